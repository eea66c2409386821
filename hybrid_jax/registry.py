"""Model registry: every variant by name, with the figures its paper reports.

A variant is data: a Flax module class plus the field values that make it, e.g.
`resnet50 = ResNet(block="bottleneck", layers=(3, 4, 6, 3))`. `create_model`
merges the caller's overrides into those fields, or with `features_only=True`
builds a feature extractor (see `hybrid_jax.layers.features`); `list_models` finds
names with shell-style patterns. Family files register their variant tables
(`register_variants`) when `hybrid_jax.models` imports them.
"""

import dataclasses
import difflib
import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

# The survey's ways of joining a CNN and a transformer, and the two baselines. Its fourth, fusion, is a kind of
# module here (hybrid_jax.fusion), swapped inside the parallel hybrids, not a kind of model.
CATEGORIES = ("cnn", "vit", "serial", "parallel", "hierarchical")


@dataclasses.dataclass(frozen=True)
class PaperFigures:
    """What the paper (or the reference implementation) reports for a variant at its input size."""

    params_m: float  # parameters, millions
    gmacs: float  # multiply-adds per image, billions
    top1: float | None  # ImageNet-1k top-1 %, None where no checkable figure exists
    source: str  # where each number was read


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered variant."""

    name: str
    module: type[nn.Module]
    fields: dict[str, Any]
    category: str
    input_size: int  # the resolution the paper figures are measured at
    paper: PaperFigures | None  # None for the tiny test variants

    @property
    def family(self) -> str:
        return self.module.__module__.rsplit(".", 1)[-1]

    @property
    def feature_info(self) -> tuple:
        """The variant's feature maps (`hybrid_jax.layers.features.FeatureInfo`), in the order out_indices counts."""
        return self.module(**self.fields).feature_info


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, module: type[nn.Module], fields: dict[str, Any], *, category: str,
                   input_size: int = 224, paper: PaperFigures | None = None) -> None:
    """Registers `module(**fields)` as the variant `name`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")
    _check_fields(name, module, fields)
    _REGISTRY[name] = ModelEntry(name, module, dict(fields), category, input_size, paper)


def register_variants(module: type[nn.Module], variants: Mapping[str, tuple[dict[str, Any], PaperFigures | None]],
                      *, category: str, input_size: int | None = None) -> None:
    """Registers a family's variant table, `{name: (fields, paper figures)}`.

    Each variant's input size is `input_size`, else its `img_size` field, else 224.
    """
    for name, (fields, paper) in variants.items():
        register_model(name, module, fields, category=category, paper=paper,
                       input_size=input_size or fields.get("img_size", 224))


def _field_names(module: type[nn.Module]) -> set[str]:
    return {f.name for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name")}


def _check_fields(name: str, module: type[nn.Module], fields: dict[str, Any]) -> None:
    known = _field_names(module)
    unknown = sorted(set(fields) - known)
    if unknown:
        hints = {key: difflib.get_close_matches(key, known, n=3) for key in unknown}
        hints = "; ".join(f"{key!r} (did you mean {', '.join(close)}?)" if close else repr(key)
                          for key, close in hints.items())
        raise TypeError(f"{module.__name__} (model {name!r}) has no field {hints}. "
                        f"Its fields are: {', '.join(sorted(known))}")


def _entry(name: str) -> ModelEntry:
    _import_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See hybrid_jax.list_models() for all names.") from None


def model_info(name: str) -> ModelEntry:
    """The registry entry of `name`: module, fields, category, input size, paper figures."""
    return _entry(name)


def create_model(name: str, *, num_classes: int | None = None, dtype: Any = None,
                 pretrained: str | os.PathLike | None = None, features_only: bool = False,
                 out_indices: Sequence[int | str] | None = None, **overrides: Any) -> nn.Module:
    """Builds the variant `name`; keyword arguments override its fields.

    Args:
      name: a registered name, e.g. "vit_base_patch16_224" (see `list_models`).
      num_classes: classifier width; 0 returns pooled features instead of logits.
      dtype: compute dtype, e.g. jnp.bfloat16 (parameters stay float32).
      pretrained: a local checkpoint to convert and load (.safetensors, .npz, or
        .pth / .pt / .bin with torch installed); nothing is downloaded. Without
        num_classes the model takes the checkpoint's classifier (none: features);
        with another num_classes the classifier is initialised afresh; another
        img_size resamples position tables (see `hybrid_jax.convert`).
      features_only: build a `FeatureExtractor` (`hybrid_jax.layers.features`), whose
        call returns a list of NHWC feature maps and whose `feature_info` gives each
        one's name, channels and stride; it has no classifier (num_classes is not taken).
      out_indices: with features_only, which maps: positions in the model's
        `feature_info` (negative ones count from the end) or names; default all.
      **overrides: any other field of the model's module, e.g. drop_path_rate=0.1.

    Returns:
      An unbound Flax module: `variables = model.init(rng, images, train=False)`.
      With `pretrained`, the module bound to the converted variables: call it
      directly, or `module, variables = model.unbind()` for jit.
    """
    entry = _entry(name)
    if features_only and num_classes is not None:
        raise ValueError("a features_only model has no classifier; leave num_classes out")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices chooses feature maps; pass features_only=True with it")
    if features_only:
        num_classes = 0
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if dtype is not None:
        overrides["dtype"] = dtype
    _check_fields(name, entry.module, overrides)
    model = entry.module(**{**entry.fields, **overrides})
    variables = None
    if pretrained is not None:
        model, variables = _load_pretrained(name, model, pretrained,
                                            classes_from_checkpoint=num_classes is None)
    if features_only:
        from hybrid_jax.layers.features import FeatureExtractor

        if out_indices is not None:
            out_indices = (out_indices,) if isinstance(out_indices, (int, str)) else tuple(out_indices)
        model = FeatureExtractor(model, out_indices)
    return model if variables is None else model.bind(variables)


def _load_pretrained(name: str, model: nn.Module, path: str | os.PathLike, *,
                     classes_from_checkpoint: bool) -> tuple[nn.Module, dict]:
    """`model` and a converted checkpoint's variables; the checkpoint's classifier sets num_classes unless given."""
    from hybrid_jax.convert import checkpoint_classes, convert_state_dict, load_state_dict

    state_dict = load_state_dict(path)
    classes = checkpoint_classes(name, state_dict) if classes_from_checkpoint else model.num_classes
    if classes != model.num_classes:
        logging.getLogger(__name__).info("%s: the checkpoint's classifier has %d classes (0: none); building the "
                                         "model with num_classes=%d", name, classes, classes)
        model = model.clone(num_classes=classes)
    return model, convert_state_dict(name, state_dict, model, fit=True)


def list_models(pattern: str = "*", *, category: str | None = None) -> list[str]:
    """Sorted names matching a shell-style `pattern` (and `category`, if given)."""
    _import_families()
    return sorted(name for name, entry in _REGISTRY.items()
                  if fnmatch.fnmatch(name, pattern) and category in (None, entry.category))


def _import_families() -> None:
    # Imported on first use so `import hybrid_jax` stays light.
    import hybrid_jax.models  # noqa: F401
