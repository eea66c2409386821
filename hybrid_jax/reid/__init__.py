"""Person re-identification: retrieval by embedding across cameras.

Modules, each with one job: `model` (BNNeck embedding head over any registry backbone),
`losses` (identity, batch-hard triplet, center), `sampler` (P x K batches), `data`
(re-ID input streams), `distance`, `evaluate` (CMC / mAP protocol), `rerank`
(k-reciprocal re-ranking) and `task` (what the training loop calls for config.task="reid").
"""
