"""PyTorch checkpoints (timm, Hugging Face) into Flax variables for the models of the zoo.

  variables = convert_state_dict("resnet50", torch_model.state_dict())
  model = create_model("resnet50", pretrained="resnet50.safetensors")   # a bound module

Each model family `hybrid_jax/models/F.py` has a converter `hybrid_jax/convert/F.py`
whose `convert(model, sd) -> variables` maps the reference implementation's tensor
names onto ours; the result is checked against the model's own variables (every
path, every shape) and every checkpoint tensor must have been used. Nothing is downloaded: checkpoints are
local files.
"""

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn

from hybrid_jax.convert.core import ConversionError, StateDict, check_against_model, load_state_dict, model_shapes
from hybrid_jax.registry import model_info


def converter_module(family: str):
    """The converter of a model family: `hybrid_jax.convert.<family>`, the name of the model's module."""
    if not (Path(__file__).parent / f"{family}.py").is_file():
        known = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "core")
        raise ConversionError(f"no PyTorch converter for the {family!r} family; converters exist for "
                              f"{', '.join(known)}")
    return importlib.import_module(f"{__name__}.{family}")


def convert_state_dict(name: str, state_dict: Mapping[str, Any], model: nn.Module | None = None) -> dict:
    """Flax variables for the registered model `name` from a PyTorch state dict.

    Args:
      name: registered model name; picks the converter and the input size of the check.
      state_dict: tensor name -> torch tensor or numpy array.
      model: the module to fill, if it differs from `create_model(name)` (other num_classes).

    Raises:
      ConversionError: a tensor is missing, left over, or of the wrong shape.
    """
    from hybrid_jax.registry import create_model

    entry = model_info(name)
    model = model if model is not None else create_model(name)
    module = converter_module(entry.family)
    sd = StateDict(state_dict, ignore=getattr(module, "IGNORE", ()))
    variables = module.convert(model, sd)
    sd.finish()
    return check_against_model(variables, model_shapes(model, entry.input_size))


def load_pretrained(name: str, path: str | Path, model: nn.Module | None = None) -> dict:
    """Flax variables for `name` from a local checkpoint file (.safetensors, or .pth with torch)."""
    return convert_state_dict(name, load_state_dict(path), model)


__all__ = ["ConversionError", "convert_state_dict", "load_pretrained", "load_state_dict"]
