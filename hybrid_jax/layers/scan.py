"""A uniform stack of blocks as one `nn.scan`: XLA compiles one block, whatever the depth.

A Python loop over 24 blocks gives XLA 24 copies of the block to compile; a scan gives it one,
run 24 times. The price is the parameter layout: the scanned stack keeps every block's variables
stacked on a leading axis under one name ("blocks"), where the loop keeps one subtree per block
("blocks_0", "blocks_1", ...), the layout converters, timm and checkpoints of looped models use.
`stack_layers` and `unstack_layers` move variables between the two.

The block must take `(x, *, train, drop_path)`, `drop_path` overriding its stochastic-depth rate,
since the per-block rates of the usual linear schedule become a scanned input.
"""

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

Variables = Mapping[str, Any]


@functools.cache
def scanned(block: type[nn.Module], depth: int) -> type[nn.Module]:
    """`block` applied `depth` times in a scan: `(x, rates [depth], train) -> (x, every block's output [depth, ...])`.

    Parameters (and any other collection) are stacked on axis 0, logically named "layers"; every block
    draws its own initialisation and dropout randomness.
    """

    class Step(block):
        def __call__(self, x: jax.Array, rate: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
            y = super().__call__(x, train=train, drop_path=rate)
            return y, y

    Step.__name__ = Step.__qualname__ = block.__name__
    return nn.scan(Step, variable_axes={True: 0}, split_rngs={True: True}, in_axes=(0, nn.broadcast),
                   length=depth, metadata_params={nn.PARTITION_NAME: "layers"})


def _layer_index(name: str, stem: str) -> int | None:
    match = re.fullmatch(rf"{re.escape(stem)}_(\d+)", name)
    return int(match.group(1)) if match else None


def stack_layers(variables: Variables, stem: str = "blocks") -> dict:
    """Looped layout -> scanned: `{stem}_0 .. {stem}_{n-1}` become one `{stem}` with every leaf stacked on axis 0.

    Applies at every level of the tree where such a run of names appears; anything else is unchanged.
    """
    if not isinstance(variables, Mapping):
        return variables
    layers, out = {}, {}
    for name, value in variables.items():
        if (i := _layer_index(name, stem)) is None:
            out[name] = stack_layers(value, stem)
        else:
            layers[i] = value
    if layers:
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{stem}_i layers are not numbered 0..{len(layers) - 1}: {sorted(layers)}")
        out[stem] = jax.tree.map(lambda *leaves: np.stack(leaves), *(layers[i] for i in range(len(layers))))
    return out


def unstack_layers(variables: Variables, stem: str = "blocks") -> dict:
    """Scanned layout -> looped: the inverse of `stack_layers`."""
    if not isinstance(variables, Mapping):
        return variables
    out = {}
    for name, value in variables.items():
        if name == stem:
            depth = len(jax.tree.leaves(value)[0])
            out |= {f"{stem}_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], value) for i in range(depth)}
        else:
            out[name] = unstack_layers(value, stem)
    return out

