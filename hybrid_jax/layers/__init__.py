"""Shared layers: every model in the zoo is built from these."""

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.attention import MultiHeadAttention, attention_path, dot_product_attention
from hybrid_jax.layers.axes import MAP, TOKENS
from hybrid_jax.layers.broadcast import add_shared
from hybrid_jax.layers.conv import (
    BasicBlock,
    Bottleneck,
    Conv2d,
    ConvNormAct,
    InvertedResidual,
    ResNetStage,
    SqueezeExcite,
    max_pool_3x3,
    torch_padding,
)
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.drop import DropPath, LayerScale, drop_path_schedule
from hybrid_jax.layers.features import FeatureExtractor, FeatureInfo
from hybrid_jax.layers.inputs import check_divisible, check_images
from hybrid_jax.layers.mlp import Mlp, classifier, classifier_head
from hybrid_jax.layers.model import BranchClassifier, ImageClassifier, run_stages
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.patch import (
    ConvStem,
    PatchEmbed,
    grid_to_tokens,
    prepend_tokens,
    resample_pos_embed,
    tokens_to_grid,
)
