"""ResNet (He et al., CVPR 2016, arXiv 1512.03385), the CNN baseline of the zoo.

ResNet v1.5 as torchvision and timm build it: the stride sits on the 3x3 conv of
the bottleneck, padding is PyTorch's symmetric k // 2, and the last norm of each
residual branch starts at zero. Parameter counts equal torchvision's exactly.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.conv import RESIDUAL_BLOCKS, ConvNormAct, ResNetStage
from hybrid_jax.layers.drop import drop_path_schedule
from hybrid_jax.layers.mlp import classifier_head
from hybrid_jax.registry import PaperFigures, register_model

Dtype = Any


def max_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-2 max pool with one pixel of -inf padding, as PyTorch's MaxPool2d(3, 2, 1)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNet(nn.Module):
    """ResNet for ImageNet: 7x7 stem, max pool, four residual stages, average pool, linear head."""

    layers: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"  # basic | bottleneck
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem = ConvNormAct(self.stem_width, 7, strides=2, **kw)
        rates = drop_path_schedule(self.drop_path_rate, self.layers)
        self.stages = [ResNetStage(self.block, depth, width, 1 if i == 0 else 2, rates[i], **kw)
                       for i, (depth, width) in enumerate(zip(self.layers, self.widths))]
        self.head_drop = nn.Dropout(self.drop_rate)
        if self.num_classes:
            self.head = classifier_head(self.num_classes, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.widths[-1] * RESIDUAL_BLOCKS[self.block].expansion

    def forward_features(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Feature maps after the stem and after each stage, and the pooled features."""
        features = {"stem": max_pool_3x3(self.stem(x, train=train))}
        x = features["stem"]
        for i, stage in enumerate(self.stages):
            x = features[f"stage{i + 1}"] = stage(x, train=train)
        features["pooled"] = jnp.mean(x, axis=(1, 2))
        return features

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pooled = self.forward_features(x, train=train)["pooled"]
        if not self.num_classes:
            return pooled
        return self.head(self.head_drop(pooled, deterministic=not train))


# torchvision's model table (IMAGENET1K_V1 weights): params exact, "GFLOPS" are multiply-adds.
_TORCHVISION = "torchvision model docs / resnet.py weight metadata (IMAGENET1K_V1)"
VARIANTS = {
    "resnet18": (dict(block="basic", layers=(2, 2, 2, 2)), PaperFigures(11.689512, 1.814, 69.758, _TORCHVISION)),
    "resnet34": (dict(block="basic", layers=(3, 4, 6, 3)), PaperFigures(21.797672, 3.664, 73.314, _TORCHVISION)),
    "resnet50": (dict(block="bottleneck", layers=(3, 4, 6, 3)), PaperFigures(25.557032, 4.089, 76.130, _TORCHVISION)),
    "resnet101": (dict(block="bottleneck", layers=(3, 4, 23, 3)), PaperFigures(44.549160, 7.801, 77.374, _TORCHVISION)),
}

for _name, (_fields, _paper) in VARIANTS.items():
    register_model(_name, ResNet, _fields, category="cnn", paper=_paper)

# A few-thousand-parameter ResNet so registry-wide and training tests stay fast.
register_model("test_resnet", ResNet, dict(block="basic", layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), stem_width=8,
                                            num_classes=10), category="cnn", input_size=32)
