"""Grain input pipeline: tfds array_record sources -> per-process numpy batches.

Every process builds the same globally shuffled stream of examples, cuts it
into global batches of `global_batch_size`, and reads only its own contiguous
slice of each: process p of P gets rows [p*b, (p+1)*b) with b = global / P, so
`jax.make_array_from_process_local_data` reassembles exactly the batch a
single process would have seen. The stream is a grain `MapDataset`, so the
iterator's state is a position and a resumed run sees the same next batches.

Batches are numpy dicts {"image": uint8 [b, H, W, C], "label": int32 [b]};
eval batches add "mask": bool [b], False on padding. Normalisation and
augmentation happen on device (`hybrid_jax.data.augment`), not here, except the two
geometric transforms that need the decoded original of a variable-size image: timm's
eval resize-and-centre-crop (`crop_pct`) and the Inception random-resized-crop
(`random_crop_scale`), both done with PIL as timm / torchvision do them.

Encoded images (tfds `Image` features: JPEG / PNG bytes, as imagenet2012 and
`image_folder:PATH` store them) are read undecoded and decoded by `decode_image` (PIL,
libjpeg-turbo) inside the per-example transform, so with `worker_count > 0` the grain
worker processes read, decode and crop, and the training process only receives batches.
tfds's own decoder (OpenCV when installed, else PIL) would return an array that the crop
copies back into PIL (about 10% more CPU per training image) and keep a CMYK image's 4
channels; this one converts as torchvision's loader does.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from hybrid_jax.data.builders.fashion_mnist import HybridFashionMnist
from hybrid_jax.data.builders.image_folder import HybridImageFolder, ImageFolderError
from hybrid_jax.data.builders.reid_folder import (
    HybridDukemtmcReid,
    HybridMarket1501,
    HybridMsmt17,
    SourceFileError,
)
from hybrid_jax.data.builders.reid_synthetic import HybridReidSynthetic

# Names served by our offline builders instead of the tfds catalogue (whose
# fashion_mnist would need a download). "name/config" picks a builder config.
EMBEDDED_BUILDERS = {
    "fashion_mnist": HybridFashionMnist,
    "hybrid_fashion_mnist": HybridFashionMnist,
    "reid_synthetic": HybridReidSynthetic,
    "hybrid_reid_synthetic": HybridReidSynthetic,
    "market1501": HybridMarket1501,
    "dukemtmc_reid": HybridDukemtmcReid,
    "msmt17": HybridMsmt17,
}
# Embedded builders that read a local copy of the data from a manual directory.
MANUAL_DIR_BUILDERS = (HybridMarket1501, HybridDukemtmcReid, HybridMsmt17)
# "image_folder:PATH" names a folder of class subfolders (builders/image_folder.py), read once.
IMAGE_FOLDER = "image_folder:"
DATA_DIR_ENV = "TFDS_DATA_DIR"
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# PIL mode of a decoded image per channel count of its feature, as torchvision's loader converts to RGB.
_MODES = {1: "L", 3: "RGB"}
# Aspect-ratio range of the Inception crop (torchvision's RandomResizedCrop default).
_CROP_RATIO = (3 / 4, 4 / 3)

Batch = dict[str, np.ndarray]


class DataError(ValueError):
    """A dataset is missing, unprepared, empty or not what the caller expects."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a model and loop need to know about one split before training."""

    num_examples: int
    image_shape: tuple[int, int, int]  # after the optional resize
    num_classes: int


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #


