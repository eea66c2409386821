"""timm / torchvision ResNet (`resnet18` .. `resnet101`) into `hybrid_jax.models.resnet.ResNet`."""

from hybrid_jax.convert.core import Collector, StateDict
from hybrid_jax.layers.conv import RESIDUAL_BLOCKS

CLASSIFIER = ("fc.bias",)


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    out.conv_bn("stem", sd, "conv1", "bn1")
    convs = 3 if RESIDUAL_BLOCKS[model.block].expansion == 4 else 2
    for i, depth in enumerate(model.layers):
        for j in range(depth):
            torch_block, block = f"layer{i + 1}.{j}", f"stages_{i}/blocks_{j}"
            for k in range(1, convs + 1):
                out.conv_bn(f"{block}/conv{k}", sd, f"{torch_block}.conv{k}", f"{torch_block}.bn{k}")
            if f"{torch_block}.downsample.0.weight" in sd:
                out.conv_bn(f"{block}/downsample", sd, f"{torch_block}.downsample.0", f"{torch_block}.downsample.1")
    if model.num_classes:
        out.add("head", sd.linear("fc"))
    return out.variables()
