"""EdgeNeXt (Maaz et al., ECCV Workshops 2022, arXiv 2206.10589): ConvNeXt stages with transposed attention.

A hierarchical hybrid of four stages (strides 4, 8, 16, 32), each a run of
ConvNeXt-style *conv encoders* (depthwise kxk conv, LayerNorm, inverted-bottleneck
MLP, LayerScale, residual; kernel 3, 5, 7, 9 from stage 1 to 4) ending, in stages
2-4, with one *split depth-wise transpose attention* (SDTA) encoder:
- the channels are split into s groups; each group but the last goes through a
  depthwise 3x3 conv after adding the previous group's output (Res2Net-style), so
  later groups see larger receptive fields (s = 2, 3, 4 in stages 2, 3, 4);
- in stage 2 only, XCiT's Fourier position encoding (sine / cosine of normalised
  coordinates, 1x1-projected) is added to the tokens;
- *transposed* (cross-covariance) attention: queries and keys are L2-normalised
  along the spatial axis and attention runs across channels, a C/h x C/h map per
  head scaled by a learned per-head temperature, so its cost is linear in the
  number of pixels;
- then LayerNorm, an inverted-bottleneck MLP and LayerScale, added to the block's
  input (the split convs and attention feed only the MLP's input, as the official
  code has it).
A patchify stem (4x4 conv, stride 4, LayerNorm) starts the network; later stages
downsample with LayerNorm + 2x2 stride-2 conv; the head is average pooling,
LayerNorm and a linear classifier. Every LayerNorm uses eps 1e-6.

Transposed attention runs through the shared `dot_product_attention` with the roles
of the axes swapped: channels are the sequence positions (each head has C/h of
them) and pixels are the feature dimension, i.e. q, k, v enter as
[batch, C/h, heads, H*W]. The learned temperature is per head, so it cannot be the
entry point's scalar `scale`: it multiplies the normalised queries instead and the
entry point runs with scale 1, which is the same softmax(T * q_n k_n^T) v. The
"head dim" seen by the entry point is H*W, so on GPU `auto` chooses cuDNN only where
the map is small enough (H*W <= 256 on Hopper, a multiple of 8) and XLA elsewhere.

Layout, names and numbers follow timm's `edgenext_*` (the official mmaaz60/EdgeNeXt
weights); `hybrid_jax/convert/edgenext.py` converts them.
"""

import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.conv import Conv2d
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import DENSE_INIT, Mlp, classifier
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import grid_to_tokens
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
LN_EPS = 1e-6


