"""Re-ID input streams: P x K identity-balanced train batches, and ordered query / gallery passes.

Re-ID records hold encoded image bytes, a person id and a camera id
(`hybrid_jax.data.builders.reid_folder`). Here they are decoded, resized to the
model's input and batched as uint8 like the classification pipeline's, through the
same per-process sharding (`hybrid_jax.data.pipeline`). Training labels are the train
split's person ids renumbered 0..N-1; junk and distractor images (ids <= 0) are
never drawn for training.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from hybrid_jax.data import pipeline
from hybrid_jax.data.pipeline import DataError
from hybrid_jax.reid.sampler import PKSampler

REID_FEATURES = ("image", "person_id", "camera_id")
REID_DATASETS = ("reid_synthetic", "market1501", "dukemtmc_reid", "msmt17")
PADDING_ID = -1  # padded eval examples count as junk, which evaluation ignores


@dataclasses.dataclass(frozen=True)
class ReidSpec:
    """What the model and loop need to know about a re-ID train split."""

    num_examples: int  # trainable images (junk and distractors left out)
    image_shape: tuple[int, int, int]  # after the optional resize
    num_identities: int


def open_split(name: str, split: str, data_dir: str | None, manual_dir: str | None) -> Sequence[Mapping[str, Any]]:
    """Random access to one split of a re-ID dataset."""
    source, info = pipeline.load_source(name, split, data_dir, manual_dir)
    missing = sorted(set(REID_FEATURES) - set(info.features.keys()))
    if missing:
        raise DataError(f"{name!r} is not a re-ID dataset (it lacks {missing}); use one of {REID_DATASETS}.")
    return source


def read_ids(source: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Person and camera id of every record, in storage order."""
    records = (source[i] for i in range(len(source)))
    ids = np.array([(record["person_id"], record["camera_id"]) for record in records], np.int32).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


def train_labels(person_ids: np.ndarray) -> np.ndarray:
    """Identity indices 0..N-1 in person-id order; -1 for junk and distractors (ids <= 0)."""
    identities = np.unique(person_ids[person_ids > 0])
    return np.where(person_ids > 0, np.searchsorted(identities, person_ids), -1).astype(np.int32)


def decode_image(data: bytes, shape: tuple[int, int, int], resize: bool) -> np.ndarray:
    """uint8 [H, W, 3] pixels of encoded image bytes, resized to `shape` when `resize` is set."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if resize and image.size != (shape[1], shape[0]):  # PIL sizes are (width, height)
        image = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.uint8)
    if pixels.shape != shape:
        raise DataError(f"an image decodes to {pixels.shape}, not {shape}: the dataset's images differ in size; "
                        f"set config.resize=(H, W).")
    return pixels


def image_shape(source: Sequence[Mapping[str, Any]], resize: tuple[int, int] | None) -> tuple[int, int, int]:
    """The batched image shape: `resize` if given, else the first image's size."""
    if resize:
        return (*resize, 3)
    return np.asarray(Image.open(io.BytesIO(source[0]["image"])).convert("RGB")).shape


def describe(name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None,
             resize: tuple[int, int] | None = None) -> ReidSpec:
    """Size, image shape and identity count of a re-ID train split."""
    source = open_split(name, split, data_dir, manual_dir)
    person_ids, _ = read_ids(source)
    labels = train_labels(person_ids)
    if not (labels >= 0).any():
        raise DataError(f"split {split!r} of {name!r} has no identified person (all ids are junk or distractors); "
                        f"train on the train split.")
    return ReidSpec(int((labels >= 0).sum()), image_shape(source, resize), int(labels.max()) + 1)


def _train_example(index: int, *, source, labels: np.ndarray, shape: tuple[int, int, int],
                   resize: bool) -> dict[str, np.ndarray]:
    return {"image": decode_image(source[index]["image"], shape, resize), "label": labels[index]}


def _eval_example(record: Mapping[str, Any], *, shape: tuple[int, int, int], resize: bool) -> dict[str, np.ndarray]:
    return {"image": decode_image(record["image"], shape, resize), "person_id": np.int32(record["person_id"]),
            "camera_id": np.int32(record["camera_id"])}


def _padding_example(index: int, *, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    del index
    return {"image": np.zeros(shape, np.uint8), "person_id": np.int32(PADDING_ID), "camera_id": np.int32(0)}


def make_train_dataset(name: str, *, global_batch_size: int, images_per_identity: int, split: str = "train",
                       data_dir: str | None = None, manual_dir: str | None = None, seed: int = 0,
                       resize: tuple[int, int] | None = None, process_index: int | None = None,
                       process_count: int | None = None, worker_count: int = 0,
                       read_threads: int = 8) -> grain.IterDataset:
    """The endless P x K training stream: every global batch holds K images of each of P identities.

    Args:
      global_batch_size: P * K, summed over processes.
      images_per_identity: K.
      Others as for `hybrid_jax.data.pipeline.make_train_dataset`.

    Returns:
      A checkpointable grain IterDataset of {"image": uint8 [b, H, W, 3], "label": int32 [b]}.
    """
    batch_size, index, count = pipeline.per_process_batch_size(global_batch_size, process_index, process_count)
    if global_batch_size % images_per_identity:
        raise DataError(f"the batch size {global_batch_size} is not a multiple of images_per_identity (K) "
                        f"{images_per_identity}; each batch holds K images of each of batch/K identities.")
    source = open_split(name, split, data_dir, manual_dir)
    labels = train_labels(read_ids(source)[0])
    try:
        sampler = PKSampler(labels, identities_per_batch=global_batch_size // images_per_identity,
                            images_per_identity=images_per_identity, seed=seed)
    except ValueError as error:
        raise DataError(f"{name!r} {split!r}: {error}") from error
    load = functools.partial(_train_example, source=source, labels=labels, shape=image_shape(source, resize),
                             resize=bool(resize))
    return pipeline.finish(pipeline.shard_batches(sampler.map(load), batch_size, index, count), worker_count,
                           read_threads)


def make_eval_dataset(name: str, *, split: str, global_batch_size: int, data_dir: str | None = None,
                      manual_dir: str | None = None, resize: tuple[int, int] | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      read_threads: int = 8) -> grain.IterDataset:
    """One ordered pass over a query or gallery split, padded to whole batches with junk (person id -1).

    Yields {"image": uint8 [b, H, W, 3], "person_id": int32 [b], "camera_id": int32 [b]}.
    """
    batch_size, index, count = pipeline.per_process_batch_size(global_batch_size, process_index, process_count)
    source = open_split(name, split, data_dir, manual_dir)
    shape = image_shape(source, resize)
    real = grain.MapDataset.source(source).map(functools.partial(_eval_example, shape=shape, resize=bool(resize)))
    num_padding = -len(source) % global_batch_size
    padding = grain.MapDataset.range(num_padding).map(functools.partial(_padding_example, shape=shape))
    ds = grain.MapDataset.concatenate([real, padding]) if num_padding else real
    return pipeline.finish(pipeline.shard_batches(ds, batch_size, index, count), 0, read_threads)
