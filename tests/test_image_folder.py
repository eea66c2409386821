"""The image-folder builder (`image_folder:PATH`), crops from the decoded original, decoding in grain workers, and
the host pipeline benchmark."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.benchmarks import host_pipeline
from hybrid_jax.data import pipeline

CLASSES = ("ant", "bee", "cat")
# (H, W) per image within a class, all outside the crop's 3/4..4/3 aspect range: a crop cut from an image squashed
# to a square would have 2-3x the aspect of one cut from the original. Class k adds 4k to both sides.
SHAPES = ((60, 180), (180, 60), (48, 120), (120, 48))
SIZE = 32


def _coded(height: int, width: int, index: int) -> np.ndarray:
    """Red rises with x and green with y across the image, blue names the image: a crop tells where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    blue = np.full((height, width), 40 + 60 * index)
    return np.stack([255 * x / (width - 1), 255 * y / (height - 1), blue], -1).round().astype(np.uint8)


def _jpeg(image: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0, **kwargs)
    return buffer.getvalue()


def _shape(label: int, index: int) -> tuple[int, int]:
    return SHAPES[index][0] + 4 * label, SHAPES[index][1] + 4 * label


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for index in range(len(SHAPES)):
            (root / name / f"{index}.jpg").write_bytes(_jpeg(_coded(*_shape(label, index), index)))
    (root / "cat" / "Thumbs.db").write_bytes(b"not an image")  # skipped: not an image suffix
    return root


