"""BoTNet: Bottleneck Transformers (Srinivas et al., CVPR 2021, arXiv 2101.11605).

A ResNet whose last bottleneck blocks swap their 3x3 convolution for global
multi-head self-attention (MHSA) over the whole feature map: 1x1 conv -> MHSA ->
BN-ReLU -> 1x1 conv, with the usual shortcut. A strided block attends at its input
resolution and then average-pools 2x2. Attention is made position-aware by 2-D
relative position logits: each query q at (y, x) adds q . r_h[y' - y] + q . r_w[x' - x]
for every key at (y', x'), with one learned embedding per height offset and one per
width offset (Bello et al. 2019). The paper computes these with a "rel_to_abs"
pad-and-reshape of q . r over all 2n - 1 offsets; here the tables are gathered per
(query, key) pair first, the same logits with fewer multiply-adds, and they enter the
shared attention entry point as `bias`.

Category "serial": convolution stages feed attention stages (only the last stage, or
the last two, attend), as the zoo files CoAtNet, not "hierarchical" (convolution and
attention in every stage), although the network is a four-stage pyramid.

Two variants:
- `botnet50`: the paper's BoT50: ResNet-50 (7x7 stem, v1.5 bottlenecks) with MHSA
  (4 heads) in all three c5 blocks. As in the paper's reference code, the position
  logits are scaled with the content logits (`scale_pos_embed`).
- `botnet26t_256`: timm's own small BoTNet (not a paper configuration; timm's weights
  `botnet26t_256.c1_in1k`): "tiered" three-conv stem, two blocks per stage, one MHSA
  block in stage 3 and two in stage 4, position logits added unscaled. Converts from
  timm one to one (`hybrid_jax/convert/botnet.py`).

The relative tables are sized for the feature maps at `img_size`; at another input
size they are resampled (linear over offsets), which timm does not offer.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.conv import Bottleneck, ConvNormAct, max_pool_3x3
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import DENSE_INIT, classifier
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.layers.norm import norm_2d
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
BLOCK_TYPES = ("C", "A")  # C: conv bottleneck, A: attention bottleneck


def offset_index(size: int) -> np.ndarray:
    """[size, size] row of the 2*size - 1 offset table for each (query, key) pair: key - query + size - 1."""
    positions = np.arange(size)
    return (positions[None, :] - positions[:, None] + size - 1).astype(np.int32)


def relative_logits(q: jax.Array, height_rel: jax.Array, width_rel: jax.Array) -> jax.Array:
    """BoTNet's 2-D relative position logits.

    Args:
      q: queries [B, h, w, heads, d] over an h x w map.
      height_rel: [2h - 1, d] embeddings of the height offsets key_y - query_y, from -(h - 1) to h - 1.
      width_rel: [2w - 1, d] embeddings of the width offsets.

    Returns:
      [B, heads, h*w, h*w]: q . height_rel[y' - y] + q . width_rel[x' - x] for query (y, x), key (y', x').
    """
    b, h, w, heads, _ = q.shape
    rel_h = height_rel[offset_index(h)].astype(q.dtype)  # [h (query), h (key), d]
    rel_w = width_rel[offset_index(w)].astype(q.dtype)
    logits_h = jnp.einsum("byxnd,ykd->bnyxk", q, rel_h)
    logits_w = jnp.einsum("byxnd,xkd->bnyxk", q, rel_w)
    logits = logits_h[..., :, None] + logits_w[..., None, :]  # [B, heads, h, w, h', w']
    return logits.reshape(b, heads, h * w, h * w)


def _resize_offsets(table: jax.Array, size: int) -> jax.Array:
    """A [2n - 1, d] offset table resampled (linear) to 2 * size - 1 offsets."""
    if table.shape[0] == 2 * size - 1:
        return table
    return jax.image.resize(table.astype(jnp.float32), (2 * size - 1, table.shape[1]), "linear").astype(table.dtype)


class BottleneckAttention(nn.Module):
    """MHSA over the whole map with 2-D relative position logits; a fused bias-free 1x1 q/k/v projection."""

    feat_size: tuple[int, int]  # the map the offset tables are sized for
    num_heads: int = 4
    scale_pos_embed: bool = False  # scale position logits by 1/sqrt(d) with the content logits (paper) or not (timm)
    qkv_bias: bool = False
    implementation: str = "auto"  # xla | cudnn | auto
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
        d = c // self.num_heads
        qkv = Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv",
                    kernel_init=with_logical_partitioning(DENSE_INIT, ("embed", "heads")),
                    bias_init=with_logical_partitioning(nn.initializers.zeros, ("heads",)))(x)
        # Channels are [q | k | v], each head-major, as timm's 1x1 conv.
        q, k, v = (t.reshape(b, h * w, self.num_heads, d) for t in jnp.split(qkv, 3, axis=-1))
        init = with_logical_partitioning(nn.initializers.normal(d ** -0.5), (None, "kv"))
        height_rel = self.param("height_rel", init, (2 * self.feat_size[0] - 1, d), self.param_dtype)
        width_rel = self.param("width_rel", init, (2 * self.feat_size[1] - 1, d), self.param_dtype)
        bias = relative_logits(q.reshape(b, h, w, self.num_heads, d), _resize_offsets(height_rel, h),
                               _resize_offsets(width_rel, w))
        scale = d ** -0.5
        bias = bias * scale if self.scale_pos_embed else bias
        out = dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=self.implementation)
        return out.reshape(b, h, w, c)


class BoTBlock(nn.Module):
    """Bottleneck Transformer block: 1x1 conv-BN-ReLU, MHSA (then 2x2 average pool if strided), BN-ReLU, 1x1 conv-BN."""

    features: int  # bottleneck width; the block outputs 4x this
    strides: int = 1
    feat_size: tuple[int, int] = (14, 14)
    num_heads: int = 4
    scale_pos_embed: bool = False
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_features = self.features * self.expansion
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = ConvNormAct(out_features, 1, self.strides, act="identity", name="downsample", **kw)(
                x, train=train)
        y = ConvNormAct(self.features, 1, name="conv1", **kw)(x, train=train)
        y = BottleneckAttention(self.feat_size, self.num_heads, self.scale_pos_embed, implementation=self.attn_impl,
                                name="attn", **kw)(y)
        if self.strides == 2:
            y = nn.avg_pool(y, (2, 2), strides=(2, 2))
        y = nn.relu(norm_2d("batch", train=train, name="post_attn", **kw)(y))
        y = ConvNormAct(out_features, 1, act="identity", zero_init_norm=True, name="conv3", **kw)(y, train=train)
        return nn.relu(DropPath(self.drop_path)(y, train=train) + shortcut)


def _conv_out(size: int) -> int:
    """Side after a stride-2 conv or max pool with PyTorch's k // 2 padding (3x3 and 7x7)."""
    return (size - 1) // 2 + 1