def default_data_dir() -> str:
    """Where tfds datasets live unless the caller says otherwise (tfds's own rule)."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def _prepare_hint(name: str, data_dir: str) -> str:
    """The command that prepares a catalogue dataset in a form we can read."""
    manual = " --manual_dir=DIR_WITH_THE_TARS" if name.startswith("imagenet2012") else ""
    return (
        f"Prepare it once where internet (and, for datasets built from numpy "
        f"arrays such as cifar10, TensorFlow) is available: run "
        f"`tfds build {name} --file_format=array_record --data_dir={data_dir}{manual}`, "
        f"or copy an array_record copy of it into {data_dir}."
    )


def _embedded_builder(
    name: str, data_dir: str, manual_dir: str | None
) -> tfds.core.DatasetBuilder:
    """Instantiates one of our builders; `manual_dir` goes to those that read a local copy."""
    base, _, config = name.partition("/")
    cls = EMBEDDED_BUILDERS[base]
    kwargs = {"data_dir": data_dir}
    if config:
        names = [c.name for c in cls.BUILDER_CONFIGS]
        if config not in names:
            raise DataError(f"{base!r} has no config {config!r}; choose one of {names}.")
        kwargs["config"] = config
    if issubclass(cls, MANUAL_DIR_BUILDERS):
        kwargs["source_dir"] = manual_dir
    elif manual_dir:
        raise DataError(
            f"{base!r} is not built from a manual directory; leave manual_dir empty."
        )
    return cls(**kwargs)


def _image_folder_builder(name: str, data_dir: str) -> HybridImageFolder:
    """The builder of "image_folder:PATH"; its prepared copy is named after PATH."""
    path = name[len(IMAGE_FOLDER):]
    if not path:
        raise DataError(f"{name!r} names no folder; write {IMAGE_FOLDER}/path/to/root.")
    return HybridImageFolder(source_dir=path, data_dir=data_dir)


def _prepared(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Prepares one of our builders the first time, with bad local files as a DataError."""
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except (FileNotFoundError, SourceFileError, ImageFolderError) as e:  # local files missing or bad
            raise DataError(str(e)) from e
    return builder


