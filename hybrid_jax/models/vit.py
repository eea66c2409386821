"""Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929), DeiT, and R50+ViT.

The ViT paper's serial hybrid, R50+ViT-B/16, is this same model with a ResNet
in front: stages (3, 4, 9) of a BiT-style ResNet (GroupNorm, weight-standardised
convs, TensorFlow "SAME" padding) produce a stride-16 map that a 1x1 "patch"
projection turns into tokens. Layout and parameter counts follow timm.

Inputs of another size than `img_size` run with the position embedding resampled
on the fly (bicubic), so a model built at 224 can be evaluated or fine-tuned at 384.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.attention import MultiHeadAttention
from hybrid_jax.layers.axes import TOKENS, with_logical_partitioning
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.conv import ConvNormAct, ResNetStage
from hybrid_jax.layers.drop import DropPath, LayerScale, drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import Mlp, classifier
from hybrid_jax.layers.model import ImageClassifier
from hybrid_jax.layers.norm import layer_norm
from hybrid_jax.layers.patch import PatchEmbed, grid_to_tokens, prepend_tokens, resample_pos_embed
from hybrid_jax.layers.remat import checkpointed
from hybrid_jax.layers.scan import block_sequence, run_sequence
from hybrid_jax.registry import PaperFigures, register_model, register_variants

Dtype = Any


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    drop_path: float = 0.0
    layer_scale: float | None = None  # initial LayerScale value; None disables it
    attn_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, drop_path: jax.Array | None = None) -> jax.Array:
        """`drop_path` overrides the field (a scanned stack passes each block's rate)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        scale = (lambda name: LayerScale(self.layer_scale, self.param_dtype, name=name)) if self.layer_scale else (
            lambda name: lambda y: y)
        y = MultiHeadAttention(self.num_heads, qkv_bias=self.qkv_bias, proj_drop=self.drop_rate,
                               implementation=self.attn_impl, name="attn", **kw)(
            layer_norm(**kw, name="norm1")(x), train=train)
        x = x + DropPath(self.drop_path)(scale("ls1")(y), train=train, rate=drop_path)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), dropout=self.drop_rate, name="mlp", **kw)(
            layer_norm(**kw, name="norm2")(x), train=train)
        x = x + DropPath(self.drop_path)(scale("ls2")(y), train=train, rate=drop_path)
        return nn.with_logical_constraint(x, TOKENS)


