"""A generic parallel CNN + ViT hybrid whose fusion is a config string, and a TCCNet-style variant.

Two branches run side by side from a shared conv stem, stage by stage:
  CNN branch: residual stages (ResNet basic or bottleneck blocks), each `strides[i]`.
  Transformer branch: the stem output cut into `patch_size` patches (tokens every
  stem_stride * patch_size pixels), a class token, learned positions (resampled for
  other input sizes, as in ViT), then `depths[i]` pre-norm ViT blocks per stage.
After each stage named in `fusion_stages` the two exchange features through the
fusion named in `fusion` (`hybrid_jax.fusion.get_fusion`: concat | add | gating |
cross_attention | fcu | bridge), tokens first, then the map (`Fusion.__call__`).
The map-shaped fusions (concat, add, gating, fcu) need the token grid to divide
the fused maps, i.e. a token stride that is a multiple of those stages' strides;
the default variants use a token stride equal to the CNN's final stride, so every
fusion fits every stage.

Head: each branch has its own linear classifier (CNN: average-pooled last map;
transformer: the normed class token) and the logits are their average. A linear
layer on the concatenated pooled features computes the same family of functions
(W [a; b] = W_a a + W_b b), so averaging loses nothing, and it keeps the two
branches separable: `branch_logits` returns both for branch-wise losses (Conformer
trains each head with its own cross-entropy) and for seeing what each branch knows.
`num_classes=0` returns the concatenated pooled features.

TCCNet (Li et al., "Heterogeneous feature-aware Transformer-CNN coupling network for
person re-identification", PeerJ Computer Science 8:e1098, 2022) is this model with
the branches coupled at exactly two points, a Low-level Feature Coupling Module
(LFCM) after the first stage and a High-level Feature Coupling Module (HFCM) after
the last: `fusion="concat,cross_attention", fusion_stages=(1, 4)`. No code is
public and only the abstract and the start of the introduction could be read
(peerj.com/articles/cs-1098), so this follows what they say (a CNN branch and a
transformer branch in parallel, with one low-level and one high-level bridging
module between them) and assumes the rest: the LFCM as a concat fusion (low-level
features are spatially aligned, so a per-position exchange fits), the HFCM as
two-way cross-attention (high-level semantics, no alignment needed), ResNet
basic-block and ViT branches, and this model's averaged heads. The
re-identification parts (BNNeck, triplet loss, 256x128 person crops) are left out.

No paper figures exist for these configurations (paper=None in the registry).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion import Fusion, get_fusion, get_fusion_class
from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.conv import RESIDUAL_BLOCKS, ConvNormAct, ResNetStage, max_pool_3x3
from hybrid_jax.layers.drop import drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.inputs import check_divisible
from hybrid_jax.layers.mlp import classifier_head
from hybrid_jax.layers.model import BranchClassifier
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import PatchEmbed, grid_to_tokens, prepend_tokens, resample_pos_embed
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import block_sequence, run_sequence
from hybrid_jax.models.vit import Block
from hybrid_jax.registry import register_variants

Dtype = Any

STEM_STRIDES = (1, 2, 4)


class Stem(nn.Module):
    """Shared conv stem: 3x3 conv (stride 1 or 2), or ResNet's 7x7/2 conv + 3x3/2 max pool (stride 4)."""

    features: int
    stride: int = 4  # 1 | 2 | 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kernel, strides = (7, 2) if self.stride == 4 else (3, self.stride)
        x = ConvNormAct(self.features, kernel, strides, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="conv")(x, train=train)
        if self.stride == 4:
            x = max_pool_3x3(x)
        return x


