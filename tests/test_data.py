"""Tests for the offline Fashion-MNIST builder and the grain input pipeline."""

from __future__ import annotations

import gzip
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.data import augment, pipeline
from hybrid_jax.data.builders import fashion_mnist as fm

NUM_TRAIN, NUM_TEST = 64, 20
TEST_ID_OFFSET = 100  # test example ids are 100..119, train ids 0..63


def _image(example_id: int) -> np.ndarray:
    """A 28x28 image whose top-left pixel is its id and the rest a known ramp."""
    return ((np.arange(28 * 28) * 3 + example_id) % 256).astype(np.uint8).reshape(28, 28)


def _label(example_id: int) -> int:
    return (example_id * 3) % 10


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encodes a uint8 array as IDX, the format of the Debian files."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(directory: Path, gz: bool) -> None:
    """Writes the four Fashion-MNIST IDX files with the synthetic examples."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, (count, offset) in {
        "train": (NUM_TRAIN, 0),
        "test": (NUM_TEST, TEST_ID_OFFSET),
    }.items():
        ids = range(offset, offset + count)
        image_stem, label_stem = fm.SPLIT_FILES[split]
        for stem, array in (
            (image_stem, np.stack([_image(i) for i in ids])),
            (label_stem, np.array([_label(i) for i in ids], np.uint8)),
        ):
            data = _idx_bytes(array)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / stem).write_bytes(data)


def _ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Recovers example ids from the marker pixel."""
    return batch["image"][:, 0, 0, 0].astype(int)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tfds data_dir holding fashion_mnist prepared from the synthetic IDX set."""
    root = tmp_path_factory.mktemp("fmnist")
    _write_idx_set(root / "idx", gz=True)
    builder = fm.HybridFashionMnist(data_dir=str(root / "tfds"), idx_dir=root / "idx")
    builder.download_and_prepare()
    return str(root / "tfds")


def _train(data_dir: str, **kwargs) -> list[dict[str, np.ndarray]]:
    """All batches of a finite training stream."""
    kwargs.setdefault("num_epochs", 1)
    kwargs.setdefault("global_batch_size", 16)
    return list(pipeline.make_train_dataset("fashion_mnist", data_dir=data_dir, **kwargs))


# --------------------------------------------------------------------------- #
# IDX parsing and the builder
# --------------------------------------------------------------------------- #


def test_parse_idx_round_trip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fm.parse_idx(_idx_bytes(array), expected_ndim=3), array)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\x00\x08", "too short"),
        (b"\x00\x00\x0d\x01" + np.asarray([2], ">u4").tobytes() + b"\x00" * 8, "bad IDX magic"),
        (_idx_bytes(np.zeros((2, 3), np.uint8)), "bad IDX magic"),  # 2 dims where 1 expected
        (_idx_bytes(np.zeros(5, np.uint8))[:-1], "truncated or corrupt"),
    ],
)
def test_parse_idx_rejects_corrupt(data: bytes, match: str):
    with pytest.raises(fm.IdxError, match=match):
        fm.parse_idx(data, expected_ndim=1)


def test_corrupt_gzip_is_clear_error(tmp_path: Path):
    _write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(fm.IdxError, match="corrupt"):
        fm.load_split(tmp_path, "train")


def test_load_split_reads_plain_idx(tmp_path: Path):
    _write_idx_set(tmp_path, gz=False)
    images, labels = fm.load_split(tmp_path, "test")
    assert images.shape == (NUM_TEST, 28, 28, 1)
    np.testing.assert_array_equal(images[3, ..., 0], _image(TEST_ID_OFFSET + 3))
    np.testing.assert_array_equal(labels, [_label(TEST_ID_OFFSET + i) for i in range(NUM_TEST)])


def test_idx_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(fm.IDX_DIR_ENV, str(tmp_path))
    assert fm.resolve_idx_dir() == tmp_path
    assert fm.resolve_idx_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(fm.IDX_DIR_ENV)
    assert fm.resolve_idx_dir() == Path(fm.DEFAULT_IDX_DIR)


def test_builder_round_trip_exact(data_dir: str):
    builder = fm.HybridFashionMnist(data_dir=data_dir)
    for split, count, offset in (("train", NUM_TRAIN, 0), ("test", NUM_TEST, TEST_ID_OFFSET)):
        source = builder.as_data_source(split=split)
        assert len(source) == count
        seen = set()
        for record in source:
            example_id = int(record["image"][0, 0, 0])
            assert record["image"].dtype == np.uint8
            np.testing.assert_array_equal(record["image"][..., 0], _image(example_id))
            assert record["label"] == _label(example_id)
            seen.add(example_id)
        assert seen == set(range(offset, offset + count))
    assert builder.info.features["label"].names == list(fm.LABEL_NAMES)


def test_missing_idx_dir_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(fm.IDX_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(pipeline.DataError, match="apt-get install dataset-fashion-mnist"):
        pipeline.make_train_dataset(
            "fashion_mnist", global_batch_size=8, data_dir=str(tmp_path / "tfds")
        )


def test_missing_idx_file_says_how_to_install(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_split(tmp_path, "train")


@pytest.mark.skipif(
    not Path(fm.DEFAULT_IDX_DIR).is_dir(),
    reason=f"Debian package dataset-fashion-mnist not installed ({fm.DEFAULT_IDX_DIR} absent)",
)
def test_real_debian_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(fm.IDX_DIR_ENV, raising=False)
    spec = pipeline.describe("fashion_mnist", "train", data_dir=str(tmp_path))
    assert spec == pipeline.DatasetSpec(60000, (28, 28, 1), 10)
    assert pipeline.describe("fashion_mnist", "test", data_dir=str(tmp_path)).num_examples == 10000
    source, _ = pipeline.load_source("fashion_mnist", "test", str(tmp_path))
    labels = np.array([r["label"] for r in source])
    # Fashion-MNIST is balanced: 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
    images, raw_labels = fm.load_split(Path(fm.DEFAULT_IDX_DIR), "test")
    np.testing.assert_array_equal(np.bincount(raw_labels), np.bincount(labels))
    assert images.dtype == np.uint8 and images.max() == 255


# --------------------------------------------------------------------------- #
# Training stream
# --------------------------------------------------------------------------- #


def test_batches_are_typed_numpy(data_dir: str):
    batch = _train(data_dir)[0]
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (16, 28, 28, 1)
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], [_label(i) for i in _ids(batch)])


def test_same_seed_same_batches_other_seed_differs(data_dir: str):
    first, again, other = (_train(data_dir, seed=s) for s in (3, 3, 4))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(_ids(first[0]), _ids(other[0]))


def test_every_example_once_per_epoch(data_dir: str):
    batches = _train(data_dir, global_batch_size=24, num_epochs=2, seed=7)
    # 128 examples in the stream -> 5 whole global batches; batches cross epochs.
    assert len(batches) == 5
    ids = np.concatenate([_ids(b) for b in batches])
    assert sorted(ids[:NUM_TRAIN]) == list(range(NUM_TRAIN))
    assert len(set(ids[NUM_TRAIN:])) == len(ids) - NUM_TRAIN
    assert not np.array_equal(ids[:32], ids[NUM_TRAIN : NUM_TRAIN + 32])  # reshuffled


def test_in_memory_split_streams_the_same_batches_and_resumes(data_dir: str, monkeypatch: pytest.MonkeyPatch):
    """A split that fits `cache_max_bytes` is read once into arrays; nothing else about the stream changes."""
    source, _ = pipeline.load_source("fashion_mnist", "train", data_dir)
    stored = NUM_TRAIN * 28 * 28
    cached = pipeline.InMemorySplit(source)
    assert cached.images.shape == (NUM_TRAIN, 28, 28, 1) and cached.labels.dtype == np.int32
    np.testing.assert_array_equal(cached[5]["image"], source[5]["image"])
    made = []
    monkeypatch.setattr(pipeline, "InMemorySplit", lambda source: made.append(1) or cached)
    from_disk = _train(data_dir, seed=3, num_epochs=2, cache_max_bytes=stored - 1)  # one byte short
    assert not made
    from_memory = _train(data_dir, seed=3, num_epochs=2, cache_max_bytes=stored)
    assert made and len(from_disk) == len(from_memory)
    for a, b in zip(from_disk, from_memory):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # The iterator state of one resumes the other: a checkpoint does not depend on the cache.
    disk_iter = iter(pipeline.make_train_dataset("fashion_mnist", data_dir=data_dir, global_batch_size=16, seed=3))
    next(disk_iter)
    memory_iter = iter(pipeline.make_train_dataset("fashion_mnist", data_dir=data_dir, global_batch_size=16, seed=3,
                                                   cache_max_bytes=stored))
    memory_iter.set_state(disk_iter.get_state())
    np.testing.assert_array_equal(next(disk_iter)["image"], next(memory_iter)["image"])


def test_unshuffled_follows_stored_order(data_dir: str):
    source, _ = pipeline.load_source("fashion_mnist", "train", data_dir)
    ids = np.concatenate([_ids(b) for b in _train(data_dir, shuffle=False)])
    np.testing.assert_array_equal(ids, [r["image"][0, 0, 0] for r in source])


def test_two_processes_split_each_global_batch(data_dir: str):
    single = _train(data_dir, global_batch_size=16, seed=5, process_count=1, process_index=0)
    halves = [
        _train(data_dir, global_batch_size=16, seed=5, process_count=2, process_index=p)
        for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == len(single) == NUM_TRAIN // 16
    for whole, p0, p1 in zip(single, *halves, strict=True):
        assert p0["image"].shape[0] == 8
        assert not set(_ids(p0)) & set(_ids(p1))
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), whole[key])


def test_processes_get_equal_step_counts_when_uneven(data_dir: str):
    # 64 examples / per-process batch 12 = 5 chunks; only 2 whole global batches of 24.
    counts = [
        len(_train(data_dir, global_batch_size=24, process_count=2, process_index=p))
        for p in (0, 1)
    ]
    assert counts == [2, 2]


def test_iterator_state_restores_exact_next_batches(data_dir: str):
    ds = pipeline.make_train_dataset(
        "fashion_mnist", data_dir=data_dir, global_batch_size=16, seed=1
    )
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(6)]  # crosses into the next epochs
    resumed = iter(
        pipeline.make_train_dataset(
            "fashion_mnist", data_dir=data_dir, global_batch_size=16, seed=1
        )
    )
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(6)), strict=True):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])


def test_iterator_state_through_grain_checkpoint_handler(data_dir: str, tmp_path: Path):
    make = lambda: iter(
        pipeline.make_train_dataset(
            "fashion_mnist", data_dir=data_dir, global_batch_size=16, seed=2
        )
    )
    it = make()
    next(it)
    (tmp_path / "ckpt").mkdir()  # orbax creates it in real runs
    grain.checkpoint.CheckpointHandler().save(tmp_path / "ckpt", item=it)
    want = next(it)
    resumed = make()
    grain.checkpoint.CheckpointHandler().restore(tmp_path / "ckpt", item=resumed)
    np.testing.assert_array_equal(next(resumed)["image"], want["image"])


def test_worker_processes_match_in_process_reading_and_resume(data_dir: str):
    in_process = _train(data_dir, seed=9, num_epochs=2)
    make = lambda: iter(
        pipeline.make_train_dataset(
            "fashion_mnist",
            data_dir=data_dir,
            global_batch_size=16,
            seed=9,
            num_epochs=2,
            worker_count=2,
        )
    )
    it = make()
    try:
        for want in in_process[:3]:
            np.testing.assert_array_equal(next(it)["image"], want["image"])
        state = it.get_state()
    finally:
        it.close()
    resumed = make()
    try:
        resumed.set_state(state)
        for want in in_process[3:]:
            np.testing.assert_array_equal(next(resumed)["image"], want["image"])
        with pytest.raises(StopIteration):
            next(resumed)
    finally:
        resumed.close()


def test_train_fraction_keeps_a_fixed_prefix(data_dir: str):
    source, _ = pipeline.load_source("fashion_mnist", "train", data_dir)
    prefix = {int(source[i]["image"][0, 0, 0]) for i in range(16)}
    ids = np.concatenate(
        [_ids(b) for b in _train(data_dir, global_batch_size=8, train_fraction=0.25, num_epochs=2)]
    )
    assert len(ids) == 32 and set(ids[:16]) == set(ids[16:]) == prefix
    sliced = np.concatenate(
        [_ids(b) for b in _train(data_dir, split="train[:25%]", global_batch_size=8, shuffle=False)]
    )
    assert set(sliced) == prefix


def test_resize_nearest_doubles_pixels(data_dir: str):
    small = _train(data_dir, shuffle=False)[0]["image"]
    big = _train(
        data_dir, shuffle=False, resize=(56, 56), resize_method="nearest", image_shape=(56, 56, 1)
    )[0]["image"]
    assert big.shape == (16, 56, 56, 1)
    np.testing.assert_array_equal(big[:, ::2, ::2], small)
    np.testing.assert_array_equal(big[:, 1::2, 1::2], small)


# --------------------------------------------------------------------------- #
# Eval pass
# --------------------------------------------------------------------------- #


def test_eval_counts_every_example_once_across_processes(data_dir: str):
    source, _ = pipeline.load_source("fashion_mnist", "test", data_dir)
    per_process = [
        list(
            pipeline.make_eval_dataset(
                "fashion_mnist",
                data_dir=data_dir,
                global_batch_size=8,
                process_count=2,
                process_index=p,
            )
        )
        for p in (0, 1)
    ]
    assert len(per_process[0]) == len(per_process[1]) == pipeline.eval_steps(NUM_TEST, 8) == 3
    rows = [
        np.concatenate([p0[k], p1[k]])
        for p0, p1 in zip(*per_process, strict=True)
        for k in ("image", "mask")
    ]
    images, masks = np.concatenate(rows[0::2]), np.concatenate(rows[1::2])
    assert masks.dtype == np.bool_ and masks.sum() == NUM_TEST
    np.testing.assert_array_equal(masks, np.arange(24) < NUM_TEST)
    np.testing.assert_array_equal(images[:NUM_TEST, 0, 0, 0], [r["image"][0, 0, 0] for r in source])
    assert not images[NUM_TEST:].any()


def test_eval_without_padding_has_all_true_mask(data_dir: str):
    batches = list(
        pipeline.make_eval_dataset(
            "fashion_mnist",
            data_dir=data_dir,
            global_batch_size=10,
            process_count=1,
            process_index=0,
        )
    )
    assert len(batches) == 2 and all(b["mask"].all() for b in batches)
    assert sorted(np.concatenate([_ids(b) for b in batches])) == list(
        range(TEST_ID_OFFSET, TEST_ID_OFFSET + NUM_TEST)
    )


# --------------------------------------------------------------------------- #
# Clear errors
# --------------------------------------------------------------------------- #


def test_wrong_expected_shape_names_the_fix(data_dir: str):
    with pytest.raises(pipeline.DataError, match=r"resize=\(32, 32\).*input channels to 1"):
        pipeline.make_train_dataset(
            "fashion_mnist", data_dir=data_dir, global_batch_size=8, image_shape=(32, 32, 3)
        )


def test_expected_shape_must_have_three_dims(data_dir: str):
    with pytest.raises(pipeline.DataError, match=r"must be \(H, W, C\)"):
        pipeline.make_eval_dataset(
            "fashion_mnist", data_dir=data_dir, global_batch_size=8, image_shape=(28, 28)
        )


def test_unknown_dataset(tmp_path: Path):
    with pytest.raises(pipeline.DataError, match="Unknown dataset 'no_such_set'"):
        pipeline.make_train_dataset("no_such_set", data_dir=str(tmp_path), global_batch_size=8)


def test_unprepared_catalogue_dataset_says_how_to_prepare(tmp_path: Path):
    with pytest.raises(pipeline.DataError, match="tfds build cifar10 --file_format=array_record"):
        pipeline.make_train_dataset("cifar10", data_dir=str(tmp_path), global_batch_size=8)


def test_empty_split(data_dir: str):
    with pytest.raises(pipeline.DataError, match="empty"):
        pipeline.make_train_dataset(
            "fashion_mnist", split="train[:0]", data_dir=data_dir, global_batch_size=8
        )


def test_unknown_split_lists_available(data_dir: str):
    with pytest.raises(pipeline.DataError, match=r"Available splits: \['test', 'train'\]"):
        pipeline.make_eval_dataset(
            "fashion_mnist", split="validation", data_dir=data_dir, global_batch_size=8
        )


def test_batch_larger_than_data(data_dir: str):
    with pytest.raises(pipeline.DataError, match="fewer than one global batch"):
        pipeline.make_train_dataset("fashion_mnist", data_dir=data_dir, global_batch_size=128)


def test_batch_not_divisible_by_processes(data_dir: str):
    with pytest.raises(pipeline.DataError, match="multiple of the process count 2"):
        pipeline.make_train_dataset(
            "fashion_mnist",
            data_dir=data_dir,
            global_batch_size=9,
            process_count=2,
            process_index=0,
        )


# --------------------------------------------------------------------------- #
# On-device augmentation
# --------------------------------------------------------------------------- #


def _distinct_images(batch: int = 8, size: int = 12, channels: int = 3) -> jax.Array:
    """Float images whose pixels are all different, so any move is visible."""
    n = batch * size * size * channels
    return jnp.arange(n, dtype=jnp.float32).reshape(batch, size, size, channels) / n


def test_flip_is_exact_reversal_or_identity():
    images = _distinct_images(batch=32)
    out = jax.jit(augment.random_flip)(jax.random.key(0), images)
    flipped = [bool(jnp.array_equal(o, i[:, ::-1])) for o, i in zip(out, images, strict=True)]
    kept = [bool(jnp.array_equal(o, i)) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32


def test_full_area_crop_is_identity():
    images = _distinct_images()
    out = augment.random_resized_crop(
        jax.random.key(1), images, (12, 12), scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    np.testing.assert_allclose(out, images, atol=1e-6)


def test_random_crop_upsamples_constant_images_to_constants():
    images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None] / 4, (4, 10, 10, 1))
    out = jax.jit(augment.random_resized_crop, static_argnums=2)(
        jax.random.key(2), images, (16, 16)
    )
    assert out.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(out, jnp.broadcast_to(images[:, :1, :1], out.shape), atol=1e-6)


def test_mixup_matches_lambda_and_labels_sum_to_one():
    images = _distinct_images()
    labels = augment.one_hot(jnp.arange(8) % 5, 5)
    mixed, soft, lam = jax.jit(augment.mixup, static_argnums=3)(
        jax.random.key(3), images, labels, 0.4
    )
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-6)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft, lam * labels + (1 - lam) * labels[::-1], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_area_matches_label_weights(seed: int):
    images = _distinct_images(size=16)
    labels = augment.one_hot(jnp.arange(8), 8)
    mixed, soft, lam = jax.jit(augment.cutmix, static_argnums=3)(
        jax.random.key(seed), images, labels, 1.0
    )
    pasted = (mixed != images).all(-1).mean(axis=(1, 2))  # fraction taken from the partner
    np.testing.assert_allclose(pasted, 1.0 - lam, atol=1e-6)
    np.testing.assert_allclose(soft[jnp.arange(8), jnp.arange(8)], lam, atol=1e-6)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    taken = jnp.where(mixed != images, mixed, images[::-1])
    np.testing.assert_array_equal(taken, images[::-1])  # pasted pixels come from the partner


def test_randaugment_ops_with_known_results():
    image = _distinct_images(batch=1, size=20)[0]
    level = jnp.float32(1.0)
    # Magnitude 10 translates by 0.45 * 20 = 9 pixels and fills with grey.
    moved = augment._op_translate_x(image, level)
    np.testing.assert_allclose(moved[:, :11], image[:, 9:], atol=1e-6)
    np.testing.assert_allclose(moved[:, 11:], 0.5)
    # Level 3 is 90 degrees counter-clockwise; the border is skipped because
    # rounding puts its source coordinates a hair outside the image (-> grey fill).
    turned = augment._op_rotate(image, jnp.float32(3.0))
    np.testing.assert_allclose(turned[1:-1, 1:-1], jnp.rot90(image)[1:-1, 1:-1], atol=1e-4)
    # Shear 1.0 about the centre row 10 of a 21-row image: row 10 stays, row 11 moves 1 pixel.
    odd = _distinct_images(batch=1, size=21)[0]
    sheared = augment._op_shear_x(odd, jnp.float32(1 / 0.3))
    np.testing.assert_allclose(sheared[10], odd[10], atol=1e-6)
    np.testing.assert_allclose(sheared[11, :-1], odd[11, 1:], atol=1e-6)
    np.testing.assert_allclose(augment._op_brightness(image, -level), image * 0.1, atol=1e-6)
    posterized = augment._op_posterize(image, level) * 255
    np.testing.assert_allclose(posterized, np.round(posterized / 16) * 16, atol=1e-3)
    np.testing.assert_allclose(
        augment._op_solarize(image, jnp.float32(0.5)), jnp.where(image < 0.5, image, 1 - image)
    )


def test_augment_batch_jits_and_is_finite():
    config = augment.AugmentConfig(
        crop_size=(16, 16),
        randaug_num_ops=1,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        mean=augment.IMAGENET_MEAN,
        std=augment.IMAGENET_STD,
    )
    images = (np.arange(8 * 20 * 20 * 3) % 256).astype(np.uint8).reshape(8, 20, 20, 3)
    step = jax.jit(augment.augment_batch, static_argnames=("num_classes", "config"))
    x, y = step(jax.random.key(4), images, jnp.arange(8) % 10, num_classes=10, config=config)
    assert x.shape == (8, 16, 16, 3) and x.dtype == jnp.float32
    assert bool(jnp.isfinite(x).all())
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    x2, _ = step(jax.random.key(4), images, jnp.arange(8) % 10, num_classes=10, config=config)
    np.testing.assert_array_equal(x, x2)


def test_eval_batch_normalises_exactly():
    config = augment.AugmentConfig(mean=(0.25,), std=(0.5,))
    images = np.array([0, 255, 51], np.uint8).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(
        augment.eval_batch(images, config).ravel(), [-0.5, 1.5, -0.1], atol=1e-6
    )
