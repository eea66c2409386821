"""Person re-identification: retrieval by embedding across cameras.

Modules, each with one job: `model` (BNNeck embedding head over any registry backbone),
`losses` (identity, batch-hard triplet, center), `sampler` (P x K batches), `data`
(re-ID input streams), `distance`, `evaluate` (CMC / mAP protocol), `rerank`
(k-reciprocal re-ranking) and `step` (train and embed steps); `hybrid_jax.tasks.reid` trains it.
"""
