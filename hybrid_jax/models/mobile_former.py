"""Mobile-Former (Chen et al., CVPR 2022, arXiv 2108.05895): MobileNet and a tiny Transformer in parallel.

A MobileNet-style CNN ("Mobile") processes the image while a Transformer ("Former")
processes a handful of learned global tokens (6 or fewer, no patches). Each block
runs Mobile -> Former (tokens attend to the map), the Former (token self-attention
and FFN), the Mobile sub-block (inverted bottleneck whose dynamic ReLUs take their
slopes from the first token), then Former -> Mobile (the map attends to the tokens);
the bridge is `hybrid_jax.fusion.bridge.Bridge`. The head concatenates the pooled
expanded map with the first token, then an MLP and the classifier.

Structure, widths and parameter names follow the official code (AAboys/MobileFormer,
`mobile_former.py` and `dna_blocks.py`) where the paper leaves details open:
the Former's attention projects only its queries (keys = values = the tokens), the
Former has 4 heads and an FFN of ratio 2, the bridge 2 heads. Three block kinds:
"lite" (the paper's bneck-lite: depthwise expand, pointwise project, no tokens),
"down" (the strided Mobile-Former block: depthwise expand with stride, pointwise,
then a depthwise-expand / pointwise pair with a residual, `DnaBlock3`) and "block"
(pointwise expand, depthwise, pointwise, residual, `DnaBlock`). With the official
weights converted, logits equal the official PyTorch model's to 1e-7 (checked on
26M, 96M and 508M). One difference: stochastic depth drops whole examples on the
token branch too (timm's DropPath on the official [T, B, C] tokens drops single
tokens); released models train with drop-path 0, where the two agree.

Parameters equal the official code's exactly; the README rounds them to 0.1M (so
26M's 3.233M reads "3.2M"). MACs: `count_macs` (every conv and matrix product, the
bridge attentions and all token Linears included) equals fvcore's conv + linear +
matmul count of the official code exactly, and is 1.9% (508M) to 9.4% (26M) below
the README. The difference is BatchNorm: counted as 2 multiply-adds per element
(scale and shift, as fvcore counts BatchNorm in eval mode), it brings all seven
within 0.6% of the README (tests/test_mobile_former.py checks this). It weighs most
on 26M, whose grouped pointwise convs leave BatchNorm a tenth of the work. The
registry therefore holds the official code's own counts, with the README's figures
in the source string; the residual 0.6% matches no single further op.
"""

from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.bridge import Bridge, MobileToFormer, linear
from hybrid_jax.layers.attention import dot_product_attention
from hybrid_jax.layers.axes import MAP, TOKENS, with_logical_partitioning
from hybrid_jax.layers.conv import ConvNormAct
from hybrid_jax.layers.drop import DropPath
from hybrid_jax.layers.dyrelu import DynamicReLU
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.model import ImageClassifier
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any
BlockSpec = tuple[str, int, int, int, int]  # (kind: lite|down|block, expand1, out width, stride, expand2)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's channel shuffle: [.., groups * n] -> [.., n * groups], NHWC."""
    if groups <= 1:
        return x
    return einops.rearrange(x, "... (g n) -> ... (n g)", g=groups)


class Former(nn.Module):
    """Post-norm transformer block on the tokens: light self-attention (only queries projected), then FFN."""

    num_heads: int = 4
    ffn_ratio: int = 2
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, d = tokens.shape
        split = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        q = split(linear(d, ("embed", "heads"), name="q", **kw)(tokens))
        kv = split(tokens.astype(self.dtype))
        out = dot_product_attention(q, kv, kv, implementation=self.attn_impl).reshape(b, n, d)
        out = linear(d, ("heads", "embed"), name="channel_mlp", **kw)(out)
        tokens = layer_norm(1e-5, name="layer_norm", **kw)(tokens + DropPath(self.drop_path)(out, train=train))
        y = linear(d * self.ffn_ratio, ("embed", "mlp"), name="ffn_fc1", **kw)(tokens)
        y = linear(d, ("mlp", "embed"), name="ffn_fc2", **kw)(nn.gelu(y, approximate=False))
        return nn.with_logical_constraint(layer_norm(1e-5, name="ffn_norm", **kw)(tokens + y), TOKENS)


