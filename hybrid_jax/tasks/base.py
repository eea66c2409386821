"""The one interface between the training loop and what it trains for."""

import abc
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import grain
import ml_collections
import optax

from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.parallel.placement import Placement
from hybrid_jax.train.state import TrainState
from hybrid_jax.train.step import Metrics

TrainStep = Callable[[TrainState, dict], tuple[TrainState, Metrics]]
Evaluate = Callable[[Any, Any], dict[str, float]]  # (params, batch_stats) -> metrics of the eval split


def optional(value: str) -> str | None:
    """A config path, with "" (unset) as None, as the data builders take it."""
    return value or None


class Task(abc.ABC):
    """A training problem: its data, model, loss and evaluation.

    The loop shards, jits, checkpoints, logs and resumes the same way for every task;
    all it knows of the problem comes through these methods.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # An optional hook, not an abstract one: a task with no constraints of its own inherits this no-op.
    @classmethod  # noqa: B027
    def check_config(cls, config: ml_collections.ConfigDict) -> None:
        """Fails on settings this task cannot train with (ConfigError), before any data is read."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model is fed."""

    @property
    @abc.abstractmethod
    def num_train_examples(self) -> int:
        """Training examples per epoch."""

    @abc.abstractmethod
    def build_model(self, dtype: Any) -> nn.Module:
        """The network `config.model` describes, with this task's output head."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, *, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   augment: AugmentConfig, ema_decay: float, grad_accum_steps: int,
                   freeze: tuple[str, ...]) -> TrainStep:
        """The pure step function `(state, global batch) -> (state, metrics)` the loop jits."""

    @abc.abstractmethod
    def train_dataset(self) -> grain.IterDataset:
        """This process's stream of training batches, with a resumable iterator state."""

    @abc.abstractmethod
    def evaluator(self, model: nn.Module, augment: AugmentConfig, placement: Placement) -> Evaluate:
        """Scores weights on the evaluation data; every process returns the same metrics."""

    def pretrained_module(self, model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
        """The registered model inside `model` that `config.init_from` holds weights for, and its scope."""
        return model, ()

    def summary(self) -> dict[str, Any]:
        """What the run's summary names about the task."""
        return {"task": self.config.task, "model": self.config.model.name, "dataset": self.config.dataset}
