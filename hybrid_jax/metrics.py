"""Where a run's numbers go: metrics.jsonl, TensorBoard events, a progress bar and a plot.

Only process 0 writes; the other processes of a multi-host run get a writer that
does nothing, so the loop never asks which process it is on.
"""

import json
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / METRICS_FILE
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter  # train extra; imported only where it writes

            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """Records `scalars` of `split` ("train", "eval") at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{key}", float(value), int(step))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(workdir: str | Path) -> Path:
    """Draws train and eval loss and accuracy against step into {workdir}/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if points:
                ax.plot(*zip(*points), style, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(workdir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ProgressBar:
    """A tqdm bar over steps showing the latest loss, accuracy and throughput (process 0 only)."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, steps: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