class BoTStage(nn.Module):
    """A stage of conv ("C") and attention ("A") bottlenecks; the first block strides and widens."""

    blocks: str  # one letter per block, e.g. "CA"
    features: int  # bottleneck width
    strides: int = 1
    in_size: int = 56  # input map side at the model's img_size, to size the attention tables
    num_heads: int = 4
    scale_pos_embed: bool = False
    drop_path_rates: Sequence[float] = ()
    attn_impl: str = "auto"
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rates = self.drop_path_rates or (0.0,) * len(self.blocks)
        bottleneck, bot_block = checkpointed(Bottleneck, self.remat), checkpointed(BoTBlock, self.remat)
        size = self.in_size
        for i, kind in enumerate(self.blocks):
            strides = self.strides if i == 0 else 1
            if kind == "C":
                x = bottleneck(self.features, strides, drop_path=rates[i], name=f"blocks_{i}", **kw)(x, train=train)
                size = _conv_out(size) if strides == 2 else size
            elif kind == "A":
                x = bot_block(self.features, strides, (size, size), self.num_heads, self.scale_pos_embed, rates[i],
                             self.attn_impl, name=f"blocks_{i}", **kw)(x, train=train)
                size = size // strides
            else:
                raise ValueError(f"unknown block type {kind!r}; choose one of {BLOCK_TYPES}")
        return nn.with_logical_constraint(x, MAP)


