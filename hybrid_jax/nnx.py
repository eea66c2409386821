"""Registered models as Flax NNX modules, through `flax.nnx.bridge`.

    model = hybrid_jax.nnx.create_model("test_resnet", num_classes=10, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    model.eval()  # NNX's modes choose the Linen model's `train` argument

A bare `bridge.ToNNX(create_model(...))` + `bridge.lazy_init(...)` works too: the parameters'
boxes (`hybrid_jax.layers.axes.with_logical_partitioning`) carry `eager_sharding=False`, so Flax
0.12's eager sharding (`flax_always_shard_variable`) does not try to place them with no mesh
set, nor split a dimension an axis does not divide (a 3-channel stem on `fsdp=2`), which the
project's rules leave whole. This module adds what a bare bridge leaves to the user: NNX
train/eval modes, batch statistics updated in place, the project's rules in scope while the
model traces, and, given a mesh, every variable placed by `hybrid_jax.parallel.logical_shardings`
inside the one jitted initialisation, so each is created in its shards.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.nnx import bridge
from jax.sharding import Mesh

from hybrid_jax import registry
from hybrid_jax.parallel.rules import DEFAULT_RULES, Rules, logical_shardings

# Linen collection -> the NNX Variable type bridge.ToNNX makes of it.
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class Model(nnx.Module):
    """A Linen model as a stateful NNX module: NNX train/eval modes, batch statistics updated in place.

    Its state is the Linen model's variables under `linen` (a `bridge.ToNNX`), by module path:
    `model.linen.stem["conv"]["kernel"]` is an nnx.Param, BatchNorm statistics are nnx.BatchStat.
    """

    def __init__(self, module: nn.Module, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        # The two streams the models draw; a bare nnx.Rngs(0) has only `default`, which both fall back to.
        self.linen = bridge.ToNNX(module, rngs=nnx.Rngs(params=rngs.params(), dropout=rngs.dropout()))
        # In scope while the model traces, so its activation constraints act under a mesh; hashable, as the
        # module's static data must be (a config's rules arrive as lists).
        self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
        self.deterministic = False  # as nnx.Dropout: training mode until `model.eval()`

    def __call__(self, x: jax.Array, *, train: bool | None = None, method: str | Callable | None = None,
                 **kwargs: Any) -> Any:
        """The Linen model's output; `train` defaults to the module's mode (`model.train()` / `model.eval()`).

        In training mode BatchNorm's running statistics update in place and dropout and stochastic
        depth draw from the module's `dropout` stream. `method` calls another method of the Linen
        model, e.g. "forward_features".
        """
        train = not self.deterministic if train is None else train
        mutable = ["batch_stats"] if train else False  # a model without BatchNorm returns no updates
        # ToNNX stores updated statistics as new Variables: created as the first ones were, with eager sharding
        # off, the module keeps its structure and a jitted step is not traced again.
        with nn.logical_axis_rules(self.rules), nnx.use_eager_sharding(False):
            return self.linen(x, train=train, method=method, mutable=mutable, **kwargs)

    def linen_variables(self) -> dict[str, Any]:
        """{"params", "batch_stats"} as plain arrays: for the Linen model's `apply`, `hybrid_jax.export`, orbax."""
        collections = {name: nnx.to_pure_dict(nnx.state(self.linen, kind)) for name, kind in COLLECTIONS.items()}
        return {name: tree for name, tree in collections.items() if tree}