@pytest.fixture(scope="module")
def built(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(dataset name, data_dir) with the folder prepared."""
    name, data_dir = pipeline.IMAGE_FOLDER + str(folder), str(tmp_path_factory.mktemp("tfds"))
    pipeline.get_builder(name, data_dir)
    return name, data_dir


def test_round_trip_keeps_labels_original_sizes_and_bytes(folder: Path, built: tuple[str, str]):
    name, data_dir = built
    raw, info = pipeline.load_source(name, "train", data_dir, decode_images=False)
    decoded, _ = pipeline.load_source(name, "train", data_dir)  # tfds's own decoder
    assert info.features["label"].names == list(CLASSES)
    assert pipeline.describe(name, "train", data_dir, resize=(SIZE, SIZE)).num_classes == 3
    names = sorted(r["file_name"].decode() for r in raw)
    assert names == sorted(f"{c}/{i}.jpg" for c in CLASSES for i in range(len(SHAPES)))
    for stored, tfds_decoded in zip(raw, decoded):
        relative = stored["file_name"].decode()
        label, index = CLASSES.index(relative.split("/")[0]), int(relative.split("/")[1][0])
        assert stored["label"] == label
        assert stored["image"] == (folder / relative).read_bytes()  # not re-encoded
        ours = np.asarray(pipeline.decode_image(stored["image"], 3))
        assert ours.shape == (*_shape(label, index), 3) == tfds_decoded["image"].shape
        np.testing.assert_array_equal(ours, tfds_decoded["image"])
        assert abs(int(ours[..., 2].mean()) - (40 + 60 * index)) <= 2


def test_split_folders_grey_jpegs_and_other_formats(tmp_path: Path):
    """Grey JPEGs are stored as they are and decode to RGB; a PNG with alpha is stored as its RGB conversion."""
    grey = np.arange(40 * 50, dtype=np.uint32).reshape(40, 50).astype(np.uint8)
    rgba = np.random.default_rng(0).integers(0, 256, (30, 20, 4), dtype=np.uint8)
    for split, classes in {"train": ("a", "b"), "val": ("a",)}.items():
        for name in classes:
            (tmp_path / "root" / split / name).mkdir(parents=True)
    (tmp_path / "root/train/a/grey.jpg").write_bytes(_jpeg(grey))
    Image.fromarray(rgba).save(tmp_path / "root/train/b/alpha.png")
    (tmp_path / "root/val/a/x.jpeg").write_bytes(_jpeg(_coded(20, 30, 0)))
    name, data_dir = pipeline.IMAGE_FOLDER + str(tmp_path / "root"), str(tmp_path / "tfds")
    builder = pipeline.get_builder(name, data_dir)
    assert set(builder.info.splits) == {"train", "val"} and builder.info.features["label"].names == ["a", "b"]
    train = {r["file_name"].decode(): r for r in pipeline.load_source(name, "train", data_dir, decode_images=False)[0]}
    assert train["train/a/grey.jpg"]["image"] == (tmp_path / "root/train/a/grey.jpg").read_bytes()
    pixels = np.asarray(pipeline.decode_image(train["train/a/grey.jpg"]["image"], 3))
    assert pixels.shape == (40, 50, 3) and (pixels == pixels[..., :1]).all()
    np.testing.assert_array_equal(np.asarray(pipeline.decode_image(train["train/b/alpha.png"]["image"], 3)),
                                  np.asarray(Image.fromarray(rgba).convert("RGB")))
    (val,) = pipeline.load_source(name, "val", data_dir)[0]
    assert val["label"] == 0 and val["image"].shape == (20, 30, 3)


def _train(built: tuple[str, str], **kwargs):
    name, data_dir = built
    return pipeline.make_train_dataset(name, data_dir=data_dir, global_batch_size=4, resize=(SIZE, SIZE),
                                       image_shape=(SIZE, SIZE, 3), **kwargs)


def test_full_area_crops_equal_pil_crops_of_the_originals(folder: Path, built: tuple[str, str]):
    """Scale (1, 1) takes torchvision's central 4:3 (or 3:4) box of each original, pixel for pixel."""
    batches = list(_train(built, random_crop_scale=(1.0, 1.0), shuffle=False, num_epochs=1))
    name, data_dir = built
    raw, _ = pipeline.load_source(name, "train", data_dir, decode_images=False)
    crops = np.concatenate([b["image"] for b in batches])
    assert len(crops) == len(raw) == 12
    for crop, record in zip(crops, raw):
        original = Image.open(folder / record["file_name"].decode()).convert("RGB")
        top, left, h, w = pipeline._crop_box(original.height, original.width, (1.0, 1.0), np.random.default_rng())
        want = original.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(crop, np.asarray(want))


def test_random_crops_have_the_originals_geometry(built: tuple[str, str]):
    """Read back from the coded pixels, every crop is a box of its original with aspect 3/4..4/3 in original pixels
    and 8-100% of its area; crops of a 3:1 image squashed to a square first would measure aspect 2.25-4."""
    batches = list(_train(built, random_crop_scale=(0.08, 1.0), seed=1, num_epochs=3))
    aspects = []
    for batch in batches:
        for crop, label in zip(batch["image"].astype(float), batch["label"]):
            index = int(round((crop[..., 2].mean() - 40) / 60))
            height, width = _shape(int(label), index)
            # Output pixel j samples the crop at (j + 1/2) / SIZE of its width, where red is 255 x / (width - 1):
            # red's slope per output pixel is 255 / (width - 1) * w / SIZE (fitted inside, away from edge effects).
            inner = np.arange(2, SIZE - 2)
            w = np.polyfit(inner, crop[:, inner, 0].mean(0), 1)[0] * SIZE * (width - 1) / 255
            h = np.polyfit(inner, crop[inner, :, 1].mean(1), 1)[0] * SIZE * (height - 1) / 255
            assert 0.07 <= w * h / (width * height) <= 1.02
            aspects.append(w / h)
    assert len(aspects) == 36
    assert min(aspects) >= 0.72 and max(aspects) <= 1.39, (min(aspects), max(aspects))


def test_images_are_decoded_in_the_grain_workers(built: tuple[str, str], monkeypatch: pytest.MonkeyPatch):
    """With workers, the training process never decodes: breaking its decoder changes nothing."""
    want = [b["image"] for b in _train(built, random_crop_scale=(0.08, 1.0), num_epochs=1)]
    in_process = _train(built, random_crop_scale=(0.08, 1.0), num_epochs=1)
    with_worker = _train(built, random_crop_scale=(0.08, 1.0), num_epochs=1, worker_count=1)

    def broken(data: bytes, channels: int):
        raise RuntimeError("decoded in the training process")

    monkeypatch.setattr(pipeline, "decode_image", broken)  # the worker, a fresh spawned process, keeps the real one
    with pytest.raises(RuntimeError, match="decoded in the training process"):
        next(iter(in_process))
    got = [b["image"] for b in with_worker]
    assert len(got) == len(want) == 3
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _write(root: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)


GOOD = _jpeg(_coded(20, 30, 0))


@pytest.mark.parametrize("files, dirs, match", [
    ({}, (), "is empty"),
    ({"a.jpg": GOOD, "b.jpg": GOOD}, (), "holds images but no class subfolders"),
    ({"dog/a.jpg": GOOD}, ("cat",), r"Class folder\(s\) \['cat'\] .* hold no images"),
    ({"dog/a.jpg": GOOD, "dog/notes.jpg": b"just text"}, (), r"dog/notes.jpg is not a readable image"),
    ({"dog/a.jpg": GOOD, "dog/cut.jpg": GOOD[: len(GOOD) // 2]}, (), r"dog/cut.jpg is not a readable image"),
    ({"train/dog/a.jpg": GOOD, "val/cat/b.jpg": GOOD}, (), r"\['cat'\] appear in another split"),
])
def test_bad_folders_are_clear_errors(tmp_path: Path, files: dict[str, bytes], dirs: tuple[str, ...], match: str):
    root = tmp_path / "root"
    root.mkdir()
    _write(root, files)
    for name in dirs:
        (root / name).mkdir()
    with pytest.raises(pipeline.DataError, match=match):
        pipeline.get_builder(pipeline.IMAGE_FOLDER + str(root), str(tmp_path / "tfds"))


def test_fixed_folder_builds_after_an_error_and_missing_names_are_errors(tmp_path: Path):
    root, data_dir = tmp_path / "root", str(tmp_path / "tfds")
    _write(root, {"dog/a.jpg": GOOD, "dog/bad.jpg": b"\xff\xd8 broken"})
    name = pipeline.IMAGE_FOLDER + str(root)
    with pytest.raises(pipeline.DataError, match="bad.jpg is not a readable image"):
        pipeline.get_builder(name, data_dir)
    (root / "dog/bad.jpg").write_bytes(GOOD)
    assert pipeline.get_builder(name, data_dir).info.splits["train"].num_examples == 2
    with pytest.raises(pipeline.DataError, match="does not exist"):
        pipeline.get_builder(pipeline.IMAGE_FOLDER + str(tmp_path / "nowhere"), data_dir)
    with pytest.raises(pipeline.DataError, match="names no folder"):
        pipeline.get_builder(pipeline.IMAGE_FOLDER, data_dir)


def test_benchmark_generates_imagenet_like_jpegs_and_times_them(tmp_path: Path):
    sizes = host_pipeline.write_folder(tmp_path / "folder", 30, 3)
    files = sorted((tmp_path / "folder").rglob("*.jpg"))
    assert len(files) == 30 and {f.parent.name for f in files} == {"class_00", "class_01", "class_02"}
    assert sorted(sizes) == sorted(f.stat().st_size for f in files)
    assert {Image.open(f).size for f in files} <= {s[:2] for s in host_pipeline.SIZES}
    assert 40e3 < np.mean(sizes) < 250e3  # photograph-like weight, not flat colour (a few KB) nor noise (~400 KB)
    out = tmp_path / "report.md"
    text = host_pipeline.main(["--num_images", "20", "--num_classes", "4", "--workers", "0", "--cost_images", "10",
                               "--out", str(out)])
    assert out.read_text() == text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| train") or line.startswith("| eval")]
    assert [(r[1], r[2]) for r in rows] == [("0", "20"), ("0", "20")]  # workers, images
    assert all(float(r[7]) > 0 and abs(float(r[5]) - float(r[6])) <= 0.1 for r in rows)  # per core; no workers
    assert "1,460 img/s" in text and "4,700 img/s" in text and "--num_images 20" in text
