"""On-device augmentation of uint8 batches, jit-able with an explicit rng.

The host pipeline hands over uint8 images; everything here runs inside the
train step so augmentation costs accelerator time, not host CPU. Images are
float32 in [0, 1] until `normalize`. dm-pix supplies the geometric and
colour primitives; crop, RandAugment's op table, mixup and cutmix are ours.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandAugment fills uncovered pixels with mid grey, as timm and the paper do.
_FILL = 0.5
# Magnitudes are on RandAugment's 0..10 scale; these are the values at 10.
_MAX_ROTATE_DEG = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE_FRACTION = 0.45
_MAX_ENHANCE = 0.9


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run in the train step; hashable so jit can treat it as static."""

    crop_size: tuple[int, int] | None = None  # random resized crop output (H, W); None: off
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaug_num_ops: int = 0  # 0 turns RandAugment off
    randaug_magnitude: float = 9.0  # 0..10
    mixup_alpha: float = 0.0  # 0 turns mixup off
    cutmix_alpha: float = 0.0  # 0 turns cutmix off
    mix_switch_prob: float = 0.5  # chance of cutmix when both are on
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    def __post_init__(self):
        # Tuples keep the config hashable when callers pass lists.
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))


# --------------------------------------------------------------------------- #
# Basics
# --------------------------------------------------------------------------- #


def to_float(images: jax.Array) -> jax.Array:
    """Maps uint8 pixels to float32 in [0, 1], the range every op here assumes."""
    return images.astype(jnp.float32) / 255.0


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Standardises [0, 1] images per channel for the model."""
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    """Integer labels to float32 one-hot, the form mixup and cutmix blend."""
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _per_example(rng: jax.Array, fn: Callable, images: jax.Array, *args) -> jax.Array:
    """Applies a per-image random op with an independent key per example."""
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(fn)(keys, images, *args)


# --------------------------------------------------------------------------- #
# Crop and flip
# --------------------------------------------------------------------------- #


def _crop_box(
    rng: jax.Array, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Samples (top, left, h, w) covering a random area fraction and aspect ratio."""
    k_area, k_ratio, k_top, k_left = jax.random.split(rng, 4)
    area = height * width * jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(
        k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_ratio)
    # Clipping instead of rejection sampling keeps it branch-free under jit.
    h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    top = jax.random.uniform(k_top, ()) * (height - h)
    left = jax.random.uniform(k_left, ()) * (width - w)
    return top, left, h, w


