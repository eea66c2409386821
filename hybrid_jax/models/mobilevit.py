"""MobileViT (Mehta & Rastegari, ICLR 2022, arXiv 2110.02178): transformers as convolutions.

A hierarchical hybrid of five stages (strides 2, 4, 8, 16, 32 after a stride-2 stem):
- the first two stages are MobileNetV2 inverted residuals (1x1 expand, depthwise
  3x3, 1x1 project; SiLU; a residual where stride and width allow);
- each of the last three is one strided inverted residual followed by a *MobileViT
  block*: a 3x3 conv and a 1x1 conv (local features, widened to the transformer
  width), *unfold* into 2x2 patches, a stack of pre-norm transformer blocks that
  attend across patches (pixel p of every patch sees pixel p of every other patch),
  *fold* back into a map, a 1x1 conv back to the stage width, concatenation with the
  block's input and a 3x3 fusion conv;
- a 1x1 conv widens the last map (320 / 384 / 640 channels), then average pooling
  and a linear classifier.
There is no position embedding: the convolutions carry position, so any input size
runs. Where a map side is not a multiple of the patch size, the map is resized
(bilinear, half-pixel centres, no antialiasing) up to the next multiple for the
transformer and back afterwards, as the official code, timm and Hugging Face do.

Layout and numbers follow timm's `mobilevit_*` (a ByobNet built from the apple/
ml-cvnets configs, whose weights it carries) and Hugging Face's
`MobileViTForImageClassification`; both convert into this module
(`hybrid_jax/convert/mobilevit.py`). Kept from them: LayerNorm eps 1e-5, SiLU in the
transformer MLPs (2x expansion), 4 heads everywhere, and no residual around a
strided or widening inverted residual (timm's `downsample=''`). Stochastic depth
rises linearly over the blocks as timm schedules it (a MobileViT block counts as one
block and passes its rate to each of its transformer layers).
"""

import math
from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.attention import MultiHeadAttention
from hybrid_jax.layers.axes import MAP, TOKENS
from hybrid_jax.layers.conv import Conv2d, ConvNormAct, InvertedResidual
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import Mlp, classifier
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
LN_EPS = 1e-5  # PyTorch's nn.LayerNorm default, as timm and Hugging Face use here


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of an NHWC map, as PyTorch's interpolate(mode="bilinear", align_corners=False)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


