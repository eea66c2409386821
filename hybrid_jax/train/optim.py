"""The optax recipe: optimizer, warmup + cosine schedule, weight-decay mask, clipping, accumulation."""

from typing import Any

import jax
import ml_collections
import optax

# Parameters that are never decayed besides biases and norm scales (all 1-D): learned
# positions and tokens, whose pull towards zero would erase what they encode.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "tokens", "relative_position_bias_table", "rel_pos")

OPTIMIZERS = ("adamw", "sgd", "lamb")


def decay_mask(params: Any, no_decay_names: tuple[str, ...] = NO_DECAY_NAMES) -> Any:
    """True for the weights weight decay applies to: matrices and kernels, not biases, norms or embeddings."""
    def decays(path, leaf) -> bool:
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        return leaf.ndim > 1 and not names & set(no_decay_names)
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `config.learning_rate`, then cosine decay to `config.min_learning_rate`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.min_learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                   optax.Schedule]:
    """The gradient transformation for `config.optimizer` and its learning-rate schedule.

    `total_steps` counts optimizer updates; with `grad_accum_steps` > 1 the train step
    runs that many times more often and `optax.MultiSteps` applies one update per group.
    """
    schedule = learning_rate_schedule(config, total_steps)
    mask = lambda params: decay_mask(params, tuple(config.no_decay_names))
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
    return tx, schedule
