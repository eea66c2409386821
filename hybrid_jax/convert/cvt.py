"""Hugging Face `CvtForImageClassification` (`cvt_13`, `cvt_21`) into `hybrid_jax.models.cvt.CvT`.

The Hugging Face port keeps the official microsoft/CvT structure under longer
names: one Linear each for query, key and value, a depthwise conv + BatchNorm per
projection, and the class token on the last stage.
"""

from hybrid_jax.convert.core import Collector, StateDict

CLASSIFIER = ("classifier.bias",)


def _block(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    attn = f"{prefix}.attention.attention"
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        projection = f"{attn}.convolution_projection_{theirs}.convolution_projection"
        out.conv_bn(f"{path}/attn/conv_proj_{ours}", sd, f"{projection}.convolution", f"{projection}.normalization")
        out.add(f"{path}/attn/proj_{ours}", sd.linear(f"{attn}.projection_{theirs}"))
    out.add(f"{path}/attn/proj", sd.linear(f"{prefix}.attention.output.dense"))
    out.add(f"{path}/norm1", sd.norm(f"{prefix}.layernorm_before"))
    out.add(f"{path}/norm2", sd.norm(f"{prefix}.layernorm_after"))
    out.add(f"{path}/mlp/fc1", sd.linear(f"{prefix}.intermediate.dense"))
    out.add(f"{path}/mlp/fc2", sd.linear(f"{prefix}.output.dense"))


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    for i, depth in enumerate(model.depths):
        prefix, stage = f"cvt.encoder.stages.{i}", f"stages_{i}"
        embed = f"{prefix}.embedding.convolution_embeddings"
        out.add(f"{stage}/embed/proj", sd.conv(f"{embed}.projection", bias=True))
        out.add(f"{stage}/embed/norm", sd.norm(f"{embed}.normalization"))
        if f"{prefix}.cls_token" in sd:
            out.add(stage, {"cls_token": sd.take(f"{prefix}.cls_token")})
        for j in range(depth):
            _block(out, sd, f"{prefix}.layers.{j}", f"{stage}/blocks_{j}")
    out.add("norm", sd.norm("layernorm"))
    if model.num_classes:
        out.add("head", sd.linear("classifier"))
    return out.variables()
