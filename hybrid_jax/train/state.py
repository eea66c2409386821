"""The train state, created directly in its sharded layout."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hybrid_jax.parallel.rules import Rules, logical_shardings


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes; checkpoints save exactly this."""

    step: jax.Array  # train-step calls so far (micro-steps under gradient accumulation)
    params: Any
    batch_stats: Any  # BatchNorm running statistics; {} for models without BatchNorm
    opt_state: optax.OptState
    ema_params: Any  # exponential moving average of params; None when disabled
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so resuming needs no key bookkeeping


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], *,
                       seed: int, use_ema: bool, mesh: Mesh, rules: Rules) -> tuple[TrainState, TrainState]:
    """Initialises the state so every array is born sharded as the logical rules say.

    The init runs under `jax.eval_shape` first to learn the state's structure and the
    logical axis names of its parameters (optimizer moments and EMA inherit them,
    because optax maps over the boxed parameters); a jit with those out_shardings then
    materialises each shard on its own device.

    Returns:
      (state, state shardings), the latter to hand to jit as in/out shardings.
    """
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        images = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init({"params": init_rng, "dropout": init_rng}, images, train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                          ema_params=params if use_ema else None, rng=state_rng)

    rng = jax.random.PRNGKey(seed)
    shardings = logical_shardings(jax.eval_shape(init, rng), mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings
