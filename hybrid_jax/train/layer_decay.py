"""Layer-wise learning-rate decay (BEiT, timm's `param_groups_layer_decay`): each family's layer order.

A family orders its parameters the way timm's `group_matcher(coarse=False)` does, over our
'/'-joined parameter paths: "stem" patterns are group 0, "blocks" patterns give keys compared
as tuples (stage 1 block 3 before stage 2 block 0), a key ending in PREVIOUS joins the group
before it (a final norm joins the last block), and what matches nothing (the head) comes last.
The groups present, in order, are the layer ids 0 .. L + 1; id i scales the learning rate by
`decay ** (L + 1 - i)`. Families timm has follow its matcher; the others are marked.
"""

import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

PREVIOUS = (99999,)  # timm's MATCH_PREV_GROUP
Matcher = dict[str, str | list[tuple[str, tuple[int, ...] | None]]]


def _vit(model: nn.Module) -> Matcher:
    # timm VisionTransformer and ConVit; the R50 stem of a ViT-hybrid is timm's patch_embed.backbone.
    return {"stem": r"^(?:cls_token|pos_embed|patch_embed|hybrid_stem)\b",
            "blocks": [(r"^blocks_(\d+)\b", None), (r"^norm\b", PREVIOUS)]}


def _resnet(model: nn.Module) -> Matcher:
    # timm ResNet: one layer per block.
    return {"stem": r"^stem\b", "blocks": [(r"^stages_(\d+)/blocks_(\d+)\b", None)]}


def _byobnet(model: nn.Module) -> Matcher:
    # timm ByobNet (BoTNet, MobileViT): one layer per block; the final 1x1 conv joins the last one.
    return {"stem": r"^stem", "blocks": [(r"^stages_(\d+)/blocks_(\d+)\b", None), (r"^final_conv\b", PREVIOUS)]}


def _levit(model: nn.Module) -> Matcher:
    # timm Levit: a stage's downsampling joins its first block.
    return {"stem": r"^stem", "blocks": [(r"^stages_(\d+)/downsample\b", (0,)),
                                         (r"^stages_(\d+)/blocks_(\d+)\b", None)]}


def _edgenext(model: nn.Module) -> Matcher:
    # timm EdgeNeXt, whose final norm (our `norm`) is in its head.
    return {"stem": r"^stem", "blocks": [(r"^stages_(\d+)/downsample", (0,)),
                                         (r"^stages_(\d+)/blocks_(\d+)\b", None)]}


def _maxxvit(model: nn.Module) -> Matcher:
    # timm MaxxVit: one layer per stage; the final norm is in the head when the head has a hidden layer.
    blocks = [(r"^stages_(\d+)\b", None)] + ([] if model.head_hidden else [(r"^norm\b", PREVIOUS)])
    return {"stem": r"^stem\b", "blocks": blocks}


def _cvt(model: nn.Module) -> Matcher:
    # Not in timm. As LeViT: a stage's embedding (and the class token it adds) joins its first block.
    return {"stem": r"^stages_0/embed\b", "blocks": [(r"^stages_(\d+)/(?:embed|cls_token)\b", (0,)),
                                                     (r"^stages_(\d+)/blocks_(\d+)\b", None), (r"^norm\b", PREVIOUS)]}


def _cmt(model: nn.Module) -> Matcher:
    # Not in timm. As LeViT: a stage's patch embedding and position table join its first block.
    return {"stem": r"^stem\b", "blocks": [(r"^stages_(\d+)/(?:patch_embed|patch_norm|relative_pos)\b", (0,)),
                                           (r"^stages_(\d+)/blocks_(\d+)\b", None), (r"^head_conv\b", PREVIOUS)]}


def _conformer(model: nn.Module) -> Matcher:
    # Not in timm. Block i is both branches and their coupling; the transformer's patch conv and class
    # token are the embedding, as ViT's.
    return {"stem": r"^(?:conv1|bn1|cls_token|trans_patch_conv)\b",
            "blocks": [(r"^(?:conv|trans)_(\d+)\b", None), (r"^conv_trans_(\d+)\b", None),
                       (r"^trans_norm\b", PREVIOUS)]}


