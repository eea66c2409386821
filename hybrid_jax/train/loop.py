"""`train_and_evaluate(config, workdir)`: the one training loop, from one CPU to a pod.

The loop knows no task: what to train for (data, model, loss, evaluation) comes
through `hybrid_jax.tasks.Task`. The state is created sharded (state.py); the train
and eval steps are jitted with explicit in/out shardings over the ('data', 'fsdp',
'tensor') mesh and trace under its logical axis rules, so the models' activation
constraints act; each process feeds its slice of the global batch. Metrics are
fetched from the device every `log_every` steps, which is also when a diverged loss
is caught, and a checkpoint is only written after the steps before it were checked,
so the last checkpoint always holds a finite state. Every path may be remote.
"""

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from hybrid_jax.checkpoint import Checkpointer
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.metrics import MetricsWriter, ProgressBar, plot_curves, read_metrics
from hybrid_jax.parallel.mesh import make_mesh
from hybrid_jax.parallel.placement import Placement, ShardedJit
from hybrid_jax.parallel.rules import DEFAULT_RULES
from hybrid_jax.tasks import Evaluate, Task, make_task
from hybrid_jax.train.config import DTYPES, ConfigError, config_defaults
from hybrid_jax.train.init_from import start_from
from hybrid_jax.train.optim import make_optimizer
from hybrid_jax.train.state import TrainState, plan_train_state

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint and stop between steps.

    In a multi-process run with jax's preemption service (`synced`), the platform's notice reaches every
    process and orbax's sync point (`Checkpointer.reached_preemption`) names the step all stop at.
    """

    synced: bool = False
    requested: bool = False

    def __call__(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins a multi-process run when the config asks for one."""
    if not config.distributed or jax.distributed.is_initialized():
        return
    # CPU processes exchange gradients through gloo (accelerators bring their own collectives and ignore
    # this). Set unconditionally: asking which backend is present would initialise it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if config.coordinator_address:
        kwargs = dict(coordinator_address=config.coordinator_address, num_processes=config.num_processes,
                      process_id=config.process_id)
    jax.distributed.initialize(**kwargs)


def _check_model_takes(model: nn.Module, image_shape: tuple[int, int, int], name: str) -> None:
    """Traces the model once on the data's image shape, turning a shape failure into advice."""
    try:
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    except Exception as error:  # a shape mismatch surfaces as many exception types
        raise ConfigError(f"model {name!r} cannot take images of shape {image_shape} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200]}). Set config.resize=(H, W) to a size the model "
                          f"accepts (its registered input size is {getattr(model, 'img_size', 'see the registry')})."
                          ) from error


def _augment_config(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> AugmentConfig:
    a = config.augment
    on_device = a.random_resized_crop and not a.crop_on_host  # else the host crops from the decoded original
    return AugmentConfig(crop_size=tuple(image_shape[:2]) if on_device else None,
                         crop_scale=tuple(a.crop_scale), flip=a.flip, randaug_num_ops=a.randaug_num_ops,
                         randaug_magnitude=a.randaug_magnitude, mixup_alpha=a.mixup_alpha,
                         cutmix_alpha=a.cutmix_alpha, mean=tuple(a.mean), std=tuple(a.std))


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    try:
        mesh = make_mesh(tuple(config.mesh_shape))
    except ValueError as error:
        raise ConfigError(f"config.mesh_shape={tuple(config.mesh_shape)}: {error}.") from None
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % batch_shards:
            raise ConfigError(f"config.{name}={config[name]} must be a multiple of the data x fsdp mesh size "
                              f"{batch_shards}.")
    return mesh


def _first_diverged(history: list[tuple[int, dict[str, float]]]) -> tuple[int, float] | None:
    """(step, loss) of the first step whose loss or updated parameters are not finite, if any."""
    for step, metrics in history:
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["param_norm"])):
            return step, metrics["loss"]
    return None


def evaluate_state(state: TrainState, evaluate_weights: Evaluate) -> dict[str, float]:
    """The task's evaluation of the trained weights, and of their EMA (keys prefixed "ema_") when kept."""
    metrics = evaluate_weights(state.params, state.batch_stats)
    if state.ema_params is not None:
        ema = evaluate_weights(state.ema_params, state.ema_batch_stats)
        metrics.update({f"ema_{k}": v for k, v in ema.items()})
    return metrics


def _untrained_metrics(workdir: epath.Path) -> dict[str, float]:
    """The step-0 evaluation (config.eval_at_start) from metrics.jsonl, as "untrained_" summary keys."""
    for record in read_metrics(workdir):
        if record["split"] == "eval" and record["step"] == 0:
            return {f"untrained_{k}": v for k, v in record.items() if k not in ("step", "split", "time")}
    return {}


