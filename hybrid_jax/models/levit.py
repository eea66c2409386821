"""LeViT (Graham et al., ICCV 2021, arXiv 2104.01136): a vision transformer in a ConvNet's clothing.

A serial hybrid built for inference speed:
- a convolutional stem of four stride-2 3x3 conv + BatchNorm layers (Hardswish between)
  turns a 224 px image into a 14 x 14 map of `embed_dim[0]` channels;
- three transformer stages on that map, 14x14 -> 7x7 -> 4x4, joined by *shrinking
  attention*: queries come from every second position (the subsampled grid) while
  keys and values see the whole map, so attention itself downsamples (with more
  heads and 4x wider values), followed by a residual MLP;
- every projection is a Linear without bias followed by BatchNorm (`LinearNorm`), so
  at inference the norm folds into the linear layer (`fold_linear_norm`);
- value heads are `attn_ratio` times wider than key heads (2x in blocks, 4x in the
  shrinking attention), and a Hardswish sits between attention and its output
  projection;
- instead of position embeddings, each head adds a learned bias indexed by the
  absolute offset (|dy|, |dx|) between query and key positions;
- MLPs expand only 2x, and the head is BatchNorm + Linear, twice: a class head and a
  distillation head trained against a CNN teacher, averaged at inference.

Layout, names and numbers follow timm's `levit_*` (the official facebookresearch/LeViT
weights); Hugging Face's `LevitForImageClassificationWithTeacher` is the same network
under other names. Both convert into this module (`hybrid_jax/convert/levit.py`), as
do timm's `levit_conv_*` (the same weights stored as 1x1 convolutions).

Attention runs through the shared `dot_product_attention`; because LeViT's value
heads are wider than its key heads, the entry point zero-pads queries and keys to
the value width (unchanged logits), so the MAC count of the QK^T product is that of
the padded width. Stochastic depth uses one rate for every residual branch, as the
official code and timm do (not a linear schedule).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.conv import ConvNormAct
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import DENSE_INIT, HEAD_INIT
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.layers.patch import grid_to_tokens
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import block_sequence, run_sequence
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
BN_EPS = 1e-5  # PyTorch's BatchNorm default


def _batch_norm(axis_name: str | None, *, train: bool, zero_init: bool = False, dtype: Dtype, param_dtype: Dtype,
                name: str) -> nn.BatchNorm:
    scale = nn.initializers.zeros if zero_init else nn.initializers.ones
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS, dtype=dtype,
                        param_dtype=param_dtype, name=name,
                        scale_init=with_logical_partitioning(scale, (axis_name,)),
                        bias_init=with_logical_partitioning(nn.initializers.zeros, (axis_name,)))


class LinearNorm(nn.Module):
    """Linear without bias, then BatchNorm over its outputs: LeViT's projection, foldable into one Linear."""

    features: int
    axes: tuple[str, str] = ("embed", "mlp")  # logical names of the kernel's (in, out) dims
    zero_init: bool = False  # BN scale starts at 0, so a residual branch ending here starts as identity
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = Dense(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="linear",
                  kernel_init=with_logical_partitioning(DENSE_INIT, self.axes))(x)
        return _batch_norm(self.axes[1], train=train, zero_init=self.zero_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="bn")(x)


def fold_linear_norm(params: dict, batch_stats: dict, epsilon: float = BN_EPS) -> dict:
    """Dense params (kernel, bias) equal to a `LinearNorm` in eval mode: the BN folded into the weights."""
    scale = params["bn"]["scale"] / jnp.sqrt(batch_stats["bn"]["var"] + epsilon)
    return {"kernel": params["linear"]["kernel"] * scale,
            "bias": params["bn"]["bias"] - batch_stats["bn"]["mean"] * scale}


