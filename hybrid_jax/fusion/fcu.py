"""Conformer's Feature Coupling Unit (Peng et al., ICCV 2021, arXiv 2105.03889).

Two light projections between a CNN map [B, H, W, C] and transformer tokens
[B, prefix + h*w, D], as the official code's `FCUDown` and `FCUUp`
(pengzhiliang/Conformer, conformer.py):

  down (map -> tokens):  1x1 conv C -> D (with bias) at the map's resolution,
                         average pool H/h x W/w, LayerNorm, GELU
  up (tokens -> map):    the grid tokens (prefix dropped) as an h x w map, 1x1 conv
                         D -> C (with bias), BatchNorm, ReLU, nearest upsample to H x W

Both directions are residual here, which is how Conformer uses them:
  to_tokens(local, tokens) = tokens + [0, down(local)]   (prefix tokens unchanged)
  to_local(local, tokens) = local + up(tokens)

Where Conformer's wiring sits: `to_local` is exact when `local` is the activation
after the first 1x1 conv of the block that receives the transformer's features (the
official ConvBlock adds FCUUp's map there, before its 3x3 conv). For `to_tokens`, the
official FCUDown returns its grid with the stream's own class token in front, and the
block adds that to the stream, so the class token enters the next transformer block
doubled. That is a property of Conformer, not of the coupling: `to_tokens` leaves
prefix tokens unchanged (as every fusion here does) and the Conformer model adds the
class token once more itself (hybrid_jax/models/conformer.py, ConvTransBlock).

Widths come from the inputs: down projects to the token width, up to the map's width.
The 1x1 conv of down runs at the map's resolution as in the official code (pooling
first would give the same result for less work, but a different MAC count from the
paper's). LayerNorm and BatchNorm use epsilon 1e-6, as the official code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.base import Dtype, Fusion, grid_to_map, map_to_grid
from hybrid_jax.layers.conv import Conv2d
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.patch import grid_to_tokens, prepend_tokens

EPS = 1e-6  # the official FCU's LayerNorm and BatchNorm epsilon


class FCUDown(nn.Module):
    """CNN map -> token grid: 1x1 conv to the token width, average pool to the grid, LayerNorm, GELU."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, local: jax.Array, grid: jax.Array) -> jax.Array:
        """Projects `local` [B, H, W, C] onto the shape of the token grid `grid` [B, h, w, D]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(grid.shape[-1], 1, padding=0, use_bias=True, name="conv_project", **kw)(local)
        x = map_to_grid(x, grid.shape[1:3])
        return nn.gelu(layer_norm(EPS, name="ln", **kw)(x), approximate=False)


class FCUUp(nn.Module):
    """Token grid -> CNN map: 1x1 conv to the map width, BatchNorm, ReLU, nearest upsample."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, grid: jax.Array, local: jax.Array, *, train: bool) -> jax.Array:
        """Projects the token grid `grid` [B, h, w, D] onto the shape of `local` [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(local.shape[-1], 1, padding=0, use_bias=True, name="conv_project", **kw)(grid)
        x = nn.relu(norm_2d("batch", train=train, epsilon=EPS, name="bn", **kw)(x))
        return grid_to_map(x, local.shape[1:3])


class FeatureCouplingUnit(Fusion):
    """Conformer's FCU behind the fusion interface: residual FCUDown into the tokens, FCUUp into the map."""

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.squeeze_block = FCUDown(**kw)  # official names: ConvTransBlock.squeeze_block / expand_block
        self.expand_block = FCUUp(**kw)

    def to_tokens(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        prefix, grid, _ = self.split_tokens(tokens)
        grid = grid + self.squeeze_block(local, grid).astype(grid.dtype)
        return prepend_tokens(grid_to_tokens(grid), prefix)

    def to_local(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        _, grid, _ = self.split_tokens(tokens)
        return local + self.expand_block(grid, local, train=train).astype(local.dtype)
