"""Conformer (Peng et al., ICCV 2021, arXiv 2105.03889): a ResNet and a ViT in parallel, coupled by FCUs.

A ResNet-style CNN branch and a DeiT-style transformer branch run side by side from
a shared stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool). Block 1 is a bottleneck
(`conv_1`) beside a transformer block (`trans_1`) on stride-`patch_size` tokens cut
from the stem by a strided conv (`trans_patch_conv`), with a class token and no
position embedding. Blocks 2..depth (`conv_trans_{i}`, a third each at CNN widths
c, 2c, 4c and strides 4, 8, 16 with c = base_channel * channel_ratio) run:

  x, x2 = cnn_block(x)                           bottleneck; x2 = its 3x3 conv's activation
  t = trans_block(t + FCUDown(x2, t))            FCU map -> tokens
  x = med_blocks(x)                              num_med_block extra bottlenecks (0 in every release)
  x = fusion_block(x, coupled by FCUUp(t))       bottleneck; FCU tokens -> map after its 1x1 conv

The token grid stays at stride `patch_size`, so the FCU pools each stage's map by
`dw_stride` = patch_size / 4, / 8, / 16. The last block's fusion_block has stride 2,
so the CNN ends at stride 32. Two heads: a Linear on the average-pooled CNN map
(`conv_cls_head`) and a Linear on the LayerNormed class token (`trans_cls_head`).

Structure, widths, norms (BatchNorm and LayerNorm epsilon 1e-6 in the blocks and
FCUs, 1e-5 in the stem and the final LayerNorm) and parameter names follow the
official code (pengzhiliang/Conformer, conformer.py and models.py); parameter counts
equal mmpretrain's for the converted official weights to the unit. Two quirks of
that code are kept because the released weights depend on them: FCUDown passes the
stream's class token through, and the block adds its output to the stream, so the
class token enters every ConvTransBlock's transformer block doubled; and the CNN
branch has no stochastic depth (only the transformer blocks drop paths, at rates
rising linearly over the depth). Names differ from the official ones in three places
a converter maps: attention has separate query / key / value projections (the
official fused `qkv` split in three), the FCU's `squeeze_block` / `expand_block` sit
under `fcu`, and `med_block.{j}` is `med_block_{j}`.

Heads and training. `__call__` returns the mean of the two heads' logits, which ranks
classes as the official evaluation's sum does. Training needs both: `branch_logits`
returns {"cnn": ..., "transformer": ...}; the official recipe gives each head its own
cross-entropy and averages them (hybrid_jax.train.step sums them: twice the loss,
the same gradient direction). `num_classes=0` returns the pooled CNN features and
the normed class token, concatenated.

Cost. `count_macs` (every conv, Linear and attention matmul) gives 5.226 / 10.599 /
23.326 GMACs for Ti / S / B at 224: the README's 5.2 / 10.6 / 23.3. mmpretrain lists
4.900 / 10.311 / 22.892 GFLOPs: mmcv's module-hook count of the backbone, which
cannot see the attention matmuls (torch.matmul inside the attention module: 0.358 G
for Ti and S, 0.537 G for B) or the heads, and adds norms, conv biases, ReLUs and
pooling. tests/test_conformer.py reproduces mmpretrain's figures to the unit with
that rule, so the README's figures are the ones registered.

`stem_stride=1` (one 3x3 conv, no max pool: not in the paper) is for 28-32 px
inputs: tokens every 4 px with patch_size 16, a 7x7 grid at 28 px, 8x8 at 32 px.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.fcu import FeatureCouplingUnit
from hybrid_jax.layers.axes import MAP, with_logical_partitioning
from hybrid_jax.layers.conv import Conv2d, max_pool_3x3
from hybrid_jax.layers.drop import drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.inputs import check_divisible
from hybrid_jax.layers.mlp import classifier_head
from hybrid_jax.layers.model import BranchClassifier
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.patch import grid_to_tokens, prepend_tokens
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import block_sequence, run_sequence
from hybrid_jax.models.vit import Block
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any

EPS = 1e-6  # the official blocks' BatchNorm and LayerNorm epsilon


class ConvBlock(nn.Module):
    """Conformer's bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), BN eps 1e-6, residual, ReLU.

    `couple` (the FCU's tokens -> map direction) acts on the first 1x1 conv's
    activation, before the 3x3 conv, where the official code adds FCUUp's map.
    Returns the output and the 3x3 conv's activation (which FCUDown reads).
    """

    features: int
    strides: int = 1
    res_conv: bool = False  # a 1x1 conv + BN on the shortcut (where width or stride change)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool,
                 couple: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        med = self.features // 4
        conv = lambda features, kernel, strides, name: Conv2d(features, kernel, strides, name=name, **kw)
        bn = lambda name: norm_2d("batch", train=train, epsilon=EPS, name=name, **kw)
        y = nn.relu(bn("bn1")(conv(med, 1, 1, "conv1")(x)))
        if couple is not None:
            y = couple(y)
        x2 = nn.relu(bn("bn2")(conv(med, 3, self.strides, "conv2")(y)))
        y = bn("bn3")(conv(self.features, 1, 1, "conv3")(x2))
        if self.res_conv:
            x = bn("residual_bn")(conv(self.features, 1, self.strides, "residual_conv")(x))
        return nn.with_logical_constraint(nn.relu(y + x), MAP), x2


class ConvTransBlock(nn.Module):
    """CNN bottleneck, FCU map -> tokens, transformer block, FCU tokens -> map inside the fusion bottleneck."""

    features: int
    strides: int = 1
    res_conv: bool = False
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_med_block: int = 0
    last_fusion: bool = False  # the model's last block: the fusion bottleneck halves the map
    drop_rate: float = 0.0
    drop_path: float = 0.0
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array, *, train: bool,
                 drop_path: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`drop_path` overrides the transformer block's rate (a scanned stack passes each block's)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x, x2 = ConvBlock(self.features, self.strides, self.res_conv, name="cnn_block", **kw)(x, train=train)
        fcu = FeatureCouplingUnit(num_prefix_tokens=1, name="fcu", **kw)
        fused = fcu.to_tokens(x2, tokens, train=train)
        # The official FCUDown output carries the class token, which the block adds to the stream again.
        fused = fused.at[:, :1].add(tokens[:, :1])
        tokens = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate, self.drop_path,
                       attn_impl=self.attn_impl, name="trans_block", **kw)(fused, train=train, drop_path=drop_path)
        for i in range(self.num_med_block):
            x, _ = ConvBlock(self.features, name=f"med_block_{i}", **kw)(x, train=train)
        x, _ = ConvBlock(self.features, 2 if self.last_fusion else 1, self.last_fusion, name="fusion_block", **kw)(
            x, train=train, couple=lambda y: fcu.to_local(y, tokens, train=train))
        return x, tokens


class Conformer(BranchClassifier):
    """Conformer: shared stem, a bottleneck CNN and a ViT side by side, FCUs between them, two heads."""

    patch_size: int = 16  # token stride; the FCUs pool stage maps by patch_size / 4, / 8, / 16
    base_channel: int = 64
    channel_ratio: int = 4  # CNN widths: base_channel * channel_ratio * (1, 2, 4)
    embed_dim: int = 384
    depth: int = 12  # a multiple of 3: block 1, then depth / 3 - 1, depth / 3, depth / 3 ConvTransBlocks
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_med_block: int = 0
    stem_width: int = 64
    stem_stride: int = 4  # 4: 7x7/2 conv + 3x3/2 max pool (official) | 1: one 3x3 conv, for 28-32 px inputs
    attn_impl: str = "auto"  # xla | cudnn | auto
    # Runs of identical ConvTransBlocks as nn.scans (layers/scan.py): at depth 12 "conv_trans_2to4",
    # "conv_trans_6to8" and "conv_trans_10to11"; the blocks that change width or stride stay on their own.
    scan_blocks: bool = False

    def setup(self):
        if self.depth % 3 or self.depth < 3:
            raise ValueError(f"Conformer's depth must be a positive multiple of 3, got {self.depth}")
        if self.patch_size % 16:
            raise ValueError(f"patch_size must be a multiple of 16 (stage 3 pools by patch_size / 16), "
                             f"got {self.patch_size}")
        if self.stem_stride not in (1, 4):
            raise ValueError(f"stem_stride must be 4 (official) or 1, got {self.stem_stride}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        stem_kernel, stem_strides = (7, 2) if self.stem_stride == 4 else (3, 1)
        self.conv1 = Conv2d(self.stem_width, stem_kernel, stem_strides, **kw)
        self.bn1 = nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw,  # use_running_average is given per call
                                scale_init=with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                                bias_init=with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))
        width = self.base_channel * self.channel_ratio
        self.conv_1 = ConvBlock(width, res_conv=True, **kw)
        dw_stride = self.patch_size // 4
        self.trans_patch_conv = Conv2d(self.embed_dim, dw_stride, dw_stride, padding=0, use_bias=True, **kw)
        self.cls_token = self.param(
            "cls_token", with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, None, "embed")),
            (1, 1, self.embed_dim), self.param_dtype)
        rates = drop_path_schedule(self.drop_path_rate, (self.depth,))[0]
        transformer = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                           drop_rate=self.drop_rate, attn_impl=self.attn_impl, **kw)
        self.trans_1 = checkpointed(Block, self.remat)(drop_path=rates[0], **transformer)
        third = self.depth // 3
        layers = []
        for i in range(2, self.depth + 1):
            stage = (i - 1) // third  # blocks 2..third: 0; the next third: 1; the last third: 2
            first = i in (third + 1, 2 * third + 1)  # the first block of the 2nd and 3rd thirds halves the map
            layers.append(dict(features=width * 2 ** stage, strides=2 if first else 1, res_conv=first,
                               num_med_block=self.num_med_block, last_fusion=i == self.depth,
                               drop_path=rates[i - 1], **transformer))
        self.conv_trans = block_sequence(checkpointed(ConvTransBlock, self.remat), layers, name="conv_trans",
                                         scan=self.scan_blocks, start=2)
        self.trans_norm = layer_norm(1e-5, **kw)
        if self.num_classes:
            self.conv_cls_head = classifier_head(self.num_classes, **kw)
            self.trans_cls_head = classifier_head(self.num_classes, **kw)

    @property
    def stride(self) -> int:
        """Input pixels per token along each side; input sides must be multiples of it."""
        return self.stem_stride * self.patch_size // 4

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The stem, then both branches after every block i = 1..depth: "cnn{i}" and "transformer{i}" (patch tokens).

        The CNN halves its map in the first block of the second and third thirds and in the last block.
        """
        width, third = self.base_channel * self.channel_ratio, self.depth // 3
        infos = [FeatureInfo("stem", self.stem_width, self.stem_stride)]
        for i in range(1, self.depth + 1):
            stage = (i - 1) // third
            halvings = (i > third) + (i > 2 * third) + (i == self.depth)
            infos += [FeatureInfo(f"cnn{i}", width * 2 ** stage, self.stem_stride * 2 ** halvings, "cnn"),
                      FeatureInfo(f"transformer{i}", self.embed_dim, self.stride, "transformer", num_prefix_tokens=1)]
        return tuple(infos)

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The stem, then both branches after every block: "cnn{i}" maps and "transformer{i}" tokens, i = 1..depth."""
        check_divisible(x, self.stride, "Conformer's stride")
        stem = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        if self.stem_stride == 4:
            stem = max_pool_3x3(stem)
        features = {"stem": stem}
        x, _ = self.conv_1(stem, train=train)
        tokens = self.trans_1(prepend_tokens(grid_to_tokens(self.trans_patch_conv(stem)), self.cls_token), train=train)
        features["cnn1"], features["transformer1"] = x, tokens
        _, outputs = run_sequence(self.conv_trans, (x, tokens), train=train)
        for i, (x, tokens) in enumerate(outputs, start=2):
            features[f"cnn{i}"], features[f"transformer{i}"] = x, tokens
        return features

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The normed final tokens, "cnn_pooled", "transformer_pooled" (the normed class token), both as "pooled"."""
        x, tokens = features[f"cnn{self.depth}"], self.trans_norm(features[f"transformer{self.depth}"])
        pooled = {"cnn_pooled": jnp.mean(x, axis=(1, 2)), "transformer_pooled": tokens[:, 0]}
        return {"tokens": tokens, **pooled,
                "pooled": jnp.concatenate([pooled["cnn_pooled"], pooled["transformer_pooled"].astype(x.dtype)], -1)}

    def branch_heads(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """{"cnn": [B, classes], "transformer": [B, classes]}; no dropout before them, as the official code."""
        return {"cnn": self.conv_cls_head(features["cnn_pooled"]),
                "transformer": self.trans_cls_head(features["transformer_pooled"])}


# Parameters: exact counts from mmpretrain's metafile (configs/conformer/metafile.yml, converted official
# weights), which ours equal to the unit; the README rounds them. Top-1: the official README.
_MACS_NOTE = (
    "; GMACs: the README's, which count_macs reproduces (every conv, Linear and attention matmul, heads "
    "included: 5.226 / 10.599 / 23.326). mmpretrain's metafile lists 4.900 / 10.311 / 22.892 GFLOPs: mmcv's "
    "module-hook counter on the backbone alone, which cannot see the attention matmuls (functional ops, "
    "0.358 G for Ti and S, 0.537 G for B) or the heads, and adds BN / LayerNorm (2 per element), conv "
    "biases, ReLU and pooling; that rule applied to this model gives mmpretrain's figures to the unit "
    "(tests/test_conformer.py)")
_README = "pengzhiliang/Conformer README (MACs, top-1); params: mmpretrain metafile (exact; README rounds)"
_VARIANTS = {  # the official models.py: every variant has depth 12, mlp_ratio 4 and qkv_bias
    "conformer_tiny_patch16": (dict(patch_size=16, channel_ratio=1, embed_dim=384, num_heads=6),
                               PaperFigures(23.524704, 5.2, 81.3, _README + _MACS_NOTE)),
    "conformer_small_patch16": (dict(patch_size=16, channel_ratio=4, embed_dim=384, num_heads=6),
                                PaperFigures(37.673424, 10.6, 83.4, _README + _MACS_NOTE)),
    # Not in the paper or the README: trained by OpenMMLab, whose metafile gives the only figures.
    "conformer_small_patch32": (dict(patch_size=32, channel_ratio=4, embed_dim=384, num_heads=6), PaperFigures(
        38.853072, 7.087, 81.96,
        "mmpretrain metafile (conformer-small-p32_8xb128_in1k: params exact, 7.087 GFLOPs, top-1 81.96, trained "
        "by OpenMMLab). Its FLOPs follow mmcv's rule (see the Ti/S/B entries); count_macs gives 7.046 (-0.6%): "
        "with 50 tokens the attention matmuls it leaves out (0.023 G) weigh less than the norms and ReLUs it adds")),
    "conformer_base_patch16": (dict(patch_size=16, channel_ratio=6, embed_dim=576, num_heads=9),
                               PaperFigures(83.289136, 23.3, 84.1, _README + _MACS_NOTE)),
}

register_variants(Conformer, _VARIANTS, category="parallel")

# For 28-32 px inputs (Fashion-MNIST, CIFAR) and fast tests: a 3x3 stride-1 stem, tokens every 4 px (8x8 at 32 px),
# CNN widths 32 / 64 / 128, two ConvTransBlocks per stage.
register_model("conformer_tiny_32", Conformer, dict(
    patch_size=16, base_channel=32, channel_ratio=1, embed_dim=64, depth=6, num_heads=2, stem_width=32,
    stem_stride=1, num_classes=10), category="parallel", input_size=32)
