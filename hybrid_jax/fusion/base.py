"""The one interface every fusion module follows, and the reshapes between maps and tokens.

A parallel hybrid carries two streams: a CNN feature map `local` [B, H, W, C] and
transformer tokens `tokens` [B, N, D]. A fusion module exchanges information
between them in both directions, one method per direction:

  tokens = fusion.to_tokens(local, tokens, train=...)   # CNN -> transformer
  local = fusion.to_local(local, tokens, train=...)     # transformer -> CNN
  local, tokens = fusion(local, tokens, train=...)      # both, tokens first

Shapes are preserved. Parallel models call the two directions at different points
of a block (Conformer: map -> tokens before the transformer block, tokens -> map
after it); generic hybrids call `__call__` between blocks.

Tokens are `num_prefix_tokens` free tokens (a class token, Mobile-Former's global
tokens) followed by an optional row-major grid. Map-shaped fusions (concat, add,
gating, fcu) need the grid and its side must divide the map's; attention-based
ones (cross_attention, bridge) take any tokens.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.patch import tokens_to_grid

Dtype = Any


class Fusion(nn.Module):
    """Base class: subclasses define `setup`, `to_tokens` and `to_local`."""

    num_prefix_tokens: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def to_tokens(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define to_tokens")

    def to_local(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define to_local")

    def __call__(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        tokens = self.to_tokens(local, tokens, train=train)
        return self.to_local(local, tokens, train=train), tokens

    def split_tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
        """(prefix tokens, grid tokens as a [B, h, w, D] map, (h, w)) for a square grid."""
        count = tokens.shape[1] - self.num_prefix_tokens
        side = math.isqrt(max(count, 0))
        if side * side != count or side == 0:
            raise ValueError(f"{type(self).__name__} needs a square token grid after {self.num_prefix_tokens} "
                             f"prefix tokens; got {count} grid tokens")
        return *tokens_to_grid(tokens, (side, side), self.num_prefix_tokens), (side, side)


def map_to_grid(local: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Average-pools a [B, H, W, C] map down to a [B, h, w, C] token grid (H, W multiples of h, w)."""
    (h, w), (H, W) = grid, local.shape[1:3]
    if H % h or W % w:
        raise ValueError(f"feature map {H}x{W} is not a multiple of the token grid {h}x{w}")
    return nn.avg_pool(local, (H // h, W // w), strides=(H // h, W // w))


def grid_to_map(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour upsampling of a [B, h, w, C] grid to the map's [B, H, W, C]."""
    (H, W), (h, w) = size, grid.shape[1:3]
    return jnp.repeat(jnp.repeat(grid, H // h, axis=1), W // w, axis=2)
