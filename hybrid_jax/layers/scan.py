"""Runs of identical blocks as one `nn.scan`: XLA compiles one block, whatever the depth.

A Python loop over 24 blocks gives XLA 24 copies of the block to compile; a scan gives it one,
run 24 times. A model builds its blocks with `block_sequence`: looped, each block is its own
module (`blocks_0`, `blocks_1`, ..., the layout converters, timm and checkpoints use); scanned,
every run of consecutive blocks built with the same fields becomes one module named after the
layers it holds (`blocks_0to11`), its variables stacked on a leading "layers" axis. Blocks whose
fields differ (a stride, a width, another attention) stay on their own, so a model scans what its
structure allows. `run_sequence` applies either layout. `stack_layers` and `unstack_layers` move
variables between the two.

A block in a sequence is called as `block(*carry, *args, train=...)` and returns its carry (an
array, or a tuple for blocks that pass two streams on); in a scan it also gets `drop_path=`, its
own stochastic-depth rate, since the per-block rates of the usual linear schedule become a scanned
input.
"""

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]
Carry = jax.Array | tuple[jax.Array, ...]

_RUN = re.compile(r"(.+)_(\d+)to(\d+)")


@functools.cache
def scanned(block: type[nn.Module]) -> type[nn.Module]:
    """`block` applied once per entry of its `rates` field: `(carry, rates, args, train) -> (carry, every output)`.

    Variables (of every collection) are stacked on axis 0, logically named "layers"; every block draws its own
    initialisation and dropout randomness. Blocks of one rate get it as a Python float, so a zero rate costs
    nothing, as in a loop.
    """

    class Step(block):
        rates: tuple[float, ...] = ()

        def __call__(self, carry: Carry, rate: jax.Array, args: tuple, train: bool) -> tuple[Carry, Carry]:
            uniform = len(set(self.rates)) == 1
            y = super().__call__(*_as_tuple(carry), *args, train=train, drop_path=self.rates[0] if uniform else rate)
            return y, y

    Step.__name__ = Step.__qualname__ = block.__name__
    return nn.scan(Step, variable_axes={True: 0}, split_rngs={True: True},
                   in_axes=(0, nn.broadcast, nn.broadcast), metadata_params={nn.PARTITION_NAME: "layers"})


def _as_tuple(carry: Carry) -> tuple:
    return carry if isinstance(carry, tuple) else (carry,)


def block_sequence(block: type[nn.Module], layers: Sequence[Mapping[str, Any]], *, name: str, scan: bool,
                   start: int = 0) -> dict[str, nn.Module]:
    """The modules for `layers` (each the block's fields, `drop_path` its rate), keyed in order by their layers.

    Module names are `{name}_{i}` for a block of its own and `{name}_{first}to{last}` for a scanned run; layer
    numbers begin at `start`. With `scan`, consecutive layers whose fields are equal but for `drop_path` form a
    run; a run of one stays a plain block.
    """
    runs, first = {}, 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or not scan or _without_rate(layers[i]) != _without_rate(layers[first]):
            runs[first] = i
            first = i
    modules = {}
    for first, stop in runs.items():
        lo, hi = start + first, start + stop - 1
        if stop - first == 1:
            modules[str(lo)] = block(**layers[first], name=f"{name}_{lo}")
        else:
            rates = tuple(float(layer.get("drop_path", 0.0)) for layer in layers[first:stop])
            modules[f"{lo}to{hi}"] = scanned(block)(**_without_rate(layers[first]), rates=rates,
                                                   name=f"{name}_{lo}to{hi}")
    return modules


def _without_rate(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if key != "drop_path"}


def _layers(key: str) -> range:
    lo, _, hi = key.partition("to")
    return range(int(lo), int(hi or lo) + 1)


def run_sequence(modules: Mapping[str, nn.Module], carry: Carry, *args: Any, train: bool,
                 layers: range | None = None) -> tuple[Carry, list[Carry]]:
    """Applies the modules of `block_sequence` (those of `layers`, if given) in order.

    Returns the final carry and every layer's output.
    """
    outputs = []
    for key, module in modules.items():
        if layers is not None and _layers(key)[0] not in layers:
            continue
        if "to" in key:
            carry, stacked = module(carry, jnp.asarray(module.rates, jnp.float32), args, train)
            outputs += [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(len(module.rates))]
        else:
            carry = module(*_as_tuple(carry), *args, train=train)
            outputs.append(carry)
    return carry, outputs


def _runs(tree: Mapping) -> Iterator[tuple[str, str, range]]:
    for key in tree:
        if match := _RUN.fullmatch(key):
            yield key, match.group(1), range(int(match.group(2)), int(match.group(3)) + 1)


def stack_layers(variables: Variables, like: Variables) -> dict:
    """Looped layout -> the scanned layout of `like` (the scanned model's variables, or their shapes).

    Wherever `like` holds a run `{stem}_{a}to{b}`, the looped `{stem}_{a}` .. `{stem}_{b}` at the same place become
    it, every leaf stacked on axis 0; anything else is unchanged.
    """
    if not isinstance(variables, Mapping) or not isinstance(like, Mapping):
        return variables
    out = dict(variables)
    for key, stem, layers in _runs(like):
        names = [f"{stem}_{i}" for i in layers]
        if key in out or not all(name in out for name in names):
            continue
        out[key] = jax.tree.map(lambda *leaves: np.stack(leaves), *(out.pop(name) for name in names))
    return {key: stack_layers(value, like[key]) if key in like else value for key, value in out.items()}


def unstack_layers(variables: Variables) -> dict:
    """Scanned layout -> looped: the inverse of `stack_layers`."""
    if not isinstance(variables, Mapping):
        return variables
    runs = {key: (stem, layers) for key, stem, layers in _runs(variables)}
    out = {}
    for key, value in variables.items():
        if key in runs:
            stem, layers = runs[key]
            out |= {f"{stem}_{i}": jax.tree.map(lambda leaf, j=j: leaf[j], value) for j, i in enumerate(layers)}
        else:
            out[key] = unstack_layers(value)
    return out
