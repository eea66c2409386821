"""timm MaxxVit (`coatnet_*`, `maxvit_*_tf_*`) into `hybrid_jax.models.maxxvit` (CoAtNet, MaxViT).

timm fuses query, key and value into one `qkv` layer (a 1x1 conv in CoAtNet's
transformer blocks, a Linear in MaxViT's) in one of two channel orders: timm's own
models interleave them per head ([head][q, k, v][dim]), the TensorFlow ports keep
them apart ([q, k, v][head][dim]). The relative position table tells which: timm's
own is flat [(2h-1)(2w-1), heads], the TensorFlow one [heads, 2h-1, 2w-1] indexed by
key - query. 1x1 convs used as dense layers become Dense kernels.

A checkpoint for another input size (CoAtNet's tables span the whole map, MaxViT's a
window of img_size // 32) has its tables resampled to the model's (bicubic over
displacements; timm's own resize interpolates differently, so fine-tune after).
"""

import math

import numpy as np

from hybrid_jax.convert.core import Collector, ConversionError, StateDict
from hybrid_jax.layers.relpos import from_flat_table, from_key_minus_query_table, resize_table
from hybrid_jax.models.maxxvit import stage_sizes

# Buffers computed from the config (older timm versions saved some of them).
IGNORE = (r".*relative_position_index$", r".*height_lookup$", r".*width_lookup$")
CLASSIFIER = ("head.fc.bias",)


def _dense(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
    """A Linear or a 1x1 Conv2d as Dense params."""
    weight = sd.take(f"{prefix}.weight")
    return {"kernel": weight.reshape(weight.shape[0], -1).T, "bias": sd.take(f"{prefix}.bias")}


def _conv(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    """A Conv2d, with its bias where the checkpoint has one (the model's variables are checked afterwards)."""
    out.add(path, sd.conv(prefix, bias=f"{prefix}.bias" in sd))


def _table(sd: StateDict, key: str, window: int) -> tuple[np.ndarray, bool]:
    """The relative position table in our layout for a window x window attention, and whether q, k, v are
    interleaved per head."""
    table = sd.take(key)
    if table.ndim == 3:
        table, per_head = from_key_minus_query_table(table), False
    else:
        side = (math.isqrt(table.shape[0]) + 1) // 2
        if (2 * side - 1) ** 2 != table.shape[0]:
            raise ConversionError(f"{key}: {table.shape[0]} relative positions is not a square window's (2s - 1)^2")
        table, per_head = from_flat_table(table, side, side), True
    return np.asarray(resize_table(table, window, window)), per_head


def _attention(out: Collector, sd: StateDict, prefix: str, path: str, window: int) -> None:
    """timm Attention2d / AttentionCl (fused qkv, proj, rel_pos) into `attn` and `rel_pos` under `path`."""
    table, per_head = _table(sd, f"{prefix}.rel_pos.relative_position_bias_table", window)
    out.add(f"{path}/rel_pos", {"relative_position_bias_table": table})
    qkv = _dense(sd, f"{prefix}.qkv")
    kernel, bias = qkv["kernel"], qkv["bias"]
    heads, width = table.shape[0], kernel.shape[1] // 3
    if per_head:
        kernel = kernel.reshape(-1, heads, 3, width // heads).transpose(0, 2, 1, 3)
        bias = bias.reshape(heads, 3, width // heads).transpose(1, 0, 2)
    kernel, bias = kernel.reshape(-1, 3, width), bias.reshape(3, width)
    for i, name in enumerate(("query", "key", "value")):
        out.add(f"{path}/attn/{name}", {"kernel": kernel[:, i], "bias": bias[i]})
    out.add(f"{path}/attn/out", _dense(sd, f"{prefix}.proj"))


def _norm_and_mlp(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    out.add(f"{path}/norm2", sd.norm(f"{prefix}.norm2"))
    out.add(f"{path}/mlp/fc1", _dense(sd, f"{prefix}.mlp.fc1"))
    out.add(f"{path}/mlp/fc2", _dense(sd, f"{prefix}.mlp.fc2"))


def _mbconv(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    if f"{prefix}.shortcut.expand.weight" in sd:
        _conv(out, sd, f"{prefix}.shortcut.expand", f"{path}/shortcut/expand")
    for norm in ("pre_norm", "norm1", "norm2"):
        out.add(f"{path}/{norm}", *sd.batch_norm(f"{prefix}.{norm}"))
    for conv in ("conv1_1x1", "conv2_kxk", "conv3_1x1"):
        _conv(out, sd, f"{prefix}.{conv}", f"{path}/{conv}")
    se = f"{prefix}.se_early" if f"{prefix}.se_early.fc1.weight" in sd else f"{prefix}.se"
    out.add(f"{path}/se/conv_reduce", sd.conv(f"{se}.fc1", bias=True))
    out.add(f"{path}/se/conv_expand", sd.conv(f"{se}.fc2", bias=True))


def _transformer(out: Collector, sd: StateDict, prefix: str, path: str, window: int) -> None:
    """TransformerBlock2d; a stride-2 one keeps its norm in `norm1.norm` (beside the pool) and has a shortcut."""
    if f"{prefix}.shortcut.expand.weight" in sd:
        _conv(out, sd, f"{prefix}.shortcut.expand", f"{path}/shortcut/expand")
    norm1 = f"{prefix}.norm1.norm" if f"{prefix}.norm1.norm.weight" in sd else f"{prefix}.norm1"
    out.add(f"{path}/norm1", sd.norm(norm1))
    _attention(out, sd, f"{prefix}.attn", path, window)
    _norm_and_mlp(out, sd, prefix, path)


def _partition(out: Collector, sd: StateDict, prefix: str, path: str, window: int) -> None:
    out.add(f"{path}/norm1", sd.norm(f"{prefix}.norm1"))
    _attention(out, sd, f"{prefix}.attn", path, window)
    _norm_and_mlp(out, sd, prefix, path)


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    _conv(out, sd, "stem.conv1", "stem/conv1")
    out.add("stem/norm1", *sd.batch_norm("stem.norm1"))
    _conv(out, sd, "stem.conv2", "stem/conv2")
    partition = model.partition_size or model.img_size // 32
    sizes = stage_sizes(model.img_size, len(model.depths))
    for i, (kind, depth, size) in enumerate(zip(model.block_types, model.depths, sizes)):
        for j in range(depth):
            prefix, path = f"stages.{i}.blocks.{j}", f"stages_{i}/blocks_{j}"
            if kind == "C":
                _mbconv(out, sd, prefix, path)
            elif kind == "T":
                _transformer(out, sd, prefix, path, size)
            else:
                _mbconv(out, sd, f"{prefix}.conv", f"{path}/conv")
                _partition(out, sd, f"{prefix}.attn_block", f"{path}/attn_block", partition)
                _partition(out, sd, f"{prefix}.attn_grid", f"{path}/attn_grid", partition)
    if model.head_hidden:
        out.add("norm", sd.norm("head.norm"))
        out.add("pre_logits", sd.linear("head.pre_logits.fc"))
    else:
        out.add("norm", sd.norm("norm"))
    if model.num_classes:
        out.add("head", sd.linear("head.fc"))
    return out.variables()
