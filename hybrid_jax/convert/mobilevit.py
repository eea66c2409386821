"""timm `mobilevit_*` and Hugging Face `MobileViTForImageClassification` into `hybrid_jax.models.mobilevit.MobileViT`.

Both hold the same network (apple/ml-cvnets' MobileViT v1) under different names:
- timm builds it as a ByobNet: `stages.i.j` are inverted residuals (`conv1_1x1`,
  `conv2_kxk`, `conv3_1x1`) or, last in stages 3-5, the MobileViT block with a fused
  `qkv` Linear in each transformer layer;
- Hugging Face nests it under `mobilevit.encoder.layer.i`: stages 1-2 hold
  `layer.j` inverted residuals (`expand_1x1`, `conv_3x3`, `reduce_1x1`), stages 3-5
  a `downsampling_layer` and the block itself, with separate query / key / value.
Which one a state dict is comes from its key names.
"""

from hybrid_jax.convert.core import Collector, ConversionError, StateDict
from hybrid_jax.convert.vit import attention as fused_attention

CLASSIFIER = ("head.fc.bias", "classifier.bias")

_IR = ("conv_pw", "conv_dw", "conv_pwl")


def _timm(model, sd: StateDict) -> dict:
    out = Collector()
    out.conv_bn("stem", sd, "stem.conv", "stem.bn")
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            prefix, path = f"stages.{i}.{j}", f"stages_{i}/blocks_{j}"
            for ours, theirs in zip(_IR, ("conv1_1x1", "conv2_kxk", "conv3_1x1")):
                out.conv_bn(f"{path}/{ours}", sd, f"{prefix}.{theirs}.conv", f"{prefix}.{theirs}.bn")
        if not model.transformer_dims[i]:
            continue
        prefix, path = f"stages.{i}.{depth}", f"stages_{i}/blocks_{depth}"
        out.conv_bn(f"{path}/conv_kxk", sd, f"{prefix}.conv_kxk.conv", f"{prefix}.conv_kxk.bn")
        out.add(f"{path}/conv_1x1", sd.conv(f"{prefix}.conv_1x1"))
        for k in range(model.transformer_depths[i]):
            layer, block = f"{prefix}.transformer.{k}", f"{path}/transformer_{k}"
            out.add(f"{block}/norm1", sd.norm(f"{layer}.norm1"))
            fused_attention(out, sd, f"{layer}.attn", f"{block}/attn")
            out.add(f"{block}/norm2", sd.norm(f"{layer}.norm2"))
            out.add(f"{block}/mlp/fc1", sd.linear(f"{layer}.mlp.fc1"))
            out.add(f"{block}/mlp/fc2", sd.linear(f"{layer}.mlp.fc2"))
        out.add(f"{path}/norm", sd.norm(f"{prefix}.norm"))
        for conv in ("conv_proj", "conv_fusion"):
            out.conv_bn(f"{path}/{conv}", sd, f"{prefix}.{conv}.conv", f"{prefix}.{conv}.bn")
    out.conv_bn("final_conv", sd, "final_conv.conv", "final_conv.bn")
    if model.num_classes:
        out.add("head", sd.linear("head.fc"))
    return out.variables()


def _hf_conv_bn(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    out.conv_bn(path, sd, f"{prefix}.convolution", f"{prefix}.normalization")


def _hf_inverted_residual(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    for ours, theirs in zip(_IR, ("expand_1x1", "conv_3x3", "reduce_1x1")):
        _hf_conv_bn(out, sd, f"{prefix}.{theirs}", f"{path}/{ours}")


def _hf(model, sd: StateDict) -> dict:
    out = Collector()
    _hf_conv_bn(out, sd, "mobilevit.conv_stem", "stem")
    for i, depth in enumerate(model.depths):
        prefix, stage = f"mobilevit.encoder.layer.{i}", f"stages_{i}"
        if not model.transformer_dims[i]:
            for j in range(depth):
                _hf_inverted_residual(out, sd, f"{prefix}.layer.{j}", f"{stage}/blocks_{j}")
            continue
        if depth != 1:
            raise ConversionError(f"Hugging Face's MobileViT stages hold one inverted residual before the MobileViT "
                                  f"block; stage {i + 1} of this model has {depth}")
        _hf_inverted_residual(out, sd, f"{prefix}.downsampling_layer", f"{stage}/blocks_0")
        path = f"{stage}/blocks_{depth}"
        _hf_conv_bn(out, sd, f"{prefix}.conv_kxk", f"{path}/conv_kxk")
        out.add(f"{path}/conv_1x1", sd.conv(f"{prefix}.conv_1x1.convolution"))
        for k in range(model.transformer_depths[i]):
            layer, block = f"{prefix}.transformer.layer.{k}", f"{path}/transformer_{k}"
            out.add(f"{block}/norm1", sd.norm(f"{layer}.layernorm_before"))
            for name in ("query", "key", "value"):
                out.add(f"{block}/attn/{name}", sd.linear(f"{layer}.attention.attention.{name}"))
            out.add(f"{block}/attn/out", sd.linear(f"{layer}.attention.output.dense"))
            out.add(f"{block}/norm2", sd.norm(f"{layer}.layernorm_after"))
            out.add(f"{block}/mlp/fc1", sd.linear(f"{layer}.intermediate.dense"))
            out.add(f"{block}/mlp/fc2", sd.linear(f"{layer}.output.dense"))
        out.add(f"{path}/norm", sd.norm(f"{prefix}.layernorm"))
        _hf_conv_bn(out, sd, f"{prefix}.conv_projection", f"{path}/conv_proj")
        _hf_conv_bn(out, sd, f"{prefix}.fusion", f"{path}/conv_fusion")
    _hf_conv_bn(out, sd, "mobilevit.conv_1x1_exp", "final_conv")
    if model.num_classes:
        out.add("head", sd.linear("classifier"))
    return out.variables()


def convert(model, sd: StateDict) -> dict:
    if "mobilevit.conv_stem.convolution.weight" in sd:
        return _hf(model, sd)
    return _timm(model, sd)

