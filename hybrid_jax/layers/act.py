"""Activations by name, so that module fields stay plain strings in configs."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    # Exact (erf) GELU, as PyTorch's nn.GELU: converted weights give the same logits.
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "hard_swish": nn.hard_swish,
    "hard_sigmoid": nn.hard_sigmoid,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}


def get_act(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name`."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None
