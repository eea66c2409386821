"""How many host cores feed one accelerator: decoded + cropped JPEGs per second per host core.

  nice -n 15 python experiments/benchmarks/host_pipeline.py --out experiments/benchmarks/cpu_2core/host_pipeline.md
  python experiments/benchmarks/host_pipeline.py --num_images 20 --workers 0   # a seconds-long smoke run

Writes an offline ImageNet-like folder (class subfolders of JPEGs at ImageNet's usual sizes, quality 90,
1/f-noise-plus-gradient content so the files weigh what photographs do), builds it with the image-folder builder
(`image_folder:PATH`) and times the training stream at 224 px (Inception crop, scale 0.08-1, cut from the decoded
original) with 0, 1 and 2 grain workers, and the eval view (shorter side to 256, bicubic, centre 224). Wall-clock
rates depend on whatever else the machine runs; the CPU seconds this process and its grain workers consume
(psutil, user + system) depend far less (shared caches still cost a few percent), so img/s per core = images /
CPU seconds is the figure that transfers to another host, and rate / (img/s per core) is how many cores an
accelerator training at `rate` needs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import io
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np
import PIL
import psutil
import tensorflow_datasets as tfds
from PIL import Image, features

from hybrid_jax.data import pipeline

# (width, height, share): ImageNet-1k's usual shapes, most 500 px on the long side, a few larger and smaller.
SIZES = (
    (500, 375, 0.42), (375, 500, 0.12), (500, 333, 0.14), (333, 500, 0.06), (500, 500, 0.06), (500, 400, 0.04),
    (640, 480, 0.04), (800, 600, 0.03), (1024, 768, 0.015), (1280, 960, 0.005), (300, 225, 0.04), (200, 150, 0.04),
)
QUALITY = 90
# Training rates to feed (img/s per accelerator): NVIDIA's published ViT-B/16 figure on one H100, and issue 17's goal.
RATES = {"ViT-B/16 on one H100, NVIDIA's anchor": 1460, "ViT-B/16 on one H100, issue 17's goal": 4700}


# --------------------------------------------------------------------------- #
# The folder
# --------------------------------------------------------------------------- #


def texture(side: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """side x side x 3 noise with natural images' 1/f^slope amplitude spectrum and correlated channels, unit std."""
    fy, fx = np.fft.fftfreq(side)[:, None], np.fft.rfftfreq(side)[None, :]
    radius = np.hypot(fy, fx)
    radius[0, 0] = 1.0
    shape = radius.shape

    def spectrum():
        return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)

    shared = spectrum()
    channels = [np.fft.irfft2((0.8 * shared + 0.45 * spectrum()) * radius**-slope, s=(side, side)) for _ in range(3)]
    out = np.stack(channels, -1).astype(np.float32)
    return (out - out.mean()) / out.std()


