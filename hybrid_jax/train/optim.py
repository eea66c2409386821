"""The optax recipe: optimizer, warmup + cosine schedule, weight-decay mask, clipping, accumulation,
layer-wise learning-rate decay and freezing."""

import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from hybrid_jax.train.layer_decay import path_name, scale_by_layer_decay

OPTIMIZERS = ("adamw", "sgd", "lamb")


def _matches(patterns: tuple[str, ...]):
    """Whether a parameter's path matches (re.search) any of `patterns`."""
    compiled = [re.compile(pattern) for pattern in patterns]
    return lambda name: any(pattern.search(name) for pattern in compiled)


def decay_mask(params: Any, no_decay: tuple[str, ...] | None = None) -> Any:
    """True for the weights weight decay applies to: matrices and kernels, but no `no_decay` match.

    The patterns (default: config.no_decay) name the learned position tables and tokens,
    whose pull towards zero would erase what they encode; biases and norm scales are 1-D.
    """
    if no_decay is None:
        from hybrid_jax.train.config import default_config

        no_decay = tuple(default_config().no_decay)
    excluded = _matches(no_decay)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf.ndim > 1 and not excluded(path_name(path)),
                                            params)


def freeze_labels(params: Any, freeze: tuple[str, ...]) -> Any:
    """"frozen" for parameters a `freeze` pattern matches, else "train"; a box (logical axis names) is one leaf."""
    frozen = _matches(freeze)
    return jax.tree_util.tree_map_with_path(lambda path, _: "frozen" if frozen(path_name(path)) else "train", params,
                                            is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `config.learning_rate`, then cosine decay to `config.min_learning_rate`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.min_learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   model: nn.Module | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation for `config.optimizer` and its learning-rate schedule.

    Args:
      config: the run's config (optimizer, schedule, `no_decay`, `layer_decay`, `freeze`).
      total_steps: optimizer updates; with `grad_accum_steps` > 1 the train step runs that
        many times more often and `optax.MultiSteps` applies one update per group.
      model: the model trained, whose family gives the layer order; needed when
        `config.layer_decay` != 1.

    Frozen parameters (`config.freeze`) get zero updates, no weight decay, no optimizer state,
    and do not count in the clipped gradient norm.
    """
    schedule = learning_rate_schedule(config, total_steps)
    mask = lambda params: decay_mask(params, tuple(config.no_decay))
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=mask)
    elif config.optimizer == "lamb":
        opt = optax.lamb(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=mask)
    elif config.optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                          optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt) if config.clip_norm else opt
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    if config.freeze:
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()},
                             lambda params: freeze_labels(params, tuple(config.freeze)))
    if config.layer_decay != 1:
        if model is None:
            raise ValueError("config.layer_decay != 1 needs the model, whose family gives the layer order: "
                             "make_optimizer(config, total_steps, model)")
        # After the learning rate and weight decay: timm scales each layer group's learning rate.
        tx = optax.chain(tx, scale_by_layer_decay(model, config.layer_decay))
    return tx, schedule
