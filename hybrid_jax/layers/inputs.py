"""Checks on the images a model is given, each failing with one clear error that names the fix."""

import chex
import jax


def check_images(x: jax.Array) -> None:
    """Raises unless `x` is a floating-point NHWC image batch, the layout every model takes."""
    chex.assert_rank(x, 4, custom_message="images must be a batch [batch, height, width, channels] (NHWC)")
    chex.assert_type(x, float, custom_message="images must be floating point (normalise uint8 pixels first)")
    if x.shape[1] <= 4 < x.shape[3]:
        raise ValueError(f"images of shape {x.shape} look channels-first (NCHW); the models take NHWC: "
                         f"x.transpose(0, 2, 3, 1)")


def check_divisible(x: jax.Array, multiple: int, what: str) -> None:
    """Raises unless both sides of the [B, H, W, C] images are multiples of `multiple` (`what` names it)."""
    height, width = x.shape[1:3]
    if height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} is not a multiple of {what} {multiple}; "
                         f"resize or crop the input to a multiple of {multiple}")
