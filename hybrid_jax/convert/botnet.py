"""timm ByobNet BoTNets (`botnet26t_256`, and the paper's BoT50 layout) into `hybrid_jax.models.botnet.BoTNet`.

timm names a conv bottleneck's convs conv1_1x1 / conv2_kxk / conv3_1x1 and an
attention bottleneck's MHSA `self_attn` (a bias-free 1x1 conv `qkv`, channels
[q | k | v] each head-major, and `pos_embed.height_rel` / `width_rel` tables laid
out as ours), with `post_attn` the BatchNorm after it.
"""

import numpy as np

from hybrid_jax.convert.core import Collector, StateDict

CLASSIFIER = ("head.fc.bias",)


def _conv_bn(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    out.conv_bn(path, sd, f"{prefix}.conv", f"{prefix}.bn")


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    for i in range(3 if model.stem_type == "tiered" else 1):
        _conv_bn(out, sd, f"stem.conv{i + 1}", f"stem_{i}")
    for i, blocks in enumerate(model.layout):
        for j, kind in enumerate(blocks):
            prefix, path = f"stages.{i}.{j}", f"stages_{i}/blocks_{j}"
            if f"{prefix}.shortcut.conv.weight" in sd:
                _conv_bn(out, sd, f"{prefix}.shortcut", f"{path}/downsample")
            _conv_bn(out, sd, f"{prefix}.conv1_1x1", f"{path}/conv1")
            _conv_bn(out, sd, f"{prefix}.conv3_1x1", f"{path}/conv3")
            if kind == "C":
                _conv_bn(out, sd, f"{prefix}.conv2_kxk", f"{path}/conv2")
                continue
            qkv = sd.take(f"{prefix}.self_attn.qkv.weight")
            out.add(f"{path}/attn", {
                "qkv": {"kernel": np.ascontiguousarray(qkv.reshape(qkv.shape[0], -1).T)},
                "height_rel": sd.take(f"{prefix}.self_attn.pos_embed.height_rel"),
                "width_rel": sd.take(f"{prefix}.self_attn.pos_embed.width_rel")})
            out.add(f"{path}/post_attn", *sd.batch_norm(f"{prefix}.post_attn"))
    if model.num_classes:
        out.add("head", sd.linear("head.fc"))
    return out.variables()