def _mobile_former(model: nn.Module) -> Matcher:
    # Not in timm. Block i is both branches and their bridges; the last bridge and pre-pool conv join the last.
    return {"stem": r"^(?:stem|tokens)\b",
            "blocks": [(r"^features_(\d+)\b", None), (r"^(?:local_global|classifier/conv)\b", PREVIOUS)]}


def _parallel_hybrid(model: nn.Module) -> Matcher:
    # Not in timm. Stage i is the CNN stage, the transformer blocks beside it and the fusion after it.
    stage_of_block = [stage for stage, depth in enumerate(model.depths) for _ in range(depth)]
    return {"stem": r"^(?:stem|patch_embed|cls_token|pos_embed)\b",
            "blocks": [(r"^stages_(\d+)\b", None), *[(rf"^blocks_{i}\b", (s,)) for i, s in enumerate(stage_of_block)],
                       *[(rf"^fusions_{s}\b", (s - 1,)) for s in model.fusion_stages], (r"^trans_norm\b", PREVIOUS)]}


FAMILIES: dict[str, Callable[[nn.Module], Matcher]] = {
    "vit": _vit, "convit": _vit, "resnet": _resnet, "botnet": _byobnet, "mobilevit": _byobnet, "levit": _levit,
    "edgenext": _edgenext, "maxxvit": _maxxvit, "cvt": _cvt, "cmt": _cmt, "conformer": _conformer,
    "mobile_former": _mobile_former, "parallel_hybrid": _parallel_hybrid,
}


def path_name(path: tuple) -> str:
    """A parameter's '/'-joined name, "blocks_0/attn/query/kernel"; boxes' `.value` is not part of it."""
    return "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def _group_key(name: str, matcher: Matcher) -> tuple[float, ...]:
    """timm's `group_with_matcher` key: (group ordinal, *numbers the pattern captures, *suffix); unmatched last."""
    for ordinal, spec in enumerate(matcher.values()):
        for pattern, suffix in [(spec, None)] if isinstance(spec, str) else spec:
            if match := re.match(pattern, name):
                return tuple(map(float, (ordinal, *match.groups(), *(suffix or ()))))
    return (math.inf,)


def _matcher(model: nn.Module) -> tuple[Matcher, str]:
    """The family's matcher, and the path prefix of the parameters it orders (a wrapper's backbone)."""
    backbone = getattr(model, "backbone", None)
    inner, prefix = (backbone, "backbone/") if isinstance(backbone, nn.Module) else (model, "")
    family = type(inner).__module__.rsplit(".", 1)[-1]
    if family not in FAMILIES:
        raise ValueError(f"no layer order for the {family!r} family; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](inner), prefix


def layer_ids(params: Any, model: nn.Module) -> Any:
    """Each parameter's layer id: 0 for the stem and embeddings, then the family's blocks, the head last.

    A wrapper with a `backbone` field (the re-ID model) takes its backbone's order; its own
    parameters (BNNeck, classifier, centers) are the head.
    """
    matcher, prefix = _matcher(model)
    names = jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), params)
    keys = {name: _group_key(name[len(prefix):], matcher) if name.startswith(prefix) else (math.inf,)
            for name in jax.tree.leaves(names)}
    ids, layer = {}, -1
    for key in sorted(set(keys.values())):
        if layer < 0 or key[-1] != PREVIOUS[0]:
            layer += 1
        ids[key] = layer
    return jax.tree.map(lambda name: ids[keys[name]], names)


def layer_scales(params: Any, model: nn.Module, decay: float) -> Any:
    """Each parameter's learning-rate scale, `decay ** (L + 1 - layer id)`: 1 for the head."""
    ids = layer_ids(params, model)
    top = max(jax.tree.leaves(ids))
    return jax.tree.map(lambda i: decay ** (top - i), ids)


def scale_by_layer_decay(model: nn.Module, decay: float) -> optax.GradientTransformation:
    """Multiplies each final update by its layer's scale, as timm multiplies its group's learning rate."""
    _matcher(model)  # an unknown family fails here, not inside the first jitted step

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s, updates, layer_scales(updates, model, decay)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
