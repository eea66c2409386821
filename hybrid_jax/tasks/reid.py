"""Person re-identification: P x K batches, ID + triplet (+ center) loss, retrieval of queries in a gallery."""

import functools
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.parallel.placement import Placement
from hybrid_jax.reid import data
from hybrid_jax.reid import step as reid_step
from hybrid_jax.reid.evaluate import EmbeddedSet, evaluate_retrieval
from hybrid_jax.reid.losses import ReidLossConfig
from hybrid_jax.reid.model import ReidModel
from hybrid_jax.reid.rerank import RerankConfig
from hybrid_jax.tasks.base import Evaluate, Task, TrainStep, optional
from hybrid_jax.train.config import ConfigError, build_model

DISTANCES = ("cosine", "euclidean")


class ReidTask(Task):
    """Trains a BNNeck embedding over `config.model`; scores rank-1/5/10 and mAP of queries against the gallery."""

    def __init__(self, config):
        super().__init__(config)
        self._spec = data.describe(config.dataset, config.train_split, optional(config.data_dir),
                                   optional(config.manual_dir), tuple(config.resize) or None)

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        k = config.reid.images_per_identity
        if k < 2 or config.batch_size % k:
            raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of config.reid."
                              f"images_per_identity={k} (>= 2, so every image has a positive for the triplet loss).")
        if config.augment.mixup_alpha or config.augment.cutmix_alpha:
            raise ConfigError("config.augment.mixup_alpha and cutmix_alpha must be 0 for re-ID: a blended image has "
                              "no single identity for the triplet loss.")
        if config.reid.distance not in DISTANCES:
            raise ConfigError(f"config.reid.distance={config.reid.distance!r}; choose one of {DISTANCES}.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._spec.image_shape

    @property
    def num_train_examples(self) -> int:
        return self._spec.num_examples

    def build_model(self, dtype: Any) -> ReidModel:
        """`config.model` as a feature extractor under the BNNeck and identity classifier."""
        backbone = build_model(self.config.model, num_classes=0, dtype=dtype, remat=self.config.remat)
        return ReidModel(backbone, num_classes=self._spec.num_identities,
                         center_loss=self.config.reid.center_weight > 0, dtype=dtype)

    def pretrained_module(self, model: ReidModel) -> tuple[nn.Module, tuple[str, ...]]:
        return model.backbone, ("backbone",)

    def train_step(self, model, **update) -> TrainStep:
        c, r = self.config, self.config.reid
        losses = ReidLossConfig(id_weight=r.id_weight, label_smoothing=c.label_smoothing,
                                triplet_weight=r.triplet_weight, triplet_margin=r.triplet_margin,
                                center_weight=r.center_weight)
        return functools.partial(reid_step.train_step, model=model, losses=losses, **update)

    def train_dataset(self) -> grain.IterDataset:
        """The P x K training stream (P = batch_size / reid.images_per_identity)."""
        c = self.config
        return data.make_train_dataset(
            c.dataset, global_batch_size=c.batch_size, images_per_identity=c.reid.images_per_identity,
            split=c.train_split, data_dir=optional(c.data_dir), manual_dir=optional(c.manual_dir), seed=c.seed,
            resize=tuple(c.resize) or None, worker_count=c.worker_count, read_threads=c.read_threads)

    def evaluator(self, model: ReidModel, augment: AugmentConfig, placement: Placement) -> Evaluate:
        # Embeddings come back replicated: every process ranks the whole query set against the whole gallery.
        embed_fn = placement.jit_on_weights(functools.partial(reid_step.embed_step, model=model, augment=augment))
        return functools.partial(self._evaluate, embed_fn=embed_fn, placement=placement)

    def _embed_split(self, split: str, params: Any, batch_stats: Any, *, embed_fn, placement: Placement
                     ) -> EmbeddedSet:
        """Embeddings of every image of a query or gallery split (padding included, marked as junk)."""
        c = self.config
        dataset = data.make_eval_dataset(c.dataset, split=split, global_batch_size=c.eval_batch_size,
                                         data_dir=optional(c.data_dir), manual_dir=optional(c.manual_dir),
                                         resize=tuple(c.resize) or None, read_threads=c.read_threads)
        batches = [jax.device_get(embed_fn(params, batch_stats, placement.global_batch(b))) for b in dataset]
        return EmbeddedSet(*(np.concatenate([b[key] for b in batches])
                             for key in ("embedding", "person_id", "camera_id")))

    def _evaluate(self, params: Any, batch_stats: Any, *, embed_fn, placement: Placement) -> dict[str, float]:
        """rank1 / rank5 / rank10 / mAP (percent) of the query split against the gallery split."""
        r = self.config.reid
        query, gallery = (self._embed_split(split, params, batch_stats, embed_fn=embed_fn, placement=placement)
                          for split in (r.query_split, r.gallery_split))
        rerank = RerankConfig(r.rerank_k1, r.rerank_k2, r.rerank_lambda) if r.rerank else None
        return evaluate_retrieval(query, gallery, metric=r.distance, block_size=r.eval_block_size, rerank=rerank)