def unfold(x: jax.Array, patch_size: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, H, W, C] -> [B * p * p, N, C]: one sequence of N patches per pixel position within a patch.

    Sides not divisible by `patch_size` are resized up to the next multiple first.
    Returns the sequences and the patch grid (n_h, n_w).
    """
    h, w = x.shape[1:3]
    n_h, n_w = math.ceil(h / patch_size), math.ceil(w / patch_size)
    x = _resize(x, n_h * patch_size, n_w * patch_size)
    return einops.rearrange(x, "b (nh ph) (nw pw) c -> (b ph pw) (nh nw) c", ph=patch_size, pw=patch_size), (n_h, n_w)


def fold(x: jax.Array, grid: tuple[int, int], patch_size: int, size: tuple[int, int]) -> jax.Array:
    """Inverse of `unfold`: [B * p * p, N, C] -> [B, H, W, C] (resized back to `size` if unfold resized)."""
    x = einops.rearrange(x, "(b ph pw) (nh nw) c -> b (nh ph) (nw pw) c", ph=patch_size, pw=patch_size, nh=grid[0],
                         nw=grid[1])
    return _resize(x, *size)


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer over patch sequences: x + attn(norm(x)), then x + mlp(norm(x)) with SiLU."""

    num_heads: int = 4
    mlp_ratio: float = 2.0
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = MultiHeadAttention(self.num_heads, proj_drop=self.drop_rate, implementation=self.attn_impl, name="attn",
                               **kw)(layer_norm(LN_EPS, name="norm1", **kw)(x), train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), act="silu", dropout=self.drop_rate, name="mlp", **kw)(
            layer_norm(LN_EPS, name="norm2", **kw)(x), train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return nn.with_logical_constraint(x, TOKENS)


class MobileViTBlock(nn.Module):
    """Local convs, unfold into patches, transformer across patches, fold, project, fuse with the input."""

    transformer_dim: int
    depth: int
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    kernel_size: int = 3
    act: str = "silu"
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda features, kernel_size, name: ConvNormAct(features, kernel_size, act=self.act, name=name, **kw)
        width, size = x.shape[-1], x.shape[1:3]
        y = conv(width, self.kernel_size, "conv_kxk")(x, train=train)
        y = Conv2d(self.transformer_dim, 1, name="conv_1x1", **kw)(y)
        tokens, grid = unfold(y, self.patch_size)
        for i in range(self.depth):
            tokens = TransformerBlock(self.num_heads, self.mlp_ratio, self.drop_rate, self.drop_path, self.attn_impl,
                                      name=f"transformer_{i}", **kw)(tokens, train=train)
        tokens = layer_norm(LN_EPS, name="norm", **kw)(tokens)
        y = fold(tokens, grid, self.patch_size, size)
        y = conv(width, 1, "conv_proj")(y, train=train)
        y = conv(width, self.kernel_size, "conv_fusion")(jnp.concatenate([x.astype(y.dtype), y], axis=-1), train=train)
        return nn.with_logical_constraint(y, MAP)


class MobileViTStage(nn.Module):
    """`depth` inverted residuals (the first strided), then a MobileViT block where `transformer_dim` is set."""

    features: int
    depth: int
    strides: int
    expand_ratio: float
    transformer_dim: int = 0  # 0: no MobileViT block (a MobileNetV2 stage)
    transformer_depth: int = 0
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    drop_rate: float = 0.0
    drop_path_rates: Sequence[float] = ()  # one per block, the MobileViT block counted as one
    attn_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = self.drop_path_rates or (0.0,) * (self.depth + bool(self.transformer_dim))
        inverted_residual = checkpointed(InvertedResidual, self.remat)
        mobilevit_block = checkpointed(MobileViTBlock, self.remat)
        for i in range(self.depth):
            x = inverted_residual(self.features, self.expand_ratio, strides=self.strides if i == 0 else 1, act="silu",
                                 drop_path=rates[i], name=f"blocks_{i}", **kw)(x, train=train)
        if self.transformer_dim:
            # Named after its index in the stage, as timm's `stages.i.j`.
            x = mobilevit_block(self.transformer_dim, self.transformer_depth, self.patch_size, self.num_heads,
                               self.mlp_ratio, drop_rate=self.drop_rate, drop_path=rates[self.depth],
                               attn_impl=self.attn_impl, name=f"blocks_{self.depth}", **kw)(x, train=train)
        return nn.with_logical_constraint(x, MAP)


class MobileViT(ImageClassifier):
    """MobileViT: 3x3 stem, two MobileNetV2 stages, three MobileViT stages, 1x1 expansion conv, pooled head."""

    stem_width: int = 16
    widths: Sequence[int] = (32, 64, 96, 128, 160)
    depths: Sequence[int] = (1, 3, 1, 1, 1)  # inverted residuals per stage
    strides: Sequence[int] = (1, 2, 2, 2, 2)
    expand_ratio: float = 4.0
    transformer_dims: Sequence[int] = (0, 0, 144, 192, 240)  # 0: no MobileViT block in that stage
    transformer_depths: Sequence[int] = (0, 0, 2, 4, 3)
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    num_features: int = 640  # width of the final 1x1 conv, i.e. of the pooled features
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem = ConvNormAct(self.stem_width, 3, strides=2, act="silu", **kw)
        blocks = [depth + bool(dim) for depth, dim in zip(self.depths, self.transformer_dims)]
        rates = drop_path_schedule(self.drop_path_rate, blocks)
        self.stages = [
            MobileViTStage(self.widths[i], self.depths[i], self.strides[i], self.expand_ratio,
                           self.transformer_dims[i], self.transformer_depths[i], self.patch_size, self.num_heads,
                           self.mlp_ratio, self.drop_rate, rates[i], self.attn_impl, self.remat, **kw)
            for i in range(len(self.widths))]
        self.final_conv = ConvNormAct(self.num_features, 1, act="silu", **kw)
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem (stride 2) and each stage (strides 2, 4, 8, 16, 32 in every variant)."""
        infos, stride = [FeatureInfo("stem", self.stem_width, 2)], 2
        for i, (width, strides) in enumerate(zip(self.widths, self.strides)):
            stride *= strides
            infos.append(FeatureInfo(f"stage{i + 1}", width, stride))
        return tuple(infos)

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Maps after the stem and after each stage."""
        return run_stages(self.stem(x, train=train), self.stages, train=train)

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The map after the final 1x1 conv and its spatial mean, the pooled features."""
        x = self.final_conv(features[f"stage{len(self.widths)}"], train=train)
        return {"final_conv": x, "pooled": jnp.mean(x, axis=(1, 2))}


# Parameters: timm's exact count (the paper rounds to 1.3M / 2.3M / 5.6M). GMACs at 256 px, attention matmuls
# included: mmpretrain's configs/mobilevit README (0.42 / 1.05 / 2.03, models converted from ml-cvnets); our
# jaxpr count is 0.407 / 1.026 / 2.001, equal to torch.utils.flop_counter on timm's model with unfused attention
# (with timm's fused attention that counter sees no attention matmuls: 0.329 / 0.909 / 1.823). Top-1: the paper's
# ImageNet-1k figures at 256 px (78.4 for S also in its abstract); mmpretrain re-measured the converted ml-cvnets
# weights at 69.02 / 74.75 / 78.25.
_SOURCE = ("params: timm mobilevit_{v} count (paper: {p}M); GMACs at 256 px: mmpretrain configs/mobilevit README "
           "(attention matmuls included; our count {g}); top-1: paper arXiv 2110.02178, MobileViT-{n}")
VARIANTS = {
    "mobilevit_xxs": (dict(widths=(16, 24, 48, 64, 80), expand_ratio=2.0, transformer_dims=(0, 0, 64, 80, 96),
                           num_features=320),
                      PaperFigures(1.272024, 0.42, 69.0, _SOURCE.format(v="xxs", p=1.3, g=0.407, n="XXS"))),
    "mobilevit_xs": (dict(widths=(32, 48, 64, 80, 96), transformer_dims=(0, 0, 96, 120, 144), num_features=384),
                     PaperFigures(2.317848, 1.05, 74.8, _SOURCE.format(v="xs", p=2.3, g=1.026, n="XS"))),
    "mobilevit_s": (dict(), PaperFigures(5.578632, 2.03, 78.4, _SOURCE.format(v="s", p=5.6, g=2.001, n="S"))),
}

register_variants(MobileViT, VARIANTS, category="hierarchical", input_size=256)

# Every block kind at a few ten thousand parameters, one MobileViT block and one width, so that compiling (and the
# registry tests' eager per-shape weight noise) stays fast on CPU. At 40 px the MobileViT block's map is 5 x 5, so
# the tiny model also runs the resize that unfolding an odd side into 2 x 2 patches needs.
register_model("test_mobilevit", MobileViT,
               dict(stem_width=16, widths=(16, 16, 16, 16, 16), depths=(1, 1, 1, 1, 1), expand_ratio=2.0,
                    transformer_dims=(0, 0, 16, 0, 0), transformer_depths=(0, 0, 1, 0, 0), num_heads=2,
                    num_features=32, num_classes=10),
               category="hierarchical", input_size=40)
