"""ResNet (He et al., CVPR 2016, arXiv 1512.03385), the CNN baseline of the zoo.

ResNet v1.5 as torchvision and timm build it: the stride sits on the 3x3 conv of
the bottleneck, padding is PyTorch's symmetric k // 2, and the last norm of each
residual branch starts at zero. Parameter counts equal torchvision's exactly.
"""

from collections.abc import Sequence

import jax

from hybrid_jax.layers.conv import RESIDUAL_BLOCKS, ConvNormAct, ResNetStage, max_pool_3x3
from hybrid_jax.layers.drop import drop_path_schedule
from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.mlp import classifier
from hybrid_jax.layers.model import ImageClassifier, run_stages
from hybrid_jax.registry import PaperFigures, register_model, register_variants


class ResNet(ImageClassifier):
    """ResNet for ImageNet: 7x7 stem, max pool, four residual stages, average pool, linear head."""

    layers: Sequence[int] = (3, 4, 6, 3)
    block: str = "bottleneck"  # basic | bottleneck
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem = ConvNormAct(self.stem_width, 7, strides=2, **kw)
        rates = drop_path_schedule(self.drop_path_rate, self.layers)
        self.stages = [ResNetStage(self.block, depth, width, 1 if i == 0 else 2, rates[i], remat=self.remat, **kw)
                       for i, (depth, width) in enumerate(zip(self.layers, self.widths))]
        self.head_drop, self.head = classifier(self.num_classes, self.drop_rate, **kw)

    @property
    def num_features(self) -> int:
        """Width of the pooled features."""
        return self.widths[-1] * RESIDUAL_BLOCKS[self.block].expansion

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """The max-pooled stem (stride 4) and each stage (strides 4, 8, 16, 32)."""
        expansion = RESIDUAL_BLOCKS[self.block].expansion
        return (FeatureInfo("stem", self.stem_width, 4),
                *(FeatureInfo(f"stage{i + 1}", width * expansion, 4 * 2 ** i) for i, width in enumerate(self.widths)))

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Feature maps after the stem (max-pooled) and after each stage."""
        return run_stages(max_pool_3x3(self.stem(x, train=train)), self.stages, train=train)


# torchvision's model table (IMAGENET1K_V1 weights): params exact, "GFLOPS" are multiply-adds.
_TORCHVISION = "torchvision model docs / resnet.py weight metadata (IMAGENET1K_V1)"
VARIANTS = {
    "resnet18": (dict(block="basic", layers=(2, 2, 2, 2)), PaperFigures(11.689512, 1.814, 69.758, _TORCHVISION)),
    "resnet34": (dict(block="basic", layers=(3, 4, 6, 3)), PaperFigures(21.797672, 3.664, 73.314, _TORCHVISION)),
    "resnet50": (dict(block="bottleneck", layers=(3, 4, 6, 3)), PaperFigures(25.557032, 4.089, 76.130, _TORCHVISION)),
    "resnet101": (dict(block="bottleneck", layers=(3, 4, 23, 3)), PaperFigures(44.549160, 7.801, 77.374, _TORCHVISION)),
}

register_variants(ResNet, VARIANTS, category="cnn")

# A few-thousand-parameter ResNet so registry-wide and training tests stay fast.
register_model("test_resnet", ResNet, dict(block="basic", layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), stem_width=8,
                                            num_classes=10), category="cnn", input_size=32)
