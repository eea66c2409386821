"""Orbax checkpoints of a run: save asynchronously, resume from the newest readable step.

A checkpoint holds the train state (params, optimizer state, batch statistics, EMA,
step, rng), the data iterator's position and the config, so a resumed run continues
bit-identically. Resuming tells damage from change: a checkpoint written under another
config, or holding another state structure, stops the run with the differences named and
is left where it is; only a step that cannot be read even as itself (a truncated file, a
half-copied directory) is moved aside to `{directory}_unreadable/` with a warning, never
deleted, and the step before it is tried. Transient storage errors are retried first.

Every path may be remote (`gs://bucket/run`): paths are `etils.epath`, and orbax writes
the arrays through tensorstore, which reaches GCS itself.
"""

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
T = TypeVar("T")

# Config keys that never change the state or the results, so a resume may change them freely. The mesh and
# process layout are here because a run may resume onto another mesh or process count.
IGNORED_CONFIG_KEYS = frozenset({
    "progress_bar", "resume_changes", "async_checkpoint", "max_to_keep", "compilation_cache_dir", "profile_steps",
    "mesh_shape", "distributed", "coordinator_address", "num_processes", "process_id"})
RETRY_SECONDS = (1.0, 4.0, 10.0)  # waits before each retry of a transient storage error
_TRANSIENT = re.compile(r"timed? ?out|unavailable|deadline.exceeded|connection reset", re.IGNORECASE)
_SHOWN = 6  # differing tree paths named per kind before "and N more"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored; the message says why and what to do."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that does not fit the current config or state; it is left in place."""


class _Unreadable(Exception):
    """A step that fails to read as itself: damaged, to be set aside."""


def is_remote(path: str | epath.PathLike) -> bool:
    """True for a URI such as gs://bucket/run, which has no local directory behind it."""
    return "://" in str(path)


def flatten_config(config: Any) -> dict[str, Any]:
    """{"augment.flip": True, ...} of a dict or ConfigDict, values as JSON would store them."""
    config = config.to_dict() if hasattr(config, "to_dict") else config
    flat = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(json.loads(json.dumps(config)), "")  # tuples become lists, as in the saved JSON
    return flat


