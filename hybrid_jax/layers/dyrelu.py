"""Dynamic ReLU (Chen et al., ECCV 2020, arXiv 2003.10027) conditioned on a global token.

y_c = max_j a_c^j x_c: a piecewise-linear activation whose slopes are predicted per
example and per channel. Mobile-Former's Mobile sub-block predicts them from the
first global token (after the Former has run) instead of from pooled features, so
the CNN branch's non-linearity carries global context at almost no cost. Following
the official code (AAboys/MobileFormer, `DyReLU` + `HyperFunc`): a two-layer MLP
(reduction 4, ReLU, hard sigmoid) gives h in [0, 1]; slope j is (h_j - 0.5) * scale,
plus 1 for the first piece, so at h = 0.5 the activation is an ordinary ReLU. The
pieces have no intercepts.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.dense import Dense

Dtype = Any

# The official code initialises every Linear as N(0, 0.01): h starts near 0.5, i.e. a ReLU.
HYPER_INIT = nn.initializers.normal(0.01)


class DynamicReLU(nn.Module):
    """max over `num_pieces` linear pieces per channel, slopes predicted from one token."""

    num_pieces: int = 2
    reduction: int = 4  # hidden width of the coefficient MLP: token_dim // reduction
    scale: float = 2.0  # slope range: first piece in [1 - scale/2, 1 + scale/2], others in [-scale/2, scale/2]
    token_index: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def coefficients(self, tokens: jax.Array, channels: int) -> jax.Array:
        """Slopes [B, num_pieces, channels] from tokens [B, N, D]."""
        dense = lambda features, axes, name: Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=with_logical_partitioning(HYPER_INIT, axes),
            bias_init=with_logical_partitioning(nn.initializers.zeros, axes[-1:]))
        t = tokens[:, self.token_index]
        h = nn.relu(dense(tokens.shape[-1] // self.reduction, ("embed", "mlp"), "fc1")(t))
        h = nn.hard_sigmoid(dense(self.num_pieces * channels, ("mlp", "conv_out"), "fc2")(h))
        # Piece-major layout (all first slopes, then all second ones), as the official split.
        h = h.reshape(h.shape[0], self.num_pieces, channels)
        offset = jnp.zeros((self.num_pieces, 1), h.dtype).at[0].set(1.0)
        return (h - 0.5) * self.scale + offset

    @nn.compact
    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        """x [B, ..., C] (a map or tokens), tokens [B, N, D] -> x's shape."""
        a = self.coefficients(tokens, x.shape[-1]).astype(x.dtype)
        a = a.reshape(a.shape[:2] + (1,) * (x.ndim - 2) + a.shape[-1:])  # broadcast over positions
        return jnp.max(x[:, None] * a, axis=1)
