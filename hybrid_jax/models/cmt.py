"""CMT: Convolutional Neural Networks Meet Vision Transformers (Guo et al., CVPR 2022, arXiv 2107.06263).

A hierarchical hybrid with convolution and attention in every stage. After a
convolutional stem (3x3 stride-2 conv, two 3x3 convs, each GELU then BatchNorm),
four stages each start with a 2x2 stride-2 conv + LayerNorm and stack CMT blocks:
- Local Perception Unit (LPU): x + depthwise 3x3 conv(x), local structure and
  position before attention;
- Lightweight MHSA (LMHSA): keys and values come from the map shrunk k x k by a
  depthwise k x k stride-k conv + BatchNorm (k = 8, 4, 2, 1 over the stages), and a
  learned bias B is added to the logits;
- Inverted Residual FFN (IRFFN): 1x1 expand, depthwise 3x3 with its own residual,
  1x1 project, each followed by BatchNorm (GELU after the first two).
The head widens to 1280 by a 1x1 conv + BatchNorm + Swish, pools and classifies.

Structure and numbers follow the official code (huawei-noah/Efficient-AI-Backbones,
`cmt_pytorch/cmt.py`, which ships the released weights), including what the paper
leaves open:
- the "relative position bias" B is a free learned [heads, N, N / k^2] tensor per
  stage, shared by every block of the stage (not a table indexed by displacement),
  so its size follows `img_size`; at another input size it is resampled;
- the stem applies GELU before BatchNorm; the patch-embedding LayerNorm uses eps 1e-5,
  the blocks' 1e-6; convolutions carry biases; attention scales by 1 / sqrt(head_dim).
There is no timm or Hugging Face CMT, so no converter and no parity test in the suite.
Parameter counts and multiply-adds equal the official code's, and with the same random
weights all four variants gave its logits to 1.5e-6 (checked once by hand: the official
code is a repository, not an installable package).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.attention import MultiHeadAttention
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.conv import Conv2d, ConvNormAct
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import classifier
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.patch import grid_to_tokens
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
# The official code initialises B with torch.randn (std 1) and never re-initialises it.
BIAS_INIT = nn.initializers.normal(1.0)


def stage_grids(img_size: int, sr_ratios: Sequence[int]) -> list[tuple[int, int]]:
    """(query side, key side) of each stage's attention at `img_size`: stride 4, 8, 16, 32; keys shrunk by sr."""
    grids, side = [], img_size // 2
    for sr in sr_ratios:
        side //= 2
        grids.append((side, side // sr))
    return grids


def resize_attention_bias(bias: jax.Array, query: tuple[int, int], key: tuple[int, int]) -> jax.Array:
    """A learned [heads, hq*wq, hk*wk] bias resampled (bilinear over both grids) for new query and key grids."""
    heads, n, m = bias.shape
    q0, k0 = round(n ** 0.5), round(m ** 0.5)
    if (q0 * q0, k0 * k0) != (n, m):
        raise ValueError(f"attention bias {bias.shape} is not over square query and key grids")
    if (q0, q0, k0, k0) == (*query, *key):
        return bias
    grid = bias.reshape(heads, q0, q0, k0, k0).astype(jnp.float32)
    grid = jax.image.resize(grid, (heads, *query, *key), method="linear")
    return grid.reshape(heads, query[0] * query[1], key[0] * key[1]).astype(bias.dtype)


class Stem(nn.Module):
    """3x3 stride-2 conv, then two 3x3 convs, each with a bias and followed by GELU, then BatchNorm."""

    features: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(3):
            x = Conv2d(self.features, 3, 2 if i == 0 else 1, use_bias=True, name=f"conv{i + 1}", **kw)(x)
            x = norm_2d("batch", train=train, name=f"norm{i + 1}", **kw)(get_act("gelu")(x))
        return x


class IRFFN(nn.Module):
    """Inverted residual FFN: 1x1 -> GELU -> BN, depthwise 3x3 + shortcut -> GELU -> BN, 1x1 -> BN."""

    hidden_features: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gelu = get_act("gelu")
        norm = lambda name: norm_2d("batch", train=train, name=name, **kw)
        drop = lambda y: nn.Dropout(self.drop_rate)(y, deterministic=not train)
        hidden, out = self.hidden_features, x.shape[-1]
        y = drop(norm("norm1")(gelu(Conv2d(hidden, 1, use_bias=True, name="conv1", **kw)(x))))
        y = Conv2d(hidden, 3, groups=hidden, use_bias=True, name="dwconv", **kw)(y) + y
        y = norm("norm2")(gelu(y))
        return drop(norm("norm3")(Conv2d(out, 1, use_bias=True, name="conv2", **kw)(y)))


class CMTBlock(nn.Module):
    """LPU (x + dwconv(x)), then x + LMHSA(norm(x)) with shrunk keys / values and the stage's bias, then x + IRFFN."""

    num_heads: int
    mlp_ratio: float = 4.0
    sr_ratio: int = 1
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, H, W, C] map; bias: [heads, H*W, (H/sr)*(W/sr)] attention bias."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        x = x + Conv2d(c, 3, groups=c, use_bias=True, name="lpu", **kw)(x)
        y = layer_norm(1e-6, name="norm1", **kw)(x)
        context = y
        if self.sr_ratio > 1:
            context = ConvNormAct(c, self.sr_ratio, self.sr_ratio, padding=0, groups=c, use_bias=True,
                                  act="identity", name="sr", **kw)(y, train=train)
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, proj_drop=self.drop_rate,
                               implementation=self.attn_impl, name="attn", **kw)(
            grid_to_tokens(y), grid_to_tokens(context), bias=bias, train=train)
        x = x + DropPath(self.drop_path)(y.reshape(b, h, w, c), train=train)
        y = IRFFN(int(c * self.mlp_ratio), self.drop_rate, name="ffn", **kw)(
            layer_norm(1e-6, name="norm2", **kw)(x), train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return nn.with_logical_constraint(x, MAP)


class CMTStage(nn.Module):
    """2x2 stride-2 patch embedding + LayerNorm, the stage's learned attention bias, then `depth` CMT blocks."""

    features: int
    depth: int
    num_heads: int
    sr_ratio: int
    bias_grid: tuple[int, int]  # (query side, key side) of the bias at the model's img_size
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path_rates: Sequence[float] = ()
    attn_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv2d(self.features, 2, 2, padding="VALID", use_bias=True, name="patch_embed", **kw)(x)
        x = layer_norm(1e-5, name="patch_norm", **kw)(x)
        q, k = self.bias_grid
        bias = self.param("relative_pos", with_logical_partitioning(BIAS_INIT, ("heads", None, None)),
                          (self.num_heads, q * q, k * k), self.param_dtype)
        h, w = x.shape[1:3]
        if h < self.sr_ratio or w < self.sr_ratio:
            raise ValueError(f"a {h}x{w} map is smaller than the key reduction {self.sr_ratio}; use a larger input")
        bias = resize_attention_bias(bias, (h, w), (h // self.sr_ratio, w // self.sr_ratio))
        rates = self.drop_path_rates or (0.0,) * self.depth
        block = checkpointed(CMTBlock, self.remat)
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, self.sr_ratio, self.qkv_bias, self.drop_rate, rates[i],
                         self.attn_impl, name=f"blocks_{i}", **kw)(x, bias.astype(x.dtype), train=train)
        return x


class CMT(ImageClassifier):
    """CMT: convolutional stem, four stages of LPU + lightweight MHSA + IRFFN blocks, 1x1 conv head."""

    img_size: int = 224  # sizes the learned attention biases; other inputs resample them
    embed_dims: Sequence[int] = (46, 92, 184, 368)
    depths: Sequence[int] = (2, 2, 10, 2)
    num_heads: Sequence[int] = (1, 2, 4, 8)
    mlp_ratio: float = 3.6
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    stem_width: int = 16
    fc_dim: int = 1280
    qkv_bias: bool = True
    head_drop_rate: float = 0.1  # before the classifier (the official `dp`); drop_rate acts inside the blocks
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem = Stem(self.stem_width, **kw)
        rates = drop_path_schedule(self.drop_path_rate, self.depths)
        grids = stage_grids(self.img_size, self.sr_ratios)
        self.stages = [CMTStage(self.embed_dims[i], self.depths[i], self.num_heads[i], self.sr_ratios[i], grids[i],
                                self.mlp_ratio, self.qkv_bias, self.drop_rate, rates[i], self.attn_impl, self.remat,
                                **kw)
                       for i in range(len(self.depths))]
        self.head_conv = ConvNormAct(self.fc_dim, 1, use_bias=True, act="silu", **kw)
        self.head_drop, self.head = classifier(self.num_classes, self.head_drop_rate, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.fc_dim

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem (stride 2) and each stage (strides 4, 8, 16, 32)."""
        return (FeatureInfo("stem", self.stem_width, 2),
                *(FeatureInfo(f"stage{i + 1}", dim, 2 ** (i + 2)) for i, dim in enumerate(self.embed_dims)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The stem's map and each stage's map."""
        return run_stages(self.stem(x, train=train), self.stages, train=train)

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The spatial mean after the 1x1 head conv."""
        return {"pooled": jnp.mean(self.head_conv(features[f"stage{len(self.depths)}"], train=train), axis=(1, 2))}


# Parameters: the official code's count at each variant's resolution (equal to the paper's 9.5M, 15.2M and 45.7M
# for Ti, XS and B). GMACs and top-1: the paper (arXiv 2107.06263), GMACs to one decimal; the official code
# measures Ti 0.639, XS 1.547, S 4.032, B 9.317 GMACs (torch FlopCounterMode: convs and matmuls), as we do.
_PAPER = "GMACs, top-1: CMT paper (arXiv 2107.06263) ImageNet table; params: official cmt_pytorch/cmt.py count"
_TI_NOTE = ("; GMACs: the official code's 0.639 (the paper prints 0.6, one decimal, more than 5% below it); "
            "top-1: paper 79.1 (the official README: 79.0)")
_S_NOTE = ("; the paper's 25.1M for CMT-S does not match the official cmt_s config (26.26M with the paper's own "
           "widths, depths and ratio 4, measured in the released code; ggjy/CMT.pytorch issue 7 reports such "
           "code/paper mismatches): registered at the code's count, which the released weights use")
VARIANTS = {
    "cmt_ti": (dict(img_size=160), PaperFigures(9.492426, 0.639, 79.1, _PAPER + _TI_NOTE)),
    "cmt_xs": (dict(img_size=192, embed_dims=(52, 104, 208, 416), depths=(3, 3, 12, 3), mlp_ratio=3.77),
               PaperFigures(15.247208, 1.5, 81.8, _PAPER)),
    "cmt_s": (dict(img_size=224, embed_dims=(64, 128, 256, 512), stem_width=32, depths=(3, 3, 16, 3),
                   mlp_ratio=4.0), PaperFigures(26.256160, 4.0, 83.5, _PAPER + _S_NOTE)),
    "cmt_b": (dict(img_size=256, embed_dims=(76, 152, 304, 608), stem_width=38, depths=(4, 4, 20, 4),
                   mlp_ratio=4.0, head_drop_rate=0.3), PaperFigures(45.715076, 9.3, 84.5, _PAPER)),
}

register_variants(CMT, VARIANTS, category="hierarchical")  # each at its img_size

# Two stages (keys shrunk 2x2, then not at all), the stem, IRFFN and the head conv at about 30k parameters, so its
# compilation stays quick; tests/test_cmt.py checks the four-stage layout.
register_model("test_cmt", CMT, dict(img_size=32, embed_dims=(16, 24), depths=(1, 1), num_heads=(1, 2),
                                     sr_ratios=(2, 1), mlp_ratio=2.0, stem_width=8, fc_dim=64, num_classes=10),
               category="hierarchical", input_size=32)
