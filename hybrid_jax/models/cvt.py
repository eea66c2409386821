"""CvT: Convolutional vision Transformer (Wu et al., ICCV 2021, arXiv 2103.15808).

A hierarchical hybrid with convolution in every stage, in two places:
- convolutional token embedding: each of the three stages starts with an
  overlapping strided convolution (7x7 stride 4, then 3x3 stride 2) and a LayerNorm,
  so the token map shrinks and widens like a CNN's;
- convolutional projection: inside attention, queries, keys and values are each
  taken from the token map through a depthwise 3x3 conv + BatchNorm before their
  linear projection; keys and values use stride 2, so attention sees a quarter of
  the tokens as keys.
The convolutions carry position, so there is no position embedding and any input
size runs. A class token joins only in the last stage and feeds the head.

Layout, names and numbers follow the official code (microsoft/CvT), which Hugging
Face's `CvtForImageClassification` reproduces; its weights convert one to one
(`hybrid_jax/convert/cvt.py`). Kept from the official code on purpose:
- attention logits are scaled by 1 / sqrt(embed_dim), the whole width, not by
  1 / sqrt(head_dim) (`self.scale = dim_out ** -0.5`);
- the class token bypasses the convolutional projections (it is concatenated to
  their outputs), and LayerNorms use PyTorch's eps 1e-5;
- stochastic depth only in the last stage, rising linearly over its blocks (the
  official configs' DROP_PATH_RATE [0, 0, 0.1]).
Because the head reads the class token alone and that token takes no convolutional
projection, the last block's query projection of the map tokens shapes the final
map (`forward_features`) but not the logits.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import TOKENS, with_logical_partitioning
from hybrid_jax.layers.conv import Conv2d, ConvNormAct
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import DENSE_INIT, HEAD_INIT, Mlp, classifier
from hybrid_jax.layers.model import ImageClassifier
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import grid_to_tokens, prepend_tokens, tokens_to_grid
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, as the official code


class ConvEmbed(nn.Module):
    """Convolutional token embedding: an overlapping strided conv, then LayerNorm over channels."""

    features: int
    patch_size: int = 7
    stride: int = 4
    padding: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(self.features, self.patch_size, self.stride, self.padding, use_bias=True, name="proj", **kw)(x)
        return layer_norm(LN_EPS, name="norm", **kw)(x)


class ConvAttention(nn.Module):
    """Multi-head attention whose q / k / v come from depthwise conv + BN projections of the token map."""

    num_heads: int
    qkv_bias: bool = True
    kernel_size: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    proj_drop: float = 0.0
    implementation: str = "auto"  # xla | cudnn | auto
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int], *, with_cls: bool, train: bool) -> jax.Array:
        """x: [B, (1 +) h*w, C] tokens of an h x w map (class token first when `with_cls`)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, c = x.shape
        cls, grid = tokens_to_grid(x, size, int(with_cls))
        dense = lambda axes, name, use_bias: Dense(
            c, use_bias=use_bias, name=name, kernel_init=with_logical_partitioning(DENSE_INIT, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]), **kw)

        def project(name: str, stride: int) -> jax.Array:
            y = ConvNormAct(c, self.kernel_size, stride, groups=c, act="identity", name=f"conv_proj_{name}", **kw)(
                grid, train=train)
            y = grid_to_tokens(y)
            if with_cls:
                y = jnp.concatenate([cls.astype(y.dtype), y], axis=1)
            y = dense(("embed", "heads"), f"proj_{name}", self.qkv_bias)(y)
            return y.reshape(b, -1, self.num_heads, c // self.num_heads)

        q, k, v = project("q", self.stride_q), project("k", self.stride_kv), project("v", self.stride_kv)
        # The official scale: the full width, not the head width.
        out = dot_product_attention(q, k, v, scale=c ** -0.5, implementation=self.implementation)
        out = dense(("heads", "embed"), "proj", True)(out.reshape(b, n, c))
        return nn.Dropout(self.proj_drop)(out, deterministic=not train)


class CvtBlock(nn.Module):
    """Pre-norm transformer block with convolutional projections: x + attn(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_size: int = 3
    stride_kv: int = 2
    stride_q: int = 1
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int], *, with_cls: bool, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = ConvAttention(self.num_heads, self.qkv_bias, self.kernel_size, stride_q=self.stride_q,
                          stride_kv=self.stride_kv, proj_drop=self.drop_rate, implementation=self.attn_impl,
                          name="attn", **kw)(
            layer_norm(LN_EPS, name="norm1", **kw)(x), size, with_cls=with_cls, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), dropout=self.drop_rate, name="mlp", **kw)(
            layer_norm(LN_EPS, name="norm2", **kw)(x), train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return nn.with_logical_constraint(x, TOKENS)


class CvtStage(nn.Module):
    """Convolutional token embedding, an optional class token, then `depth` blocks; returns (map, class token)."""

    features: int
    depth: int
    num_heads: int
    patch_size: int
    patch_stride: int
    patch_padding: int
    with_cls: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_qkv: int = 3
    stride_kv: int = 2
    stride_q: int = 1
    drop_rate: float = 0.0
    drop_path_rates: Sequence[float] = ()
    attn_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array | None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvEmbed(self.features, self.patch_size, self.patch_stride, self.patch_padding, name="embed", **kw)(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        size = x.shape[1:3]
        x = grid_to_tokens(x)
        if self.with_cls:
            cls = self.param("cls_token", with_logical_partitioning(HEAD_INIT, (None, None, "embed")),
                             (1, 1, self.features), self.param_dtype)
            x = prepend_tokens(x, cls)
        rates = self.drop_path_rates or (0.0,) * self.depth
        block = checkpointed(CvtBlock, self.remat)
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.kernel_qkv, self.stride_kv, self.stride_q,
                         self.drop_rate, rates[i], self.attn_impl, name=f"blocks_{i}", **kw)(
                x, size, with_cls=self.with_cls, train=train)
        cls, x = tokens_to_grid(x, size, int(self.with_cls))
        return x, cls if self.with_cls else None


class CvT(ImageClassifier):
    """CvT: three stages of convolutional embedding + convolutional-projection transformer blocks, then a head."""

    embed_dims: Sequence[int] = (64, 192, 384)
    depths: Sequence[int] = (1, 2, 10)
    num_heads: Sequence[int] = (1, 3, 6)
    patch_sizes: Sequence[int] = (7, 3, 3)
    patch_strides: Sequence[int] = (4, 2, 2)
    patch_paddings: Sequence[int] = (2, 1, 1)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    kernel_qkv: int = 3
    stride_kv: int = 2
    stride_q: int = 1
    cls_token: bool = True  # a class token in the last stage feeds the head; False: mean of the last map's tokens
    attn_impl: str = "auto"  # xla | cudnn | auto
    # drop_path_rate acts in the last stage only, as the official configs

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last = len(self.depths) - 1
        self.stages = [
            CvtStage(self.embed_dims[i], self.depths[i], self.num_heads[i], self.patch_sizes[i], self.patch_strides[i],
                     self.patch_paddings[i], self.cls_token and i == last, self.mlp_ratio, self.qkv_bias,
                     self.kernel_qkv, self.stride_kv, self.stride_q, self.drop_rate,
                     drop_path_schedule(self.drop_path_rate, (self.depths[i],))[0] if i == last else (),
                     self.attn_impl, self.remat, **kw)
            for i in range(len(self.depths))]
        self.norm = layer_norm(LN_EPS, **kw)
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.embed_dims[-1]

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Each stage's token map (strides 4, 8, 16); no stem: the first stage's embedding is the first conv."""
        return tuple(FeatureInfo(f"stage{i + 1}", dim, math.prod(self.patch_strides[:i + 1]))
                     for i, dim in enumerate(self.embed_dims))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Each stage's token map [B, h, w, C], and the class token [B, C] where the last stage has one."""
        features = {}
        for i, stage in enumerate(self.stages):
            x, cls = stage(x, train=train)
            features[f"stage{i + 1}"] = x
        if cls is not None:
            features["cls_token"] = cls[:, 0]
        return features

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The normed class token, or the mean of the last map's normed tokens."""
        if "cls_token" in features:
            return {"pooled": self.norm(features["cls_token"])}
        return {"pooled": jnp.mean(self.norm(grid_to_tokens(features[f"stage{len(self.depths)}"])), axis=1)}


# Parameters: the exact count of the official / Hugging Face model with a 1000-class head (the README rounds
# 20.00M and 31.62M to 20M and 32M); GMACs ("FLOPs") and top-1: the official README, ImageNet-1k at 224 px.
_CVT = ("params: Hugging Face CvtForImageClassification(num_labels=1000) count, which the microsoft/CvT README "
        "rounds to 20M / 32M; GMACs (README 'FLOPs') and top-1: microsoft/CvT README, ImageNet-1k at 224")
VARIANTS = {
    "cvt_13": (dict(depths=(1, 2, 10)), PaperFigures(19.997480, 4.5, 81.6, _CVT)),
    "cvt_21": (dict(depths=(1, 4, 16)), PaperFigures(31.622696, 7.1, 82.5, _CVT)),
}

register_variants(CvT, VARIANTS, category="hierarchical")

# Two stages, both strides and every projection at about 20k parameters, so its compilation stays quick. Without
# the class token: with it, the last block's query projection of the map tokens cannot reach the logits (only the
# class token is classified), which the registry-wide gradient test would flag; tests/test_cvt.py checks that path.
register_model("test_cvt", CvT, dict(embed_dims=(16, 24), depths=(1, 1), num_heads=(1, 2), patch_sizes=(7, 3),
                                     patch_strides=(4, 2), patch_paddings=(2, 1), cls_token=False, num_classes=10),
               category="hierarchical", input_size=32)