def attention_bias_index(key_grid: tuple[int, int], table_grid: tuple[int, int], stride: int = 1) -> np.ndarray:
    """Table entry of every (query, key) pair: |dy| * table_width + |dx|.

    Keys sit on a row-major `key_grid`; queries on every `stride`-th position of it.
    Offsets are absolute, so a table of table_h * table_w entries per head covers every
    pair of a grid up to the table's size (the grid at the model's `img_size`). On a
    larger grid, offsets beyond the table's reach are clipped to its farthest entry
    (as T5 clips relative distances), so the model also runs at larger inputs.

    Returns:
      int32 [num_queries, num_keys].
    """
    (height, width), (table_h, table_w) = key_grid, table_grid
    ky, kx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    qy, qx = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
    dy = np.minimum(np.abs(qy.reshape(-1, 1) - ky.reshape(1, -1)), table_h - 1)
    dx = np.minimum(np.abs(qx.reshape(-1, 1) - kx.reshape(1, -1)), table_w - 1)
    return (dy * table_w + dx).astype(np.int32)


class LevitAttention(nn.Module):
    """Multi-head attention with offset-indexed biases; with stride 2, shrinking attention (subsampled queries).

    stride 1: one fused `qkv` LinearNorm, per head [q | k | v].
    stride 2: `kv` from every position (per head [k | v]), `q` from every second one;
    the output has `out_features` channels on the subsampled grid.
    """

    key_dim: int
    num_heads: int
    attn_ratio: float
    table_grid: tuple[int, int]  # key grid at the model's img_size: the size of the bias table
    stride: int = 1
    out_features: int | None = None  # default: input width
    act: str = "hard_swish"
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), out_features]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        kd, vd, heads = self.key_dim, int(self.attn_ratio * self.key_dim), self.num_heads
        tokens = grid_to_tokens(x)
        if self.stride == 1:
            qkv = LinearNorm(heads * (2 * kd + vd), ("embed", "heads"), name="qkv", **kw)(tokens, train=train)
            q, k, v = jnp.split(qkv.reshape(batch, -1, heads, 2 * kd + vd), [kd, 2 * kd], axis=-1)
            out_grid = (height, width)
        else:
            kv = LinearNorm(heads * (kd + vd), ("embed", "heads"), name="kv", **kw)(tokens, train=train)
            k, v = jnp.split(kv.reshape(batch, -1, heads, kd + vd), [kd], axis=-1)
            sub = x[:, ::self.stride, ::self.stride]
            out_grid = sub.shape[1:3]
            q = LinearNorm(heads * kd, ("embed", "heads"), name="q", **kw)(
                grid_to_tokens(sub), train=train).reshape(batch, -1, heads, kd)
        table = self.param("attention_biases", with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
                           (heads, self.table_grid[0] * self.table_grid[1]), self.param_dtype)
        bias = table[:, attention_bias_index((height, width), self.table_grid, self.stride)]
        out = dot_product_attention(q, k, v, bias, scale=kd ** -0.5, implementation=self.attn_impl)
        out = get_act(self.act)(out.reshape(batch, -1, heads * vd))
        out = LinearNorm(self.out_features or channels, ("heads", "embed"), zero_init=self.stride == 1,
                         name="proj", **kw)(out, train=train)
        return out.reshape(batch, *out_grid, -1)


class LevitMlp(nn.Module):
    """LinearNorm -> act -> LinearNorm (the last BN starts at zero: the residual branch starts as identity)."""

    hidden_features: int
    act: str = "hard_swish"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = get_act(self.act)(LinearNorm(self.hidden_features, ("embed", "mlp"), name="ln1", **kw)(x, train=train))
        return LinearNorm(x.shape[-1], ("mlp", "embed"), zero_init=True, name="ln2", **kw)(y, train=train)


