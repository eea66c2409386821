"""PyTorch checkpoints (timm, Hugging Face, the authors' releases) and ViT `.npz` files into Flax variables.

  variables = convert_state_dict("resnet50", torch_model.state_dict())
  model = create_model("resnet50", pretrained="resnet50.safetensors")   # a bound module

Each model family `hybrid_jax/models/F.py` has a converter `hybrid_jax/convert/F.py`
whose `convert(model, sd) -> variables` maps the reference implementation's tensor
names onto ours; the result is checked against the model's own variables (every
path, every shape) and every checkpoint tensor must have been used. Nothing is
downloaded: checkpoints are local files.

The model may differ from the checkpoint where timm lets it:
- another classifier: the converter's `CLASSIFIER` names the classifier's bias,
  whose length is the checkpoint's class count. The checkpoint converts into the
  model with that count; then the head's variables of another shape (or absent from
  the checkpoint) start afresh, and those the model lacks (num_classes=0) are
  dropped, each logged. A new classifier starts at zero (norm scales at one), as
  google-research/vision_transformer fine-tunes: the model's own initialiser would
  cost a compile of its whole init. Everything else must match.
- another resolution (`img_size=...`): tensors sized by it are resampled the way
  the model built at the checkpoint's size would resample them when run at the new
  one, so loading at a size and running at it agree: ViT / ConViT `pos_embed`
  (bicubic), CoAtNet / MaxViT relative position tables (bicubic), BoTNet's
  `height_rel` / `width_rel` offset tables (linear), and LeViT's attention biases
  (edge-padded or cropped: LeViT clips offsets beyond its table). The other
  families with a converter (ResNet, CvT, MobileViT, EdgeNeXt, Conformer,
  Mobile-Former) hold no size-dependent tensor and load at any size their strides
  allow. CMT and the parallel-hybrid ablation models have no converter at all.
"""

import importlib
import logging
import math
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.convert.core import ConversionError, StateDict, check_against_model, load_state_dict, model_shapes
from hybrid_jax.layers.patch import resample_pos_embed
from hybrid_jax.layers.relpos import resize_table
from hybrid_jax.layers.scan import stack_layers
from hybrid_jax.registry import model_info

log = logging.getLogger(__name__)


def converter_module(family: str):
    """The converter of a model family: `hybrid_jax.convert.<family>`, the name of the model's module."""
    if not (Path(__file__).parent / f"{family}.py").is_file():
        known = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "core")
        raise ConversionError(f"no PyTorch converter for the {family!r} family; converters exist for "
                              f"{', '.join(known)}")
    return importlib.import_module(f"{__name__}.{family}")


