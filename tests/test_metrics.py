"""metrics.jsonl rewinds to the step a run resumes from; every output also reaches a gs:// workdir."""

import json

import pytest
from etils import epath
from etils.epath import testing as epath_testing
from tensorboardX import record_writer

from hybrid_jax.metrics import METRICS_FILE, MetricsWriter, plot_curves, read_metrics


def _log(workdir, steps, **kwargs) -> None:
    writer = MetricsWriter(workdir, **kwargs)
    for step in steps:
        writer.write(step, "train", {"loss": 1.0 / step, "accuracy": 0.5})
        if step % 10 == 0:
            writer.write(step, "eval", {"loss": 2.0 / step, "accuracy": 0.4})
    writer.close()


def _steps(workdir) -> list[tuple[int, str]]:
    return [(r["step"], r["split"]) for r in read_metrics(workdir)]


def test_resuming_drops_the_records_after_the_resume_step(tmp_path):
    _log(tmp_path, [5, 10, 15, 20])
    _log(tmp_path, [15, 20, 25], resume_step=10)  # the newest checkpoint (20) was damaged; 10 was used
    assert _steps(tmp_path) == [(5, "train"), (10, "train"), (10, "eval"), (15, "train"), (20, "train"),
                                (20, "eval"), (25, "train")]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(METRICS_FILE)] == [METRICS_FILE]

    _log(tmp_path, [25])  # no resume step: appends, as before
    assert _steps(tmp_path)[-2:] == [(25, "train"), (25, "train")]
    _log(tmp_path, [5], resume_step=0)  # a fresh start: the old records describe a run that is gone
    assert _steps(tmp_path) == [(5, "train")]


def test_only_process_0_touches_the_file(tmp_path):
    _log(tmp_path, [5, 10])
    before = (tmp_path / METRICS_FILE).read_text()
    _log(tmp_path, [15], enabled=False, resume_step=5)
    assert (tmp_path / METRICS_FILE).read_text() == before


def test_a_gcs_workdir_gets_metrics_events_and_plot(tmp_path, monkeypatch):
    """etils' mock_epath serves gs://bucket/run from {cwd}/gs:/bucket/run; tensorboardX has no writer for it
    (google-cloud-storage is left out here), so the events are copied there on close."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    files = tmp_path / "gs:" / "bucket" / "run"
    with epath_testing.mock_epath():
        epath.Path("gs://bucket/run").mkdir(parents=True)  # as the loop does (a no-op on real GCS)
        _log("gs://bucket/run", [5, 10, 15, 20])
        _log("gs://bucket/run", [15, 20], resume_step=10)
        assert _steps("gs://bucket/run") == [(5, "train"), (10, "train"), (10, "eval"), (15, "train"),
                                             (20, "train"), (20, "eval")]
        plot = plot_curves("gs://bucket/run")
    assert str(plot) == "gs://bucket/run/curves.png"
    assert (files / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(line)["step"] for line in (files / METRICS_FILE).read_text().splitlines()] == [
        5, 10, 10, 15, 20, 20]
    events = sorted((files / "tensorboard").iterdir())
    assert len(events) == 2 and all(p.name.startswith("events.out.tfevents") and p.stat().st_size for p in events)


@pytest.mark.parametrize("scheme, client", [("gs", "GCS_ENABLED"), ("s3", "S3_ENABLED")])
def test_tensorboardx_writes_remote_schemes_itself_when_it_can(scheme, client, monkeypatch):
    from hybrid_jax.metrics import _open_tensorboard

    created = []
    monkeypatch.setattr("tensorboardX.SummaryWriter", lambda logdir, **kwargs: created.append(logdir))
    for enabled in (True, False):
        monkeypatch.setattr(record_writer, client, enabled)
        _, local = _open_tensorboard(epath.Path(f"{scheme}://bucket/run/tensorboard"))
        assert (local is None) == enabled
    assert created[0] == f"{scheme}://bucket/run/tensorboard" and "://" not in created[1]