def _resized_crop_one(
    rng: jax.Array,
    image: jax.Array,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
    """Crops one image to a random box and resamples it to `size`."""
    height, width, channels = image.shape
    top, left, h, w = _crop_box(rng, height, width, scale, ratio)
    factor = jnp.stack([size[0] / h, size[1] / w])
    return jax.image.scale_and_translate(
        image,
        (*size, channels),
        spatial_dims=(0, 1),
        scale=factor,
        translation=-jnp.stack([top, left]) * factor,
        method="linear",
    )


def random_resized_crop(
    rng: jax.Array,
    images: jax.Array,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """Inception-style crop: random area and aspect ratio, resized to `size`."""
    fn = lambda key, image: _resized_crop_one(key, image, tuple(size), scale, ratio)
    return _per_example(rng, fn, images)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability one half."""
    return _per_example(rng, pix.random_flip_left_right, images)


# --------------------------------------------------------------------------- #
# RandAugment
# --------------------------------------------------------------------------- #


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL ImageEnhance semantics: factor 1 is the image, 0 the degenerate one."""
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _grey(image: jax.Array) -> jax.Array:
    """Luma, broadcast back to the image's channels (identity for grey input)."""
    if image.shape[-1] != 3:
        return image
    return jnp.broadcast_to(pix.rgb_to_grayscale(image), image.shape)


def _affine(image: jax.Array, matrix_2d: jax.Array, shift: jax.Array) -> jax.Array:
    """Applies an output->input (y, x) map about the image centre, filling with grey."""
    matrix = jnp.eye(3).at[:2, :2].set(matrix_2d)
    centre = (jnp.asarray(image.shape, jnp.float32) - 1.0) / 2.0
    offset = centre - matrix @ centre + jnp.concatenate([shift, jnp.zeros(1)])
    return pix.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=_FILL)


def _op_identity(image: jax.Array, level: jax.Array) -> jax.Array:
    return image


def _op_brightness(image: jax.Array, level: jax.Array) -> jax.Array:
    return _blend(jnp.zeros_like(image), image, 1.0 + _MAX_ENHANCE * level)


def _op_contrast(image: jax.Array, level: jax.Array) -> jax.Array:
    return _blend(jnp.full_like(image, _grey(image).mean()), image, 1.0 + _MAX_ENHANCE * level)


def _op_color(image: jax.Array, level: jax.Array) -> jax.Array:
    return _blend(_grey(image), image, 1.0 + _MAX_ENHANCE * level)


def _op_rotate(image: jax.Array, level: jax.Array) -> jax.Array:
    angle = jnp.deg2rad(_MAX_ROTATE_DEG * level)
    return pix.rotate(image, angle, order=1, mode="constant", cval=_FILL)


def _op_shear_x(image: jax.Array, level: jax.Array) -> jax.Array:
    # x_in = x_out + shear * y_out in (y, x) coordinates.
    return _affine(image, jnp.array([[1.0, 0.0], [_MAX_SHEAR * level, 1.0]]), jnp.zeros(2))


def _op_shear_y(image: jax.Array, level: jax.Array) -> jax.Array:
    return _affine(image, jnp.array([[1.0, _MAX_SHEAR * level], [0.0, 1.0]]), jnp.zeros(2))


def _op_translate_x(image: jax.Array, level: jax.Array) -> jax.Array:
    shift = jnp.stack([0.0, _MAX_TRANSLATE_FRACTION * image.shape[1] * level])
    return _affine(image, jnp.eye(2), shift)


def _op_translate_y(image: jax.Array, level: jax.Array) -> jax.Array:
    shift = jnp.stack([_MAX_TRANSLATE_FRACTION * image.shape[0] * level, 0.0])
    return _affine(image, jnp.eye(2), shift)


def _op_solarize(image: jax.Array, level: jax.Array) -> jax.Array:
    # Stronger magnitude means a lower threshold, i.e. more pixels inverted.
    return pix.solarize(image, 1.0 - jnp.abs(level))


def _op_posterize(image: jax.Array, level: jax.Array) -> jax.Array:
    levels = 2.0 ** (8.0 - jnp.round(4.0 * jnp.abs(level)))
    return jnp.floor(image * 255.0 / (256.0 / levels)) * (256.0 / levels) / 255.0


def _op_autocontrast(image: jax.Array, level: jax.Array) -> jax.Array:
    low = image.min(axis=(0, 1), keepdims=True)
    high = image.max(axis=(0, 1), keepdims=True)
    # A flat channel has nothing to stretch; keep it as it is.
    return jnp.where(high > low, (image - low) / jnp.maximum(high - low, 1e-6), image)


RANDAUG_OPS: tuple[Callable[[jax.Array, jax.Array], jax.Array], ...] = (
    _op_identity,
    _op_autocontrast,
    _op_brightness,
    _op_contrast,
    _op_color,
    _op_rotate,
    _op_shear_x,
    _op_shear_y,
    _op_translate_x,
    _op_translate_y,
    _op_solarize,
    _op_posterize,
)


def _randaugment_one(rng: jax.Array, image: jax.Array, num_ops: int, magnitude: float) -> jax.Array:
    """Applies `num_ops` uniformly chosen ops, each with a random sign of the magnitude."""
    for key in jax.random.split(rng, num_ops):
        k_op, k_sign = jax.random.split(key)
        op = jax.random.randint(k_op, (), 0, len(RANDAUG_OPS))
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        image = jax.lax.switch(op, RANDAUG_OPS, image, sign * magnitude / 10.0)
    return image


def randaugment(
    rng: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: float = 9.0
) -> jax.Array:
    """RandAugment (Cubuk et al. 2019, arXiv:1909.13719) on [0, 1] float images.

    Uses a subset of the paper's ops (no equalize or sharpness); `magnitude`
    is on the paper's 0..10 scale.
    """
    fn = lambda key, image: _randaugment_one(key, image, num_ops, magnitude)
    return _per_example(rng, fn, images)


# --------------------------------------------------------------------------- #
# Mixup and cutmix
# --------------------------------------------------------------------------- #


def mixup(
    rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blends each example with the batch reversed (Zhang et al. 2017, arXiv:1710.09412).

    Returns (images, soft labels, lambda), lambda being the weight of the
    original example; `labels` are one-hot or already soft.
    """
    lam = jax.random.beta(rng, alpha, alpha)
    mixed = lam * images + (1.0 - lam) * images[::-1]
    return mixed, lam * labels + (1.0 - lam) * labels[::-1], lam


def _cutmix_mask(rng: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """Boolean [H, W] box covering about (1 - lam) of the image, clipped at its edges."""
    k_y, k_x = jax.random.split(rng)
    cut = jnp.sqrt(1.0 - lam)
    half_h, half_w = jnp.round(height * cut / 2.0), jnp.round(width * cut / 2.0)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside_y = (rows >= cy - half_h) & (rows < cy + half_h)
    inside_x = (cols >= cx - half_w) & (cols < cx + half_w)
    return inside_y & inside_x


def cutmix(
    rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pastes a box from the reversed batch (Yun et al. 2019, arXiv:1905.04899).

    Label weights follow the box's actual (clipped) area. Returns (images,
    soft labels, lambda), lambda being the kept fraction of the original.
    """
    k_lam, k_box = jax.random.split(rng)
    _, height, width, _ = images.shape
    mask = _cutmix_mask(k_box, height, width, jax.random.beta(k_lam, alpha, alpha))
    lam = 1.0 - mask.mean()
    mixed = jnp.where(mask[None, :, :, None], images[::-1], images)
    return mixed, lam * labels + (1.0 - lam) * labels[::-1], lam


def mix(
    rng: jax.Array, images: jax.Array, labels: jax.Array, config: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Applies mixup, cutmix, or one of them at random per batch, as configured."""
    k_choice, k_mix = jax.random.split(rng)
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_choice, config.mix_switch_prob)
        images, labels, _ = jax.lax.cond(
            use_cutmix,
            lambda: cutmix(k_mix, images, labels, config.cutmix_alpha),
            lambda: mixup(k_mix, images, labels, config.mixup_alpha),
        )
    elif config.mixup_alpha > 0:
        images, labels, _ = mixup(k_mix, images, labels, config.mixup_alpha)
    elif config.cutmix_alpha > 0:
        images, labels, _ = cutmix(k_mix, images, labels, config.cutmix_alpha)
    return images, labels


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def augment_batch(
    rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, config: AugmentConfig
) -> tuple[jax.Array, jax.Array]:
    """Train-time view of a uint8 batch: augmented, normalised images and soft labels.

    Args:
      rng: a PRNG key, fresh per step.
      images: uint8 [B, H, W, C].
      labels: int [B].
      num_classes: width of the soft labels.
      config: static; pass via `jax.jit(..., static_argnames=("num_classes", "config"))`.

    Returns:
      (float32 [B, H', W', C] normalised images, float32 [B, num_classes] labels).
    """
    k_crop, k_flip, k_ra, k_mix = jax.random.split(rng, 4)
    x = to_float(images)
    if config.crop_size is not None:
        x = random_resized_crop(k_crop, x, config.crop_size, config.crop_scale, config.crop_ratio)
    if config.flip:
        x = random_flip(k_flip, x)
    if config.randaug_num_ops > 0:
        x = randaugment(k_ra, x, config.randaug_num_ops, config.randaug_magnitude)
    x, soft = mix(k_mix, x, one_hot(labels, num_classes), config)
    return normalize(x, config.mean, config.std), soft


def eval_batch(images: jax.Array, config: AugmentConfig) -> jax.Array:
    """Eval-time view of a uint8 batch: only the normalisation the model was trained with."""
    return normalize(to_float(images), config.mean, config.std)
