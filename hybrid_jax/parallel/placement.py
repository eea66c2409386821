"""Where a run's arrays live, and jitted steps that trace with the logical axis rules in scope."""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.parallel.rules import Rules

# A global batch is split over the data-parallel axes; FSDP shards data as well as parameters.
BATCH_AXES = PartitionSpec(("data", "fsdp"))


class ShardedJit:
    """`jax.jit(fn)` whose every trace (call or `lower`) sees the mesh and the logical axis rules.

    The models constrain their activations by logical names (`nn.with_logical_constraint`); those
    constraints only act when rules that map the names onto mesh axes are in scope at trace time.
    """

    def __init__(self, fn: Callable, mesh: Mesh, rules: Rules, **jit_kwargs: Any):
        self.fn = fn  # the step itself, e.g. to run it on one device for comparison
        self._jitted = jax.jit(fn, **jit_kwargs)
        self._mesh, self._rules = mesh, rules

    def __call__(self, *args):
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted(*args)

    def lower(self, *args) -> jax.stages.Lowered:
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted.lower(*args)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The mesh, its rules and the train state's shardings: what a task needs to jit and feed its steps."""

    mesh: Mesh
    rules: Rules
    state: Any  # TrainState of NamedShardings

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, BATCH_AXES)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of a batch, assembled into the global array every process shares."""
        return {key: jax.make_array_from_process_local_data(self.batch, value) for key, value in batch.items()}

    def jit(self, fn: Callable, *, in_shardings: Any, out_shardings: Any, donate_argnums: Any = ()) -> ShardedJit:
        return ShardedJit(fn, self.mesh, self.rules, in_shardings=in_shardings, out_shardings=out_shardings,
                          donate_argnums=donate_argnums)

    def jit_on_weights(self, fn: Callable, out_shardings: Any = None) -> ShardedJit:
        """`fn(params, batch_stats, batch)` jitted on the state's weights and a global batch (evaluation)."""
        return self.jit(fn, in_shardings=(self.state.params, self.state.batch_stats, self.batch),
                        out_shardings=self.replicated if out_shardings is None else out_shardings)
