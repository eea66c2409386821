"""Logical axis names -> mesh axes, and sharded initialisation from them.

Parameters and activations carry logical names (`embed`, `heads`, `act_batch`, ...);
the rules below map each to mesh axes in one place. A dimension that a mesh axis
does not divide stays unsharded rather than failing, so the same rules serve a
ResNet stem with 3 input channels and a ViT-L.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_emb", "tensor"),
    ("act_height", None),
    ("act_width", None),
    # parameters: FSDP shards the model dimension, tensor parallelism the wide ones
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("classes", "tensor"),
)


def _fit_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for name in names:
            size *= mesh.shape[name]
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a (boxed, abstract) variable tree, following the logical rules.

    Leaves without logical names (BatchNorm statistics, optimizer counters) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, _fit_to_shape(spec, leaf.shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES, *args: Any) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` so each output is created already sharded: no host holds it whole.

    Returns:
      (unboxed variables, their NamedShardings).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    # No logical rules in scope here: out_shardings places every output, and flax's
    # unboxing constraints misfire on DenseGeneral's flattened kernel init.
    with jax.set_mesh(mesh):
        variables = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings
