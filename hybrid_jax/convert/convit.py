"""timm `convit_*` (the official facebookresearch/convit weights) into `hybrid_jax.models.convit.ConViT`.

GPSA blocks keep timm's names (`qk`, `v`, `proj`, `pos_proj`, `gating_param`); the
global blocks' fused `qkv` Linear (no bias) is split in thirds into our query / key /
value. timm's `rel_indices` buffer is recomputed from the grid, so it is ignored.
"""

import numpy as np

from hybrid_jax.convert.core import Collector, StateDict

IGNORE = (r".*rel_indices$",)
CLASSIFIER = ("head.bias",)


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    out.add("patch_embed/proj", sd.conv("patch_embed.proj", bias=True))
    out.add("", {"cls_token": sd.take("cls_token"), "pos_embed": sd.take("pos_embed")})
    bias = model.qkv_bias
    for i in range(model.depth):
        prefix, block = f"blocks.{i}", f"blocks_{i}"
        out.add(f"{block}/norm1", sd.norm(f"{prefix}.norm1"))
        out.add(f"{block}/norm2", sd.norm(f"{prefix}.norm2"))
        attn, path = f"{prefix}.attn", f"{block}/attn"
        if i < model.local_up_to_layer:
            out.add(f"{path}/qk", sd.linear(f"{attn}.qk", bias=bias))
            out.add(f"{path}/v", sd.linear(f"{attn}.v", bias=bias))
            out.add(f"{path}/pos_proj", sd.linear(f"{attn}.pos_proj"))
            out.add(path, {"gating_param": sd.take(f"{attn}.gating_param")})
            out.add(f"{path}/proj", sd.linear(f"{attn}.proj"))
        else:
            qkv = sd.linear(f"{attn}.qkv", bias=bias)
            kernels = np.split(qkv["kernel"], 3, axis=1)
            biases = np.split(qkv["bias"], 3) if bias else [None] * 3
            for name, kernel, b in zip(("query", "key", "value"), kernels, biases):
                out.add(f"{path}/{name}", {"kernel": kernel} | ({"bias": b} if bias else {}))
            out.add(f"{path}/out", sd.linear(f"{attn}.proj"))
        out.add(f"{block}/mlp/fc1", sd.linear(f"{prefix}.mlp.fc1"))
        out.add(f"{block}/mlp/fc2", sd.linear(f"{prefix}.mlp.fc2"))
    out.add("norm", sd.norm("norm"))
    if model.num_classes:
        out.add("head", sd.linear("head"))
    return out.variables()
