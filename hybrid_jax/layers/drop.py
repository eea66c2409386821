"""Residual-branch regularisers: stochastic depth and LayerScale."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.axes import with_logical_partitioning

Dtype = Any


def drop_path_schedule(rate: float, depths: Sequence[int]) -> list[tuple[float, ...]]:
    """Stochastic-depth rates rising linearly from 0 to `rate` over all blocks, split per stage."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [tuple(rates[start:start + depth]) for start, depth in zip(starts, depths)]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example, rescaling the rest."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, rate: float | jax.Array | None = None) -> jax.Array:
        """`rate` overrides the field; an array rate (a scanned block's) always draws the mask."""
        rate = self.rate if rate is None else rate
        if not train or (isinstance(rate, float) and rate == 0.0):
            return x
        keep = 1.0 - rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(kept, x / keep, jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Learned per-channel scale on a residual branch (CaiT), starting small."""

    init_value: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", with_logical_partitioning(nn.initializers.constant(self.init_value), ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        return x * gamma.astype(x.dtype)
