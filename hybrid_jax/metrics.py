"""Where a run's numbers go: metrics.jsonl, TensorBoard events, a progress bar and a plot.

Only process 0 writes; the other processes of a multi-host run get a writer that
does nothing, so the loop never asks which process it is on.
"""

import io
import json
import shutil
import tempfile
import time
from typing import Any

from etils import epath

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def _is_remote(path: epath.Path) -> bool:
    return "://" in str(path)


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

    Args:
      workdir: the run's directory, local or remote (gs://...).
      enabled: False on every process but 0: the writer then does nothing.
      resume_step: the step the run continues from; records after it are dropped, since the run logs
        those steps again (0, a fresh start, drops them all, the step-0 evaluation included).
    """

    def __init__(self, workdir: str | epath.PathLike, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tensorboard = self._local_events = None
        # A remote file's whole text: objects in cloud storage cannot be appended to, so each write replaces it.
        self._remote_text = None
        if not enabled:
            return
        text = self.path.read_text() if self.path.exists() else ""
        if resume_step is not None:
            lines = [line for line in text.splitlines() if line.strip()]
            kept = "".join(f"{line}\n" for line in lines if resume_step and json.loads(line)["step"] <= resume_step)
            if kept != text:
                self._replace(kept)
                text = kept
        if _is_remote(self.path):
            self._remote_text = text
        self._tensorboard, self._local_events = _open_tensorboard(epath.Path(workdir) / "tensorboard")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        """Records `scalars` of `split` ("train", "eval") at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        line = json.dumps(record) + "\n"
        if self._remote_text is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._remote_text += line
            self.path.write_text(self._remote_text)
        for key, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{key}", float(value), int(step))

    def _replace(self, text: str) -> None:
        """Writes `text` beside the file, then puts it in the file's place, so a crash leaves one or the other."""
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text(text)
        staged.replace(self.path)

    def close(self) -> None:
        if self._tensorboard is None:
            return
        self._tensorboard.close()
        if self._local_events is not None:
            target = self.path.parent / "tensorboard"
            target.mkdir(parents=True, exist_ok=True)
            for file in self._local_events.iterdir():
                (target / file.name).write_bytes(file.read_bytes())
            shutil.rmtree(self._local_events)


def _open_tensorboard(directory: epath.Path):
    """(SummaryWriter, None) on `directory`, or (SummaryWriter, local directory) when tensorboardX cannot
    write there: then the events are written locally and copied into `directory` on close()."""
    from tensorboardX import SummaryWriter, record_writer  # train extra; imported only where it writes

    # tensorboardX writes gs:// itself through google-cloud-storage and s3:// through boto3, when those are
    # installed; any other scheme, or a missing client, gets the local copy (so no events while it runs).
    scheme = str(directory).split("://")[0] if _is_remote(directory) else None
    if scheme is None or {"gs": record_writer.GCS_ENABLED, "s3": record_writer.S3_ENABLED}.get(scheme, False):
        return SummaryWriter(str(directory)), None
    local = epath.Path(tempfile.mkdtemp(prefix="tensorboard_"))
    # Event files are named by the second and host; the unique suffix keeps two sessions' copies apart.
    return SummaryWriter(str(local), filename_suffix=f".{local.name}"), local


def read_metrics(workdir: str | epath.PathLike) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order."""
    path = epath.Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(workdir: str | epath.PathLike) -> epath.Path:
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
    image = io.BytesIO()  # savefig writes local files only; epath writes anywhere
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    path = epath.Path(workdir) / PLOT_FILE
    path.write_bytes(image.getvalue())
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
