"""timm `levit_*` / `levit_conv_*` and Hugging Face `LevitForImageClassification(WithTeacher)` into `Levit`.

All three hold the official LeViT weights under different names:
- timm (linear mode): `stem.convK.{linear,bn}`, `stages.i.downsample.attn_downsample.{kv,q.ln,proj.ln}`,
  `stages.i.blocks.j.attn.{qkv,proj.ln}`, `...mlp.{ln1,ln2}`, `head[_dist].{bn,linear}`;
- timm conv mode: the same names, every Linear stored as a 1x1 Conv2d (squeezed here);
- Hugging Face: `levit.patch_embeddings.embedding_layer_K`, and per stage one flat
  `layers` list of residual attention / MLP layers in which the shrinking attention
  of the *next* stage (and its MLP) comes last, so stage i's last two layers fill our
  stage i + 1's `downsample`.
The fused projections keep their per-head [q | k | v] order in every layout, and the
attention bias tables list offsets in the same order (|dy| * width + |dx|), so no
tensor is rearranged. The offset-index buffers are rebuilt from the config.
"""

from hybrid_jax.convert.core import Collector, StateDict

IGNORE = (r".*attention_bias_idxs$",)
CLASSIFIER = ("head.linear.bias", "classifier.linear.bias")


def _linear_norm(out: Collector, sd: StateDict, prefix: str, path: str, linear: str = "linear",
                 bn: str = "bn") -> None:
    weight = sd.take(f"{prefix}.{linear}.weight")
    if weight.ndim == 4:  # timm's conv mode: a 1x1 convolution
        weight = weight[:, :, 0, 0]
    out.add(f"{path}/linear", {"kernel": weight.T})
    out.add(f"{path}/bn", *sd.batch_norm(f"{prefix}.{bn}"))


def _timm(model, sd: StateDict, out: Collector) -> None:
    for k in range(4):
        out.conv_bn(f"stem_{k}", sd, f"stem.conv{k + 1}.linear", f"stem.conv{k + 1}.bn")
    for i, depth in enumerate(model.depth):
        stage = f"stages_{i}"
        if i > 0:
            down = f"stages.{i}.downsample"
            attn = f"{stage}/downsample/attn_downsample"
            _linear_norm(out, sd, f"{down}.attn_downsample.kv", f"{attn}/kv")
            _linear_norm(out, sd, f"{down}.attn_downsample.q.ln", f"{attn}/q")
            _linear_norm(out, sd, f"{down}.attn_downsample.proj.ln", f"{attn}/proj")
            out.add(attn, {"attention_biases": sd.take(f"{down}.attn_downsample.attention_biases")})
            _linear_norm(out, sd, f"{down}.mlp.ln1", f"{stage}/downsample/mlp/ln1")
            _linear_norm(out, sd, f"{down}.mlp.ln2", f"{stage}/downsample/mlp/ln2")
        for j in range(depth):
            block, path = f"stages.{i}.blocks.{j}", f"{stage}/blocks_{j}"
            _linear_norm(out, sd, f"{block}.attn.qkv", f"{path}/attn/qkv")
            _linear_norm(out, sd, f"{block}.attn.proj.ln", f"{path}/attn/proj")
            out.add(f"{path}/attn", {"attention_biases": sd.take(f"{block}.attn.attention_biases")})
            _linear_norm(out, sd, f"{block}.mlp.ln1", f"{path}/mlp/ln1")
            _linear_norm(out, sd, f"{block}.mlp.ln2", f"{path}/mlp/ln2")
    heads = (("head", "head"), ("head_dist", "head_dist"))
    _heads(model, sd, out, heads, bn="bn", linear="linear")


def _hf(model, sd: StateDict, out: Collector) -> None:
    hf_norm = dict(linear="linear", bn="batch_norm")
    for k in range(4):
        layer = f"levit.patch_embeddings.embedding_layer_{k + 1}"
        out.conv_bn(f"stem_{k}", sd, f"{layer}.convolution", f"{layer}.batch_norm")
    for i, depth in enumerate(model.depth):
        stage, layers = f"stages_{i}", f"levit.encoder.stages.{i}.layers"
        for j in range(depth):
            attn, mlp, path = f"{layers}.{2 * j}.module", f"{layers}.{2 * j + 1}.module", f"{stage}/blocks_{j}"
            _linear_norm(out, sd, f"{attn}.queries_keys_values", f"{path}/attn/qkv", **hf_norm)
            _linear_norm(out, sd, f"{attn}.projection", f"{path}/attn/proj", **hf_norm)
            out.add(f"{path}/attn", {"attention_biases": sd.take(f"{attn}.attention_biases")})
            _linear_norm(out, sd, f"{mlp}.linear_up", f"{path}/mlp/ln1", **hf_norm)
            _linear_norm(out, sd, f"{mlp}.linear_down", f"{path}/mlp/ln2", **hf_norm)
        if i + 1 < len(model.depth):
            down, mlp = f"{layers}.{2 * depth}", f"{layers}.{2 * depth + 1}.module"  # the subsample is not wrapped
            path = f"stages_{i + 1}/downsample"
            _linear_norm(out, sd, f"{down}.keys_values", f"{path}/attn_downsample/kv", **hf_norm)
            _linear_norm(out, sd, f"{down}.queries", f"{path}/attn_downsample/q", **hf_norm)
            _linear_norm(out, sd, f"{down}.projection", f"{path}/attn_downsample/proj", **hf_norm)
            out.add(f"{path}/attn_downsample", {"attention_biases": sd.take(f"{down}.attention_biases")})
            _linear_norm(out, sd, f"{mlp}.linear_up", f"{path}/mlp/ln1", **hf_norm)
            _linear_norm(out, sd, f"{mlp}.linear_down", f"{path}/mlp/ln2", **hf_norm)
    heads = (("head", "classifier"), ("head_dist", "classifier_distill"))
    _heads(model, sd, out, heads, bn="batch_norm", linear="linear")


def _heads(model, sd: StateDict, out: Collector, heads, *, bn: str, linear: str) -> None:
    if not model.num_classes:
        return
    for ours, theirs in heads[:2 if model.distilled else 1]:
        out.add(f"{ours}/bn", *sd.batch_norm(f"{theirs}.{bn}"))
        out.add(f"{ours}/linear", sd.linear(f"{theirs}.{linear}"))


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    if "levit.patch_embeddings.embedding_layer_1.convolution.weight" in sd:
        _hf(model, sd, out)
    else:
        _timm(model, sd, out)
    return out.variables()
