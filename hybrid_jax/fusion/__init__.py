"""Fusion modules that merge a CNN branch's map with a transformer branch's tokens.

All share the interface of `hybrid_jax.fusion.base.Fusion`, so a parallel hybrid
names its fusion in a config string: `get_fusion("gating", num_prefix_tokens=1)`.
"""

import difflib
import importlib

from hybrid_jax.fusion.base import Fusion, grid_to_map, map_to_grid

# name -> "module:Class", imported on first use.
FUSIONS = {
    "concat": "hybrid_jax.fusion.simple:ConcatFusion",
    "add": "hybrid_jax.fusion.simple:AddFusion",
    "gating": "hybrid_jax.fusion.simple:GatingFusion",
    "cross_attention": "hybrid_jax.fusion.cross_attention:CrossAttentionFusion",
    "fcu": "hybrid_jax.fusion.fcu:FeatureCouplingUnit",
    "bridge": "hybrid_jax.fusion.bridge:Bridge",
}


def get_fusion_class(name: str) -> type[Fusion]:
    """The Fusion subclass registered as `name`."""
    if name not in FUSIONS:
        close = difflib.get_close_matches(name, FUSIONS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown fusion {name!r}.{hint} Choose one of: {', '.join(FUSIONS)}.")
    module, cls = FUSIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_fusion(name: str, **fields) -> Fusion:
    """An instance of the fusion `name` with the given fields."""
    return get_fusion_class(name)(**fields)


__all__ = ["FUSIONS", "Fusion", "get_fusion", "get_fusion_class", "grid_to_map", "map_to_grid"]
