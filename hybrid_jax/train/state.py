"""The train state, created directly in its sharded layout."""

from collections.abc import Callable
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
    ema_batch_stats: Any  # the same average of batch_stats, evaluated with ema_params; None when disabled
    rng: jax.Array  # base key; step k uses fold_in(rng, k), so resuming needs no key bookkeeping


def plan_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], *,
                     seed: int, use_ema: bool, mesh: Mesh,
                     rules: Rules) -> tuple[Callable[[], TrainState], TrainState, TrainState]:
    """How to build the state sharded, without building it (a resumed run restores instead).

    The init runs under `jax.eval_shape` to learn the state's structure and the logical
    axis names of its parameters (optimizer moments and EMA inherit them, because optax
    maps over the boxed parameters); a jit with the resulting out_shardings then
    materialises each shard on its own device, so no host ever holds the whole state.

    Returns:
      (init: builds the state, abstract state of ShapeDtypeStructs carrying shardings,
      state shardings for jit's in/out_shardings).
    """
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        images = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init({"params": init_rng, "dropout": init_rng}, images, train=False)
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), ema_params=params if use_ema else None,
                          ema_batch_stats=batch_stats if use_ema else None, rng=state_rng)

    rng = jax.random.PRNGKey(seed)
    boxed = jax.eval_shape(init, rng)
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)

    def build() -> TrainState:
        with jax.set_mesh(mesh):
            return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)

    return build, abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], *,
                       seed: int, use_ema: bool, mesh: Mesh, rules: Rules) -> tuple[TrainState, TrainState]:
    """A fresh sharded state and its shardings (see `plan_train_state`)."""
    build, _, shardings = plan_train_state(model, tx, image_shape, seed=seed, use_ema=use_ema, mesh=mesh,
                                           rules=rules)
    return build(), shardings