class _StepTrace:
    """A jax.profiler trace of train steps first..last (config.profile_steps) into {workdir}/profile."""

    def __init__(self, steps: tuple[int, ...], workdir: epath.Path):
        self.first, self.last = steps if steps else (0, -1)
        self.directory = workdir / "profile"
        self.running = False

    def before(self, step: int) -> None:
        """Called before train step `step` (1-based) runs."""
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.running = True

    def after(self, step: int, state: TrainState) -> None:
        """Called once train step `step` is dispatched; the trace ends when its work is done."""
        if self.running and step == self.last:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        if self.running:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.running = False
            log.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)


@dataclasses.dataclass
class Run:
    """Everything a run needs before its first step, built from the config alone."""

    config: ml_collections.ConfigDict
    task: Task
    model: nn.Module
    placement: Placement
    total_steps: int
    eval_every: int
    build_state: Callable[[], TrainState]  # a fresh sharded state (a resumed run restores instead)
    abstract_state: TrainState  # ShapeDtypeStructs carrying shardings: the restore target
    train_step: ShardedJit  # (state, global batch) -> (state, metrics), under the mesh's logical rules
    evaluate: Evaluate  # (params, batch_stats) -> the task's eval metrics


def build_run(config: ml_collections.ConfigDict) -> Run:
    """Checks the config, then plans the model, state, shardings and jitted steps of its run."""
    task = make_task(config)
    maybe_initialize_distributed(config)
    mesh = _make_mesh(config)
    model = task.build_model(DTYPES[config.dtype])
    _check_model_takes(model, task.image_shape, config.model.name)

    steps_per_epoch = max(task.num_train_examples // config.batch_size, 1)
    total_steps = config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    tx, schedule = make_optimizer(config, max(total_steps // config.grad_accum_steps, 1), model)
    build_state, abstract_state, state_shardings = plan_train_state(
        model, tx, task.image_shape, seed=config.seed, use_ema=config.ema_decay > 0, mesh=mesh, rules=DEFAULT_RULES)
    placement = Placement(mesh, DEFAULT_RULES, state_shardings)
    augment = _augment_config(config, task.image_shape)
    step = task.train_step(model, tx=tx, schedule=schedule, augment=augment, ema_decay=config.ema_decay,
                           grad_accum_steps=config.grad_accum_steps, freeze=tuple(config.freeze))
    train_step = placement.jit(step, in_shardings=(state_shardings, placement.batch),
                               out_shardings=(state_shardings, placement.replicated), donate_argnums=0)
    return Run(config, task, model, placement, total_steps, config.eval_every or steps_per_epoch, build_state,
               abstract_state, train_step, task.evaluator(model, augment, placement))


def _initial_state(run: Run) -> TrainState:
    """A fresh sharded state, with its weights from `config.init_from` when set (fine-tuning)."""
    state = run.build_state()
    if run.config.init_from:
        module, scope = run.task.pretrained_module(run.model)
        state = start_from(state, run.config.init_from, run.config.model.name, module, scope)
    return state


def evaluate_only(run: Run, workdir: epath.Path) -> dict[str, Any]:
    """`config.mode == "eval"`: scores `config.init_from` on the eval split and writes {workdir}/summary.json."""
    if (workdir / "checkpoints").exists():
        raise ConfigError(f"{workdir} holds a training run, whose summary an evaluation would replace: give the "
                          f"evaluation a workdir of its own (--config.init_from={workdir} scores that run).")
    start = time.perf_counter()
    state = _initial_state(run)
    metrics = run.evaluate(state.params, state.batch_stats)
    summary = {"finished": True, "mode": "eval", **run.task.summary(), "init_from": run.config.init_from,
               **{f"test_{k}": v for k, v in metrics.items()}, "wall_time_s": time.perf_counter() - start}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(run.config.to_json_best_effort(indent=2))
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> dict[str, Any]:
    """Trains `config.model` for `config.task`, resuming from `workdir` if it holds checkpoints.

    Args:
      config: a config from `hybrid_jax.train.config.default_config()` and its overrides.
      workdir: where checkpoints, metrics and the summary go; local or remote (gs://...).

    Returns:
      The final summary (also written to {workdir}/summary.json).
    """
    run = build_run(config)
    workdir = epath.Path(workdir)
    if config.mode == "eval":
        return evaluate_only(run, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    data_iter = iter(run.task.train_dataset())

    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.max_to_keep,
                                async_save=config.async_checkpoint)
    restored = checkpointer.restore_latest(run.abstract_state, config, tuple(config.resume_changes),
                                           defaults=config_defaults(config))
    start_step = 0
    if restored is None:
        state = _initial_state(run)
    else:
        start_step, state, data_position = restored
        data_iter.set_state(data_position)
        log.info("resumed from step %d in %s", start_step, checkpointer.directory)
        if start_step >= run.total_steps and (workdir / "summary.json").exists():
            log.info("the run in %s is already finished; its summary follows", workdir)
            checkpointer.close()
            return json.loads((workdir / "summary.json").read_text())
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)
    bar = ProgressBar(run.total_steps, start_step, enabled=is_main and config.progress_bar)
    preemption = _Preemption(synced=jax.process_count() > 1 and jax.config.jax_enable_preemption_service)
    # With jax's preemption service, its own notifier takes SIGTERM and tells every process.
    previous_handler = None if preemption.synced else signal.signal(signal.SIGTERM, preemption)
    trace = _StepTrace(tuple(config.profile_steps), workdir)
    summary = {}
    try:
        summary = _run(run, state, start_step, data_iter, checkpointer, writer, bar, preemption, trace)
    finally:
        trace.stop()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        checkpointer.close()
        writer.close()
    if is_main and summary.get("finished"):
        summary.update(_untrained_metrics(workdir))
        plot_curves(workdir)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run(run: Run, state: TrainState, step: int, data_iter: Iterator, checkpointer: Checkpointer,
         writer: MetricsWriter, bar: ProgressBar, preemption: _Preemption, trace: _StepTrace) -> dict[str, Any]:
    """The step loop: train, log, evaluate, checkpoint; returns the summary."""
    config, total_steps, eval_every = run.config, run.total_steps, run.eval_every
    start_step = step
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet fetched from the device
    last_good = checkpointer.steps()[-1] if checkpointer.steps() else None
    run_start = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    steady_seconds, steady_steps = 0.0, 0  # training time after the first window, which compiles
    eval_metrics: dict[str, float] = {}

    def fetch_and_check() -> list[tuple[int, dict[str, float]]]:
        history = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
        pending.clear()
        diverged = _first_diverged(history)
        if diverged is not None:
            where = f"step {last_good}" if last_good is not None else "none was written"
            raise TrainingDiverged(f"training diverged at step {diverged[0]} (loss {diverged[1]}). The "
                                   f"last good checkpoint is kept ({where}). Lower config.learning_rate, raise "
                                   f"config.warmup_steps or set config.clip_norm, then rerun to resume.")
        return history

    def save(at_step: int) -> None:
        nonlocal last_good
        fetch_and_check()
        checkpointer.save(at_step, state, data_iter.get_state(), config.to_dict())
        last_good = at_step

    if config.eval_at_start and step == 0:
        writer.write(0, "eval", evaluate_state(state, run.evaluate))
        window_start = time.perf_counter()
    while step < total_steps:
        trace.before(step + 1)
        state, metrics = run.train_step(state, run.placement.global_batch(next(data_iter)))
        step += 1
        trace.after(step, state)
        window_steps += 1
        pending.append((step, metrics))
        if step % config.log_every == 0 or step == total_steps:
            history = fetch_and_check()
            elapsed = time.perf_counter() - window_start
            means = {k: float(np.mean([m[k] for _, m in history])) for k in history[-1][1]}
            means["images_per_sec"] = window_steps * config.batch_size / elapsed
            if history[0][0] > start_step + 1:
                steady_seconds, steady_steps = steady_seconds + elapsed, steady_steps + window_steps
            writer.write(step, "train", means)
            bar.update(window_steps, loss=means["loss"], acc=means["accuracy"], img_s=means["images_per_sec"])
            window_start, window_steps = time.perf_counter(), 0
        if step % eval_every == 0 or step == total_steps:
            eval_metrics = evaluate_state(state, run.evaluate)
            writer.write(step, "eval", eval_metrics)
            window_start = time.perf_counter()  # throughput counts training time only
        if preemption.synced:
            stop = checkpointer.reached_preemption(step)
        elif jax.process_count() > 1:  # every process must agree before the collective save
            stop = step % config.log_every == 0 and bool(
                multihost_utils.process_allgather(np.array(preemption.requested)).any())
        else:
            stop = preemption.requested
        if step % config.checkpoint_every == 0 or step == total_steps or stop:
            save(step)
        if stop:
            log.warning("stopped at step %d after SIGTERM; rerun the same command to resume", step)
            return {"finished": False, "step": step}

    wall = time.perf_counter() - run_start
    if not eval_metrics:  # resumed a finished run: report its final evaluation
        eval_metrics = run.evaluate(state.params, state.batch_stats)
    summary = {"finished": True, **run.task.summary(), "steps": step,
               **{f"test_{k}": v for k, v in eval_metrics.items()},
               "wall_time_s": wall,
               "train_images_per_sec": steady_steps * config.batch_size / steady_seconds if steady_steps else None}
    return summary
