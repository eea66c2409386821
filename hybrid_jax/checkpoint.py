"""Orbax checkpoints of a run: save asynchronously, resume from the newest readable step.

A checkpoint holds the train state (params, optimizer state, batch statistics, EMA,
step, rng), the data iterator's position and the config, so a resumed run continues
bit-identically. A step that cannot be read (a truncated file, a half-copied
directory) is moved aside to `{directory}_unreadable/` with a warning, never deleted,
and the step before it is tried.
"""

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the directory can be restored."""


class Checkpointer:
    """Saves and restores {state, data position, config} under one directory."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "config"))

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Starts saving `step`; it completes in the background unless async saving is off."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data position) of the newest readable checkpoint, or None if there is none.

        Args:
          abstract_state: the state's structure as ShapeDtypeStructs carrying shardings, so
            every array is restored straight into its sharded layout.
        """
        found = self._restore_newest(ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return None if found is None else (found[0], found[1]["state"], found[1]["data"])

    def restore_variables(self, *, ema: bool = False) -> tuple[int, dict[str, Any]]:
        """(step, {"params", "batch_stats"}) of the newest readable checkpoint, for evaluation and analysis.

        Needs no target, so neither the optimizer nor the mesh that wrote it: the arrays come back
        on the default device. `ema=True` returns the parameter EMA in place of the parameters.
        """
        found = self._restore_newest(ocp.args.Composite(state=ocp.args.StandardRestore()))
        if found is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train the run first")
        step, state = found[0], found[1]["state"]
        if ema and state.get("ema_params") is None:
            raise CheckpointError(f"the checkpoint at step {step} in {self.directory} has no parameter EMA; "
                                  "train with config.ema_decay > 0, or ask for the parameters (ema=False)")
        variables = {"params": state["ema_params"] if ema else state["params"]}
        if state.get("batch_stats"):
            variables["batch_stats"] = state["batch_stats"]
        return step, variables

    def _restore_newest(self, args: ocp.args.Composite) -> tuple[int, Any] | None:
        """(step, restored items) of the newest step that reads; unreadable steps are set aside on the way."""
        steps = self.steps()
        for step in reversed(steps):
            try:
                return step, self._manager.restore(step, args=args)
            except Exception as error:  # orbax raises many types for damaged files
                self._set_aside(step, error)
        if steps:
            raise CheckpointError(f"none of the checkpoints {steps} in {self.directory} can be read; they were moved "
                                  f"to {self._aside_dir()}. Start a fresh run in another workdir, or repair them.")
        return None

    def _aside_dir(self) -> Path:
        return self.directory.with_name(self.directory.name + "_unreadable")

    def _set_aside(self, step: int, error: Exception) -> None:
        """Moves an unreadable step out of the manager's way (a later save may reuse its number)."""
        target = self._aside_dir() / str(step)
        copies = 1
        while target.exists():  # the same step may go bad twice; keep both
            target, copies = self._aside_dir() / f"{step}.{copies}", copies + 1
        log.warning("checkpoint step %d in %s cannot be read (%s: %s); moving it to %s and trying the "
                    "previous one", step, self.directory, type(error).__name__, str(error)[:300], target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
