"""Learned 2-D relative position bias for attention over a window of tokens (Swin, CoAtNet, MaxViT).

Every query-key pair in an h x w window is a displacement (dy, dx) with
|dy| < h and |dx| < w, so one learned table of (2h - 1) x (2w - 1) entries per head
covers all of them. `RelPosBias` looks the table up into a [heads, h*w, h*w]
logits bias, which attention adds through `dot_product_attention(..., bias=)`.

The table is stored as [heads, 2h - 1, 2w - 1], indexed by (query - key) + (size - 1)
along each axis. Checkpoints that store it flat as [(2h - 1)(2w - 1), heads]
(timm's Swin-style `RelPosBias`) or indexed by key - query (the TensorFlow MaxViT
port, timm's `RelPosBiasTf`) are the same numbers rearranged:
`from_flat_table` and `from_key_minus_query_table` turn them into this layout.

The lookup is a gather with indices fixed at trace time, so it costs no
multiply-adds. A window of another size than the table's (a CoAtNet run at a new
resolution) resamples the table bicubically over displacements first.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.axes import with_logical_partitioning

Dtype = Any

# timm initialises the tables with a (truncated) normal of std 0.02.
TABLE_INIT = nn.initializers.truncated_normal(0.02)


def relative_position_index(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the table entry for each (query, key) pair of a row-major height x width window.

    Returns:
      (rows, cols), each [h*w, h*w] int32: query - key displacement shifted to start at 0.
    """
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    rows = ys[:, None] - ys[None, :] + height - 1
    cols = xs[:, None] - xs[None, :] + width - 1
    return rows.astype(np.int32), cols.astype(np.int32)


def resize_table(table: jax.Array, height: int, width: int) -> jax.Array:
    """A [heads, 2h'-1, 2w'-1] table resampled (bicubic over displacements) for an h x w window."""
    shape = (table.shape[0], 2 * height - 1, 2 * width - 1)
    if tuple(table.shape) == shape:
        return table
    return jax.image.resize(table, shape, method="bicubic")


def lookup_bias(table: jax.Array, height: int, width: int) -> jax.Array:
    """The [heads, h*w, h*w] attention bias of an h x w window from a [heads, 2h-1, 2w-1] table."""
    rows, cols = relative_position_index(height, width)
    return resize_table(table, height, width)[:, rows, cols]


def from_flat_table(flat: np.ndarray, height: int, width: int) -> np.ndarray:
    """timm / Swin layout [(2h-1)(2w-1), heads] (row-major over query - key) into [heads, 2h-1, 2w-1]."""
    return np.asarray(flat).T.reshape(-1, 2 * height - 1, 2 * width - 1)


def from_key_minus_query_table(table: np.ndarray) -> np.ndarray:
    """TensorFlow MaxViT layout [heads, 2h-1, 2w-1] indexed by key - query into query - key: both axes flipped."""
    return np.ascontiguousarray(np.asarray(table)[:, ::-1, ::-1])


class RelPosBias(nn.Module):
    """One learned bias per head and 2-D displacement inside a window; returns the [heads, N, N] logits bias."""

    window_size: tuple[int, int]  # the window the table is sized for
    num_heads: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, window: tuple[int, int] | None = None) -> jax.Array:
        """The bias for `window` (default: the table's own window size)."""
        height, width = self.window_size
        table = self.param("relative_position_bias_table",
                           with_logical_partitioning(TABLE_INIT, ("heads", None, None)),
                           (self.num_heads, 2 * height - 1, 2 * width - 1), self.param_dtype)
        return lookup_bias(table, *(window or self.window_size))
