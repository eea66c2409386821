"""Resume tells damage from change: a changed config or state stops with the differences named and moves
nothing; a damaged step is set aside; transient errors are retried; a gs:// workdir round-trips."""

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import fake_gcs
from hybrid_jax import checkpoint
from hybrid_jax.checkpoint import Checkpointer, CheckpointError, CheckpointMismatch


def _config(**changes) -> ml_collections.ConfigDict:
    """A run config in miniature: nested sections, tuples (saved as JSON lists), keys that never matter."""
    config = ml_collections.ConfigDict({
        "model": {"name": "test_resnet", "drop_path_rate": 0.0}, "total_steps": 0, "num_epochs": 5.0, "seed": 0,
        "augment": {"flip": True, "crop_scale": (0.08, 1.0)}, "progress_bar": True, "mesh_shape": (-1, 1, 1),
        "resume_changes": ()})
    config.update(changes)
    return config


class TinyState(flax.struct.PyTreeNode):
    """A train state in miniature: the checkpointer saves any pytree."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # None when the EMA is off
    rng: jax.Array


def _state(*, ema: bool = False, width: int = 4) -> TinyState:
    params = {"dense": {"kernel": jnp.arange(3.0 * width).reshape(3, width), "bias": jnp.ones(width)}}
    return TinyState(step=jnp.array(7, jnp.int32), params=params, batch_stats={},
                     opt_state=optax.adam(1e-3).init(params), ema_params=params if ema else None,
                     rng=jax.random.PRNGKey(0))


def _abstract(state: TinyState) -> TinyState:
    replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def _save(directory, steps=(10, 20), config=None, **state_kwargs) -> None:
    saver = Checkpointer(directory, async_save=False)
    for step in steps:
        saver.save(step, _state(**state_kwargs), {"position": step}, config or _config())
    saver.close()


def _restore(directory, config=None, allowed=(), **state_kwargs):
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        return checkpointer.restore_latest(_abstract(_state(**state_kwargs)), config or _config(), allowed)
    finally:
        checkpointer.close()


def _assert_restored(found, step: int, **state_kwargs) -> None:
    assert found[0] == step and found[2] == {"position": step}
    jax.tree.map(np.testing.assert_array_equal, found[1], _state(**state_kwargs))


def _corrupt(step_dir: Path) -> None:
    """Truncates every array-data file of a step (OCDBT keeps several, some unreferenced)."""
    data_files = [p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"]
    assert data_files
    for path in data_files:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)


def test_resume_restores_state_and_data_position(tmp_path):
    _save(tmp_path / "ckpt", config=_config().to_dict())  # a dict or a ConfigDict, either way
    _assert_restored(_restore(tmp_path / "ckpt"), 20)
    assert _restore(tmp_path / "empty") is None


def test_changed_config_names_the_fields_and_moves_nothing(tmp_path):
    changed = _config(total_steps=900)
    changed.augment.flip, changed.model.name = False, "test_vit"
    changed.progress_bar, changed.mesh_shape = False, (2, 2, 2)  # never matter to a resume
    with pytest.raises(CheckpointMismatch) as error:
        _save(tmp_path / "ckpt"), _restore(tmp_path / "ckpt", changed)
    message = str(error.value)
    assert "\n" not in message and "step 20" in message
    assert "augment.flip True -> False" in message and "total_steps 0 -> 900" in message
    assert "model.name 'test_resnet' -> 'test_vit'" in message
    assert "progress_bar" not in message and "mesh_shape" not in message
    assert "new workdir" in message and "--config.resume_changes=augment.flip,model.name,total_steps" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["10", "20"]
    assert not (tmp_path / "ckpt_unreadable").exists()


def test_allowed_changes_resume(tmp_path):
    _save(tmp_path / "ckpt")
    longer = _config(total_steps=900, num_epochs=10.0)
    longer.augment.flip = False
    # As --config.resume_changes=total_steps,num_epochs and a whole section arrive.
    _assert_restored(_restore(tmp_path / "ckpt", longer, ("total_steps,num_epochs", "augment")), 20)


def test_changed_state_structure_names_the_tree_paths_and_moves_nothing(tmp_path):
    _save(tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatch, match=r"not in the checkpoint: ema_params/dense/bias, "
                                                 r"ema_params/dense/kernel\).*left in place"):
        _restore(tmp_path / "ckpt", ema=True)
    with pytest.raises(CheckpointMismatch, match=r"other shape \(saved -> current\): .*params/dense/kernel "
                                                 r"\(3, 4\) -> \(3, 5\)"):
        _restore(tmp_path / "ckpt", width=5)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["10", "20"]
    assert not (tmp_path / "ckpt_unreadable").exists()


@pytest.mark.parametrize("damage, reason", [
    (_corrupt, r"its metadata: ValueError: .*Error reading"),
    (lambda step_dir: shutil.rmtree(step_dir / "state"), "its state: no arrays are listed"),  # a partial copy
    (lambda step_dir: (step_dir / "config" / "metadata").write_text("{"), "its config: JSONDecodeError"),
])
def test_damaged_step_is_set_aside_and_the_previous_one_restored(tmp_path, caplog, damage, reason):
    _save(tmp_path / "ckpt")
    damage(tmp_path / "ckpt" / "20")
    with caplog.at_level(logging.WARNING):
        _assert_restored(_restore(tmp_path / "ckpt"), 10)
    assert re.search(rf"step 20 .* cannot be read \({reason}", caplog.text)
    assert (tmp_path / "ckpt_unreadable" / "20" / "config").is_dir()  # moved, never deleted
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["10"]

    _corrupt(tmp_path / "ckpt" / "10")
    with pytest.raises(CheckpointError, match=r"none of the checkpoints \[10\] .* can be read"):
        _restore(tmp_path / "ckpt")


def test_transient_errors_are_retried_before_any_conclusion(tmp_path, monkeypatch, caplog):
    _save(tmp_path / "ckpt")
    monkeypatch.setattr(checkpoint, "RETRY_SECONDS", (0.0, 0.0))
    real_restore, calls = ocp.CheckpointManager.restore, []

    def flaky_restore(self, step, *args, fail_times, **kwargs):
        calls.append(step)
        if len(calls) <= fail_times:
            raise OSError("read timed out")
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", lambda *a, **k: flaky_restore(*a, fail_times=1, **k))
    with caplog.at_level(logging.WARNING):
        _assert_restored(_restore(tmp_path / "ckpt"), 20)
    assert "retrying" in caplog.text

    calls.clear()  # storage that stays away is an error to rerun after, not damage
    monkeypatch.setattr(ocp.CheckpointManager, "restore", lambda *a, **k: flaky_restore(*a, fail_times=99, **k))
    with pytest.raises(CheckpointError, match="failed 3 times.*read timed out.*rerun when the storage is reachable"):
        _restore(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["10", "20"]


def test_checkpoint_without_a_saved_config_resumes_with_a_warning(tmp_path, caplog):
    """Checkpoints of older code hold no config item: unknown, so resume and say so."""
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    manager.save(20, args=ocp.args.Composite(state=ocp.args.StandardSave(_state()),
                                             data=ocp.args.JsonSave({"position": 20})))
    manager.close()
    with caplog.at_level(logging.WARNING):
        _assert_restored(_restore(tmp_path / "ckpt"), 20)
    assert "saved no config" in caplog.text


# --------------------------------------------------------------------------- #
# A gs:// workdir, end to end, without a network
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def _gcs_server(tmp_path_factory):
    """One fake GCS endpoint per test process; tensorstore is pointed at it through its environment."""
    root = tmp_path_factory.mktemp("gcs")
    with fake_gcs.serve(root) as environ, pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        yield root


@pytest.fixture
def gcs_workdir(_gcs_server, tmp_path, monkeypatch):
    """A gs://{bucket}/run workdir: epath reads and writes it through etils' mock_epath, orbax's arrays go
    through tensorstore's GCS driver to the fake server; both see the same files."""
    monkeypatch.chdir(_gcs_server)  # mock_epath resolves gs://... relative to the working directory
    with fake_gcs.patch_process():
        bucket = re.sub(r"[^a-z0-9]", "-", tmp_path.name.lower()).strip("-")
        yield f"gs://{bucket}/run", _gcs_server / "gs:" / bucket / "run"


def test_gcs_workdir_saves_restores_and_sets_aside(gcs_workdir):
    workdir, files = gcs_workdir
    _save(f"{workdir}/checkpoints")
    assert (files / "checkpoints" / "20" / "commit_success.txt").is_file()  # orbax took its GCS path
    _assert_restored(_restore(f"{workdir}/checkpoints"), 20)

    _corrupt(files / "checkpoints" / "20")
    _assert_restored(_restore(f"{workdir}/checkpoints"), 10)
    assert (files / "checkpoints_unreadable" / "20" / "state").is_dir()

    changed = _config(seed=1)
    with pytest.raises(CheckpointMismatch, match="seed 0 -> 1"):
        _restore(f"{workdir}/checkpoints", changed)
