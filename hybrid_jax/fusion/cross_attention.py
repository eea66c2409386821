"""Cross-attention fusion: tokens attend to the map's positions, and the map's positions to the tokens.

Each direction is a pre-norm residual cross-attention (as a transformer decoder's
cross-attention): queries from the stream being updated, keys and values from the
other, both LayerNormed, through `MultiHeadAttention`. Attention runs at the token
width D (heads of D / num_heads), whatever the map's width C: to_tokens projects
the map's C channels to keys and values of width D; to_local projects the map's
queries to D and the attended values back to C.

Unlike the map-shaped fusions, all tokens take part (any number, no grid needed):
the class token gathering evidence from every map position is what cross-attention
adds over pooling, as in CrossViT's class-token fusion. The map's positions attend
over all tokens, the class token included.

Each residual branch ends in a LayerScale (CaiT) starting at `layer_scale`: the
hybrid starts close to two independent branches, while the attention weights,
unlike behind a zero-initialised output, get gradient from the first step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.base import Dtype, Fusion
from hybrid_jax.layers.attention import MultiHeadAttention
from hybrid_jax.layers.drop import DropPath, LayerScale
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import grid_to_tokens


class CrossAttend(nn.Module):
    """x + LayerScale(attention(norm(x) -> norm(context))): x [B, L, Cx] attends to context [B, M, Cc].

    Heads split the width of the token stream, which is `x` or, with `context_is_tokens`, `context`.
    """

    num_heads: int
    context_is_tokens: bool = False
    layer_scale: float | None = 1e-2
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = (context if self.context_is_tokens else x).shape[-1]
        if width % self.num_heads:
            raise ValueError(f"cross_attention fusion: token width {width} is not divisible by "
                             f"num_heads={self.num_heads}")
        y = MultiHeadAttention(self.num_heads, width // self.num_heads, implementation=self.attn_impl, name="attn",
                               **kw)(layer_norm(**kw, name="norm_q")(x), layer_norm(**kw, name="norm_kv")(context),
                                     train=train)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, self.param_dtype, name="ls")(y)
        return x + DropPath(self.drop_path)(y, train=train)


class CrossAttentionFusion(Fusion):
    """Two-way cross-attention between a map [B, H, W, C] and tokens [B, N, D]."""

    num_heads: int = 4  # attention heads; must divide the token width D
    layer_scale: float | None = 1e-2  # initial LayerScale of both residuals; None disables it
    drop_path: float = 0.0
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(num_heads=self.num_heads, layer_scale=self.layer_scale, drop_path=self.drop_path,
                  attn_impl=self.attn_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        self.local_global = CrossAttend(context_is_tokens=False, **kw)  # tokens attend to the map
        self.global_local = CrossAttend(context_is_tokens=True, **kw)  # the map attends to the tokens

    def to_tokens(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        return self.local_global(tokens, grid_to_tokens(local), train=train)

    def to_local(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        return self.global_local(grid_to_tokens(local), tokens, train=train).reshape(local.shape)