class LevitBlock(nn.Module):
    """x + attn(x), then x + mlp(x); LeViT has no LayerNorm, every projection carries its own BN."""

    key_dim: int
    num_heads: int
    attn_ratio: float
    mlp_ratio: float
    table_grid: tuple[int, int]
    act: str = "hard_swish"
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, drop_path: float | jax.Array | None = None) -> jax.Array:
        """`drop_path` overrides the field (a scanned stack passes it)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = LevitAttention(self.key_dim, self.num_heads, self.attn_ratio, self.table_grid, act=self.act,
                           attn_impl=self.attn_impl, name="attn", **kw)(x, train=train)
        x = x + DropPath(self.drop_path)(y, train=train, rate=drop_path)
        y = LevitMlp(int(x.shape[-1] * self.mlp_ratio), self.act, name="mlp", **kw)(x, train=train)
        return x + DropPath(self.drop_path)(y, train=train, rate=drop_path)


class LevitDownsample(nn.Module):
    """Shrinking attention (no residual: width and grid change), then a residual MLP."""

    features: int
    key_dim: int
    num_heads: int
    table_grid: tuple[int, int]
    attn_ratio: float = 4.0
    mlp_ratio: float = 2.0
    act: str = "hard_swish"
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LevitAttention(self.key_dim, self.num_heads, self.attn_ratio, self.table_grid, stride=2,
                           out_features=self.features, act=self.act, attn_impl=self.attn_impl,
                           name="attn_downsample", **kw)(x, train=train)
        y = LevitMlp(int(self.features * self.mlp_ratio), self.act, name="mlp", **kw)(x, train=train)
        return x + DropPath(self.drop_path)(y, train=train)


class LevitStage(nn.Module):
    """An optional shrinking-attention downsample, then `depth` LeViT blocks."""

    features: int
    depth: int
    key_dim: int
    num_heads: int
    attn_ratio: float
    mlp_ratio: float
    table_grid: tuple[int, int]  # grid entering the stage at img_size
    downsample: bool = False
    down_attn_ratio: float = 4.0
    down_mlp_ratio: float = 2.0
    act: str = "hard_swish"
    drop_path: float = 0.0
    attn_impl: str = "auto"
    remat: str = "none"
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(act=self.act, drop_path=self.drop_path, attn_impl=self.attn_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        grid = self.table_grid
        downsample, block = checkpointed(LevitDownsample, self.remat), checkpointed(LevitBlock, self.remat)
        if self.downsample:
            # The shrinking attention has as many heads as key_dim-wide slices of its input.
            x = downsample(self.features, self.key_dim, x.shape[-1] // self.key_dim, grid,
                           self.down_attn_ratio, self.down_mlp_ratio, name="downsample", **kw)(x, train=train)
            grid = tuple((r - 1) // 2 + 1 for r in grid)
        fields = dict(key_dim=self.key_dim, num_heads=self.num_heads, attn_ratio=self.attn_ratio,
                      mlp_ratio=self.mlp_ratio, table_grid=grid, **kw)
        x, _ = run_sequence(block_sequence(block, [fields] * self.depth, name="blocks", scan=self.scan_blocks), x,
                            train=train)
        return nn.with_logical_constraint(x, MAP)


class NormLinear(nn.Module):
    """BatchNorm, dropout, Linear: LeViT's classifier head."""

    num_classes: int
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _batch_norm("embed", train=train, dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="linear",
                     kernel_init=with_logical_partitioning(HEAD_INIT, ("embed", "classes")),
                     bias_init=with_logical_partitioning(nn.initializers.zeros, ("classes",)))(x)


