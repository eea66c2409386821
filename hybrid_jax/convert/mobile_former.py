"""Mobile-Former's official release (AAboys/MobileFormer, `mobile_former.py`, `dna_blocks.py`) into `MobileFormer`.

The official state dict (`{'state_dict': ...}` or bare) keeps each conv and its
BatchNorm in an nn.Sequential (`conv1.0` / `conv1.1`; the bneck-lite's `conv.0`,
`conv.1`, `conv.4`, `conv.5`), the learned tokens as an nn.Embedding
(`tokens.weight`), each dynamic ReLU's coefficient MLP as `hyperK.hyper.{0,2}`, and
the bridge inside the block (`local_global`, `global_local`), which sits under
`bridge` here. Channel shuffles, activations and pools hold no tensors. Against the
official code with random weights and BatchNorm statistics, all seven releases'
logits agree to 1.3e-5.
"""

from hybrid_jax.convert.core import Collector, StateDict

CLASSIFIER = ("classifier.classifier.1.bias",)


def _mobile_to_former(out: Collector, sd: StateDict, prefix: str, path: str) -> None:
    for name, theirs in (("q", "q"), ("alpha", "alpha.0"), ("proj", "proj")):
        out.add(f"{path}/{name}", sd.linear(f"{prefix}.{theirs}"))
    out.add(f"{path}/layer_norm", sd.norm(f"{prefix}.layer_norm"))


def _block(out: Collector, sd: StateDict, prefix: str, path: str, kind: str) -> None:
    """A Mobile-Former block: bridge, Former (`global_block`), Mobile sub-block (DnaBlock3 or DnaBlock)."""
    _mobile_to_former(out, sd, f"{prefix}.local_global", f"{path}/bridge/local_global")
    for name in ("k", "proj"):
        out.add(f"{path}/bridge/global_local/{name}", sd.linear(f"{prefix}.global_local.{name}"))
    former = f"{prefix}.global_block"
    for name, theirs in (("q", "q"), ("channel_mlp", "channel_mlp"), ("ffn_fc1", "ffn.0"), ("ffn_fc2", "ffn.2")):
        out.add(f"{path}/global_block/{name}", sd.linear(f"{former}.{theirs}"))
    for name in ("layer_norm", "ffn_norm"):
        out.add(f"{path}/global_block/{name}", sd.norm(f"{former}.{name}"))
    convs, hypers = (4, (1, 3)) if kind == "down" else (3, (1, 2))
    for k in range(1, convs + 1):
        out.conv_bn(f"{path}/mobile/conv{k}", sd, f"{prefix}.conv{k}.0", f"{prefix}.conv{k}.1")
    for k in hypers:
        out.add(f"{path}/mobile/hyper{k}/fc1", sd.linear(f"{prefix}.hyper{k}.hyper.0"))
        out.add(f"{path}/mobile/hyper{k}/fc2", sd.linear(f"{prefix}.hyper{k}.hyper.2"))


def convert(model, sd: StateDict) -> dict:
    out = Collector()
    out.add("", {"tokens": sd.take("tokens.weight")})
    out.conv_bn("stem", sd, "stem.0", "stem.1")
    for i, (kind, *_) in enumerate(model.blocks):
        prefix, path = f"features.{i}", f"features_{i}"
        if kind == "lite":
            out.conv_bn(f"{path}/conv1", sd, f"{prefix}.conv.0", f"{prefix}.conv.1")
            out.conv_bn(f"{path}/conv2", sd, f"{prefix}.conv.4", f"{prefix}.conv.5")
        else:
            _block(out, sd, prefix, path, kind)
    _mobile_to_former(out, sd, "local_global", "local_global")
    out.conv_bn("classifier/conv", sd, "classifier.conv.1", "classifier.conv.2")
    out.add("classifier/fc", sd.linear("classifier.fc.0"))
    out.add("classifier/fc_norm", *sd.batch_norm("classifier.fc.1"))
    if model.num_classes:
        out.add("head", sd.linear("classifier.classifier.1"))
    return out.variables()