def photo_like(pool: list[np.ndarray], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 image: a window of one pooled texture, a colour gradient (light, sky) and a colour cast."""
    source = pool[rng.integers(len(pool))]
    top, left = (int(rng.integers(0, source.shape[i] - n + 1)) for i, n in enumerate((height, width)))
    window = source[top : top + height, left : left + width]
    y, x = np.ogrid[0:height, 0:width]
    gradient = (rng.uniform(-60, 60, 3) * (y / height)[..., None] + rng.uniform(-60, 60, 3) * (x / width)[..., None])
    image = 128 + rng.uniform(35, 55) * window + gradient + rng.uniform(-30, 30, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(root: Path, num_images: int, num_classes: int, seed: int = 0) -> list[int]:
    """Writes root/class_XX/NNNNN.jpg, ImageNet-sized and quality 90; returns the file sizes in bytes."""
    rng = np.random.default_rng(seed)
    shares = np.array([s[2] for s in SIZES])
    picks = rng.choice(len(SIZES), size=num_images, p=shares / shares.sum())
    side = max(max(SIZES[i][:2]) for i in picks)
    # Textures are shared between images (FFTs are the slow part); slopes 0.9-1.2 span smooth to busy scenes.
    pool = [texture(side, slope, rng) for slope in np.linspace(0.9, 1.2, min(6, max(1, num_images // 100)))]
    sizes = []
    for i, pick in enumerate(picks):
        width, height, _ = SIZES[pick]
        folder = root / f"class_{i % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(photo_like(pool, height, width, rng)).save(buffer, format="JPEG", quality=QUALITY)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
    return sizes


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


def cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process (all its threads), and of it and its live descendants (workers)."""
    me = psutil.Process()
    own = total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(child.cpu_times()[:2])
    return own, total


def _since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(cpu_seconds(), start))


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed configuration."""

    view: str
    workers: int
    images: int
    wall_s: float
    main_cpu_s: float  # the training process alone
    cpu_s: float  # with its grain workers

    @property
    def per_core(self) -> float:
        return self.images / self.cpu_s

    def cells(self) -> list[str]:
        return [self.view, str(self.workers), str(self.images), f"{self.wall_s:.1f}",
                f"{self.images / self.wall_s:.0f}", f"{self.cpu_s:.1f}", f"{self.main_cpu_s:.1f}",
                f"{self.per_core:.0f}", f"{self.cpu_s / self.wall_s:.2f}"]


HEADER = ["view", "grain workers", "images", "wall s", "img/s (wall)", "CPU s", "of which training process",
          "img/s per core", "cores busy"]


def _close(it) -> None:
    with contextlib.suppress(Exception):
        it.close()  # stops grain's worker processes now rather than at garbage collection


def time_train(name: str, data_dir: str, workers: int, threads: int, batch: int, images: int) -> Row:
    """The training stream in steady state: batches after a warm-up that starts the workers and fills their queues."""
    ds = pipeline.make_train_dataset(
        name, global_batch_size=batch, data_dir=data_dir, resize=(224, 224), image_shape=(224, 224, 3),
        random_crop_scale=(0.08, 1.0), worker_count=workers, read_threads=threads, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(2 + 2 * workers):
        next(it)
    steps = max(1, images // batch)
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        out = next(it)
    wall, cpu = time.perf_counter() - wall, _since(cpu)
    assert out["image"].shape == (batch, 224, 224, 3)
    _close(it)
    return Row("train: crop 0.08-1, 224", workers, steps * batch, wall, *cpu)


def time_eval(name: str, data_dir: str, threads: int, batch: int) -> Row:
    """One eval pass in this process, from the first read to the last batch (there is no startup to leave out)."""
    ds = pipeline.make_eval_dataset(
        name, split="train", global_batch_size=batch, data_dir=data_dir, resize=(224, 224), resize_method="bicubic",
        crop_pct=0.875, read_threads=threads, process_index=0, process_count=1)
    wall, cpu = time.perf_counter(), cpu_seconds()
    count = sum(int(b["mask"].sum()) for b in ds)
    return Row("eval: 256 bicubic, centre 224", 0, count, time.perf_counter() - wall, *_since(cpu))


def per_image_costs(name: str, data_dir: str, count: int, rounds: int = 3) -> dict[str, float]:
    """CPU ms per image of each host step, one thread, and of the earlier path (tfds decodes, numpy crops).

    Medians over `rounds` interleaved passes: on a loaded machine, consecutive passes differ by 10% or more.
    """
    raw, _ = pipeline.load_source(name, "train", data_dir, decode_images=False)
    decoded, _ = pipeline.load_source(name, "train", data_dir)  # tfds's own decode: OpenCV if installed, else PIL
    count = min(count, len(raw))
    crop = functools.partial(pipeline._to_cropped_example, resize=(224, 224), method="bilinear", scale=(0.08, 1.0))
    steps = {
        "read a record (array_record + parse)": lambda i, rng: raw[i],
        "read + decode (PIL)": lambda i, rng: pipeline.decode_image(raw[i]["image"], 3).load(),
        "read + decode + crop + resize to 224 (training, this pipeline)": lambda i, rng: crop(raw[i], rng),
        "read + tfds decode to numpy + crop from the array (before)": lambda i, rng: crop(decoded[i], rng),
        "read + decode + eval view (256 bicubic, centre 224)": lambda i, rng: pipeline._to_example(
            raw[i], (224, 224), "bicubic", crop_pct=0.875),
    }
    times = {label: [] for label in steps}
    for round_ in range(rounds):  # steps interleaved, order reversed every round, so load drifts hit all alike
        for label, step in list(steps.items())[:: 1 if round_ % 2 else -1]:
            rng = np.random.default_rng(round_)  # the same crops for both training paths
            start = time.process_time()
            for i in range(count):
                step(i, rng)
            times[label].append((time.process_time() - start) / count * 1e3)
    return {label: float(np.median(t)) for label, t in times.items()}


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, the first column left-aligned and the numbers right-aligned."""
    rule = "|---|" + "---:|" * (len(header) - 1)
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows])


def cores_needed(per_core: float) -> list[str]:
    """One sentence per training rate: the host cores that feed one accelerator at that rate."""
    return [f"- {label}, {rate:,} img/s: {rate / per_core:.1f} host cores per accelerator "
            f"({8 * rate / per_core:.0f} for a node of eight)." for label, rate in RATES.items()]


