"""Image-to-token embeddings, the reshapes between token grids and maps, and position-embedding resampling."""

from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.conv import Conv2d, ConvNormAct
from hybrid_jax.layers.inputs import check_divisible

Dtype = Any


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected to tokens by one strided convolution (ViT)."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B, H, W, C] to a token grid [B, H / patch, W / patch, embed_dim]."""
        check_divisible(x, self.patch_size, "the patch size")
        proj = Conv2d(self.embed_dim, self.patch_size, self.patch_size, padding="VALID", use_bias=True,
                      kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype, param_dtype=self.param_dtype,
                      name="proj")
        return proj(x)


class ConvStem(nn.Module):
    """A stack of strided 3x3 conv-BN-ReLU layers, then a 1x1 projection to tokens.

    Xiao et al. 2021 ("Early convolutions help transformers see better") replace the
    patchify stem with this to make ViT training more stable.
    """

    features: Sequence[int]
    embed_dim: int
    strides: Sequence[int] | None = None  # default: 2 for every layer
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        strides = self.strides or (2,) * len(self.features)
        for i, (features, stride) in enumerate(zip(self.features, strides)):
            x = ConvNormAct(features, 3, stride, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"convs_{i}")(x, train=train)
        return Conv2d(self.embed_dim, 1, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="proj")(x)


def resample_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int], num_prefix_tokens: int = 1,
                       method: str = "bicubic") -> jax.Array:
    """Resizes a learned [1, prefix + h*w, D] position embedding to a new h' x w' grid.

    Prefix tokens (class / distillation) keep their embeddings; the grid part is
    interpolated, as when fine-tuning at a new resolution (ViT paper, section 3.2).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_side = int(round(grid.shape[1] ** 0.5))
    if old_side * old_side != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid tokens, which is not a square grid")
    if (old_side, old_side) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old_side, old_side, -1)
    grid = jax.image.resize(grid.astype(jnp.float32), (1, *new_grid, grid.shape[-1]), method=method, antialias=True)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def grid_to_tokens(grid: jax.Array) -> jax.Array:
    """A [B, h, w, C] map as [B, h*w, C] row-major tokens."""
    return einops.rearrange(grid, "b h w c -> b (h w) c")


def tokens_to_grid(tokens: jax.Array, grid: tuple[int, int],
                   num_prefix_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """Splits [B, prefix + h*w, C] tokens into the prefix (class / global tokens) and the [B, h, w, C] grid."""
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    if patches.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[1]} tokens after {num_prefix_tokens} prefix tokens do not fill a "
                         f"{grid[0]}x{grid[1]} grid")
    return prefix, einops.rearrange(patches, "b (h w) c -> b h w c", h=grid[0], w=grid[1])


def prepend_tokens(tokens: jax.Array, prefix: jax.Array) -> jax.Array:
    """[B, N, D] tokens after a learned [1, n, D] prefix (a class token), broadcast over the batch."""
    batch, _, dim = tokens.shape
    prefix = jnp.broadcast_to(prefix, (batch, prefix.shape[1], dim)).astype(tokens.dtype)
    return jnp.concatenate([prefix, tokens], axis=1)
