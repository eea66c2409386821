"""What the training loop runs for `config.task == "reid"`: spec, model, losses, train stream, evaluation.

The loop (`hybrid_jax.train.loop`) stays the one loop: it shards, jits, checkpoints and
logs as for classification, and takes from here what differs for re-identification.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import jax
import ml_collections
import numpy as np

from hybrid_jax import create_model
from hybrid_jax.reid import data
from hybrid_jax.reid.evaluate import EmbeddedSet, evaluate_retrieval
from hybrid_jax.reid.losses import ReidLossConfig
from hybrid_jax.reid.model import ReidModel
from hybrid_jax.reid.rerank import RerankConfig
from hybrid_jax.train.config import parse_overrides

Batch = dict[str, np.ndarray]


def _optional(value: str) -> str | None:
    return value or None


def describe(config: ml_collections.ConfigDict) -> data.ReidSpec:
    """Size, image shape and identities of the train split."""
    return data.describe(config.dataset, config.train_split, _optional(config.data_dir), _optional(config.manual_dir),
                         tuple(config.resize) or None)


def build_model(config: ml_collections.ConfigDict, num_identities: int, dtype: Any) -> ReidModel:
    """`config.model` from the registry, as a feature extractor under the BNNeck and identity classifier."""
    backbone = create_model(config.model, num_classes=0, dtype=dtype, **parse_overrides(config.model_overrides))
    return ReidModel(backbone, num_classes=num_identities, center_loss=config.reid.center_weight > 0, dtype=dtype)


def loss_config(config: ml_collections.ConfigDict) -> ReidLossConfig:
    r = config.reid
    return ReidLossConfig(id_weight=r.id_weight, label_smoothing=config.label_smoothing,
                          triplet_weight=r.triplet_weight, triplet_margin=r.triplet_margin,
                          center_weight=r.center_weight)


def make_train_dataset(config: ml_collections.ConfigDict) -> grain.IterDataset:
    """The P x K training stream (P = batch_size / reid.images_per_identity)."""
    return data.make_train_dataset(
        config.dataset, global_batch_size=config.batch_size, images_per_identity=config.reid.images_per_identity,
        split=config.train_split, data_dir=_optional(config.data_dir), manual_dir=_optional(config.manual_dir),
        seed=config.seed, resize=tuple(config.resize) or None, worker_count=config.worker_count,
        read_threads=config.read_threads)


def embed_split(split: str, params: Any, batch_stats: Any, *, embed_fn: Callable, to_global: Callable[[Batch], Any],
                config: ml_collections.ConfigDict) -> EmbeddedSet:
    """Embeddings of every image of a query or gallery split (padding included, marked as junk)."""
    dataset = data.make_eval_dataset(config.dataset, split=split, global_batch_size=config.eval_batch_size,
                                     data_dir=_optional(config.data_dir), manual_dir=_optional(config.manual_dir),
                                     resize=tuple(config.resize) or None, read_threads=config.read_threads)
    batches = [jax.device_get(embed_fn(params, batch_stats, to_global(batch))) for batch in dataset]
    return EmbeddedSet(*(np.concatenate([b[key] for b in batches]) for key in ("embedding", "person_id", "camera_id")))


def evaluate(params: Any, batch_stats: Any, *, embed_fn: Callable, to_global: Callable[[Batch], Any],
             config: ml_collections.ConfigDict) -> dict[str, float]:
    """rank1 / rank5 / rank10 / mAP (percent) of the query split against the gallery split.

    Args:
      embed_fn: the jitted `hybrid_jax.reid.step.embed_step`, replicating its outputs.
      to_global: turns this process's numpy batch into the global device batch.
    """
    r = config.reid
    query, gallery = (embed_split(split, params, batch_stats, embed_fn=embed_fn, to_global=to_global, config=config)
                      for split in (r.query_split, r.gallery_split))
    rerank = RerankConfig(r.rerank_k1, r.rerank_k2, r.rerank_lambda) if r.rerank else None
    return evaluate_retrieval(query, gallery, metric=r.distance, block_size=r.eval_block_size, rerank=rerank)
