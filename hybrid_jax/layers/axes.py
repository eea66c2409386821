"""Logical axis names: of parameters, through `with_logical_partitioning`, and of activations.

Every model constrains its feature maps and token sequences with `MAP` and `TOKENS`, and
boxes its parameters' initialisers with `with_logical_partitioning`;
`hybrid_jax/parallel/rules.py` maps the names to mesh axes.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn

MAP = ("act_batch", "act_height", "act_width", "act_emb")  # feature maps [B, H, W, C]
TOKENS = ("act_batch", "act_len", "act_emb")  # token sequences [B, N, D]


class LogicallyPartitioned(nn.LogicallyPartitioned):
    """Flax's box of a parameter and its logical axis names, which becomes an NNX Variable placed lazily.

    Since Flax 0.12 an NNX Variable made from a box with axis names shards itself as it is created
    (`flax_always_shard_variable`), which needs a mesh and fails on dimensions an axis does not
    divide, both of which the project's rules allow. With `eager_sharding=False` in its metadata the
    Variable keeps the names and is placed by whoever holds the mesh, so `bridge.ToNNX(create_model(...))`
    works with Flax's defaults.
    """

    def to_nnx_metadata(self) -> dict[str, Any]:
        metadata = dict(vars(self))
        metadata["out_sharding"], metadata["sharding_rules"] = metadata.pop("names"), metadata.pop("rules")
        return {**metadata, "eager_sharding": False}


def with_logical_partitioning(init: Callable[..., Any], names: Sequence[str | None]) -> Callable[..., Any]:
    """`nn.with_logical_partitioning` with the box above: an initialiser whose value carries `names`."""

    @functools.wraps(init)
    def boxed(*args: Any, **kwargs: Any) -> LogicallyPartitioned:
        return LogicallyPartitioned(init(*args, **kwargs), tuple(names))

    return boxed
