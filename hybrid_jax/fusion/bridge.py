"""Mobile-Former's two-way bridge (Chen et al., CVPR 2022, arXiv 2108.05895): light cross-attention.

Mobile -> Former (`to_tokens`): the tokens query the flattened map. Only the
queries are projected (token width D -> map width C); keys and values are the map's
own channels, split into heads, so the map side costs no projection at all. The
result is projected back to D, added to the tokens and post-normalised (LayerNorm).
Former -> Mobile (`to_local`): every map position queries the tokens with its own
channels; keys and values are projected from the tokens (D -> C); the result is
added to the map. Neither direction needs a token grid, so the bridge fuses a map
with any number of tokens (`num_prefix_tokens` is not used).

As in the official code (AAboys/MobileFormer, `Local2Global` / `Global2Local`):
heads split the channels contiguously, the attention scale is (C / heads)^-0.5, and
Mobile -> Former multiplies the attended features by a token-conditioned channel
gate 2 * hard_sigmoid(W tokens) before the output projection (`gate`, on in every
released model: gbr_dynamic[0]). Every Linear starts as N(0, 0.01).
"""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.base import Dtype, Fusion
from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import grid_to_tokens

LINEAR_INIT = nn.initializers.normal(0.01)  # the official init of every Linear in Mobile-Former


def linear(features: int, axes: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype,
           name: str | None = None) -> Dense:
    """A Dense layer with Mobile-Former's init and logical axes."""
    return Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=with_logical_partitioning(LINEAR_INIT, axes),
                 bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, L, C] -> [B, L, heads, C / heads], heads taking contiguous channel groups."""
    if x.shape[-1] % num_heads:
        raise ValueError(f"width {x.shape[-1]} is not divisible by {num_heads} heads")
    return einops.rearrange(x, "b l (h d) -> b l h d", h=num_heads)


class _Direction(nn.Module):
    """Fields of both directions of the bridge."""

    num_heads: int = 2
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class MobileToFormer(_Direction):
    """Tokens attend to the map: queries from the tokens, keys = values = the map's channels."""

    gate: bool = True

    @nn.compact
    def __call__(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = local.shape[-1]
        q = _split_heads(linear(c, ("embed", "heads"), name="q", **kw)(tokens), self.num_heads)
        kv = _split_heads(grid_to_tokens(local).astype(self.dtype), self.num_heads)
        out = dot_product_attention(q, kv, kv, implementation=self.attn_impl).reshape(*tokens.shape[:2], c)
        if self.gate:
            out = out * 2.0 * nn.hard_sigmoid(linear(c, ("embed", "heads"), name="alpha", **kw)(tokens))
        out = linear(tokens.shape[-1], ("heads", "embed"), name="proj", **kw)(out)
        tokens = tokens + DropPath(self.drop_path)(out, train=train)
        return layer_norm(1e-5, name="layer_norm", **kw)(tokens)


class FormerToMobile(_Direction):
    """The map attends to the tokens: queries = the map's channels, keys and values from the tokens."""

    @nn.compact
    def __call__(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = local.shape[-1]
        k = _split_heads(linear(c, ("embed", "heads"), name="k", **kw)(tokens), self.num_heads)
        v = _split_heads(linear(c, ("embed", "heads"), name="proj", **kw)(tokens), self.num_heads)
        q = _split_heads(grid_to_tokens(local).astype(self.dtype), self.num_heads)
        out = dot_product_attention(q, k, v, implementation=self.attn_impl).reshape(local.shape)
        return local + DropPath(self.drop_path)(out, train=train)


class Bridge(Fusion):
    """Mobile-Former's bridge behind the fusion interface: `to_tokens` then `to_local`.

    The two directions may see maps of different widths (in a Mobile-Former block,
    the block's input and its output); each infers its projections from its own map.
    """

    num_heads: int = 2
    gate: bool = True  # token-conditioned channel gate in Mobile -> Former (official gbr_dynamic[0])
    drop_path: float = 0.0
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(num_heads=self.num_heads, drop_path=self.drop_path, attn_impl=self.attn_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.local_global = MobileToFormer(gate=self.gate, **kw)
        self.global_local = FormerToMobile(**kw)

    def to_tokens(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        return self.local_global(local, tokens, train=train)

    def to_local(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        return self.global_local(local, tokens, train=train)
