"""The domain-shift axis: corrupted copies of a test split, and a trained checkpoint evaluated on arrays.

Corruptions follow ImageNet-C's definitions (Hendrycks & Dietterich, arXiv 1903.12261)
at a few severities each (the sweep config lists one strength per level), applied to
the stored uint8 test images before any resize, and are deterministic: the noise comes
from a seeded numpy generator, blur and contrast have no randomness at all. Nothing is
written to disk; a few MB of arrays are built in memory once per sweep.

`load_run` rebuilds a finished run's model from its `config.json` and restores the
newest checkpoint's parameters and batch statistics (orbax, no train state or optimizer
needed); `evaluate_run` scores them with the training package's own `eval_step`, so the
clean accuracy it measures equals the one the training loop reported.
"""

import functools
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from experiments.ablation.grid import CORRUPTIONS
from hybrid_jax.checkpoint import Checkpointer
from hybrid_jax.data import pipeline
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.train.config import build_model
from hybrid_jax.train.step import eval_step


def corrupt(images: np.ndarray, name: str, *, severity: Mapping[str, float], seed: int = 0) -> np.ndarray:
    """A corrupted copy of uint8 images [N, H, W, C].

    Args:
      images: the clean images.
      name: gaussian_noise (additive, std `severity["noise_std"]` of the [0, 1] range) | blur (Gaussian,
        sigma `severity["blur_sigma"]` pixels) | contrast (pixels pulled to each image's mean by
        `severity["contrast"]`, 1 = unchanged).
      severity: the three strengths above.
      seed: the noise generator's seed.
    """
    x = images.astype(np.float32) / 255.0
    if name == "gaussian_noise":
        x = x + np.random.default_rng(seed).normal(0.0, severity["noise_std"], x.shape).astype(np.float32)
    elif name == "blur":
        sigma = severity["blur_sigma"]
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")
    elif name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * severity["contrast"] + mean
    else:
        raise ValueError(f"unknown corruption {name!r}; choose one of {CORRUPTIONS}")
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize(images: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize with PIL, as the input pipeline does for `config.resize`; None keeps the size."""
    if not size or images.shape[1:3] == tuple(size):
        return images
    grey = images.shape[-1] == 1
    out = [np.asarray(Image.fromarray(im[..., 0] if grey else im).resize(tuple(size)[::-1], Image.Resampling.BILINEAR))
           for im in images]
    out = np.stack(out)
    return out[..., None] if grey else out


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """All (images uint8 [N, H, W, C], labels int32 [N]) of a tfds split, read once per process."""
    source, _ = pipeline.load_source(dataset, split, data_dir or None)
    records = source.__getitems__(list(range(len(source))))
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    return images, np.asarray([r["label"] for r in records], np.int32)


def _levels(shift: Any) -> list[dict[str, float]]:
    """One {noise_std, blur_sigma, contrast} dict per severity level, from the config's per-level tuples."""
    strengths = dict(noise_std=shift.noise_std, blur_sigma=shift.blur_sigma, contrast=shift.contrast)
    counts = {len(v) for v in strengths.values()}
    if len(counts) != 1:
        raise ValueError(f"shift.noise_std, blur_sigma and contrast need one value per severity level each; got "
                         f"{strengths}")
    return [{k: float(v[i]) for k, v in strengths.items()} for i in range(counts.pop())]


def set_name(corruption: str, level: int) -> str:
    """The key of one corrupted copy: gaussian_noise_s2 is Gaussian noise at severity level 2 (of 1..N)."""
    return f"{corruption}_s{level}"


@functools.lru_cache(maxsize=4)
def _shifted_sets(dataset: str, split: str, data_dir: str | None, num_examples: int, corruptions: tuple[str, ...],
                  levels: tuple[tuple[tuple[str, float], ...], ...], seed: int,
                  size: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images, labels = load_split(dataset, split, data_dir)
    images, labels = images[:num_examples or None], labels[:num_examples or None]
    sets = {"clean": images}
    for level, severity in enumerate(levels, start=1):
        sets.update({set_name(name, level): corrupt(images, name, severity=dict(severity), seed=seed)
                     for name in corruptions})
    return {name: resize(x, size) for name, x in sets.items()}, labels


def shifted_sets(train_config: Any, shift: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{"clean": images, "gaussian_noise_s1": images, ...} and labels: the first `shift.num_examples` of the run's
    eval split (all of it for 0), corrupted at every severity level, at the model's input size."""
    levels = tuple(tuple(sorted(level.items())) for level in _levels(shift))
    return _shifted_sets(train_config.dataset, train_config.eval_split, train_config.data_dir or None,
                         int(shift.num_examples), tuple(shift.corruptions), levels, int(shift.seed),
                         tuple(train_config.resize) or None)


def evaluate_arrays(step: Callable, variables: dict[str, Any], images: np.ndarray, labels: np.ndarray,
                    batch_size: int) -> dict[str, float]:
    """Accuracy and loss of a model on uint8 images, through `step`: the training package's eval step, jitted
    once for every set a run is scored on (`jitted_eval_step`), so that the sets after the first compile nothing.

    Also "images_per_sec": inference throughput over the batches after the first (which may compile).
    """
    totals, timed, start = None, 0, None
    for first in range(0, len(images), batch_size):
        chunk = slice(first, first + batch_size)
        real = len(images[chunk])
        pad = batch_size - real
        batch = {"image": np.pad(images[chunk], ((0, pad), (0, 0), (0, 0), (0, 0))),
                 "label": np.pad(labels[chunk], (0, pad)), "mask": np.arange(batch_size) < real}
        sums = step(variables["params"], variables.get("batch_stats", {}), batch)
        if start is None:
            jax.block_until_ready(sums)
            start = time.perf_counter()
        else:
            timed += real
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    seconds = time.perf_counter() - start
    return {"accuracy": float(totals["correct"] / totals["count"]), "loss": float(totals["loss_sum"] / totals["count"]),
            "images_per_sec": timed / seconds if timed and seconds > 0 else float("nan")}


def jitted_eval_step(model, augment: AugmentConfig) -> Callable:
    """(params, batch_stats, batch) -> sums of loss, correct predictions and real examples: the loop's eval step."""
    return jax.jit(functools.partial(eval_step, model=model, augment=augment))


class TrainedRun(NamedTuple):
    """A finished run, rebuilt: its config, model, newest step and variables, and eval normalisation."""

    config: Any
    model: Any
    step: int
    variables: dict[str, Any]
    augment: AugmentConfig


def load_run(workdir: str | Path) -> TrainedRun:
    """Rebuilds the run in `workdir` from its config.json and newest checkpoint (parameters and batch statistics
    only; no train state or optimizer)."""
    import ml_collections

    workdir = Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step, variables = checkpointer.restore_variables()
    finally:
        checkpointer.close()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    num_classes = pipeline.describe(config.dataset, config.train_split, config.data_dir or None).num_classes
    model = build_model(config.model, num_classes=num_classes, dtype=dtype)
    augment = AugmentConfig(mean=tuple(config.augment.mean), std=tuple(config.augment.std))
    return TrainedRun(config, model, step, variables, augment)


def evaluate_run(workdir: str | Path, shift: Any) -> dict[str, Any]:
    """Clean and corrupted accuracies of the run in `workdir` on the shift subset, as written to its shift.json.

    Args:
      workdir: a run directory holding config.json and checkpoints/.
      shift: the sweep's `shift` config (corruptions, their severities, seed, num_examples).
    """
    run = load_run(workdir)
    sets, labels = shifted_sets(run.config, shift)
    step = jitted_eval_step(run.model, run.augment)
    results = {name: evaluate_arrays(step, run.variables, images, labels, run.config.eval_batch_size)
               for name, images in sets.items()}
    levels = range(1, len(_levels(shift)) + 1)
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    by_corruption = {f"{c}_accuracy": float(np.mean([accuracy[set_name(c, k)] for k in levels]))
                     for c in shift.corruptions}
    by_level = {f"severity{k}_accuracy": float(np.mean([accuracy[set_name(c, k)] for c in shift.corruptions]))
                for k in levels}
    return {"step": run.step, "clean_accuracy": accuracy["clean"], **by_corruption, **by_level,
            **{f"{name}_accuracy": a for name, a in accuracy.items() if name != "clean"},
            "shift_accuracy": float(np.mean(list(by_corruption.values()))) if by_corruption else float("nan"),
            "infer_images_per_sec": results["clean"]["images_per_sec"],
            "num_examples": len(labels), "settings": json.loads(json.dumps(shift.to_dict()))}