def from_linen(module: nn.Module, variables: dict[str, Any] | None = None, *, rngs: nnx.Rngs | int,
               input_shape: Sequence[int], mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Model:
    """An initialised `Model` of a Linen module: fresh weights, or `variables` loaded into it.

    Args:
      module: a Linen model; one bound to variables (`create_model(..., pretrained=...)`) brings them.
      variables: {"params", "batch_stats"} (boxed or not) to load, e.g. `Checkpointer.restore_variables()`;
        None: initialise from `rngs`.
      rngs: an nnx.Rngs (or a seed) with `params` and `dropout` streams, or a `default` one for both.
      input_shape: shape of a sample batch (NHWC) to initialise with.
      mesh: place every variable on this mesh by the logical axis `rules`; None: the default device.
      rules: logical axis name -> mesh axes.
    """
    if module.scope is not None:
        if variables is not None:
            raise ValueError("the module is bound to variables already: pass it unbound, or no variables")
        module, variables = module.unbind()
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    shape = tuple(input_shape)

    @nnx.jit
    def init(rngs: nnx.Rngs, variables: dict[str, Any] | None) -> Model:
        model = Model(module, rngs=rngs, rules=rules)
        with nnx.use_eager_sharding(False):
            bridge.lazy_init(model, jnp.zeros(shape, jnp.float32), train=False)
        if variables is not None:  # the random initialisation it replaces is dead code that XLA drops
            state = nnx.state(model.linen, nnx.Any(*COLLECTIONS.values()))
            nnx.replace_by_pure_dict(state, _by_module_path(nn.meta.unbox(variables)))
            nnx.update(model.linen, state)
        if mesh is not None:
            graphdef, state = nnx.split(model)
            state = jax.tree.map(_constrained, state, variable_shardings(state, mesh, rules), is_leaf=_is_variable)
            model = nnx.merge(graphdef, state)
        return model

    return init(rngs, variables)


def create_model(name: str, *, rngs: nnx.Rngs | int, input_shape: Sequence[int] | None = None,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, **kwargs: Any) -> Model:
    """The registered model `name` as an initialised NNX module.

    Args:
      name: a registered name (`hybrid_jax.list_models()`).
      rngs: an nnx.Rngs (or a seed) with `params` and `dropout` streams, or a `default` one for both.
      input_shape: a sample batch's shape (NHWC); default (1, S, S, 3), S the model's `img_size` or
        registered input size.
      mesh: place every variable on this mesh by the logical axis `rules`; call the jitted steps
        under `jax.set_mesh(mesh)` so the activation constraints act as well.
      rules: logical axis name -> mesh axes (`hybrid_jax.parallel.DEFAULT_RULES`).
      **kwargs: as for `hybrid_jax.create_model`: num_classes, dtype, pretrained, any field of the model.

    Returns:
      A `Model` in training mode (`model.eval()` for inference), ready for an `nnx.Optimizer`.
    """
    module = registry.create_model(name, **kwargs)
    if input_shape is None:
        side = getattr(module, "img_size", None) or registry.model_info(name).input_size
        input_shape = (1, side, side, 3)
    return from_linen(module, rngs=rngs, input_shape=input_shape, mesh=mesh, rules=rules)


def variable_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A NamedSharding per Variable of `state`, from its logical axis names (replicated where it has none).

    A mesh axis that does not divide a dimension leaves that dimension whole, as everywhere in the project.
    """
    def boxed(var: nnx.Variable) -> Any:
        abstract = jax.ShapeDtypeStruct(var.shape, var.dtype)
        names = var.get_metadata().get("out_sharding")
        return nn.LogicallyPartitioned(abstract, tuple(names)) if names else abstract

    return logical_shardings(jax.tree.map(boxed, state, is_leaf=_is_variable), mesh, rules)


def _constrained(var: nnx.Variable, sharding: jax.sharding.NamedSharding) -> nnx.Variable:
    return var.replace(jax.lax.with_sharding_constraint(var.get_value(), sharding))


def _by_module_path(variables: dict[str, Any]) -> dict[str, Any]:
    """Linen's {"params": tree, "batch_stats": tree} as the one tree by module path that ToNNX holds."""
    merged = {}
    for name, tree in variables.items():
        if name not in COLLECTIONS:
            raise ValueError(f"variables hold the collection {name!r}; a Model holds {', '.join(COLLECTIONS)}")
        merged.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(merged)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)
