"""Reading a PyTorch state dict and turning its tensors into Flax variables, every one accounted for.

A family's converter walks its model's structure and takes each PyTorch tensor it
needs from a `StateDict` by key, in PyTorch's layout; the helpers here transpose
into Flax's (Linear (out, in) -> Dense (in, out), Conv2d OIHW -> HWIO). When the
walk is done, `StateDict.finish` fails on any tensor that was never taken, and
`check_against_model` compares the result with the model's own variables, path by
path and shape by shape, so a converter cannot silently drop or invent a weight.
"""

import argparse
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

Variables = dict[str, Any]


class ConversionError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


WRAPPERS = ("state_dict", "model", "model_ema")  # keys a training checkpoint keeps its weights under, first found wins


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a local checkpoint: `.safetensors`, `.npz`, or PyTorch `.pth` / `.pt` / `.bin` / `.pth.tar`.

    A PyTorch file that wraps its weights (`{"state_dict": ...}`, `{"model": ...}` or
    `{"model_ema": ...}`, as training scripts save them) is unwrapped, and the
    `module.` prefix of (Distributed)DataParallel is stripped. An `.npz` keeps its
    names (google-research/vision_transformer's `Transformer/encoderblock_0/...`),
    minus the `opt/target/` prefix of its older files.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no checkpoint file at {path}; pass the path of a local .safetensors, .pth or .npz file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as error:
            raise ConversionError(f"{path} is not a readable safetensors file ({error})") from error
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                return {key.removeprefix("opt/target/"): np.asarray(arrays[key], np.float32) for key in arrays.files}
        except Exception as error:
            raise ConversionError(f"{path} is not a readable .npz file of arrays ({error})") from error
    if path.suffix not in (".pth", ".pt", ".bin", ".tar"):  # timm's training scripts save .pth.tar
        raise ConversionError(f"{path.name}: unknown checkpoint format; use .safetensors, .pth / .pt / .bin or .npz")
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"reading {path.name} needs PyTorch: pip install 'hybrid_jax[parity]', or save the "
                          "weights as .safetensors") from error
    try:  # training scripts (timm's, Conformer's) also pickle their argparse arguments
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from error
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict; save model.state_dict()")
    state = next((state[key] for key in WRAPPERS if isinstance(state.get(key), Mapping)), state)
    tensors = {key.removeprefix("module."): value for key, value in state.items() if hasattr(value, "detach")}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors (looked at the top level and under {', '.join(WRAPPERS)})")
    return to_numpy(tensors)


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict of torch tensors or arrays as float32 numpy arrays."""
    convert = lambda v: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
    return {key: convert(value) for key, value in state_dict.items()}


class StateDict:
    """PyTorch tensors being converted: each key is taken at most once, leftovers are an error.

    Args:
      tensors: name -> array, in PyTorch's layout.
      ignore: regular expressions for keys with no Flax counterpart (buffers computed
        from the config, such as BatchNorm's `num_batches_tracked` or a relative
        position index); they are never reported as left over.
    """

    def __init__(self, tensors: Mapping[str, Any], ignore: Iterable[str] = ()):
        self._tensors = to_numpy(tensors)
        self._ignore = [re.compile(pattern) for pattern in (r".*num_batches_tracked$", *ignore)]
        self._taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def take(self, key: str) -> np.ndarray:
        """The tensor `key`, as stored."""
        if key not in self._tensors:
            close = [k for k in self._tensors if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]]
            raise ConversionError(f"the checkpoint has no tensor {key!r}"
                                  + (f" (same module has: {close})" if close else ""))
        if key in self._taken:
            raise ConversionError(f"tensor {key!r} was converted twice")
        self._taken.add(key)
        return self._tensors[key]

    def linear(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        """nn.Linear `prefix` as Dense params: kernel (in, out)."""
        params = {"kernel": self.take(f"{prefix}.weight").T}
        if bias:
            params["bias"] = self.take(f"{prefix}.bias")
        return params

    def conv(self, prefix: str, bias: bool = False) -> dict[str, np.ndarray]:
        """nn.Conv2d `prefix` as Conv2d params: kernel HWIO (grouped convs keep in/groups)."""
        params = {"kernel": self.take(f"{prefix}.weight").transpose(2, 3, 1, 0)}
        if bias:
            params["bias"] = self.take(f"{prefix}.bias")
        return params

    def norm(self, prefix: str) -> dict[str, np.ndarray]:
        """LayerNorm / GroupNorm affine params."""
        return {"scale": self.take(f"{prefix}.weight"), "bias": self.take(f"{prefix}.bias")}

    def batch_norm(self, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """BatchNorm2d as (params, batch_stats)."""
        return self.norm(prefix), {"mean": self.take(f"{prefix}.running_mean"),
                                   "var": self.take(f"{prefix}.running_var")}

    def finish(self) -> None:
        """Fails if a tensor was never converted (the model would silently lack a trained weight)."""
        left = sorted(key for key in self._tensors
                      if key not in self._taken and not any(p.fullmatch(key) for p in self._ignore))
        if left:
            shown = ", ".join(left[:12]) + (f", ... ({len(left)} in all)" if len(left) > 12 else "")
            raise ConversionError(f"checkpoint tensors with no place in the model: {shown}. Is this checkpoint for "
                                  "another model or variant?")


class Collector:
    """Builds the nested `params` / `batch_stats` dicts at Flax module paths."""

    def __init__(self):
        self.params: dict[tuple[str, ...], np.ndarray] = {}
        self.batch_stats: dict[tuple[str, ...], np.ndarray] = {}

    def add(self, path: str, params: Mapping[str, np.ndarray], batch_stats: Mapping[str, np.ndarray] | None = None):
        """Puts `params` (and `batch_stats`) under the module path "a/b/c"."""
        prefix = tuple(path.split("/")) if path else ()
        for name, value in params.items():
            self.params[prefix + (name,)] = value
        for name, value in (batch_stats or {}).items():
            self.batch_stats[prefix + (name,)] = value

    def conv_bn(self, path: str, sd: StateDict, conv: str, bn: str, conv_name: str = "conv",
                norm_name: str = "norm") -> None:
        """A ConvNormAct at `path` from PyTorch's conv `conv` and BatchNorm `bn`."""
        self.add(f"{path}/{conv_name}", sd.conv(conv))
        self.add(f"{path}/{norm_name}", *sd.batch_norm(bn))

    def variables(self) -> Variables:
        variables = {"params": flax.traverse_util.unflatten_dict(self.params)}
        if self.batch_stats:
            variables["batch_stats"] = flax.traverse_util.unflatten_dict(self.batch_stats)
        return variables


