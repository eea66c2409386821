"""A run's starting weights from elsewhere (`config.init_from`): the authors' release, timm, or a run of ours.

The source is converted or restored to the model's variables, then placed into the fresh
train state leaf by leaf, in its sharding. Only what fine-tuning expects may differ: a
classifier of another size (or none) starts from the fresh state's initialisation, and an
RGB stem feeds a one-channel input by summing its kernel over colours (as timm's
`adapt_input_conv` does). Any other difference is an error that names the paths.
"""

import logging
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from hybrid_jax.checkpoint import Checkpointer
from hybrid_jax.train.config import ConfigError

log = logging.getLogger(__name__)

# Top-level modules that hold a classifier, in every family of the zoo (and re-ID's identity classifier).
CLASSIFIER = re.compile(r"^(head|head_dist|conv_cls_head|trans_cls_head|classifier)(/|$)")


def _run_directory(path: epath.Path) -> epath.Path | None:
    """The checkpoints directory of a workdir (or of the checkpoints directory itself), if `path` is one."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path if path.is_dir() else None


def load_variables(path: str, name: str, model: nn.Module) -> tuple[dict[str, Any], str]:
    """(variables, a description of the source) of `path` for the registered model `name` built as `model`.

    Args:
      path: a workdir of ours (its newest checkpoint), or a checkpoint file of the reference
        implementation (.safetensors, .npz, .pth), converted for `name`.
    """
    source = epath.Path(path)
    if (directory := _run_directory(source)) is not None:
        checkpointer = Checkpointer(directory, async_save=False)
        try:
            step, variables = checkpointer.restore_variables()
        finally:
            checkpointer.close()
        return variables, f"step {step} of {directory}"
    if not source.exists():
        raise ConfigError(f"config.init_from={path!r}: no such file or run directory; give a checkpoint file "
                          "(.safetensors, .npz, .pth) or the workdir of a run")
    from hybrid_jax.convert import convert_state_dict, load_state_dict

    return convert_state_dict(name, load_state_dict(path), model, fit=True), str(source)


def _summed_over_colours(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """An RGB convolution kernel (kh, kw, 3, out) made to read one channel, when that is what `shape` asks."""
    if value.ndim == 4 and value.shape[2] == 3 and tuple(shape) == (*value.shape[:2], 1, value.shape[3]):
        return value.sum(axis=2, keepdims=True)
    return None


def _placed(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` as a global array in `like`'s sharding; every process holds the whole value."""
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def merge(fresh: dict[str, Any], loaded: dict[str, Any], source: str) -> dict[str, Any]:
    """`fresh` (variables: params, batch_stats) with every leaf `loaded` has for it; classifiers may differ."""
    fresh_flat = flax.traverse_util.flatten_dict(fresh, sep="/")
    loaded_flat = flax.traverse_util.flatten_dict(loaded, sep="/")
    merged, reinitialised, adapted, problems = {}, [], [], []
    for path, like in fresh_flat.items():
        inner = path.split("/", 1)[1]  # without the collection
        value = loaded_flat.get(path)
        if value is not None and tuple(value.shape) == tuple(like.shape):
            merged[path] = _placed(value, like)
        elif value is not None and (summed := _summed_over_colours(np.asarray(value), like.shape)) is not None:
            merged[path] = _placed(summed, like)
            adapted.append(inner)
        elif CLASSIFIER.search(inner):
            merged[path] = like
            reinitialised.append(inner)
        else:
            shape = "absent" if value is None else f"{tuple(value.shape)}"
            problems.append(f"{inner} (checkpoint {shape}, model {tuple(like.shape)})")
    unused = [p.split("/", 1)[1] for p in loaded_flat if p not in fresh_flat]
    problems += [f"{p} (only in the checkpoint)" for p in unused if not CLASSIFIER.search(p)]
    if problems:
        more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConfigError(f"config.init_from: {source} does not fit config.model: {'; '.join(problems[:8])}{more}. "
                          "Set config.model to the model the checkpoint was trained as.")
    if adapted:
        log.info("summed the RGB kernels of %s over colours for the one-channel input", ", ".join(adapted))
    if reinitialised:
        log.warning("initialised afresh (the checkpoint's classifier has another size, or none): %s",
                    ", ".join(reinitialised))
    return flax.traverse_util.unflatten_dict(merged, sep="/")


def start_from(state: Any, path: str, name: str, module: nn.Module, scope: tuple[str, ...] = ()) -> Any:
    """The fresh train `state` with its weights (and their EMA) taken from `path`.

    Args:
      name, module: the registered model inside the trained network that `path` holds weights for.
      scope: where that model's variables sit in the network's (re-ID: ("backbone",)); a run of the
        same task loads at the root.
    """
    loaded, source = load_variables(path, name, module)
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    if scope and set(loaded["params"]) != set(state.params):  # weights of the bare model, inside a larger network
        inner = {key: _subtree(tree, scope) for key, tree in fresh.items()}
        merged = merge({k: v for k, v in inner.items() if v}, loaded, source)
        for key, tree in merged.items():
            fresh[key] = _with_subtree(fresh[key], scope, tree)
    else:
        fresh = merge({k: v for k, v in fresh.items() if v}, loaded, source) | {
            k: v for k, v in fresh.items() if not v}
    log.info("initialised from %s", source)
    copy = lambda tree: jax.tree.map(jnp.copy, tree) if state.ema_params is not None else None  # no shared buffers
    return state.replace(params=fresh["params"], batch_stats=fresh["batch_stats"], ema_params=copy(fresh["params"]),
                         ema_batch_stats=copy(fresh["batch_stats"]))


def _subtree(tree: dict, scope: tuple[str, ...]) -> dict:
    for key in scope:
        tree = tree.get(key, {})
    return tree


def _with_subtree(tree: dict, scope: tuple[str, ...], subtree: dict) -> dict:
    if not scope:
        return subtree
    return {**tree, scope[0]: _with_subtree(tree.get(scope[0], {}), scope[1:], subtree)}
