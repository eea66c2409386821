"""tfds builders of our own; importing this module registers them with tfds."""

from hybrid_jax.data.builders.fashion_mnist import HybridFashionMnist

__all__ = ["HybridFashionMnist"]
