"""Map-shaped fusions: concat, add and gating between a CNN map and a transformer's token grid.

Each direction updates one stream (`own`) from the other (`other`) brought to its
resolution: CNN -> transformer average-pools the map onto the token grid
(`map_to_grid`), transformer -> CNN repeats the grid onto the map (`grid_to_map`).

  concat:  own + W [own, other]                           (one dense layer over the concatenation)
  add:     own + W other
  gating:  z * own + (1 - z) * W other,  z = sigmoid(V [own, other])

Every W and V acts per position, so it commutes with pooling and nearest-neighbour
upsampling: the part of a projection that reads the other stream runs at the token
grid's resolution, before upsampling (transformer -> CNN) or after pooling
(CNN -> transformer). The result equals a 1x1 conv over the concatenation at the
map's resolution, at a fraction of the cost on early high-resolution stages. A
dense layer over a concatenation is stored as its two row blocks (`own`, `other`).

Prefix tokens (class token) pass through to_tokens unchanged and to_local ignores
them: they have no place on the map, and the class token keeps summarising the
transformer branch alone, as the class token of Conformer's FCU does.

Initialisation: every kernel starts at zero (biases too). No information crosses
between the branches at step 0, so the hybrid starts as two independent networks,
yet every kernel gets gradient from the first step (its input times the output's
gradient). concat and add start as the identity. gating starts at zero gate logits,
a 50/50 mix of each stream with a zero projection: each stream is halved at a
fusion point, which the next norm (LayerNorm in pre-norm blocks, BatchNorm in conv
blocks) largely undoes. A gate opened towards the own stream (bias > 0) would start
closer to the identity but shrink the gradient of the projection by (1 - z) and of
the gate by sigmoid'(bias).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.fusion.base import Dtype, Fusion, grid_to_map, map_to_grid
from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.dense import Dense
from hybrid_jax.layers.patch import grid_to_tokens, prepend_tokens


def zero_dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype, param_dtype: Dtype,
               name: str) -> Dense:
    """A per-position projection with logical axes, starting at zero."""
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                 kernel_init=with_logical_partitioning(nn.initializers.zeros, axes),
                 bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _axes(to_map: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """Logical kernel axes for the own -> own and other -> own blocks of a projection."""
    if to_map:  # own: map channels, other: token width
        return ("conv_in", "conv_out"), ("embed", "conv_out")
    return ("mlp", "embed"), ("conv_out", "embed")


class _Mixer(nn.Module):
    """One direction of a map-shaped fusion: updates `own` [B, H, W, C] from `other` [B, h, w, D].

    h and w divide H and W; terms computed on `other` are upsampled to own's size.
    `to_map` only picks the logical axis names of the kernels.
    """

    to_map: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def project(self, x: jax.Array, features: int, axes: tuple[str, str], name: str, **kw) -> jax.Array:
        return zero_dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)(x)

    def upsample(self, x: jax.Array, own: jax.Array) -> jax.Array:
        return grid_to_map(x, own.shape[1:3])


class ConcatMixer(_Mixer):
    """own + W [own, other]: a dense layer over the concatenated channels, residual."""

    @nn.compact
    def __call__(self, own: jax.Array, other: jax.Array) -> jax.Array:
        own_axes, other_axes = _axes(self.to_map)
        c = own.shape[-1]
        y = self.project(own, c, own_axes, "proj_own", use_bias=False)
        return own + y + self.upsample(self.project(other, c, other_axes, "proj_other"), own)


class AddMixer(_Mixer):
    """own + W other: the other stream projected to own's width and added."""

    @nn.compact
    def __call__(self, own: jax.Array, other: jax.Array) -> jax.Array:
        _, other_axes = _axes(self.to_map)
        return own + self.upsample(self.project(other, own.shape[-1], other_axes, "proj"), own)


class GatedMixer(_Mixer):
    """z * own + (1 - z) * W other, with a per-channel gate z = sigmoid(V [own, other])."""

    @nn.compact
    def __call__(self, own: jax.Array, other: jax.Array) -> jax.Array:
        own_axes, other_axes = _axes(self.to_map)
        c = own.shape[-1]
        projected = self.upsample(self.project(other, c, other_axes, "proj"), own)
        logits = self.project(own, c, own_axes, "gate_own", use_bias=False)
        logits = logits + self.upsample(self.project(other, c, other_axes, "gate_other"), own)
        gate = nn.sigmoid(logits)
        return gate * own + (1.0 - gate) * projected


class _MapFusion(Fusion):
    """A fusion whose two directions are `_Mixer`s over the map and the token grid."""

    mixer = _Mixer  # the direction module; set by subclasses

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.local_global = self.mixer(to_map=False, **kw)  # CNN -> transformer
        self.global_local = self.mixer(to_map=True, **kw)  # transformer -> CNN

    def to_tokens(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        prefix, grid, size = self.split_tokens(tokens)
        return prepend_tokens(grid_to_tokens(self.local_global(grid, map_to_grid(local, size))), prefix)

    def to_local(self, local: jax.Array, tokens: jax.Array, *, train: bool) -> jax.Array:
        _, grid, _ = self.split_tokens(tokens)
        return self.global_local(local, grid)


class ConcatFusion(_MapFusion):
    """Each stream concatenated with the other (at its resolution), projected back to its width, residual."""

    mixer = ConcatMixer


class AddFusion(_MapFusion):
    """Each stream plus the other projected to its width (at its resolution)."""

    mixer = AddMixer


class GatingFusion(_MapFusion):
    """Each stream mixed with the projected other by a sigmoid gate computed from both."""

    mixer = GatedMixer