class ParallelHybrid(BranchClassifier):
    """CNN and ViT branches side by side, exchanging features after the stages in `fusion_stages`."""

    img_size: int = 224  # where the position embedding is learned; other sizes resample it
    stem_width: int = 64
    stem_stride: int = 4  # 1: 3x3 conv | 2: 3x3/2 conv | 4: 7x7/2 conv + max pool
    block: str = "basic"  # basic | bottleneck
    layers: Sequence[int] = (2, 2, 2, 2)  # CNN blocks per stage
    widths: Sequence[int] = (64, 128, 256, 384)  # CNN block widths per stage (x4 at the output of bottlenecks)
    strides: Sequence[int] = (1, 2, 2, 1)  # CNN stride of each stage
    patch_size: int = 4  # patches of the stem output: a token every stem_stride * patch_size pixels
    embed_dim: int = 256
    depths: Sequence[int] = (2, 2, 2, 2)  # transformer blocks per stage
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    fusion: str = "gating"  # concat|add|gating|cross_attention|fcu|bridge, or one per fusion stage: "concat,add"
    fusion_stages: Sequence[int] = (1, 2, 3)  # stages (1-based) after which the branches meet; () keeps them apart
    attn_impl: str = "auto"  # xla | cudnn | auto
    # Each stage's transformer blocks as one nn.scan (layers/scan.py): "blocks_0to1", "blocks_2to3", ...
    scan_blocks: bool = False

    def setup(self):
        self._check_config()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem = Stem(self.stem_width, self.stem_stride, **kw)
        cnn_rates = drop_path_schedule(self.drop_path_rate, self.layers)
        self.stages = [ResNetStage(self.block, depth, width, stride, rates, remat=self.remat, **kw)
                       for depth, width, stride, rates in zip(self.layers, self.widths, self.strides, cnn_rates)]
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, **kw)
        token_axes = (None, None, "embed")
        self.cls_token = self.param("cls_token", with_logical_partitioning(nn.initializers.zeros, token_axes),
                                    (1, 1, self.embed_dim), self.param_dtype)
        num_tokens = 1 + (self.img_size // self.token_stride) ** 2
        self.pos_embed = self.param("pos_embed", with_logical_partitioning(nn.initializers.normal(0.02), token_axes),
                                    (1, num_tokens, self.embed_dim), self.param_dtype)
        self.pos_drop = nn.Dropout(self.drop_rate)
        block, blocks, first = checkpointed(Block, self.remat), {}, 0
        fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                      drop_rate=self.drop_rate, attn_impl=self.attn_impl, **kw)
        for rates in drop_path_schedule(self.drop_path_rate, self.depths):  # a scan never crosses a fusion
            blocks |= block_sequence(block, [dict(fields, drop_path=rate) for rate in rates], name="blocks",
                                     scan=self.scan_blocks, start=first)
            first += len(rates)
        self.blocks = blocks
        self.fusions = {stage: self._make_fusion(name) for stage, name in self.fusion_plan.items()}
        self.trans_norm = layer_norm(**kw)
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes:
            self.conv_cls_head = classifier_head(self.num_classes, **kw)
            self.trans_cls_head = classifier_head(self.num_classes, **kw)

    @property
    def num_stages(self) -> int:
        """Stages of each branch."""
        return len(self.layers)

    @property
    def token_stride(self) -> int:
        """Input pixels per token along each side."""
        return self.stem_stride * self.patch_size

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this: the token stride and the CNN's final stride."""
        return math.lcm(self.token_stride, self.stem_stride * math.prod(self.strides))

    @property
    def num_features(self) -> int:
        """Width of the pooled features: the CNN's last map and the class token, concatenated."""
        return self.widths[-1] * RESIDUAL_BLOCKS[self.block].expansion + self.embed_dim

    @property
    def fusion_plan(self) -> dict[int, str]:
        """Fusion name per fused stage (1-based)."""
        names = [name.strip() for name in self.fusion.split(",")]
        if len(names) == 1:
            names = names * len(self.fusion_stages)
        if len(names) != len(self.fusion_stages):
            raise ValueError(f"fusion={self.fusion!r} names {len(names)} fusions for {len(self.fusion_stages)} "
                             f"fusion_stages {tuple(self.fusion_stages)}; give one name, or one per stage")
        return dict(zip(self.fusion_stages, names))

    def _check_config(self) -> None:
        sizes = {"layers": len(self.layers), "widths": len(self.widths), "strides": len(self.strides),
                 "depths": len(self.depths)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"layers, widths, strides and depths need one entry per stage; got lengths {sizes}")
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {self.stem_stride}")
        stages = tuple(self.fusion_stages)
        bad = [s for s in stages if not 1 <= s <= self.num_stages]
        if bad or len(set(stages)) != len(stages):
            raise ValueError(f"fusion_stages {stages} must name distinct stages among 1..{self.num_stages} "
                             f"(this model has {self.num_stages} stages){f'; out of range: {bad}' if bad else ''}")
        for name in self.fusion_plan.values():
            get_fusion_class(name)  # unknown names fail here, with close matches
        if self.img_size % self.stride:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the model's stride {self.stride}")

    def _make_fusion(self, name: str) -> Fusion:
        # Fields every fusion shares; the rest of each fusion's fields keep its defaults.
        fields = dict(num_prefix_tokens=1, attn_impl=self.attn_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        declared = {f.name for f in dataclasses.fields(get_fusion_class(name))}
        return get_fusion(name, **{key: value for key, value in fields.items() if key in declared})

    def _embed(self, stem: jax.Array, *, train: bool) -> jax.Array:
        grid = self.patch_embed(stem)
        pos_embed = resample_pos_embed(self.pos_embed, grid.shape[1:3])
        tokens = prepend_tokens(grid_to_tokens(grid), self.cls_token)
        return self.pos_drop(add_shared(tokens, pos_embed.astype(grid.dtype)), deterministic=not train)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem, then both branches after each stage (after its fusion): "cnn{i}" and "transformer{i}"."""
        width, stride = self.widths, self.stem_stride
        infos = [FeatureInfo("stem", self.stem_width, stride)]
        for i in range(self.num_stages):
            stride *= self.strides[i]
            infos += [FeatureInfo(f"cnn{i + 1}", width[i] * RESIDUAL_BLOCKS[self.block].expansion, stride, "cnn"),
                      FeatureInfo(f"transformer{i + 1}", self.embed_dim, self.token_stride, "transformer",
                                  num_prefix_tokens=1)]
        return tuple(infos)

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The stem, then per stage both branches after its fusion: "cnn{i}" maps and "transformer{i}" tokens."""
        check_divisible(x, self.stride, "the model's stride")
        local = self.stem(x, train=train)
        features = {"stem": local}
        tokens = self._embed(local, train=train)
        first = 0
        for i, (stage, depth) in enumerate(zip(self.stages, self.depths)):
            local = stage(local, train=train)
            tokens, _ = run_sequence(self.blocks, tokens, train=train, layers=range(first, first + depth))
            first += depth
            if i + 1 in self.fusions:
                local, tokens = self.fusions[i + 1](local, tokens, train=train)
            features[f"cnn{i + 1}"], features[f"transformer{i + 1}"] = local, tokens
        return features

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The normed final tokens, "cnn_pooled", "transformer_pooled" (the normed class token), both as "pooled"."""
        last = self.num_stages
        local, tokens = features[f"cnn{last}"], self.trans_norm(features[f"transformer{last}"])
        pooled = {"cnn_pooled": jnp.mean(local, axis=(1, 2)), "transformer_pooled": tokens[:, 0]}
        return {"tokens": tokens, **pooled, "pooled": jnp.concatenate(
            [pooled["cnn_pooled"], pooled["transformer_pooled"].astype(local.dtype)], axis=-1)}

    def branch_heads(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """Each branch's own logits after dropout, {"cnn": [B, classes], "transformer": [B, classes]}."""
        drop = lambda y: self.head_drop(y, deterministic=not train)
        return {"cnn": self.conv_cls_head(drop(features["cnn_pooled"])),
                "transformer": self.trans_cls_head(drop(features["transformer_pooled"]))}


# The variants put tokens at the CNN's final stride (4 at 32 px, 16 at 224 px), so every fusion fits every stage.
# tiny is sized for Fashion-MNIST on CPU: ~0.3 s per batch-128 train step on 2 cores, an epoch in under 3 minutes.
_TINY = dict(img_size=32, stem_width=16, stem_stride=2, layers=(1, 1, 1, 1), widths=(16, 32, 64, 96),
             strides=(1, 2, 1, 1), patch_size=2, embed_dim=64, depths=(1, 1, 1, 1), num_heads=2, num_classes=10)
# tiny_28 is the Fashion-MNIST default, shaped by what costs time on a 2-core CPU: a full-resolution 3x3 stem
# (cheap on one input channel) that both branches read, the CNN at 14 and 7 px, and only two transformer blocks
# (after stages 2 and 4, where the branches meet): each block and fusion costs more time than its MACs suggest.
_TINY_28 = dict(img_size=28, stem_width=32, stem_stride=1, layers=(1, 1, 1, 1), widths=(48, 64, 64, 64),
                strides=(2, 2, 1, 1), patch_size=4, embed_dim=48, depths=(0, 1, 0, 1), num_heads=2, mlp_ratio=2.0,
                fusion_stages=(2, 4), num_classes=10)
_SMALL = dict(img_size=32, stem_width=32, stem_stride=2, layers=(2, 2, 2, 2), widths=(32, 64, 128, 256),
              strides=(1, 2, 1, 1), patch_size=2, embed_dim=192, depths=(2, 2, 2, 2), num_heads=3, num_classes=10)
_S_224 = dict(img_size=224, stem_width=64, stem_stride=4, layers=(2, 2, 2, 2), widths=(64, 128, 256, 384),
              strides=(1, 2, 2, 1), patch_size=4, embed_dim=256, depths=(2, 2, 2, 2), num_heads=4)
_TCCNET = dict(fusion="concat,cross_attention", fusion_stages=(1, 4))  # LFCM after stage 1, HFCM after stage 4
VARIANTS = {  # no paper figures: input size = img_size
    "parallel_hybrid_tiny": (_TINY, None),
    "parallel_hybrid_tiny_28": (_TINY_28, None),
    "parallel_hybrid_small": (_SMALL, None),
    "tccnet_tiny": ({**_TINY, **_TCCNET}, None),
    "parallel_hybrid_s_224": (_S_224, None),
    "tccnet_s_224": ({**_S_224, **_TCCNET}, None),
}

register_variants(ParallelHybrid, VARIANTS, category="parallel")
