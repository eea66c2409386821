"""Rematerialisation: trade recomputation in the backward pass for activation memory, block by block.

Every model takes `remat` (config.remat on the command line):

  none   every activation the backward pass needs is kept (fastest; most memory)
  block  each block keeps the outputs of its weight matmuls (`dots_with_no_batch_dims_saveable`: projections,
         MLPs) and recomputes the rest from them: attention's batched products, convolutions, norms, activations
  full   each block keeps only its input and recomputes everything inside it (least memory)

`checkpointed(Block, remat)` is the block class to build. It keeps the class's name, so parameter trees
(and checkpoints, converters, pretrained weights) are the same whatever `remat` is, and it lets the block
be called as before: jax.checkpoint would trace every argument, so Python values (`train=True`, a grid
shape) travel through it as static pytree nodes.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
    """An argument that is a Python value (a bool, a shape tuple, None), which jax.checkpoint must not trace."""

    value: Any


def _is_static(value: Any) -> bool:
    """Python values (a bool, a shape tuple, None), which the block may branch on; arrays are traced."""
    return all(isinstance(leaf, (bool, int, float, str)) for leaf in jax.tree_util.tree_leaves(value))


def _wrap(value: Any) -> Any:
    return _Static(value) if _is_static(value) else value


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, _Static) else value


@functools.cache
def checkpointed(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block`, recomputed in the backward pass as `remat` says (itself for "none")."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}.")
    if remat == "none":
        return block

    class Unwrapped(block):
        def __call__(self, *args, **kwargs):
            return super().__call__(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()})

    class Checkpointed(nn.remat(Unwrapped, policy=REMAT_POLICIES[remat])):
        def __call__(self, *args, **kwargs):
            return super().__call__(*map(_wrap, args), **{k: _wrap(v) for k, v in kwargs.items()})

    # The block's own name, so that auto-named instances ("Block_0") keep their parameter paths.
    Checkpointed.__name__ = Checkpointed.__qualname__ = block.__name__
    return Checkpointed