class Levit(ImageClassifier):
    """LeViT: conv stem (stride 16), three attention stages joined by shrinking attention, BN+Linear heads."""

    img_size: int = 224
    embed_dim: Sequence[int] = (128, 256, 384)
    key_dim: int = 16
    depth: Sequence[int] = (2, 3, 4)
    num_heads: Sequence[int] = (4, 6, 8)
    attn_ratio: float = 2.0  # value head width / key head width in the blocks
    mlp_ratio: float = 2.0
    down_attn_ratio: float = 4.0  # the same two ratios in the shrinking attention
    down_mlp_ratio: float = 2.0
    act: str = "hard_swish"
    distilled: bool = True  # a second (distillation) head, averaged with the first
    attn_impl: str = "auto"  # xla | cudnn | auto
    # Each stage's blocks as one nn.scan (layers/scan.py): "stages_{i}/blocks_0to{depth-1}", variables stacked.
    scan_blocks: bool = False
    # drop_path_rate: the same rate on every residual branch, as the official code

    stem_stride = 16

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.embed_dim[0]
        # Four stride-2 3x3 conv + BN: widths embed_dim[0] / 8, / 4, / 2, / 1; no activation after the last.
        self.stem = [ConvNormAct(width // 2 ** (3 - i), 3, 2, act=self.act if i < 3 else "identity", **kw)
                     for i in range(4)]
        grid = (self.img_size // self.stem_stride,) * 2
        stages = []
        for i, (features, depth, heads) in enumerate(zip(self.embed_dim, self.depth, self.num_heads)):
            stages.append(LevitStage(features, depth, self.key_dim, heads, self.attn_ratio, self.mlp_ratio, grid,
                                     downsample=i > 0, down_attn_ratio=self.down_attn_ratio,
                                     down_mlp_ratio=self.down_mlp_ratio, act=self.act,
                                     drop_path=self.drop_path_rate, attn_impl=self.attn_impl, remat=self.remat,
                                     scan_blocks=self.scan_blocks, **kw))
            if i > 0:
                grid = tuple((r - 1) // 2 + 1 for r in grid)
        self.stages = stages
        if self.num_classes:
            self.head = NormLinear(self.num_classes, self.drop_rate, **kw)
            if self.distilled:
                self.head_dist = NormLinear(self.num_classes, self.drop_rate, **kw)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem (stride 16) and each stage (strides 16, 32, 64; the shrinking attention rounds sides up)."""
        return (FeatureInfo("stem", self.embed_dim[0], self.stem_stride),
                *(FeatureInfo(f"stage{i + 1}", dim, self.stem_stride * 2 ** i) for i, dim in enumerate(self.embed_dim)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The stem's map and each stage's map."""
        for conv in self.stem:
            x = conv(x, train=train)
        return run_stages(x, self.stages, train=train)

    def forward_heads(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """Class-head and distillation-head logits separately, for training against a teacher (DeiT-style)."""
        if not (self.num_classes and self.distilled):
            raise ValueError("forward_heads needs num_classes > 0 and distilled=True")
        pooled = self.forward_features(x, train=train)["pooled"]
        return self.head(pooled, train=train), self.head_dist(pooled, train=train)

    def forward_head(self, features: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """The class head's logits, or with distillation both heads' mean (timm's LevitDistilled at inference)."""
        logits = self.head(features["pooled"], train=train)
        if self.distilled:
            logits = (logits + self.head_dist(features["pooled"], train=train)) / 2
        return logits


# Parameters: timm's `levit_*` (distillation head included), which agree with the official README
# (facebookresearch/LeViT: 7.8M / 9.2M / 11M / 19M / 39M). GMACs: the official README's FLOPs, which are
# multiply-adds (305M / 406M / 658M / 1120M / 2353M; timm's benchmark csv: 0.31 / 0.41 / 0.66 / 1.13 / 2.36).
# The official counter (FLOPS_COUNTER in its levit.py) adds one op per softmax entry, and our jaxpr count adds the
# query/key columns that the shared attention entry point zero-pads to the value width: heads * Nq * Nk *
# (value_dim - key_dim) per attention, +10.0M / 15.6M / 22.7M / 30.1M / 44.9M. Without those two terms the two
# counts agree to 0.1% (LeViT-256: 1128M against the README's rounded 1120M), so ours reads 2-4% above the paper.
# Top-1: the official README / paper (timm's evaluation of the same weights: 76.52 / 78.49 / 79.86 / 81.51 / 82.60).
_SOURCE = ("params: timm levit_{name} ({params}M); GMACs: official README {macs}M FLOPs (= MACs; ours adds "
           "+2-4% of zero-padded query/key columns, see levit.py); top-1: official README / paper")
_CONFIGS = {
    # name: (fields, params M (timm), MACs M (official), top-1 (official))
    "128s": (dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)), 7.78, 305, 76.6),
    "128": (dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)), 9.21, 406, 78.6),
    "192": (dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)), 10.95, 658, 80.0),
    "256": (dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)), 18.89, 1120, 81.6),
    "384": (dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)), 39.13, 2353, 82.6),
}

VARIANTS = {f"levit_{name}": (fields, PaperFigures(params, macs / 1000, top1, _SOURCE.format(
    name=name, params=params, macs=macs))) for name, (fields, params, macs, top1) in _CONFIGS.items()}
register_variants(Levit, VARIANTS, category="serial")

# A tiny variant for the registry-wide tests: 64 px -> a 4x4 map, then 2x2 after the shrinking attention. Two
# stages only: a third would run on a 1x1 map, where attention has one key and its biases get no gradient.
register_model("test_levit", Levit, dict(img_size=64, embed_dim=(16, 24), key_dim=8, num_heads=(2, 3),
                                         depth=(1, 1), num_classes=10), category="serial", input_size=64)