class BoTNet(ImageClassifier):
    """ResNet-style stem, four bottleneck stages mixing conv and attention blocks, average pool, linear head."""

    img_size: int = 224  # sizes the relative position tables; other inputs resample them
    layout: Sequence[str] = ("CCC", "CCCC", "CCCCCC", "AAA")  # per stage, one letter per block: C conv, A attention
    widths: Sequence[int] = (256, 512, 1024, 2048)  # stage output widths; bottlenecks are a quarter of them
    stem_type: str = "7x7"  # 7x7 (ResNet) | tiered (3x3 convs of width/8*3, width/2, width: timm's ResNet-T)
    stem_width: int = 64
    num_heads: int = 4
    scale_pos_embed: bool = False
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.stem_type == "7x7":
            self.stem = [ConvNormAct(self.stem_width, 7, 2, **kw)]
        elif self.stem_type == "tiered":
            w = self.stem_width
            self.stem = [ConvNormAct(width, 3, 2 if i == 0 else 1, **kw)
                         for i, width in enumerate((3 * w // 8, w // 2, w))]
        else:
            raise ValueError(f"unknown stem_type {self.stem_type!r}; choose 7x7 or tiered")
        rates = drop_path_schedule(self.drop_path_rate, [len(blocks) for blocks in self.layout])
        stages, size = [], _conv_out(_conv_out(self.img_size))
        for i, (blocks, width) in enumerate(zip(self.layout, self.widths)):
            strides = 1 if i == 0 else 2
            stages.append(BoTStage(blocks, width // BoTBlock.expansion, strides, size, self.num_heads,
                                   self.scale_pos_embed, rates[i], self.attn_impl, self.remat, **kw))
            size = _conv_out(size) if strides == 2 else size
        self.stages = stages
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.widths[-1]

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The max-pooled stem (stride 4) and each stage (strides 4, 8, 16, 32)."""
        return (FeatureInfo("stem", self.stem_width, 4),
                *(FeatureInfo(f"stage{i + 1}", width, 4 * 2 ** i) for i, width in enumerate(self.widths)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Feature maps after the stem (max-pooled) and after each stage."""
        for conv in self.stem:
            x = conv(x, train=train)
        return run_stages(max_pool_3x3(x), self.stages, train=train)


_TIMM = ("timm botnet26t_256.c1_in1k (a timm config, not the paper's): params and GMACs from timm "
         "results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, top-1 from results/results-imagenet.csv")
_BOT50 = ("BoT50, the paper's layout (ResNet-50 with MHSA in all three c5 blocks): params and GMACs at 224 measured "
          "on timm's ByobNet built with that layout (torch FlopCounterMode): 20.85M, the paper's 20.8M (recalled, "
          "not read here); 4.02 GMACs = ResNet-50's 4.09 minus c5's 3x3 convs plus MHSA. No top-1: the paper's "
          "224 px figure (78.3, recalled) could not be checked here")
VARIANTS = {
    "botnet26t_256": (dict(img_size=256, layout=("CC", "CC", "CA", "AA"), stem_type="tiered"),
                      PaperFigures(12.49, 3.32, 79.256, _TIMM)),
    "botnet50": (dict(img_size=224, scale_pos_embed=True), PaperFigures(20.852008, 4.025, None, _BOT50)),
}

register_variants(BoTNet, VARIANTS, category="serial")  # each at its img_size

# A conv bottleneck, a strided and a plain attention block and the tiered stem at about 20k parameters.
register_model("test_botnet", BoTNet, dict(img_size=32, layout=("C", "AA"), widths=(16, 32), stem_type="tiered",
                                           stem_width=16, num_heads=2, num_classes=10),
               category="serial", input_size=32)
