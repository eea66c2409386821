"""Conformer's official release (pengzhiliang/Conformer, `conformer.py`) into `Conformer`.

The official state dict (`{'model': ...}` as its main.py saves, or bare) names
modules as ours except in three places: attention fuses query, key and value into
one `qkv` Linear (split in thirds, [q | k | v] each head-major, as timm's ViT), the
FCU's `squeeze_block` / `expand_block` sit under `fcu` here, and `med_block.{j}` is
`med_block_{j}`. The official model keeps `conv_cls_head` even at num_classes=0
(a Linear with no outputs), which is taken and dropped. Against the official code
with random weights and BatchNorm statistics, all four releases' logits agree to 2.3e-5.
"""

from hybrid_jax.convert.core import Collector, StateDict
from hybrid_jax.convert.vit import attention

CLASSIFIER = ("trans_cls_head.bias",)


def _conv_block(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    """A bottleneck: conv{k} + bn{k}, and the shortcut's residual_conv + residual_bn where present."""
    for k in (1, 2, 3):
        out.add(f"{path}/conv{k}", sd.conv(f"{prefix}.conv{k}"))
        out.add(f"{path}/bn{k}", *sd.batch_norm(f"{prefix}.bn{k}"))
    if f"{prefix}.residual_conv.weight" in sd:
        out.add(f"{path}/residual_conv", sd.conv(f"{prefix}.residual_conv"))
        out.add(f"{path}/residual_bn", *sd.batch_norm(f"{prefix}.residual_bn"))


def _trans_block(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    out.add(f"{path}/norm1", sd.norm(f"{prefix}.norm1"))
    attention(out, sd, f"{prefix}.attn", f"{path}/attn")
    out.add(f"{path}/norm2", sd.norm(f"{prefix}.norm2"))
    out.add(f"{path}/mlp/fc1", sd.linear(f"{prefix}.mlp.fc1"))
    out.add(f"{path}/mlp/fc2", sd.linear(f"{prefix}.mlp.fc2"))


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    out.add("conv1", sd.conv("conv1"))
    out.add("bn1", *sd.batch_norm("bn1"))
    out.add("", {"cls_token": sd.take("cls_token")})
    _conv_block(out, sd, "conv_1", "conv_1")
    out.add("trans_patch_conv", sd.conv("trans_patch_conv", bias=True))
    _trans_block(out, sd, "trans_1", "trans_1")
    for i in range(2, model.depth + 1):
        prefix, path = f"conv_trans_{i}", f"conv_trans_{i}"
        _conv_block(out, sd, f"{prefix}.cnn_block", f"{path}/cnn_block")
        out.add(f"{path}/fcu/squeeze_block/conv_project", sd.conv(f"{prefix}.squeeze_block.conv_project", bias=True))
        out.add(f"{path}/fcu/squeeze_block/ln", sd.norm(f"{prefix}.squeeze_block.ln"))
        out.add(f"{path}/fcu/expand_block/conv_project", sd.conv(f"{prefix}.expand_block.conv_project", bias=True))
        out.add(f"{path}/fcu/expand_block/bn", *sd.batch_norm(f"{prefix}.expand_block.bn"))
        _trans_block(out, sd, f"{prefix}.trans_block", f"{path}/trans_block")
        for j in range(model.num_med_block):
            _conv_block(out, sd, f"{prefix}.med_block.{j}", f"{path}/med_block_{j}")
        _conv_block(out, sd, f"{prefix}.fusion_block", f"{path}/fusion_block")
    out.add("trans_norm", sd.norm("trans_norm"))
    if model.num_classes:
        out.add("conv_cls_head", sd.linear("conv_cls_head"))
        out.add("trans_cls_head", sd.linear("trans_cls_head"))
    elif "conv_cls_head.weight" in sd:
        sd.linear("conv_cls_head")  # the official headless model's empty Linear
    return out.variables()