def config_changes(saved: Any, current: Any, allowed: Sequence[str] = (),
                   defaults: Any = None) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} of the fields that differ and are neither ignored nor allowed.

    `allowed` names fields or sections ("augment" allows every augment.* field); an item may hold
    several names separated by commas, as `--config.resume_changes=total_steps,num_epochs` arrives.
    A key the saved config lacks is no change while its current value is its value in `defaults`:
    the field is newer than the checkpoint, and a new field's default keeps the old behaviour.
    """
    allowed = {name.strip() for item in allowed for name in str(item).split(",") if name.strip()}
    saved, current = flatten_config(saved), flatten_config(current)
    defaults = flatten_config(defaults) if defaults is not None else {}
    absent = "<absent>"
    changes = {}
    for key in sorted(saved.keys() | current.keys()):
        parts = key.split(".")
        if key in IGNORED_CONFIG_KEYS or any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1)):
            continue
        if key not in saved and key in defaults and current.get(key, absent) == defaults[key]:
            continue
        if saved.get(key, absent) != current.get(key, absent):
            changes[key] = (saved.get(key, absent), current.get(key, absent))
    return changes


def tree_differences(saved: Any, target: Any) -> list[str]:
    """The paths that differ between a checkpoint's tree (arrays or metadata) and the target's, described."""
    saved, target = ocp.tree.to_flat_dict(saved, sep="/"), ocp.tree.to_flat_dict(target, sep="/")
    missing = sorted(target.keys() - saved.keys())
    extra = sorted(saved.keys() - target.keys())
    reshaped = sorted(f"{k} {tuple(saved[k].shape)} -> {tuple(target[k].shape)}" for k in saved.keys() & target.keys()
                      if tuple(saved[k].shape) != tuple(target[k].shape))

    def named(kind: str, paths: list[str]) -> list[str]:
        more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
        return [f"{kind}: {', '.join(paths[:_SHOWN])}{more}"] if paths else []

    return (named("not in the checkpoint", missing) + named("only in the checkpoint", extra)
            + named("other shape (saved -> current)", reshaped))


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return False  # a file that is not there will not appear on a retry
    return isinstance(error, OSError) or bool(_TRANSIENT.search(str(error)))


def _retrying(read: Callable[[], T], what: str) -> T:
    """read(), retried after transient storage errors; one still failing so is a CheckpointError."""
    for wait in (*RETRY_SECONDS, None):
        try:
            return read()
        except Exception as error:  # storage errors surface as many types
            if not _is_transient(error):
                raise
            if wait is None:
                raise CheckpointError(f"reading {what} failed {len(RETRY_SECONDS) + 1} times ({type(error).__name__}: "
                                      f"{str(error)[:300]}); rerun when the storage is reachable") from error
            log.warning("reading %s failed (%s: %s); retrying in %.0f s", what, type(error).__name__,
                        str(error)[:200], wait)
            time.sleep(wait)


class Checkpointer:
    """Saves and restores {state, data position, config} under one directory."""

    def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        directory = epath.Path(directory)
        self.directory = directory if is_remote(directory) else directory.absolute()  # absolute() breaks a URI
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        # Handlers named up front, so a fresh process can read a step's metadata before restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state: Any, data_state: dict, config: Any) -> None:
        """Starts saving `step`; it completes in the background unless async saving is off."""
        config = config.to_dict() if hasattr(config, "to_dict") else config
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any, config: Any, allowed_changes: Sequence[str] = (),
                       defaults: Any = None) -> tuple[int, Any, dict] | None:
        """(step, state, data position) of the newest readable checkpoint, or None if there is none.

        Args:
          abstract_state: the state's structure as ShapeDtypeStructs carrying shardings, so
            every array is restored straight into its sharded layout.
          config: the current run's config (dict or ConfigDict), compared with the one saved.
          allowed_changes: config fields (or sections) the run may change, e.g. config.resume_changes.
          defaults: every field's default; a field newer than the checkpoint may be absent from it
            while it keeps its default.

        Raises:
          CheckpointMismatch: the newest readable step was written under another config or holds
            another state structure; it is left in place.
          CheckpointError: no step can be read (all were set aside) or the storage stays unreachable.
        """
        found = self._newest(lambda step: self._restore_into(step, abstract_state, config, allowed_changes,
                                                             defaults))
        return None if found is None else (found[0], *found[1])

    def restore_variables(self, *, ema: bool = False, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """(step, {"params", "batch_stats"}) of the newest readable checkpoint, or of `step`, for evaluation and
        analysis.

        Needs no target, so neither the optimizer nor the mesh that wrote it: the arrays come back
        on the default device. `ema=True` returns the parameter EMA in place of the parameters. A
        step asked for by number is read or reported, never set aside.
        """
        def read(step: int) -> dict[str, Any]:
            return self._read(step, lambda: self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())), "its arrays")["state"]

        if step is None:
            found = self._newest(read)
            if found is None:
                raise CheckpointError(f"no checkpoint in {self.directory}; train the run first")
        else:
            if step not in self.steps():
                raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it has steps "
                                      f"{self.steps() or 'none'}")
            try:
                found = step, read(step)
            except _Unreadable as damage:
                raise CheckpointError(f"step {step} in {self.directory} cannot be read: {damage}") from None
        step, state = found
        if ema and state.get("ema_params") is None:
            raise CheckpointError(f"the checkpoint at step {step} in {self.directory} has no parameter EMA; "
                                  "train with config.ema_decay > 0, or ask for the parameters (ema=False)")
        variables = {"params": state["ema_params"] if ema else state["params"]}
        # The EMA weights go with the EMA of the batch statistics (checkpoints before it kept only the raw ones).
        batch_stats = state.get("ema_batch_stats") if ema else None
        batch_stats = batch_stats or state.get("batch_stats")
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return step, variables

    def _newest(self, restore: Callable[[int], T]) -> tuple[int, T] | None:
        """(step, restore(step)) of the newest step that is not damaged; damaged steps are set aside on the way."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                return step, restore(step)
            except _Unreadable as damage:
                self._set_aside(step, damage)
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be read; they were moved "
                                  f"to {self._aside_dir()}. Start a fresh run in another workdir, or repair them.")
        return None

    def _restore_into(self, step: int, abstract_state: Any, config: Any, allowed_changes: Sequence[str],
                      defaults: Any) -> tuple[Any, dict]:
        """(state, data position) of `step` if it fits the run; raises CheckpointMismatch or _Unreadable if not."""
        metadata = self._read(step, lambda: self._manager.item_metadata(step), "its metadata")
        saved = metadata.get("state")
        if saved is None or not ocp.tree.to_flat_dict(saved):  # every state has arrays: this is a partial copy
            raise _Unreadable("its state: no arrays are listed")
        self._check_config(step, "config" in metadata, config, allowed_changes, defaults)
        if differences := tree_differences(saved, abstract_state):
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} holds another state structure than this run "
                f"builds ({'; '.join(differences)}). It is intact and left in place: resume with the code and "
                "config that wrote it, or start in a new workdir.")
        try:
            items = _retrying(lambda: self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())),
                f"checkpoint step {step}")
        except CheckpointError:
            raise
        except Exception as error:  # orbax raises many types; read the step as itself to tell why
            self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())), "its arrays")
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} reads, but not into this run's state "
                f"({type(error).__name__}: {str(error)[:300]}). It is left in place.") from error
        return items["state"], items["data"]

    def _read(self, step: int, read: Callable[[], T], what: str) -> T:
        """read() with transient errors retried; any other failure marks the step unreadable."""
        try:
            return _retrying(read, f"checkpoint step {step}")
        except CheckpointError:
            raise
        except Exception as error:  # orbax raises many types for damaged files
            raise _Unreadable(f"{what}: {type(error).__name__}: {str(error)[:300]}") from error

    def _check_config(self, step: int, saved_config: bool, config: Any, allowed_changes: Sequence[str],
                      defaults: Any) -> None:
        """Raises CheckpointMismatch when `step` was written under a config that differs in a field not allowed."""
        if not saved_config:
            log.warning("the checkpoint at step %d in %s saved no config, so whether it was written under this "
                        "one is unknown; resuming", step, self.directory)
            return
        saved = self._read(step, lambda: self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"], "its config")
        if changes := config_changes(saved, config, allowed_changes, defaults):
            listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            raise CheckpointMismatch(
                f"the checkpoint at step {step} in {self.directory} was written under another config ({listed}); it "
                f"is left in place. Start in a new workdir, or, if these changes are safe (e.g. a longer schedule), "
                f"resume with --config.resume_changes={','.join(changes)}")

    def _aside_dir(self) -> epath.Path:
        return self.directory.with_name(self.directory.name + "_unreadable")

    def _set_aside(self, step: int, damage: _Unreadable) -> None:
        """Moves an unreadable step out of the manager's way (a later save may reuse its number)."""
        target = self._aside_dir() / str(step)
        copies = 1
        while target.exists():  # the same step may go bad twice; keep both
            target, copies = self._aside_dir() / f"{step}.{copies}", copies + 1
        log.warning("checkpoint step %d in %s cannot be read (%s); moving it to %s and trying the previous one",
                    step, self.directory, damage, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True once the platform announced a preemption (TPU maintenance, a SIGTERM to any process of a
        distributed run) and every process has reached `step`: orbax's sync point, so all save together."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
