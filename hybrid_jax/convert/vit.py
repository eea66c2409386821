"""timm ViT / DeiT (`vit_*_patch*_224`, `deit_*`) and R50+ViT (`vit_base_r50_s16_224`) into VisionTransformer.

timm fuses query, key and value into one `qkv` Linear; ours has three, so its
weight is split in thirds. The R50 stem of the hybrid is timm's ResNetV2 (no
pre-activation, StdConv2dSame, GroupNorm) under `patch_embed.backbone`.

The `.npz` files of google-research/vision_transformer (the original ViT and
R50+ViT releases, which timm converts with `_load_weights`) hold the Flax model of
`vit_jax/models_vit.py` and `models_resnet.py`: `embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/`
`{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3/Dense_{0,1}}`
(attention kernels per head: [D, heads, d] and [heads, d, D]), `Transformer/encoder_norm`,
`head`; the hybrid adds `conv_root`, `gn_root` and `block{s}/unit{u}/{conv,gn}{1,2,3,_proj}`.
Kernels are already HWIO / (in, out). A `pre_logits` layer (some in21k files) has no
place here and is refused.
"""

import numpy as np

from hybrid_jax.convert.core import Collector, StateDict

CLASSIFIER = ("head.bias", "head/bias")


def attention(out: Collector, sd: StateDict, torch_prefix: str, path: str) -> None:
    """A fused-qkv attention block (timm's Attention) into query / key / value / out Dense layers."""
    qkv = sd.linear(f"{torch_prefix}.qkv")
    for name, kernel, bias in zip(("query", "key", "value"), np.split(qkv["kernel"], 3, axis=1),
                                  np.split(qkv["bias"], 3)):
        out.add(f"{path}/{name}", {"kernel": kernel, "bias": bias})
    out.add(f"{path}/out", sd.linear(f"{torch_prefix}.proj"))


def _hybrid_stem(out: Collector, sd: StateDict, layers) -> None:
    backbone = "patch_embed.backbone"
    out.add("hybrid_stem/stem/conv", sd.conv(f"{backbone}.stem.conv"))
    out.add("hybrid_stem/stem/norm", sd.norm(f"{backbone}.stem.norm"))
    for i, depth in enumerate(layers):
        for j in range(depth):
            torch_block, block = f"{backbone}.stages.{i}.blocks.{j}", f"hybrid_stem/stages_{i}/blocks_{j}"
            for k in (1, 2, 3):
                out.add(f"{block}/conv{k}/conv", sd.conv(f"{torch_block}.conv{k}"))
                out.add(f"{block}/conv{k}/norm", sd.norm(f"{torch_block}.norm{k}"))
            if f"{torch_block}.downsample.conv.weight" in sd:
                out.add(f"{block}/downsample/conv", sd.conv(f"{torch_block}.downsample.conv"))
                out.add(f"{block}/downsample/norm", sd.norm(f"{torch_block}.downsample.norm"))


def _npz(model, sd: StateDict, out: Collector) -> None:
    """google-research/vision_transformer's names and layouts (see the module docstring)."""
    dense = lambda key: {"kernel": sd.take(f"{key}/kernel"), "bias": sd.take(f"{key}/bias")}
    norm = lambda key: {"scale": sd.take(f"{key}/scale").reshape(-1), "bias": sd.take(f"{key}/bias").reshape(-1)}
    if model.hybrid_layers:
        out.add("hybrid_stem/stem/conv", {"kernel": sd.take("conv_root/kernel")})
        out.add("hybrid_stem/stem/norm", norm("gn_root"))
        for i, depth in enumerate(model.hybrid_layers):
            for j in range(depth):
                unit, block = f"block{i + 1}/unit{j + 1}", f"hybrid_stem/stages_{i}/blocks_{j}"
                for k in (1, 2, 3):
                    out.add(f"{block}/conv{k}/conv", {"kernel": sd.take(f"{unit}/conv{k}/kernel")})
                    out.add(f"{block}/conv{k}/norm", norm(f"{unit}/gn{k}"))
                if f"{unit}/conv_proj/kernel" in sd:
                    out.add(f"{block}/downsample/conv", {"kernel": sd.take(f"{unit}/conv_proj/kernel")})
                    out.add(f"{block}/downsample/norm", norm(f"{unit}/gn_proj"))
    out.add("patch_embed/proj", dense("embedding"))
    out.add("", {"cls_token": sd.take("cls"), "pos_embed": sd.take("Transformer/posembed_input/pos_embedding")})
    for i in range(model.depth):
        prefix, block = f"Transformer/encoderblock_{i}", f"blocks_{i}"
        out.add(f"{block}/norm1", norm(f"{prefix}/LayerNorm_0"))
        width = model.embed_dim
        for name in ("query", "key", "value", "out"):  # kernels [D, heads, d] or, for out, [heads, d, D]
            params = dense(f"{prefix}/MultiHeadDotProductAttention_1/{name}")
            out.add(f"{block}/attn/{name}", {"kernel": params["kernel"].reshape(width, width),
                                             "bias": params["bias"].reshape(width)})
        out.add(f"{block}/norm2", norm(f"{prefix}/LayerNorm_2"))
        out.add(f"{block}/mlp/fc1", dense(f"{prefix}/MlpBlock_3/Dense_0"))
        out.add(f"{block}/mlp/fc2", dense(f"{prefix}/MlpBlock_3/Dense_1"))
    out.add("norm", norm("Transformer/encoder_norm"))
    if model.num_classes:
        out.add("head", dense("head"))


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    if "embedding/kernel" in sd:
        _npz(model, sd, out)
        return out.variables()
    if model.hybrid_layers:
        _hybrid_stem(out, sd, model.hybrid_layers)
    out.add("patch_embed/proj", sd.conv("patch_embed.proj", bias=True))
    out.add("", {"cls_token": sd.take("cls_token"), "pos_embed": sd.take("pos_embed")})
    for i in range(model.depth):
        prefix, block = f"blocks.{i}", f"blocks_{i}"
        out.add(f"{block}/norm1", sd.norm(f"{prefix}.norm1"))
        attention(out, sd, f"{prefix}.attn", f"{block}/attn")
        out.add(f"{block}/norm2", sd.norm(f"{prefix}.norm2"))
        out.add(f"{block}/mlp/fc1", sd.linear(f"{prefix}.mlp.fc1"))
        out.add(f"{block}/mlp/fc2", sd.linear(f"{prefix}.mlp.fc2"))
        if model.layer_scale:
            out.add(f"{block}/ls1", {"gamma": sd.take(f"{prefix}.ls1.gamma")})
            out.add(f"{block}/ls2", {"gamma": sd.take(f"{prefix}.ls2.gamma")})
    out.add("norm", sd.norm("norm"))
    if model.num_classes:
        out.add("head", sd.linear("head"))
    return out.variables()