def fourier_position_encoding(height: int, width: int, hidden_dim: int = 32,
                              temperature: float = 10000.0) -> np.ndarray:
    """XCiT's position features [height, width, 2 * hidden_dim]: (sin, cos) pairs of y, then of x.

    Coordinates run over (1..n) / n * 2 pi along each side, so the features depend
    only on relative position within the map and any map size works.
    """
    eps = 1e-6
    y = np.arange(1, height + 1, dtype=np.float32) / (height + eps) * 2 * np.pi
    x = np.arange(1, width + 1, dtype=np.float32) / (width + eps) * 2 * np.pi
    dim_t = temperature ** (2 * (np.arange(hidden_dim) // 2) / hidden_dim).astype(np.float32)

    def encode(coord: np.ndarray) -> np.ndarray:
        angles = coord[:, None] / dim_t  # [n, hidden_dim]
        # Even channels take the sine, odd ones the cosine, interleaved as (sin_0, cos_1, sin_2, cos_3, ...).
        return np.stack([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=-1).reshape(len(coord), -1)

    pos_y = np.broadcast_to(encode(y)[:, None], (height, width, hidden_dim))
    pos_x = np.broadcast_to(encode(x)[None, :], (height, width, hidden_dim))
    return np.concatenate([pos_y, pos_x], axis=-1)


def _layer_scale(module: nn.Module, name: str, init_value: float, features: int) -> jax.Array:
    return module.param(name, with_logical_partitioning(nn.initializers.constant(init_value), ("embed",)),
                        (features,), module.param_dtype)


class ConvEncoder(nn.Module):
    """ConvNeXt block: x + gamma * mlp(norm(dwconv(x)))."""

    kernel_size: int = 7
    expand_ratio: float = 4.0
    layer_scale: float = 1e-6  # initial LayerScale value; 0 disables it
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        y = Conv2d(c, self.kernel_size, groups=c, use_bias=True, name="conv_dw", **kw)(x)
        y = Mlp(int(self.expand_ratio * c), name="mlp", **kw)(layer_norm(LN_EPS, name="norm", **kw)(y), train=train)
        if self.layer_scale > 0:
            y = y * _layer_scale(self, "gamma", self.layer_scale, c).astype(y.dtype)
        return x + DropPath(self.drop_path)(y, train=train)


class CrossCovarianceAttention(nn.Module):
    """XCA: softmax over channels of (temperature * q_n k_n^T), q_n / k_n L2-normalised over tokens; times v."""

    num_heads: int
    qkv_bias: bool = True
    attn_impl: str = "auto"  # xla | cudnn | auto
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: tokens [B, N, C] -> [B, N, C]."""
        c = x.shape[-1]
        dense = lambda features, axes, name, use_bias: Dense(
            features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=with_logical_partitioning(DENSE_INIT, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        qkv = dense(3 * c, ("embed", "heads"), "qkv", self.qkv_bias)(x)
        # Channels become the sequence: [B, C/h, heads, N].
        q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b d h n", three=3, h=self.num_heads)
        normalize = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
        temperature = self.param("temperature", with_logical_partitioning(nn.initializers.ones, ("heads",)),
                                 (self.num_heads,), self.param_dtype)
        q = normalize(q) * temperature.astype(q.dtype)[:, None]
        out = dot_product_attention(q, normalize(k), v, scale=1.0, implementation=self.attn_impl)
        out = einops.rearrange(out, "b d h n -> b n (h d)")
        return dense(c, ("heads", "embed"), "proj", True)(out)


def _chunks(features: int, num: int) -> list[int]:
    """Split points of `features` channels into `num` groups as torch.chunk makes them (equal, last smaller)."""
    size = math.ceil(features / num)
    points = list(range(size, features, size))
    if len(points) != num - 1:
        raise ValueError(f"{features} channels cannot be chunked into {num} groups of {size}")
    return points


class SDTAEncoder(nn.Module):
    """Split depth-wise transpose attention: Res2Net-style depthwise convs over channel groups, XCA, MLP."""

    num_heads: int = 8
    scales: int = 2  # channel groups; all but the last pass a depthwise 3x3 conv
    use_pos_emb: bool = False
    expand_ratio: float = 4.0
    layer_scale: float = 1e-6
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        num_convs = max(1, self.scales - 1)
        groups = jnp.split(x, _chunks(c, num_convs + 1), axis=-1)
        outputs, y = [], groups[0]
        for i in range(num_convs):
            if i > 0:
                y = y + groups[i]
            y = Conv2d(y.shape[-1], 3, groups=y.shape[-1], use_bias=True, name=f"convs_{i}", **kw)(y)
            outputs.append(y)
        y = jnp.concatenate(outputs + [groups[-1].astype(y.dtype)], axis=-1)
        if self.use_pos_emb:
            pos = jnp.asarray(fourier_position_encoding(h, w), self.dtype)[None]
            y = add_shared(y, Conv2d(c, 1, use_bias=True, name="pos_embd", **kw)(pos))
        tokens = grid_to_tokens(y)
        attn = CrossCovarianceAttention(self.num_heads, attn_impl=self.attn_impl, name="xca", **kw)(
            layer_norm(LN_EPS, name="norm_xca", **kw)(tokens))
        if self.layer_scale > 0:
            attn = attn * _layer_scale(self, "gamma_xca", self.layer_scale, c).astype(attn.dtype)
        tokens = tokens + DropPath(self.drop_path)(attn, train=train)
        y = Mlp(int(self.expand_ratio * c), name="mlp", **kw)(layer_norm(LN_EPS, name="norm", **kw)(tokens),
                                                              train=train)
        if self.layer_scale > 0:
            y = y * _layer_scale(self, "gamma", self.layer_scale, c).astype(y.dtype)
        return x + DropPath(self.drop_path)(y.reshape(b, h, w, c), train=train)


class EdgeNeXtStage(nn.Module):
    """Optional LayerNorm + 2x2 stride-2 conv downsampling, conv encoders, then `num_global` SDTA encoders."""

    features: int
    depth: int
    downsample: bool
    num_global: int = 1
    kernel_size: int = 7
    num_heads: int = 8
    scales: int = 2
    use_pos_emb: bool = False
    expand_ratio: float = 4.0
    layer_scale: float = 1e-6
    drop_path_rates: Sequence[float] = ()
    attn_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = layer_norm(LN_EPS, name="downsample_norm", **kw)(x)
            x = Conv2d(self.features, 2, 2, padding=0, use_bias=True, name="downsample_conv", **kw)(x)
        rates = self.drop_path_rates or (0.0,) * self.depth
        conv_encoder, sdta_encoder = checkpointed(ConvEncoder, self.remat), checkpointed(SDTAEncoder, self.remat)
        for i in range(self.depth):
            if i < self.depth - self.num_global:
                x = conv_encoder(self.kernel_size, self.expand_ratio, self.layer_scale, rates[i], name=f"blocks_{i}",
                                **kw)(x, train=train)
            else:
                x = sdta_encoder(self.num_heads, self.scales, self.use_pos_emb, self.expand_ratio, self.layer_scale,
                                rates[i], self.attn_impl, name=f"blocks_{i}", **kw)(x, train=train)
        return nn.with_logical_constraint(x, MAP)


class EdgeNeXt(ImageClassifier):
    """EdgeNeXt: patchify stem, four stages of conv encoders + SDTA encoders, pooled LayerNorm head."""

    dims: Sequence[int] = (24, 48, 88, 168)
    depths: Sequence[int] = (3, 3, 9, 3)
    global_blocks: Sequence[int] = (0, 1, 1, 1)  # SDTA encoders at the end of each stage
    kernel_sizes: Sequence[int] = (3, 5, 7, 9)
    heads: Sequence[int] = (8, 8, 8, 8)
    scales: Sequence[int] = (2, 2, 3, 4)  # SDTA channel groups per stage
    use_pos_emb: Sequence[bool] = (False, True, False, False)
    expand_ratio: float = 4.0
    layer_scale: float = 1e-6
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem_conv = Conv2d(self.dims[0], 4, 4, padding=0, use_bias=True, **kw)
        self.stem_norm = layer_norm(LN_EPS, **kw)
        rates = drop_path_schedule(self.drop_path_rate, self.depths)
        self.stages = [
            EdgeNeXtStage(self.dims[i], self.depths[i], i > 0, self.global_blocks[i], self.kernel_sizes[i],
                          self.heads[i], self.scales[i], self.use_pos_emb[i], self.expand_ratio, self.layer_scale,
                          rates[i], self.attn_impl, self.remat, **kw)
            for i in range(len(self.dims))]
        self.norm = layer_norm(LN_EPS, **kw)
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.dims[-1]

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The patchify stem and each stage (strides 4, 4, 8, 16, 32)."""
        return (FeatureInfo("stem", self.dims[0], 4),
                *(FeatureInfo(f"stage{i + 1}", dim, 4 * 2 ** i) for i, dim in enumerate(self.dims)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Maps after the stem and after each stage."""
        return run_stages(self.stem_norm(self.stem_conv(x)), self.stages, train=train)

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The pooled, normalised features."""
        return {"pooled": self.norm(jnp.mean(features[f"stage{len(self.dims)}"], axis=(1, 2)))}


# Parameters and GMACs ("MAdds") at 256 px and top-1: the official mmaaz60/EdgeNeXt README (its model table), which
# timm's entry points repeat; timm's own parameter count is used (it equals the README's to its rounding). Base's
# 82.5 is the normal recipe (83.7 with USI distillation, the weights timm ships as edgenext_base.usi_in1k). Our
# jaxpr count (conv and matmul multiply-adds, XCA's two channel-by-channel products included) equals
# torch.utils.flop_counter on timm's model and is 0.3-1.2% below the README's figures.
_SOURCE = ("params: timm edgenext_{v} count (README {p}M); GMACs at 256 px and top-1: mmaaz60/EdgeNeXt README "
           "(EdgeNeXt-{n}; our count {g})")
VARIANTS = {
    "edgenext_xx_small": (dict(depths=(2, 2, 6, 2), dims=(24, 48, 88, 168), heads=(4, 4, 4, 4)),
                          PaperFigures(1.327216, 0.261, 71.2, _SOURCE.format(v="xx_small", p=1.33, n="XXS", g=0.258))),
    "edgenext_x_small": (dict(depths=(3, 3, 9, 3), dims=(32, 64, 100, 192), heads=(4, 4, 4, 4)),
                         PaperFigures(2.336804, 0.538, 75.0, _SOURCE.format(v="x_small", p=2.34, n="XS", g=0.533))),
    "edgenext_small": (dict(depths=(3, 3, 9, 3), dims=(48, 96, 160, 304)),
                       PaperFigures(5.586832, 1.26, 79.4, _SOURCE.format(v="small", p=5.59, n="S", g=1.253))),
    "edgenext_base": (dict(depths=(3, 3, 9, 3), dims=(80, 160, 288, 584)),
                      PaperFigures(18.511292, 3.84, 82.5, _SOURCE.format(v="base", p=18.51, n="B", g=3.828))),
}

register_variants(EdgeNeXt, VARIANTS, category="hierarchical", input_size=256)

# Both encoders, the position encoding, two- and three-group splits (22 = 11 + 11 = 8 + 8 + 6, the last group
# short), one block per stage, a few ten thousand parameters. One width everywhere keeps the number of distinct
# parameter shapes (each compiled separately by eager code such as the registry tests' weight noise) small.
register_model("test_edgenext", EdgeNeXt,
               dict(dims=(22, 22, 22, 22), depths=(1, 1, 1, 1), kernel_sizes=(3, 3, 3, 3), heads=(2, 2, 2, 2),
                    scales=(2, 2, 3, 3), num_classes=10), category="hierarchical", input_size=64)