class HybridStem(nn.Module):
    """BiT-style ResNet stages that feed the transformer in R50+ViT (stride 16 for three stages)."""

    layers: Sequence[int] = (3, 4, 9)
    width: int = 64
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        kw = dict(norm="group", padding="SAME", weight_standardize=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvNormAct(self.width, 7, strides=2, name="stem", **kw)(x, train=train)
        maps = {"stem": nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")}
        x = maps["stem"]
        for i, depth in enumerate(self.layers):
            x = maps[f"stage{i + 1}"] = ResNetStage("bottleneck", depth, self.width * 2 ** i, 1 if i == 0 else 2,
                                                    remat=self.remat, name=f"stages_{i}", **kw)(x, train=train)
        return maps


class VisionTransformer(ImageClassifier):
    """ViT: patch (or CNN-stem) embedding, class token, learned positions, transformer blocks, head."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale: float | None = None
    hybrid_layers: Sequence[int] = ()  # ResNet stages before the patch projection (R50+ViT); () for plain ViT
    global_pool: str = "token"  # token | avg
    attn_impl: str = "auto"  # xla | cudnn | auto
    # The blocks as one nn.scan (layers/scan.py): compile time independent of depth; variables stacked under
    # "blocks_0to{depth-1}" instead of "blocks_0".."blocks_{depth-1}" (pretrained weights are stacked to fit).
    scan_blocks: bool = False

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.hybrid_stem = HybridStem(self.hybrid_layers, remat=self.remat, **kw) if self.hybrid_layers else None
        self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, **kw)
        self.cls_token = self.param("cls_token",
                                    with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                                    (1, 1, self.embed_dim), self.param_dtype)
        self.pos_embed = self.param("pos_embed",
                                    with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                                    (1, 1 + self.grid_size ** 2, self.embed_dim), self.param_dtype)
        self.pos_drop = nn.Dropout(self.drop_rate)
        fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                      drop_rate=self.drop_rate, layer_scale=self.layer_scale, attn_impl=self.attn_impl, **kw)
        self.blocks = block_sequence(
            checkpointed(Block, self.remat),
            [dict(fields, drop_path=rate) for rate in drop_path_schedule(self.drop_path_rate, (self.depth,))[0]],
            name="blocks", scan=self.scan_blocks)
        self.norm = layer_norm(**kw)
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def stride(self) -> int:
        """Input pixels per token along each side."""
        return self.patch_size * (2 ** (len(self.hybrid_layers) + 1) if self.hybrid_layers else 1)

    @property
    def grid_size(self) -> int:
        """Tokens per side at `img_size`."""
        return self.img_size // self.stride

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """R50+ViT: the ResNet's stem and stages (strides 4, 4, 8, 16); then every block's patch tokens as a map."""
        stem = [FeatureInfo("stem", HybridStem.width, 4)] if self.hybrid_layers else []
        stem += [FeatureInfo(f"stage{i + 1}", HybridStem.width * 2 ** i * 4, 4 * 2 ** i)
                 for i in range(len(self.hybrid_layers))]
        return (*stem, *(FeatureInfo(f"block{i}", self.embed_dim, self.stride, num_prefix_tokens=1)
                         for i in range(self.depth)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The hybrid stem's maps, the patch grid, and the tokens [B, 1 + h*w, D] after every block."""
        features = self.hybrid_stem(x, train=train) if self.hybrid_stem else {}
        grid = self.patch_embed(features[f"stage{len(self.hybrid_layers)}"] if self.hybrid_stem else x)
        features["patch_embed"] = grid
        pos_embed = resample_pos_embed(self.pos_embed, grid.shape[1:3])
        x = add_shared(prepend_tokens(grid_to_tokens(grid), self.cls_token), pos_embed.astype(grid.dtype))
        x = self.pos_drop(x, deterministic=not train)
        _, outputs = run_sequence(self.blocks, x, train=train)
        return features | {f"block{i}": tokens for i, tokens in enumerate(outputs)}

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """The normed final tokens and the pooled features: the class token, or the mean of the patch tokens."""
        x = self.norm(features[f"block{self.depth - 1}"])
        return {"tokens": x, "pooled": x[:, 0] if self.global_pool == "token" else jnp.mean(x[:, 1:], axis=1)}


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
# Parameters from torchvision / arithmetic (equal to timm's); GMACs from timm's benchmark
# results (attention matmuls counted); top-1 from timm results-imagenet.csv rows named.
_TIMM = "timm results/benchmark-infer-amp-nchw-pt240 (params, GMACs)"
_AUGREG = "; top-1: timm results-imagenet.csv, augreg_in21k_ft_in1k weights"
_DEIT = "; top-1: DeiT paper (arXiv 2012.12877) Table 1 / facebookresearch/deit README"
_HYBRID = ("timm benchmark csv: 97.89M params for the headless in21k backbone, plus 0.769M for a 1000-class "
           "head; 21.66 GMACs. No 224 px ImageNet-1k top-1 exists (timm's 384 px fine-tune: 84.988)")
VARIANTS = {
    "vit_tiny_patch16_224": (_SIZES["tiny"], PaperFigures(5.717416, 1.26, 75.452, _TIMM + _AUGREG)),
    "vit_small_patch16_224": (_SIZES["small"], PaperFigures(22.050664, 4.61, 81.402, _TIMM + _AUGREG)),
    "vit_base_patch16_224": (_SIZES["base"], PaperFigures(86.567656, 17.58, 84.534, _TIMM + _AUGREG)),
    "vit_large_patch16_224": (_SIZES["large"], PaperFigures(304.326632, 61.6, 85.856, _TIMM + _AUGREG)),
    "vit_base_patch32_224": (dict(_SIZES["base"], patch_size=32),
                             PaperFigures(88.224232, 4.41, 80.732, _TIMM + _AUGREG)),
    # DeiT is the ViT architecture trained with a data-efficient recipe.
    "deit_tiny_patch16_224": (_SIZES["tiny"], PaperFigures(5.717416, 1.26, 72.2, _TIMM + _DEIT)),
    "deit_small_patch16_224": (_SIZES["small"], PaperFigures(22.050664, 4.61, 79.8, _TIMM + _DEIT)),
    "deit_base_patch16_224": (_SIZES["base"], PaperFigures(86.567656, 17.58, 81.8, _TIMM + _DEIT)),
}
HYBRID_VARIANTS = {
    "vit_base_r50_s16_224": (dict(_SIZES["base"], patch_size=1, hybrid_layers=(3, 4, 9)),
                             PaperFigures(97.89 + 0.769, 21.66, None, _HYBRID)),
}

register_variants(VisionTransformer, VARIANTS, category="vit")
register_variants(VisionTransformer, HYBRID_VARIANTS, category="serial")

# Tiny variants for registry-wide and training tests.
register_model("test_vit", VisionTransformer, dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                                   num_classes=10), category="vit", input_size=32)
register_model("test_vit_r50", VisionTransformer, dict(img_size=64, patch_size=1, embed_dim=32, depth=1, num_heads=2,
                                                       hybrid_layers=(1, 1), num_classes=10),
               category="serial", input_size=64)
