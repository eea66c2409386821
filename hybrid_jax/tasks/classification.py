"""Image classification: a tfds dataset's labels, cross-entropy on the heads, accuracy on the eval split."""

import functools
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp

from hybrid_jax.data import pipeline
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.parallel.placement import Placement
from hybrid_jax.tasks.base import Evaluate, Task, TrainStep, optional
from hybrid_jax.train import step
from hybrid_jax.train.config import build_model


class ClassificationTask(Task):
    """Trains `config.model` on `config.dataset`'s labels; scores loss and accuracy on `config.eval_split`."""

    def __init__(self, config):
        super().__init__(config)
        resize = tuple(config.resize) or None
        self._train = pipeline.describe(config.dataset, config.train_split, optional(config.data_dir), resize)
        self._eval = pipeline.describe(config.dataset, config.eval_split, optional(config.data_dir), resize)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._train.image_shape

    @property
    def num_train_examples(self) -> int:
        return int(round(self._train.num_examples * self.config.train_fraction))

    def build_model(self, dtype: Any) -> nn.Module:
        return build_model(self.config.model, num_classes=self._train.num_classes, dtype=dtype,
                           remat=self.config.remat)

    def train_step(self, model, **update) -> TrainStep:
        c = self.config
        return functools.partial(step.train_step, model=model, num_classes=self._train.num_classes,
                                 label_smoothing=c.label_smoothing, head_loss=c.head_loss, **update)

    def train_dataset(self) -> grain.IterDataset:
        c = self.config
        return pipeline.make_train_dataset(
            c.dataset, global_batch_size=c.batch_size, split=c.train_split, data_dir=optional(c.data_dir),
            seed=c.seed, train_fraction=c.train_fraction if c.train_fraction < 1 else None,
            worker_count=c.worker_count, read_threads=c.read_threads, image_shape=self.image_shape,
            resize=tuple(c.resize) or None, cache_max_bytes=c.cache_max_mb * 2**20,
            random_crop_scale=tuple(c.augment.crop_scale) if c.augment.random_resized_crop and c.augment.crop_on_host
            else None)

    def evaluator(self, model: nn.Module, augment: AugmentConfig, placement: Placement) -> Evaluate:
        eval_fn = placement.jit_on_weights(functools.partial(step.eval_step, model=model, augment=augment))
        return functools.partial(self._evaluate, eval_fn=eval_fn, placement=placement)

    def _evaluate(self, params: Any, batch_stats: Any, *, eval_fn, placement: Placement) -> dict[str, float]:
        """Loss and accuracy over the whole eval split (padding masked out)."""
        c = self.config
        dataset = pipeline.make_eval_dataset(c.dataset, global_batch_size=c.eval_batch_size, split=c.eval_split,
                                             data_dir=optional(c.data_dir), image_shape=self.image_shape,
                                             resize=tuple(c.resize) or None, read_threads=c.read_threads,
                                             crop_pct=c.eval_crop_pct or None, resize_method=c.eval_interpolation)
        totals = None
        for batch in dataset:
            sums = eval_fn(params, batch_stats, placement.global_batch(batch))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        if int(totals["count"]) != self._eval.num_examples:
            raise RuntimeError(f"evaluated {int(totals['count'])} examples, expected {self._eval.num_examples}")
        return {"loss": float(totals["loss_sum"] / totals["count"]),
                "accuracy": float(totals["correct"] / totals["count"])}