def checkpoint_classes(name: str, state_dict: Mapping[str, Any]) -> int:
    """The number of classes of the checkpoint's classifier; 0 for a headless (features) checkpoint."""
    module = converter_module(model_info(name).family)
    bias = next((state_dict[key] for key in module.CLASSIFIER if key in state_dict), None)
    return 0 if bias is None else int(bias.shape[0])


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def _resample_pos_embed(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[1, prefix + h*w, D] to `shape`: the prefix is the token count that leaves square grids on both sides."""
    prefix = next((p for p in range(3) if _square_side(value.shape[1] - p) and _square_side(shape[1] - p)), None)
    if prefix is None:
        raise ConversionError(f"pos_embed of {value.shape[1]} tokens cannot be resampled to {shape[1]}")
    side = _square_side(shape[1] - prefix)
    return resample_pos_embed(jnp.asarray(value), (side, side), num_prefix_tokens=prefix)


def _pad_levit_biases(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[heads, h*w] offset biases to [heads, h'*w']: crop, or repeat the farthest offsets (LeViT clips there)."""
    old, new = _square_side(value.shape[1]), _square_side(shape[1])
    if not (old and new):
        raise ConversionError(f"attention biases over {value.shape[1]} offsets cannot be resized to {shape[1]}")
    table = value.reshape(value.shape[0], old, old)[:, :new, :new]
    pad = max(new - old, 0)
    return np.pad(table, ((0, 0), (0, pad), (0, pad)), mode="edge").reshape(shape)


RESAMPLE = {  # variable name -> (checkpoint value, model shape) -> resampled value
    "pos_embed": _resample_pos_embed,
    "relative_position_bias_table": lambda v, s: resize_table(jnp.asarray(v), (s[1] + 1) // 2, (s[2] + 1) // 2),
    "height_rel": lambda v, s: jax.image.resize(jnp.asarray(v), s, "linear"),
    "width_rel": lambda v, s: jax.image.resize(jnp.asarray(v), s, "linear"),
    "attention_biases": _pad_levit_biases,
}


def _fresh(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A new classifier variable: norm scales and variances one, everything else zero."""
    return (np.ones if path.rsplit("/", 1)[-1] in ("scale", "var") else np.zeros)(shape, np.float32)


def _fit(variables: dict, expected: dict, head: set[str]) -> dict:
    """Resamples size-dependent variables to the model's shapes; initialises or drops the `head` paths."""
    got = flax.traverse_util.flatten_dict(variables, sep="/")
    want = flax.traverse_util.flatten_dict(expected, sep="/")
    for path, value in list(got.items()):
        target, leaf = want.get(path), path.rsplit("/", 1)[-1]
        if (path in head or target is None or tuple(value.shape) == tuple(target.shape) or leaf not in RESAMPLE
                or value.ndim != target.ndim):
            continue
        got[path] = np.asarray(RESAMPLE[leaf](value, tuple(target.shape)), np.float32)
        log.info("resampled %s from %s to %s for the model's resolution", path, tuple(value.shape),
                 tuple(target.shape))
    dropped, fresh = sorted(p for p in head if p not in want), sorted(p for p in head if p in want)
    for path in dropped:
        got.pop(path, None)
    if dropped:
        log.info("dropped the checkpoint's classifier (the model has num_classes=0): %s", ", ".join(dropped))
    if fresh:
        got |= {path: _fresh(path, tuple(want[path].shape)) for path in fresh}
        log.warning("initialised afresh (zero weights; the checkpoint's classifier has another number of classes, "
                    "or none): %s", ", ".join(fresh))
    return flax.traverse_util.unflatten_dict(got, sep="/")


def convert_state_dict(name: str, state_dict: Mapping[str, Any], model: nn.Module | None = None, *,
                       fit: bool = False) -> dict:
    """Flax variables for the registered model `name` from a PyTorch state dict (or a ViT .npz's arrays).

    Args:
      name: registered model name; picks the converter.
      state_dict: tensor name -> torch tensor or numpy array.
      model: the module to fill, if it differs from `create_model(name)`.
      fit: fit the checkpoint to a model with another num_classes or img_size (see
        the module docstring), as `create_model(pretrained=...)` does; without it,
        any difference is an error.

    Raises:
      ConversionError: a tensor is missing, left over, or of the wrong shape.
    """
    from hybrid_jax.registry import create_model

    entry = model_info(name)
    model = model if model is not None else create_model(name)
    module = converter_module(entry.family)
    source = model.clone(num_classes=checkpoint_classes(name, state_dict)) if fit else model
    sd = StateDict(state_dict, ignore=getattr(module, "IGNORE", ()))
    variables = module.convert(source, sd)
    sd.finish()
    size = getattr(model, "img_size", None) or entry.input_size
    expected = model_shapes(model, size)
    variables = stack_layers(variables, like=expected)  # converters write one subtree per block; scans stack runs
    if fit:
        head = set()
        if source.num_classes != model.num_classes:
            shapes = lambda tree: {p: v.shape for p, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}
            before, after = shapes(model_shapes(source, size)), shapes(expected)
            head = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        variables = _fit(variables, expected, head)
    return check_against_model(variables, expected)


def load_pretrained(name: str, path: str | Path, model: nn.Module | None = None) -> dict:
    """Flax variables for `name` from a local checkpoint file (.safetensors, .npz, .pth), fitted to `model`."""
    return convert_state_dict(name, load_state_dict(path), model, fit=True)


__all__ = ["ConversionError", "checkpoint_classes", "convert_state_dict", "load_pretrained", "load_state_dict"]
