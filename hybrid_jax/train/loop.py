"""`train_and_evaluate(config, workdir)`: the one training loop, from one CPU to a pod.

The state is created sharded (state.py); the train and eval steps are jitted with
explicit in/out shardings over the ('data', 'fsdp', 'tensor') mesh; each process
feeds its slice of the global batch and `jax.make_array_from_process_local_data`
assembles it. Metrics are fetched from the device every `log_every` steps, which is
also when a diverged loss is caught, and a checkpoint is only written after the
steps before it were checked, so the last checkpoint always holds a finite state.
"""

import dataclasses
import functools
import json
import logging

log = logging.getLogger(__name__)
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax import create_model
from hybrid_jax.checkpoint import Checkpointer
from hybrid_jax.data import pipeline
from hybrid_jax.data.augment import AugmentConfig
from hybrid_jax.metrics import MetricsWriter, ProgressBar, plot_curves, read_metrics
from hybrid_jax.parallel.mesh import make_mesh
from hybrid_jax.parallel.rules import DEFAULT_RULES
from hybrid_jax.reid import step as reid_step
from hybrid_jax.reid import task as reid_task
from hybrid_jax.train.config import ConfigError, check_keys, check_values, parse_overrides
from hybrid_jax.train.optim import make_optimizer
from hybrid_jax.train.state import TrainState, plan_train_state
from hybrid_jax.train.step import eval_step, train_step

BATCH_AXES = PartitionSpec(("data", "fsdp"))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint and stop between steps."""

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


def _model_input_shape(config: ml_collections.ConfigDict) -> tuple[pipeline.DatasetSpec, tuple[int, int, int]]:
    spec = pipeline.describe(config.dataset, config.train_split, config.data_dir or None,
                             tuple(config.resize) or None)
    return spec, spec.image_shape


def _check_model_takes(model, image_shape: tuple[int, int, int], name: str) -> None:
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
    return AugmentConfig(crop_size=tuple(image_shape[:2]) if a.random_resized_crop else None,
                         crop_scale=tuple(a.crop_scale), flip=a.flip, randaug_num_ops=a.randaug_num_ops,
                         randaug_magnitude=a.randaug_magnitude, mixup_alpha=a.mixup_alpha,
                         cutmix_alpha=a.cutmix_alpha, mean=tuple(a.mean), std=tuple(a.std))


def _global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}


def _first_diverged(history: list[tuple[int, dict[str, float]]]) -> tuple[int, float] | None:
    """(step, loss) of the first step whose loss or updated parameters are not finite, if any."""
    for step, metrics in history:
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["param_norm"])):
            return step, metrics["loss"]
    return None


def evaluate(params: Any, batch_stats: Any, *, eval_fn, mesh: Mesh, config: ml_collections.ConfigDict,
             num_examples: int, image_shape: tuple[int, int, int]) -> dict[str, float]:
    """Loss and accuracy over the whole eval split (padding masked out)."""
    dataset = pipeline.make_eval_dataset(config.dataset, global_batch_size=config.eval_batch_size,
                                         split=config.eval_split, data_dir=config.data_dir or None,
                                         image_shape=image_shape, resize=tuple(config.resize) or None,
                                         read_threads=config.read_threads)
    sharding = NamedSharding(mesh, BATCH_AXES)
    totals = None
    for batch in dataset:
        sums = eval_fn(params, batch_stats, _global_batch(batch, sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if int(totals["count"]) != num_examples:
        raise RuntimeError(f"evaluated {int(totals['count'])} examples, expected {num_examples}")
    return {"loss": float(totals["loss_sum"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def evaluate_state(state: TrainState, evaluate_weights) -> dict[str, float]:
    """The task's evaluation of the trained weights, and of their EMA (keys prefixed "ema_") when kept."""
    metrics = evaluate_weights(state.params, state.batch_stats)
    if state.ema_params is not None:
        ema = evaluate_weights(state.ema_params, state.batch_stats)
        metrics.update({f"ema_{k}": v for k, v in ema.items()})
    return metrics


def _untrained_metrics(workdir: Path) -> dict[str, float]:
    """The step-0 evaluation (config.eval_at_start) from metrics.jsonl, as "untrained_" summary keys."""
    for record in read_metrics(workdir):
        if record["split"] == "eval" and record["step"] == 0:
            return {f"untrained_{k}": v for k, v in record.items() if k not in ("step", "split", "time")}
    return {}


