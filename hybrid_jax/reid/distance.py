"""Pairwise distances between embeddings, shared by the triplet loss and retrieval."""

import jax
import jax.numpy as jnp

METRICS = ("euclidean", "cosine")
# Squared distances below this are treated as zero before the square root, whose
# gradient at zero is infinite (an embedding's distance to itself, or to a duplicate).
_MIN_SQUARED = 1e-12


def pairwise_distance(a: jax.Array, b: jax.Array, metric: str = "euclidean") -> jax.Array:
    """[N, M] distances between rows of a [N, D] and b [M, D], in float32.

    euclidean: ||a - b||; cosine: 1 - cos(a, b), in [0, 2].
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if metric == "cosine":
        a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        return 1.0 - a @ b.T
    if metric == "euclidean":
        squared = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
        return jnp.sqrt(jnp.maximum(squared, _MIN_SQUARED))
    raise ValueError(f"unknown distance {metric!r}; choose one of {METRICS}")