def report(args: argparse.Namespace, command: str, stats: dict, costs: dict[str, float], rows: list[Row]) -> str:
    """The markdown page: how it was measured, the tables, and the cores per accelerator."""
    train = [r for r in rows if r.view.startswith("train")]
    feeding = max(train, key=lambda r: r.workers) if train else rows[0]
    versions = (f"Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')}), grain "
                f"{getattr(grain, '__version__', '?')}, tensorflow-datasets {tfds.__version__}, Python "
                f"{platform.python_version()}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return "\n".join([
        "# Host input pipeline: decoded + cropped JPEGs per host core",
        "",
        f"{datetime.date.today().isoformat()}, {cpu} ({psutil.cpu_count()} cores), {versions}.",
        "",
        "```bash", command, "```",
        "",
        f"Data: {stats['images']} generated JPEGs in {args.num_classes} classes, quality {QUALITY}, mean "
        f"{stats['mean_kb']:.0f} KB (median {stats['median_kb']:.0f} KB), mean {stats['mean_px'] / 1e3:.0f}k pixels "
        f"(ImageNet-1k's train tar: 138 GB for 1.28M files, about 110 KB a file); built into array_record by "
        f"`image_folder:PATH` at {stats['build_per_core']:.0f} images per CPU second (every image decoded once "
        f"to check it, bytes stored as they are).",
        "",
        f"Streams of batch {args.batch}, {args.read_threads} read threads per process; CPU s counts the training "
        f"process and its grain workers (user + system), so img/s per core depends far less on the machine's other "
        f"load than img/s (wall) does. With workers, the training process only unpickles batches: the workers read, "
        f"decode and crop. Cores busy = CPU s / wall s.",
        "",
        table(HEADER, [r.cells() for r in rows]),
        "",
        "Per image, one thread, CPU ms (median of 3 interleaved passes):",
        "",
        table(["step", "ms"], [[label, f"{ms:.2f}"] for label, ms in costs.items()]),
        "",
        f"Host cores one accelerator needs for training at 224 px, at the {feeding.per_core:.0f} img/s per core "
        f"measured with {feeding.workers} grain worker(s) (decode, crop and resize; flips, RandAugment and mixup run "
        f"on the accelerator):",
        "",
        *cores_needed(feeding.per_core),
        "",
        "Cores here are this machine's vCPUs; a faster core does more. An eval image costs more than a training "
        "one (a bicubic resize of the whole image), but ImageNet's eval pass is 50k images against 1.28M per epoch.",
        "",
    ])


def main(argv: list[str] | None = None) -> str:
    """Runs the benchmark; prints (and with --out writes) the markdown report, and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--workers", default="0,1,2", help="grain worker counts to time the training stream with")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--train_images", type=int, default=0, help="timed training images per row; 0: num_images")
    parser.add_argument("--cost_images", type=int, default=200, help="images for the per-image CPU cost table")
    parser.add_argument("--out", default="", help="also write the report to this .md file")
    parser.add_argument("--workdir", default="", help="where the folder and tfds data go; '' a temporary directory")
    args = parser.parse_args(argv)
    args.batch = min(args.batch, args.num_images)
    tfds.disable_progress_bar()
    logging.getLogger("absl").setLevel(logging.ERROR)  # tfds narrates every build step
    niceness = os.nice(0)  # the command as run, nice included: it sets how much of the machine the run could get
    command = (f"nice -n {niceness} " if niceness else "") + "python experiments/benchmarks/host_pipeline.py " + (
        shlex.join(sys.argv[1:] if argv is None else argv))

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.workdir or temporary)
        root, data_dir = work / "folder", str(work / "tfds")
        sizes = write_folder(root, args.num_images, args.num_classes)
        pixels = [np.prod(Image.open(p).size) for p in sorted(root.rglob("*.jpg"))]
        name = pipeline.IMAGE_FOLDER + str(root)
        cpu = cpu_seconds()
        pipeline.get_builder(name, data_dir)
        stats = {"images": len(sizes), "mean_kb": np.mean(sizes) / 1e3, "median_kb": np.median(sizes) / 1e3,
                 "mean_px": float(np.mean(pixels)), "build_per_core": len(sizes) / _since(cpu)[1]}
        costs = per_image_costs(name, data_dir, args.cost_images)
        train_images = args.train_images or args.num_images
        rows = [time_train(name, data_dir, int(w), args.read_threads, args.batch, train_images)
                for w in args.workers.split(",")]
        rows.append(time_eval(name, data_dir, args.read_threads, args.batch))
    text = report(args, command, stats, costs, rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
