"""timm `edgenext_*` (the official mmaaz60/EdgeNeXt weights, renamed by timm) into `models.edgenext.EdgeNeXt`.

timm's names map one to one: `stem.0/1` (conv, LayerNorm2d), `stages.i.downsample.0/1`
(LayerNorm2d, conv), `stages.i.blocks.j` with `conv_dw`, `norm`, `mlp.fc1/fc2`, `gamma`
(conv encoders) or `convs.k`, `pos_embd.token_projection`, `norm_xca`, `gamma_xca`,
`xca.qkv/proj/temperature`, `norm`, `mlp`, `gamma` (SDTA encoders), and `head.norm`,
`head.fc`. The fused `qkv` Linear stays fused here (XCA splits it after the matmul);
the per-head temperature is stored [heads, 1, 1] in timm and [heads] here.
"""

from hybrid_jax.convert.core import Collector, StateDict

CLASSIFIER = ("head.fc.bias",)


def _mlp(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    out.add(f"{path}/norm", sd.norm(f"{prefix}.norm"))
    out.add(f"{path}/mlp/fc1", sd.linear(f"{prefix}.mlp.fc1"))
    out.add(f"{path}/mlp/fc2", sd.linear(f"{prefix}.mlp.fc2"))
    if f"{prefix}.gamma" in sd:
        out.add(path, {"gamma": sd.take(f"{prefix}.gamma")})


def _sdta(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    k = 0
    while f"{prefix}.convs.{k}.weight" in sd:
        out.add(f"{path}/convs_{k}", sd.conv(f"{prefix}.convs.{k}", bias=True))
        k += 1
    if f"{prefix}.pos_embd.token_projection.weight" in sd:
        out.add(f"{path}/pos_embd", sd.conv(f"{prefix}.pos_embd.token_projection", bias=True))
    out.add(f"{path}/norm_xca", sd.norm(f"{prefix}.norm_xca"))
    if f"{prefix}.gamma_xca" in sd:
        out.add(path, {"gamma_xca": sd.take(f"{prefix}.gamma_xca")})
    out.add(f"{path}/xca/qkv", sd.linear(f"{prefix}.xca.qkv", bias=f"{prefix}.xca.qkv.bias" in sd))
    out.add(f"{path}/xca/proj", sd.linear(f"{prefix}.xca.proj"))
    out.add(f"{path}/xca", {"temperature": sd.take(f"{prefix}.xca.temperature").reshape(-1)})
    _mlp(out, sd, prefix, path)


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    out.add("stem_conv", sd.conv("stem.0", bias=True))
    out.add("stem_norm", sd.norm("stem.1"))
    for i, depth in enumerate(model.depths):
        stage, path = f"stages.{i}", f"stages_{i}"
        if i > 0:
            out.add(f"{path}/downsample_norm", sd.norm(f"{stage}.downsample.0"))
            out.add(f"{path}/downsample_conv", sd.conv(f"{stage}.downsample.1", bias=True))
        for j in range(depth):
            prefix, block = f"{stage}.blocks.{j}", f"{path}/blocks_{j}"
            if j < depth - model.global_blocks[i]:
                out.add(f"{block}/conv_dw", sd.conv(f"{prefix}.conv_dw", bias=True))
                _mlp(out, sd, prefix, block)
            else:
                _sdta(out, sd, prefix, block)
    out.add("norm", sd.norm("head.norm"))
    if model.num_classes:
        out.add("head", sd.linear("head.fc"))
    return out.variables()