def _create_model(build) -> Any:
    """Builds the model, turning an unknown name or field into a config error with close matches."""
    try:
        return build()
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.model / config.model_overrides: {error}") from error


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains `config.model` on `config.dataset`, resuming from `workdir` if it holds checkpoints.

    Returns:
      The final summary (also written to {workdir}/summary.json).
    """
    check_keys(config)
    check_values(config)
    maybe_initialize_distributed(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0

    mesh = make_mesh(tuple(config.mesh_shape))
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % batch_shards:
            raise ConfigError(f"config.{name}={config[name]} must be a multiple of the data x fsdp mesh size "
                              f"{batch_shards}.")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    if config.task == "reid":
        reid_spec = reid_task.describe(config)
        image_shape, train_examples = reid_spec.image_shape, reid_spec.num_examples
        model = _create_model(lambda: reid_task.build_model(config, reid_spec.num_identities, dtype))
    else:
        train_spec, image_shape = _model_input_shape(config)
        eval_spec = pipeline.describe(config.dataset, config.eval_split, config.data_dir or None,
                                      tuple(config.resize) or None)
        train_examples = int(round(train_spec.num_examples * config.train_fraction))
        model = _create_model(lambda: create_model(config.model, num_classes=train_spec.num_classes, dtype=dtype,
                                                   **parse_overrides(config.model_overrides)))
    _check_model_takes(model, image_shape, config.model)

    steps_per_epoch = max(train_examples // config.batch_size, 1)
    total_steps = config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = config.eval_every or steps_per_epoch
    tx, schedule = make_optimizer(config, max(total_steps // config.grad_accum_steps, 1))
    build_state, abstract_state, state_shardings = plan_train_state(
        model, tx, image_shape, seed=config.seed, use_ema=config.ema_decay > 0, mesh=mesh, rules=DEFAULT_RULES)
    augment = _augment_config(config, image_shape)

    batch_sharding = NamedSharding(mesh, BATCH_AXES)
    replicated = NamedSharding(mesh, PartitionSpec())
    common = dict(model=model, tx=tx, schedule=schedule, augment=augment, ema_decay=config.ema_decay,
                  grad_accum_steps=config.grad_accum_steps)
    if config.task == "reid":
        step = functools.partial(reid_step.train_step, losses=reid_task.loss_config(config), **common)
        # Embeddings come back replicated: every process ranks the whole query set against the whole gallery.
        embed_fn = jax.jit(functools.partial(reid_step.embed_step, model=model, augment=augment),
                           in_shardings=(state_shardings.params, state_shardings.batch_stats, batch_sharding),
                           out_shardings=replicated)
        evaluate_weights = functools.partial(reid_task.evaluate, embed_fn=embed_fn, config=config,
                                             to_global=functools.partial(_global_batch, sharding=batch_sharding))
        train_data = reid_task.make_train_dataset(config)
    else:
        step = functools.partial(train_step, num_classes=train_spec.num_classes,
                                 label_smoothing=config.label_smoothing, head_loss=config.head_loss, **common)
        eval_fn = jax.jit(functools.partial(eval_step, model=model, augment=augment),
                          in_shardings=(state_shardings.params, state_shardings.batch_stats, batch_sharding),
                          out_shardings=replicated)
        evaluate_weights = functools.partial(evaluate, eval_fn=eval_fn, mesh=mesh, config=config,
                                             num_examples=eval_spec.num_examples, image_shape=image_shape)
        train_data = pipeline.make_train_dataset(
            config.dataset, global_batch_size=config.batch_size, split=config.train_split,
            data_dir=config.data_dir or None, seed=config.seed,
            train_fraction=config.train_fraction if config.train_fraction < 1 else None,
            worker_count=config.worker_count, read_threads=config.read_threads, image_shape=image_shape,
            resize=tuple(config.resize) or None, cache_max_bytes=config.cache_max_mb * 2**20)
    train_fn = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
    data_iter = iter(train_data)

    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=config.max_to_keep,
                                async_save=config.async_checkpoint)
    restored = checkpointer.restore_latest(abstract_state)
    start_step = 0
    if restored is None:
        state = build_state()
    else:
        start_step, state, data_position = restored
        data_iter.set_state(data_position)
        log.info("resumed from step %d in %s", start_step, checkpointer.directory)
        if start_step >= total_steps and (workdir / "summary.json").exists():
            log.info("the run in %s is already finished; its summary follows", workdir)
            checkpointer.close()
            return json.loads((workdir / "summary.json").read_text())
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    writer = MetricsWriter(workdir, enabled=is_main)
    bar = ProgressBar(total_steps, start_step, enabled=is_main and config.progress_bar)
    preemption = _Preemption()
    previous_handler = signal.signal(signal.SIGTERM, preemption)
    summary = {}
    try:
        summary = _run(state, start_step, total_steps, eval_every, config, mesh, data_iter, train_fn,
                       evaluate_weights, checkpointer, writer, bar, preemption)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        checkpointer.close()
        writer.close()
    if is_main and summary.get("finished"):
        summary.update(_untrained_metrics(workdir))
        plot_curves(workdir)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _run(state, step, total_steps, eval_every, config, mesh, data_iter: Iterator, train_fn, evaluate_weights,
         checkpointer, writer, bar, preemption) -> dict[str, Any]:
    """The step loop: train, log, evaluate, checkpoint; returns the summary."""
    batch_sharding = NamedSharding(mesh, BATCH_AXES)
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
        writer.write(0, "eval", evaluate_state(state, evaluate_weights))
        window_start = time.perf_counter()
    while step < total_steps:
        batch = _global_batch(next(data_iter), batch_sharding)
        state, metrics = train_fn(state, batch)
        step += 1
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
            eval_metrics = evaluate_state(state, evaluate_weights)
            writer.write(step, "eval", eval_metrics)
            window_start = time.perf_counter()  # throughput counts training time only
        stop = preemption.requested
        if jax.process_count() > 1:  # every process must agree before the collective save
            stop = step % config.log_every == 0 and bool(multihost_utils.process_allgather(np.array(stop)).any())
        if step % config.checkpoint_every == 0 or step == total_steps or stop:
            save(step)
        if stop:
            log.warning("stopped at step %d after SIGTERM; rerun the same command to resume", step)
            return {"finished": False, "step": step}

    wall = time.perf_counter() - run_start
    if not eval_metrics:  # resumed a finished run: report its final evaluation
        eval_metrics = evaluate_weights(state.params, state.batch_stats)
    summary = {"finished": True, "model": config.model, "dataset": config.dataset, "steps": step,
               **{f"test_{k}": v for k, v in eval_metrics.items()},
               "wall_time_s": wall,
               "train_images_per_sec": steady_steps * config.batch_size / steady_seconds if steady_steps else None}
    return summary