class _MobileBase(nn.Module):
    """Shared fields and conv helper of the Mobile sub-blocks."""

    features: int
    expand: int
    strides: int = 1
    expand2: int = 0
    groups: int = 1  # pointwise convs are grouped (and channels shuffled) in Mobile-Former-26M
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, kernel_size: int, *, name: str, strides: int = 1, groups: int = 1,
             act: str = "identity") -> ConvNormAct:
        return ConvNormAct(features, kernel_size, strides, groups=groups, act=act, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)

    def dyrelu(self, name: str) -> DynamicReLU:
        return DynamicReLU(dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class LiteBottleneck(_MobileBase):
    """bneck-lite (MicroNet): depthwise 3x3 expanding by `expand`, ReLU6, grouped pointwise; no tokens."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        y = self.conv(c * self.expand, 3, strides=self.strides, groups=c, act="relu6", name="conv1")(x, train=train)
        y = channel_shuffle(y, c if self.groups > 1 else 1)
        y = self.conv(self.features, 1, groups=self.groups, name="conv2")(y, train=train)
        return y + x if self.strides == 1 and c == self.features else y


class MobileDown(_MobileBase):
    """Strided Mobile sub-block: dw-expand (stride) -> DyReLU -> pw, then dw-expand -> DyReLU -> pw + residual."""

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        c, shuffle = x.shape[-1], self.groups > 1
        hidden1, hidden2 = c * self.expand, self.features * self.expand2
        y = self.conv(hidden1, 3, strides=self.strides, groups=c, name="conv1")(x, train=train)
        y = self.dyrelu("hyper1")(channel_shuffle(y, c if shuffle else 1), tokens)
        shortcut = y = self.conv(self.features, 1, groups=self.groups, name="conv2")(y, train=train)
        y = self.conv(hidden2, 3, groups=self.features, name="conv3")(y, train=train)
        y = self.dyrelu("hyper3")(channel_shuffle(y, self.features if shuffle else 1), tokens)
        y = self.conv(self.features, 1, groups=self.groups, name="conv4")(y, train=train)
        return DropPath(self.drop_path)(y, train=train) + shortcut


class Mobile(_MobileBase):
    """Mobile sub-block: pw expand -> DyReLU -> dw 3x3 -> DyReLU -> pw project (+ residual when shapes allow)."""

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        hidden = c * self.expand
        y = self.conv(hidden, 1, groups=self.groups, name="conv1")(x, train=train)
        y = self.dyrelu("hyper1")(channel_shuffle(y, self.groups), tokens)
        y = self.dyrelu("hyper2")(self.conv(hidden, 3, strides=self.strides, groups=hidden, name="conv2")(
            y, train=train), tokens)
        y = channel_shuffle(self.conv(self.features, 1, groups=self.groups, name="conv3")(y, train=train), self.groups)
        if self.strides == 1 and c == self.features:
            y = DropPath(self.drop_path)(y, train=train) + x
        return y


class MobileFormerBlock(nn.Module):
    """Mobile -> Former, Former, Mobile (DyReLU from the first token), Former -> Mobile."""

    kind: str  # down | block
    features: int
    expand: int
    strides: int = 1
    expand2: int = 0
    groups: int = 1
    bridge_heads: int = 2
    former_heads: int = 4
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        kw = dict(drop_path=self.drop_path, attn_impl=self.attn_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        bridge = Bridge(num_heads=self.bridge_heads, name="bridge", **kw)
        tokens = bridge.to_tokens(x, tokens, train=train)
        tokens = Former(self.former_heads, name="global_block", **kw)(tokens, train=train)
        mobile = {"down": MobileDown, "block": Mobile}[self.kind]
        y = mobile(self.features, self.expand, self.strides, self.expand2, self.groups, self.drop_path,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="mobile")(x, tokens, train=train)
        y = bridge.to_local(y, tokens, train=train)
        if self.kind == "down" and self.strides == 1 and x.shape[-1] == self.features:
            y = y + x  # the official strided block's outer identity, after the bridge
        return nn.with_logical_constraint(y, MAP), tokens


class MergeClassifier(nn.Module):
    """Head: pw expand + ReLU6, pool + h-swish, concat the first token, Linear + BN + h-swish (-> pooled)."""

    num_features: int
    expand: int = 6
    groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvNormAct(x.shape[-1] * self.expand, 1, groups=self.groups, act="relu6", name="conv", **kw)(
            channel_shuffle(x, self.groups), train=train)
        pooled = nn.hard_swish(jnp.mean(x, axis=(1, 2)))
        y = jnp.concatenate([pooled, tokens[:, 0].astype(pooled.dtype)], axis=-1)
        y = linear(self.num_features, ("embed", "mlp"), name="fc", **kw)(y)
        return nn.hard_swish(norm_2d("batch", train=train, name="fc_norm", **kw)(y))


class MobileFormer(ImageClassifier):
    """Mobile-Former for ImageNet: stem, bneck-lite, Mobile-Former blocks, final Mobile -> Former, merged head."""

    blocks: Sequence[BlockSpec] = ()
    stem_features: int = 16
    token_num: int = 6
    token_dim: int = 192
    num_features: int = 1920  # width of the head's MLP, the pooled features
    head_expand: int = 6
    groups: int = 1
    bridge_heads: int = 2
    former_heads: int = 4
    attn_impl: str = "auto"  # xla | cudnn | auto

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.tokens = self.param("tokens", with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                                 (self.token_num, self.token_dim), self.param_dtype)
        self.stem = ConvNormAct(self.stem_features, 3, strides=2, act="relu6", **kw)
        layers, lite, block = [], checkpointed(LiteBottleneck, self.remat), checkpointed(MobileFormerBlock, self.remat)
        for i, (kind, expand, features, strides, expand2) in enumerate(self.blocks):
            # The official schedule: block i of n drops with rate * (i + 1) / n, on both branches.
            rate = self.drop_path_rate * (i + 1) / len(self.blocks)
            if kind == "lite":
                layers.append(lite(features, expand, strides, groups=self.groups, **kw))
            else:
                layers.append(block(kind, features, expand, strides, expand2, self.groups,
                                                self.bridge_heads, self.former_heads, rate, self.attn_impl, **kw))
        self.features = layers
        self.local_global = MobileToFormer(self.bridge_heads, drop_path=self.drop_path_rate, attn_impl=self.attn_impl,
                                           **kw)
        self.classifier = MergeClassifier(self.num_features, self.head_expand, self.groups, **kw)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes:
            self.head = linear(self.num_classes, ("embed", "classes"), **kw)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem (stride 2) and each block's map. The global tokens lie on no grid, so they give no map."""
        infos, stride = [FeatureInfo("stem", self.stem_features, 2)], 2
        for i, (_, _, features, strides, _) in enumerate(self.blocks):
            stride *= strides
            infos.append(FeatureInfo(f"block{i + 1}", features, stride))
        return tuple(infos)

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The stem map, then each block's map (`block{i}`) and global tokens (`block{i}_tokens` [B, M, D])."""
        tokens = jnp.broadcast_to(self.tokens, (x.shape[0],) + self.tokens.shape)
        x = self.stem(x, train=train)
        features = {"stem": x}
        for i, ((kind, *_), layer) in enumerate(zip(self.blocks, self.features)):
            if kind == "lite":
                x = layer(x, train=train)
            else:
                x, tokens = layer(x, tokens, train=train)
            features[f"block{i + 1}"], features[f"block{i + 1}_tokens"] = x, tokens
        return features

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The final Mobile -> Former tokens ("tokens") and the merged head's features ("pooled")."""
        last = len(self.blocks)
        x, tokens = features[f"block{last}"], features[f"block{last}_tokens"]
        tokens = self.local_global(x, tokens, train=train)
        return {"tokens": tokens, "pooled": self.classifier(x, tokens, train=train)}


# The official model table (mobile_former.py): (kind, expand1, width, stride, expand2) per block.
_BLOCKS = {
    "508m": ((("lite", 2, 24, 1, 0), ("down", 6, 40, 2, 4), ("block", 3, 40, 1, 3), ("down", 6, 72, 2, 4),
              ("block", 3, 72, 1, 3), ("down", 6, 128, 2, 4), ("block", 4, 128, 1, 4), ("block", 6, 176, 1, 4),
              ("block", 6, 176, 1, 4), ("down", 6, 240, 2, 4), ("block", 6, 240, 1, 4), ("block", 6, 240, 1, 4)),
             dict(stem_features=24, num_features=1920)),
    "294m": ((("lite", 2, 16, 1, 0), ("down", 6, 24, 2, 4), ("block", 4, 24, 1, 4), ("down", 6, 48, 2, 4),
              ("block", 4, 48, 1, 4), ("down", 6, 96, 2, 4), ("block", 4, 96, 1, 4), ("block", 6, 128, 1, 4),
              ("block", 6, 128, 1, 4), ("down", 6, 192, 2, 4), ("block", 6, 192, 1, 4), ("block", 6, 192, 1, 4)),
             dict(stem_features=16, num_features=1920)),
    "214m": ((("lite", 2, 12, 1, 0), ("down", 6, 20, 2, 4), ("block", 3, 20, 1, 4), ("down", 6, 40, 2, 4),
              ("block", 4, 40, 1, 4), ("down", 6, 80, 2, 4), ("block", 4, 80, 1, 4), ("block", 6, 112, 1, 4),
              ("block", 6, 112, 1, 4), ("down", 6, 160, 2, 4), ("block", 6, 160, 1, 4), ("block", 6, 160, 1, 4)),
             dict(stem_features=12, num_features=1600)),
    "151m": ((("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("block", 3, 16, 1, 3), ("down", 6, 32, 2, 4),
              ("block", 3, 32, 1, 3), ("down", 6, 64, 2, 4), ("block", 4, 64, 1, 4), ("block", 6, 88, 1, 4),
              ("block", 6, 88, 1, 4), ("down", 6, 128, 2, 4), ("block", 6, 128, 1, 4), ("block", 6, 128, 1, 4)),
             dict(stem_features=12, num_features=1280)),
    "96m": ((("lite", 2, 12, 1, 0), ("down", 6, 16, 2, 4), ("down", 6, 32, 2, 4), ("block", 3, 32, 1, 3),
             ("down", 6, 64, 2, 4), ("block", 4, 64, 1, 4), ("block", 6, 88, 1, 4), ("down", 6, 128, 2, 4),
             ("block", 6, 128, 1, 4)),
            dict(stem_features=12, num_features=1280, token_num=4, token_dim=128)),
    "52m": ((("lite", 3, 12, 2, 0), ("block", 3, 12, 1, 3), ("down", 6, 24, 2, 4), ("block", 3, 24, 1, 3),
             ("down", 6, 48, 2, 4), ("block", 4, 48, 1, 4), ("block", 6, 64, 1, 4), ("down", 6, 96, 2, 4),
             ("block", 6, 96, 1, 4)),
            dict(stem_features=8, num_features=1024, token_num=3, token_dim=128)),
}
_BLOCKS["26m"] = (_BLOCKS["52m"][0], dict(_BLOCKS["52m"][1], groups=4))

# Params and MACs as the official code counts them (we ran it): parameters exactly, MACs with fvcore's
# conv + linear + matmul operators, the convention of `count_macs`. The README's own figures follow in the source.
_OFFICIAL = ("AAboys/MobileFormer: params and MACs counted on the official code (params exact; MACs = fvcore's "
             "conv + linear + matmul, BatchNorm not counted); top-1 from its README. README: ")
_FIGURES = {  # params M, GMACs, top-1; README params M / MACs M
    "508m": (13.976976, 0.498468, 79.3, "14.0M / 508M"), "294m": (11.422648, 0.286732, 77.9, "11.4M / 294M"),
    "214m": (9.425920, 0.208374, 76.7, "9.4M / 214M"), "151m": (7.595828, 0.146249, 75.2, "7.6M / 151M"),
    "96m": (4.585252, 0.092017, 72.8, "4.6M / 96M"), "52m": (3.469092, 0.049290, 68.7, "3.5M / 52M"),
    "26m": (3.232788, 0.023550, 64.0, "3.2M / 26M"),
}
_BN_NOTE = ("; our MACs come within 0.6% of the README's once BatchNorm counts 2 per element (fvcore's eval "
            "rule): see the module docstring")

VARIANTS = {
    f"mobile_former_{variant}": (dict(blocks=blocks, **fields),
                                 PaperFigures(*_FIGURES[variant][:3], _OFFICIAL + _FIGURES[variant][3] + _BN_NOTE))
    for variant, (blocks, fields) in _BLOCKS.items()}
register_variants(MobileFormer, VARIANTS, category="parallel")

# For 28-32 px inputs (Fashion-MNIST, CIFAR) and fast tests: stride 8 overall, 3 tokens of width 32.
register_model("mobile_former_tiny_32", MobileFormer, dict(
    blocks=(("lite", 2, 8, 1, 0), ("down", 4, 16, 2, 2), ("block", 2, 16, 1, 2), ("down", 4, 24, 2, 2),
            ("block", 2, 24, 1, 2)),
    stem_features=8, token_num=3, token_dim=32, num_features=64, head_expand=2, num_classes=10),
    category="parallel", input_size=32)