def get_builder(
    name: str, data_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Returns a prepared tfds builder; embedded datasets prepare themselves once.

    `manual_dir` is where datasets that cannot be downloaded (Market-1501, DukeMTMC-reID,
    MSMT17) are read from the first time; None means `{data_dir}/downloads/manual`.
    "image_folder:PATH" reads the folder PATH of class subfolders once (`HybridImageFolder`).
    """
    data_dir = data_dir or default_data_dir()
    if name.startswith(IMAGE_FOLDER):
        return _prepared(_image_folder_builder(name, data_dir))
    if name.partition("/")[0] in EMBEDDED_BUILDERS:
        return _prepared(_embedded_builder(name, data_dir, manual_dir))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown dataset {name!r}: neither one of ours ({sorted(EMBEDDED_BUILDERS)}) "
            f"nor in the tfds catalogue. Check the spelling (see `tfds.list_builders()`); a folder of "
            f"class subfolders is {IMAGE_FOLDER}PATH."
        ) from e
    if not builder.is_prepared():
        raise DataError(
            f"Dataset {name!r} is not prepared in {data_dir}. {_prepare_hint(name, data_dir)}"
        )
    return builder


def _undecoded_images(info: tfds.core.DatasetInfo) -> dict[str, Any] | None:
    """tfds decoders that leave an 8-bit grey or RGB `Image` feature encoded, for `decode_image`."""
    if "image" not in info.features or not isinstance(info.features["image"], tfds.features.Image):
        return None
    feature = info.features["image"]
    if np.dtype(feature.np_dtype) != np.uint8 or feature.shape[-1] not in _MODES:
        return None  # 16-bit, float or RGBA images stay with tfds's decoder
    return {"image": tfds.decode.SkipDecoding()}


def load_source(
    name: str,
    split: str,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    *,
    decode_images: bool = True,
) -> tuple[Sequence[Mapping[str, Any]], tfds.core.DatasetInfo]:
    """Opens one split (tfds slicing like "train[:10%]" allowed) for random access.

    `decode_images=False` leaves JPEG / PNG `Image` features as bytes, for `decode_image` where they are used.
    """
    data_dir = data_dir or default_data_dir()
    builder = get_builder(name, data_dir, manual_dir)
    try:
        num_examples = builder.info.splits[split].num_examples
    except (ValueError, KeyError) as e:
        raise DataError(
            f"Split {split!r} of {name!r} cannot be read ({e}). "
            f"Available splits: {sorted(builder.info.splits)}."
        ) from e
    # Checked before opening: tfds cannot open an empty read instruction at all.
    if num_examples <= 0:
        raise DataError(f"Split {split!r} of {name!r} is empty; choose another split or slice.")
    try:
        decoders = None if decode_images else _undecoded_images(builder.info)
        source = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:  # stored as tfrecord, which needs TensorFlow
        raise DataError(
            f"Dataset {name!r} in {data_dir} is not stored as array_record, which grain "
            f"needs. {_prepare_hint(name, data_dir)}"
        ) from e
    return source, builder.info


# --------------------------------------------------------------------------- #
# Validation and per-example transforms
# --------------------------------------------------------------------------- #


def _output_shape(
    name: str, info: tfds.core.DatasetInfo, resize: tuple[int, int] | None
) -> tuple[int, int, int]:
    """Checks the stored image feature is uint8 and derives the batched image shape."""
    missing = {"image", "label"} - set(info.features.keys())
    if missing:
        raise DataError(
            f"{name!r} lacks the feature(s) {sorted(missing)}; this pipeline reads "
            f"supervised image datasets with 'image' and 'label' features."
        )
    feature = info.features["image"]
    stored_shape, dtype = tuple(feature.shape), np.dtype(feature.np_dtype)
    if dtype != np.uint8 or len(stored_shape) != 3 or stored_shape[-1] is None:
        raise DataError(
            f"{name!r} stores images as {dtype} {stored_shape}; this pipeline needs "
            f"uint8 [H, W, C]. Convert the dataset or add a decoder for it."
        )
    if resize is not None:
        return (*resize, stored_shape[-1])
    if None in stored_shape:
        raise DataError(
            f"{name!r} has images of varying size {stored_shape}; pass resize=(H, W) "
            f"so they can be batched."
        )
    return stored_shape


def _check_expected(
    name: str, actual: tuple[int, int, int], expected: Sequence[int] | None
) -> None:
    """Fails early, naming the fix, when the data would not fit the model."""
    if expected is None or tuple(expected) == actual:
        return
    if len(expected) != 3:
        raise DataError(f"image_shape must be (H, W, C), got {tuple(expected)}.")
    fixes = []
    if tuple(expected[:2]) != actual[:2]:
        fixes.append(
            f"pass resize={tuple(expected[:2])} or set the model's image size to {actual[:2]}"
        )
    if expected[-1] != actual[-1]:
        fixes.append(
            f"set the model's input channels to {actual[-1]} (channels are never converted)"
        )
    raise DataError(
        f"{name!r} yields images of shape {actual} but {tuple(expected)} was expected: "
        + "; ".join(fixes)
        + "."
    )


def _check_crops(
    shape: tuple[int, int, int],
    crop_pct: float | None,
    random_crop_scale: tuple[float, float] | None,
) -> None:
    """Rejects crop settings that would silently produce a different view than asked for."""
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise DataError(f"crop_pct must be in (0, 1] (timm's eval uses 0.875 or 0.9), got {crop_pct}.")
    if crop_pct is not None and shape[0] != shape[1]:
        raise DataError(
            f"crop_pct needs a square image size, got {shape[:2]}; set resize=(S, S) or crop_pct=None."
        )
    if random_crop_scale is not None and not 0.0 < random_crop_scale[0] <= random_crop_scale[1] <= 1.0:
        raise DataError(f"random_crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {random_crop_scale}.")


def decode_image(data: bytes, channels: int) -> Image.Image:
    """JPEG / PNG bytes -> a PIL image with `channels` (1 or 3) channels, as torchvision's loader reads files."""
    image = Image.open(io.BytesIO(data))
    return image if image.mode == _MODES[channels] else image.convert(_MODES[channels])


def _pixels(image: np.ndarray | bytes, channels: int) -> np.ndarray | Image.Image:
    """A stored image as it can be cropped: decoded to PIL when encoded, else the uint8 array itself."""
    if isinstance(image, bytes):
        return decode_image(image, channels)
    return np.asarray(image, dtype=np.uint8)


def _array(image: np.ndarray | Image.Image) -> np.ndarray:
    """uint8 [H, W, C] from a PIL image (grey gets its channel axis) or an array."""
    out = np.asarray(image, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _height_width(image: np.ndarray | Image.Image) -> tuple[int, int]:
    """(H, W) of a PIL image or an array."""
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def _resize(image: np.ndarray | Image.Image, size: tuple[int, int], method: str) -> np.ndarray:
    """Resamples a uint8 [H, W, C] image to `size` (H, W) with PIL, whose filters timm uses."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    # PIL sizes are (width, height).
    return _array(image.resize(tuple(size[::-1]), _RESAMPLE[method]))


def resize_shorter(image: np.ndarray | Image.Image, size: int, method: str) -> np.ndarray:
    """Scales the shorter side to `size` keeping the aspect ratio, as torchvision's Resize(int)."""
    height, width = _height_width(image)
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)  # truncated, as torchvision does
    return _resize(image, (new_long, size) if width <= height else (size, new_long), method)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Cuts the central size x size window; offsets round half to even, as torchvision's CenterCrop."""
    height, width = image.shape[:2]
    top, left = round((height - size) / 2), round((width - size) / 2)
    return image[top : top + size, left : left + size]


def eval_view(image: np.ndarray | Image.Image, size: int, crop_pct: float, method: str) -> np.ndarray:
    """timm's eval transform before normalisation: shorter side to floor(size / crop_pct), centre crop."""
    return center_crop(resize_shorter(image, math.floor(size / crop_pct), method), size)


def _crop_box(
    height: int, width: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Samples (top, left, h, w) as torchvision's RandomResizedCrop: 10 tries, then a central crop."""
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    if width / height < _CROP_RATIO[0]:
        w, h = width, round(width / _CROP_RATIO[0])
    elif width / height > _CROP_RATIO[1]:
        w, h = round(height * _CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_example(
    record: Mapping[str, Any],
    resize: tuple[int, int] | None,
    method: str,
    crop_pct: float | None = None,
    channels: int = 3,
) -> dict[str, np.ndarray]:
    """Decodes if encoded, keeps image and label with fixed dtypes, resizing only when asked.

    With `crop_pct`, timm's `eval_view` at the (square) `resize` or the stored size.
    """
    image = _pixels(record["image"], channels)
    if crop_pct is not None:
        image = eval_view(image, resize[0] if resize else _height_width(image)[0], crop_pct, method)
    elif resize is not None and _height_width(image) != tuple(resize):
        image = _resize(image, resize, method)
    return {"image": _array(image), "label": np.int32(record["label"])}


def _to_cropped_example(
    record: Mapping[str, Any],
    rng: np.random.Generator,
    resize: tuple[int, int] | None,
    method: str,
    scale: tuple[float, float],
    channels: int = 3,
) -> dict[str, np.ndarray]:
    """An Inception crop of the decoded original resized to `resize` (or the stored size)."""
    image = _pixels(record["image"], channels)
    height, width = _height_width(image)
    top, left, h, w = _crop_box(height, width, scale, rng)
    if isinstance(image, Image.Image):  # crop, then resize, as torchvision's resized_crop does on PIL images
        crop = image.crop((left, top, left + w, top + h))
    else:
        crop = image[top : top + h, left : left + w]
    return {"image": _resize(crop, resize or (height, width), method), "label": np.int32(record["label"])}


def _check_first_example(
    name: str,
    source: Sequence[Mapping[str, Any]],
    shape: tuple[int, int, int],
    resize: tuple[int, int] | None,
    method: str,
) -> None:
    """Decodes one record so a feature/data mismatch fails here, not mid-training."""
    image = _to_example(source[0], resize, method, channels=shape[-1])["image"]
    if image.shape != shape:
        raise DataError(
            f"{name!r}: first image decodes to {image.shape}, but its feature spec says "
            f"{shape}; the prepared data is inconsistent, rebuild it."
        )


def _with_mask(example: dict[str, np.ndarray], valid: bool) -> dict[str, np.ndarray]:
    """Marks whether an eval example is real or padding."""
    return {**example, "mask": np.bool_(valid)}


def _padding_example(shape: tuple[int, int, int], index: int) -> dict[str, np.ndarray]:
    """A blank example that fills the last eval batch and is masked out."""
    del index
    return {"image": np.zeros(shape, np.uint8), "label": np.int32(0), "mask": np.bool_(False)}


# --------------------------------------------------------------------------- #
# Sharding and assembly
# --------------------------------------------------------------------------- #


def per_process_batch_size(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """Resolves the process layout and the rows each process contributes."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise DataError(f"process_index {index} is outside 0..{count - 1}.")
    if global_batch_size <= 0 or global_batch_size % count:
        raise DataError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {count}."
        )
    return global_batch_size // count, index, count


def shard_batches(
    ds: grain.MapDataset, batch_size: int, index: int, count: int
) -> grain.MapDataset:
    """Cuts the stream into per-process chunks and keeps this process's one of each global batch."""
    ds = ds.batch(batch_size, drop_remainder=True)
    # Chunk k*count + index is this process's part of global batch k; stopping at a
    # whole number of global batches keeps every process at the same step count.
    num_global = len(ds) // count
    return ds[index : num_global * count : count]


def finish(ds: grain.MapDataset, worker_count: int, read_threads: int) -> grain.IterDataset:
    """Turns the index-addressable pipeline into a checkpointable iterable."""
    # Elements are whole batches here, so grain's default 500-element buffer
    # would hold gigabytes of ImageNet; a couple per thread keeps threads busy.
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    it_ds = ds.to_iter_dataset(options)
    if worker_count > 0:
        # Grain workers read absl flags; outside an absl app (tests, notebooks)
        # nothing parsed them, so accept their defaults rather than crash.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it_ds


class InMemorySplit(Sequence):
    """A split's images and labels read once into host arrays.

    The tfds source parses one stored record per access (~0.2 ms each); on a 2-core
    machine that work competes with the training step itself, every epoch.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], chunk: int = 4096):
        read_many = getattr(source, "__getitems__", None)
        images, labels = [], []
        for first in range(0, len(source), chunk):
            keys = range(first, min(first + chunk, len(source)))
            records = read_many(list(keys)) if read_many else [source[k] for k in keys]
            images.extend(np.asarray(r["image"], dtype=np.uint8) for r in records)
            labels.extend(r["label"] for r in records)
        self.images = np.stack(images)
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def _open(
    name: str,
    split: str,
    data_dir: str | None,
    image_shape: Sequence[int] | None,
    resize: tuple[int, int] | None,
    resize_method: str,
    cache_max_bytes: int = 0,
) -> tuple[Sequence[Mapping[str, Any]], tuple[int, int, int]]:
    """Opens and validates a split, returning it with its batched image shape.

    A split of fixed-size images that fits in `cache_max_bytes` is read into memory once.
    """
    if resize_method not in _RESAMPLE:
        raise DataError(f"resize_method {resize_method!r} is not one of {sorted(_RESAMPLE)}.")
    source, info = load_source(name, split, data_dir, decode_images=False)
    shape = _output_shape(name, info, tuple(resize) if resize else None)
    _check_expected(name, shape, image_shape)
    _check_first_example(name, source, shape, resize, resize_method)
    stored_shape = tuple(info.features["image"].shape)
    if None not in stored_shape and len(source) * math.prod(stored_shape) <= cache_max_bytes:
        source = InMemorySplit(load_source(name, split, data_dir)[0])  # read once, decoded by tfds
    return source, shape


def _fraction_size(name: str, split: str, num_examples: int, fraction: float) -> int:
    """Converts a train fraction to an example count, rejecting empty subsets."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"train_fraction must be in (0, 1], got {fraction}.")
    size = int(round(num_examples * fraction))
    if size == 0:
        raise DataError(f"train_fraction {fraction} of {name!r} {split!r} leaves no examples.")
    return size


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #


def describe(
    name: str,
    split: str,
    data_dir: str | None = None,
    resize: tuple[int, int] | None = None,
) -> DatasetSpec:
    """Reports size, image shape and class count so the loop can size model and schedule."""
    source, info = load_source(name, split, data_dir)
    shape = _output_shape(name, info, tuple(resize) if resize else None)
    return DatasetSpec(len(source), shape, info.features["label"].num_classes)


def make_train_dataset(
    name: str,
    *,
    global_batch_size: int,
    split: str = "train",
    data_dir: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    train_fraction: float | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 8,
    image_shape: Sequence[int] | None = None,
    resize: tuple[int, int] | None = None,
    resize_method: str = "bilinear",
    cache_max_bytes: int = 0,
    random_crop_scale: tuple[float, float] | None = None,
) -> grain.IterDataset:
    """Builds the shuffled, repeated, per-process-sharded training stream.

    Args:
      name: tfds name ("fashion_mnist" is built offline from the Debian package), or "image_folder:PATH"
        for a folder of class subfolders (`hybrid_jax.data.builders.image_folder`).
      global_batch_size: examples per step summed over all processes.
      split: tfds split, slicing allowed ("train[:10%]").
      data_dir: tfds data directory; defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets.
      seed: shuffle seed; each epoch is reshuffled deterministically from it.
      shuffle: False keeps stored order (debugging).
      num_epochs: passes over the data; None repeats forever. Batches run across
        epoch boundaries; a final partial global batch is dropped.
      train_fraction: keep only the first fraction of the split (nested subsets
        for dataset-size ablations; tfds already stores examples shuffled).
      process_index / process_count: default to jax.process_index()/process_count().
      worker_count: grain worker processes; 0 reads in this process.
      read_threads: threads reading batches in each process (or worker).
      image_shape: expected (H, W, C) after resizing; a mismatch is an error.
      resize: (H, W) to resize to; None keeps stored size.
      resize_method: "nearest", "bilinear" or "bicubic" (PIL's filters).
      cache_max_bytes: read a split of fixed-size images whose uint8 pixels fit in this
        many bytes into memory once (0: never); the order and iterator state are the same.
      random_crop_scale: (lo, hi) area fraction of an Inception random-resized-crop cut
        from the decoded original and resized to `resize` (aspect ratio 3/4..4/3), as
        torchvision samples it; random per (seed, position in the stream), so a resumed
        run sees the same crops. None: plain resize (crop on device instead, if at all).

    Returns:
      A grain IterDataset; `iter()` gives a DatasetIterator of dicts
      {"image": uint8 [b, H, W, C], "label": int32 [b]} whose `get_state()` /
      `set_state()` save and restore the position.
    """
    batch_size, index, count = per_process_batch_size(
        global_batch_size, process_index, process_count
    )
    source, shape = _open(name, split, data_dir, image_shape, resize, resize_method, cache_max_bytes)
    _check_crops(shape, None, random_crop_scale)
    ds = grain.MapDataset.source(source)
    if train_fraction is not None:
        ds = ds[: _fraction_size(name, split, len(source), train_fraction)]
    if len(ds) < global_batch_size:
        raise DataError(
            f"{name!r} {split!r} has {len(ds)} examples, fewer than one global batch "
            f"({global_batch_size}); lower the batch size or use more data."
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if random_crop_scale is None:
        ds = ds.map(functools.partial(_to_example, resize=resize, method=resize_method, channels=shape[-1]))
    else:
        crop = functools.partial(
            _to_cropped_example, resize=resize, method=resize_method, scale=tuple(random_crop_scale),
            channels=shape[-1],
        )
        ds = ds.random_map(crop, seed=seed)
    return finish(shard_batches(ds, batch_size, index, count), worker_count, read_threads)


def make_eval_dataset(
    name: str,
    *,
    global_batch_size: int,
    split: str = "test",
    data_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 8,
    image_shape: Sequence[int] | None = None,
    resize: tuple[int, int] | None = None,
    resize_method: str = "bilinear",
    crop_pct: float | None = None,
) -> grain.IterDataset:
    """Builds one ordered pass over a split, padded so every example counts once.

    Arguments are as for `make_train_dataset`. The last global batch is filled
    with blank examples whose "mask" is False; weight metrics by "mask".
    `crop_pct` selects timm's eval view, which published ImageNet numbers are measured
    with: the shorter side of the decoded original goes to int(S / crop_pct) (by
    `resize_method`, timm: "bicubic") and the central S x S is kept, S being `resize`
    (or the stored size). None squashes to `resize` instead.
    """
    batch_size, index, count = per_process_batch_size(
        global_batch_size, process_index, process_count
    )
    source, shape = _open(name, split, data_dir, image_shape, resize, resize_method)
    _check_crops(shape, crop_pct, None)
    num_padding = -len(source) % global_batch_size
    real = (
        grain.MapDataset.source(source)
        .map(functools.partial(_to_example, resize=resize, method=resize_method, crop_pct=crop_pct,
                               channels=shape[-1]))
        .map(functools.partial(_with_mask, valid=True))
    )
    padding = grain.MapDataset.range(num_padding).map(functools.partial(_padding_example, shape))
    ds = grain.MapDataset.concatenate([real, padding]) if num_padding else real
    return finish(shard_batches(ds, batch_size, index, count), worker_count, read_threads)


def eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Number of batches in one padded eval pass."""
    return math.ceil(num_examples / global_batch_size)
