"""Shared layers: every model in the zoo is built from these."""

from hybrid_jax.layers.act import get_act
from hybrid_jax.layers.attention import MultiHeadAttention, attention_path, dot_product_attention
from hybrid_jax.layers.conv import (BasicBlock, Bottleneck, Conv2d, ConvNormAct, InvertedResidual, ResNetStage,
                                    SqueezeExcite, torch_padding)
from hybrid_jax.layers.drop import DropPath, LayerScale, drop_path_schedule
from hybrid_jax.layers.mlp import Mlp, classifier_head
from hybrid_jax.layers.norm import layer_norm, norm_2d
from hybrid_jax.layers.patch import ConvStem, PatchEmbed, resample_pos_embed
