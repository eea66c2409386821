"""Image-to-token embeddings and position-embedding resampling."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.conv import Conv2d, ConvNormAct

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
        height, width = x.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                             f"resize or crop the input to a multiple of {self.patch_size}")
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