def model_shapes(model: nn.Module, image_size: int, channels: int = 3) -> Variables:
    """The model's variables as ShapeDtypeStructs (nothing is computed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return nn.meta.unbox(shapes)


def check_against_model(variables: Variables, expected: Variables) -> Variables:
    """`variables` as float32 jax arrays, after checking it has exactly the paths and shapes of `expected`."""
    got = flax.traverse_util.flatten_dict(variables, sep="/")
    want = flax.traverse_util.flatten_dict({k: v for k, v in expected.items() if k in ("params", "batch_stats")},
                                           sep="/")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{p}: checkpoint {tuple(got[p].shape)} vs model {tuple(want[p].shape)}"
             for p in sorted(set(got) & set(want)) if tuple(got[p].shape) != tuple(want[p].shape)]
    problems = ([f"model variables the checkpoint does not fill: {missing[:10]}"] if missing else []) + (
        [f"converted variables the model does not have: {extra[:10]}"] if extra else []) + (
        [f"shape mismatches: {wrong[:10]}"] if wrong else [])
    if problems:
        raise ConversionError("the converted checkpoint does not fit the model; " + "; ".join(problems)
                              + ". Check the model name and its fields (depth, widths, num_classes).")
    return jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.float32),
                        flax.traverse_util.unflatten_dict(got, sep="/"))
