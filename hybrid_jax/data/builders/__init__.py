"""tfds builders of our own; importing this module registers them with tfds."""

from hybrid_jax.data.builders.fashion_mnist import HybridFashionMnist
from hybrid_jax.data.builders.image_folder import HybridImageFolder
from hybrid_jax.data.builders.reid_folder import HybridDukemtmcReid, HybridMarket1501, HybridMsmt17
from hybrid_jax.data.builders.reid_synthetic import HybridReidSynthetic

__all__ = ["HybridDukemtmcReid", "HybridFashionMnist", "HybridImageFolder", "HybridMarket1501", "HybridMsmt17",
           "HybridReidSynthetic"]
