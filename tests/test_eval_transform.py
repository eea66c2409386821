"""The host-side views of variable-size images: timm's eval transform and the Inception crop."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
import timm.data
import torch
import torchvision
from PIL import Image

from hybrid_jax.data import pipeline

NAME = "hybrid_test_variable_size"
# (H, W) of the stored JPEGs: wide, tall, square, smaller than the crop (upsampled).
SHAPES = [(40, 60), (75, 50), (36, 36), (50, 77), (30, 45)]
SIZE = 32  # model input; crop_pct 0.875 resizes the shorter side to 36


def _random_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Blocky noise: resampling filters differ visibly, yet JPEG keeps most of it."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1, *shape[2:]), dtype=np.uint8)
    return np.kron(coarse, np.ones((4, 4, *[1] * (len(shape) - 2)), np.uint8))[: shape[0], : shape[1]]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class HybridTestVariableSize(tfds.core.GeneratorBasedBuilder):
    """Stand-in for imagenet2012: JPEGs of varying size, stored as tfds builds ImageNet."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs looks for metadata beside a package module.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=len(SHAPES)),  # the example's index in SHAPES
        }))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(), "validation": self._generate_examples()}

    def _generate_examples(self):
        for i, shape in enumerate(SHAPES):
            yield i, {"image": _jpeg(_random_image((*shape, 3), i)), "label": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("variable"))
    HybridTestVariableSize(data_dir=root).download_and_prepare()
    return root


def _timm_eval(image: Image.Image, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's eval transform up to (not including) normalisation, as uint8 [H, W, C]."""
    transform = timm.data.create_transform(
        input_size=size, crop_pct=crop_pct, interpolation=interpolation, use_prefetcher=True
    )
    out = np.asarray(transform(image))  # uint8 [C, H, W]
    return np.moveaxis(out, 0, -1)


@pytest.mark.parametrize("shape", [(300, 450, 3), (500, 333, 3), (384, 250, 3), (180, 200, 3), (300, 450, 1)])
@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bicubic"), (0.9, "bilinear")])
def test_eval_view_equals_timm(shape, crop_pct, interpolation):
    """Pixel for pixel; at 0.875, (384, 250) puts the crop offset at 84.5, which torchvision rounds to 84."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ours = pipeline.eval_view(image, 224, crop_pct, interpolation)
    theirs = _timm_eval(Image.fromarray(image.squeeze(-1) if shape[-1] == 1 else image), 224, crop_pct, interpolation)
    assert ours.shape == (224, 224, shape[-1])
    np.testing.assert_array_equal(ours, theirs)


def test_eval_dataset_equals_timm_on_decoded_jpegs(data_dir: str):
    """Stored JPEG -> make_eval_dataset equals PIL decode -> timm's transform, as timm's ImageNet eval reads."""
    source, _ = pipeline.load_source(NAME, "validation", data_dir)
    batches = list(pipeline.make_eval_dataset(
        NAME, split="validation", data_dir=data_dir, global_batch_size=4, resize=(SIZE, SIZE),
        image_shape=(SIZE, SIZE, 3), resize_method="bicubic", crop_pct=0.875))
    images, labels = (np.concatenate([b[k] for b in batches]) for k in ("image", "label"))
    assert np.concatenate([b["mask"] for b in batches]).tolist() == [True] * 5 + [False] * 3
    assert sorted(labels[:5]) == list(range(5)) and {r["image"].shape[:2] for r in source} == set(SHAPES)
    for image, i in zip(images, labels[:5]):
        decoded = Image.open(io.BytesIO(_jpeg(_random_image((*SHAPES[i], 3), i)))).convert("RGB")
        np.testing.assert_array_equal(image, _timm_eval(decoded, SIZE, 0.875, "bicubic"))
    # Without crop_pct the images are squashed to `resize`, as before.
    squashed = next(iter(pipeline.make_eval_dataset(
        NAME, split="validation", data_dir=data_dir, global_batch_size=4, resize=(SIZE, SIZE))))["image"]
    bilinear = Image.fromarray(source[0]["image"]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(squashed[0], np.asarray(bilinear))


@pytest.mark.parametrize("kwargs, match", [
    ({"crop_pct": 1.2, "resize": (SIZE, SIZE)}, r"crop_pct must be in \(0, 1\]"),
    ({"crop_pct": 0.875, "resize": (SIZE, 48)}, "square image size"),
])
def test_bad_crop_pct_is_a_clear_error(data_dir: str, kwargs, match):
    with pytest.raises(pipeline.DataError, match=match):
        pipeline.make_eval_dataset(NAME, split="validation", data_dir=data_dir, global_batch_size=4, **kwargs)


# --------------------------------------------------------------------------- #
# Inception random-resized-crop from the decoded original
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("height, width", [(40, 60), (60, 40), (50, 50), (10, 1000)])
def test_full_area_crop_falls_back_as_torchvision(height: int, width: int):
    """Scale (1, 1) never fits a non-square box, so both take the same deterministic central crop."""
    want = torchvision.transforms.RandomResizedCrop.get_params(
        torch.zeros(3, height, width), scale=[1.0, 1.0], ratio=[3 / 4, 4 / 3])
    assert pipeline._crop_box(height, width, (1.0, 1.0), np.random.default_rng(0)) == tuple(want)


def test_crop_boxes_stay_inside_with_the_asked_area_and_aspect():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = pipeline._crop_box(300, 450, (0.08, 1.0), rng)
        assert 0 <= top <= 300 - h and 0 <= left <= 450 - w
        assert 0.07 <= h * w / (300 * 450) <= 1.0 and 0.74 <= w / h <= 1.36


def _train(data_dir: str, **kwargs):
    return pipeline.make_train_dataset(
        NAME, data_dir=data_dir, global_batch_size=2, resize=(SIZE, SIZE), image_shape=(SIZE, SIZE, 3),
        random_crop_scale=(0.08, 1.0), **kwargs)


def test_train_crops_are_seeded_and_resume_exactly(data_dir: str):
    first = [b["image"] for b in _train(data_dir, seed=3, num_epochs=2)]
    again = [b["image"] for b in _train(data_dir, seed=3, num_epochs=2)]
    other = [b["image"] for b in _train(data_dir, seed=4, num_epochs=2)]
    assert len(first) == 5 and first[0].shape == (2, SIZE, SIZE, 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    unshuffled = np.concatenate([b["image"] for b in _train(data_dir, shuffle=False, num_epochs=2)])
    assert not np.array_equal(unshuffled[:4], unshuffled[5:9])  # each epoch crops anew
    it = iter(_train(data_dir, seed=3))
    next(it)
    state = it.get_state()
    want = next(it)["image"]
    resumed = iter(_train(data_dir, seed=3))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], want)
    np.testing.assert_array_equal(want, first[1])
