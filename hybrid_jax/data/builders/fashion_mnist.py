"""Fashion-MNIST as a tfds dataset built offline from the Debian IDX files.

The Debian package `dataset-fashion-mnist` ships the four IDX files (gzipped)
under /usr/share/datasets/fashion-mnist/. This builder turns them into an
array_record tfds dataset once, so training reads them through
`tfds.data_source` + grain with no internet and no TensorFlow. Pixels are a
uint8 `Tensor` feature rather than `Image` because encoding an `Image` needs
TensorFlow.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DIR_ENV = "HYBRID_JAX_FASHION_MNIST_DIR"
INSTALL_HINT = (
    "Install the Debian package with `sudo apt-get install dataset-fashion-mnist` "
    f"(files land in {DEFAULT_IDX_DIR}), or point ${IDX_DIR_ENV} at a directory "
    "holding the four IDX files."
)
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (28, 28, 1)
# split -> (images file, labels file), names as published by Zalando.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


class IdxError(ValueError):
    """An IDX file is missing, corrupt or inconsistent with its partner."""


def resolve_idx_dir(idx_dir: str | os.PathLike | None = None) -> Path:
    """Picks the IDX directory: explicit argument, then env var, then Debian path."""
    return Path(idx_dir or os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR)


def find_idx_file(idx_dir: Path, stem: str) -> Path:
    """Finds `stem` or `stem.gz` in idx_dir, or fails saying how to install it."""
    for candidate in (idx_dir / f"{stem}.gz", idx_dir / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {idx_dir}. {INSTALL_HINT}"
    )


def _read_bytes(path: Path) -> bytes:
    """Reads a file, transparently gunzipping, with corruption as an IdxError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"{path}: cannot read ({e}); the file is corrupt.") from e


def parse_idx(data: bytes, *, expected_ndim: int, source: str = "<bytes>") -> np.ndarray:
    """Decodes an unsigned-byte IDX blob, checking magic number and length."""
    if len(data) < 4:
        raise IdxError(f"{source}: {len(data)} bytes is too short for an IDX header.")
    zero0, zero1, dtype_code, ndim = data[:4]
    if zero0 or zero1 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        raise IdxError(
            f"{source}: bad IDX magic {data[:4].hex()}, expected "
            f"0000{_IDX_UBYTE:02x}{expected_ndim:02x} (unsigned bytes, {expected_ndim} dims)."
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxError(f"{source}: truncated IDX header.")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    payload = len(data) - header_len
    if payload != int(np.prod(shape)):
        raise IdxError(
            f"{source}: header says shape {shape} ({int(np.prod(shape))} bytes) but "
            f"{payload} bytes follow; the file is truncated or corrupt."
        )
    return np.frombuffer(data, np.uint8, offset=header_len).reshape(shape)


def load_split(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split as (uint8 [N, 28, 28, 1] images, uint8 [N] labels)."""
    image_stem, label_stem = SPLIT_FILES[split]
    image_path = find_idx_file(idx_dir, image_stem)
    label_path = find_idx_file(idx_dir, label_stem)
    images = parse_idx(_read_bytes(image_path), expected_ndim=3, source=str(image_path))
    labels = parse_idx(_read_bytes(label_path), expected_ndim=1, source=str(label_path))
    if images.shape[1:] != IMAGE_SHAPE[:2]:
        raise IdxError(f"{image_path}: images are {images.shape[1:]}, expected 28x28.")
    if len(images) != len(labels):
        raise IdxError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels."
        )
    if labels.size and labels.max() >= len(LABEL_NAMES):
        raise IdxError(f"{label_path}: label {labels.max()} is outside 0..9.")
    return images[..., None], labels


class HybridFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (60k train / 10k test, 28x28 grey, 10 classes) from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from the Debian dataset-fashion-mnist IDX files."}

    def __init__(self, *, idx_dir: str | os.PathLike | None = None, **kwargs):
        # array_record is the only format readable by tfds.data_source without TF.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._idx_dir = resolve_idx_dir(idx_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Zalando Fashion-MNIST, read from local IDX files (MIT licence).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            license="MIT",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Everything is local; nothing is downloaded.
        if not self._idx_dir.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST IDX directory {self._idx_dir} does not exist. {INSTALL_HINT}"
            )
        return {split: self._generate_examples(split) for split in SPLIT_FILES}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        images, labels = load_split(self._idx_dir, split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}
