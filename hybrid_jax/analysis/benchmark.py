"""Benchmarks of registered models on the current device: cost, compile time, throughput, memory, MFU.

  python -m hybrid_jax.analysis.benchmark --models 'conformer*,tccnet*' --batch 32 [--train] [--attn xla,cudnn]
      [--dtype bfloat16] [--out results/bench]
  python -m hybrid_jax.analysis.benchmark --models 'resnet50' --batch 8 --torch --train   # against PyTorch, CPU
  python -m hybrid_jax.analysis.benchmark --suite accelerator [--smoke] [--time_budget_s 450]   # accelerator.py

Per model and attention implementation: parameters and GMACs (beside the paper's),
the compile time of the jitted forward (and train step), inference (and training)
images per second as the median of timed steps after a warm-up, each ended by
`block_until_ready`, the memory XLA plans for the program, and the model FLOP
utilisation: the compiled program's flops (XLA cost analysis) per second over the
device's peak. The peak is only known for the accelerators in `PEAK_TFLOPS` (bf16
dense); elsewhere pass `--peak_tflops` or MFU is left out. The train step is the
training loop's own (`hybrid_jax.train.step.train_step`: augmentation, AdamW, EMA off),
jitted as the loop jits it (logical axis rules in scope, the state donated).

`--torch` also runs the same model in PyTorch on the host CPU: timm's model of the
same name with random weights, converted into ours with `hybrid_jax.convert` so both
hold identical weights (the largest logit difference is reported). Both run inference
at the same batch in float32, PyTorch in eval mode under `torch.inference_mode()` with
as many threads as XLA's CPU backend uses, their timed steps alternating so both see
the same machine load; the table gains our CPU img/s, PyTorch's, and their ratio.
With `--train` as well, both also run one plain train step on the same weights and
batch (forward in train mode, cross-entropy, backward, SGD with momentum), alternating
in the same way, and the table gains the training ratio. A last row gives the
geometric mean of each ratio over the models compared. Only families with a converter
(`hybrid_jax.convert.converter_module`) and names timm knows can be compared; others
are benchmarked without PyTorch, with a note saying why.

Process settings: `python -m hybrid_jax.analysis.benchmark` applies the command line's
settings (`hybrid_jax.runtime.configure_process`: TCMalloc, by re-executing itself, and
XLA's own CPU convolutions on a CPU-only run), as every entry point of the package does; `--library`
leaves them out, so the process is what a project importing hybrid_jax gets. Both
change CPU timings only. The table header says which settings the process ran with
(`process_settings`), read from the process itself.

`--suite accelerator` runs the accelerator suite (`hybrid_jax.analysis.accelerator`, which
uses this module's peak FLOPs, timing and train step): the same as
`python -m hybrid_jax.analysis.accelerator`, with the rest of the command line as its arguments.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hybrid_jax.analysis.flops import count_macs, xla_cost
from hybrid_jax.registry import create_model, list_models, model_info
from hybrid_jax.runtime import DEFAULT_FLAGS, GLIBC_MALLOC_TUNABLES, configure_process

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets); the longest name a device kind contains wins.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
# Memory (HBM) bandwidths, TB/s (vendor data sheets; A100: the 80 GB SXM part), named alike.
PEAK_HBM_TBPS = {"H100 PCIe": 2.0, "H100": 3.35, "H200": 4.8, "A100": 2.039}
# The step PyTorch and we both run for --torch --train.
SGD_LR, SGD_MOMENTUM = 0.01, 0.9


@dataclasses.dataclass
class Result:
    model: str
    attn_impl: str  # "-" for models without attention
    batch: int
    dtype: str
    params: int
    gmacs: float  # per image, at the model's registered resolution
    paper_params_m: float | None
    paper_gmacs: float | None
    compile_s: float
    infer_img_s: float
    infer_bytes: int  # XLA's planned arguments + outputs + temporaries of the forward
    infer_mfu: float | None
    train_compile_s: float | None = None
    train_img_s: float | None = None
    train_bytes: int | None = None
    train_mfu: float | None = None
    # --torch: inference on the host CPU, ours and PyTorch's with the same weights, steps alternating.
    cpu_img_s: float | None = None
    torch_img_s: float | None = None
    torch_ratio: float | None = None  # cpu_img_s / torch_img_s: above 1 ours is faster
    torch_max_diff: float | None = None  # max |logit difference| between the two
    torch_threads: int | None = None
    # --torch --train: one SGD train step on the host CPU, same weights and batch, steps alternating.
    cpu_train_img_s: float | None = None
    torch_train_img_s: float | None = None
    torch_train_ratio: float | None = None  # cpu_train_img_s / torch_train_img_s
    torch_train_loss_diff: float | None = None  # max |loss difference| over the steps: both ran the same updates
    category: str = ""  # the survey's category in the registry: cnn, vit, serial, parallel, hierarchical


class TorchUnavailable(ValueError):
    """A model that cannot be compared with PyTorch here (no converter, unknown to timm, no torch)."""


def _device_entry(table: dict[str, float], device_kind: str | None) -> float | None:
    """The entry of `table` whose name the device kind contains (the longest such name), or None."""
    kind = device_kind or jax.devices()[0].device_kind
    names = sorted((name for name in table if name in kind), key=len, reverse=True)
    return table[names[0]] if names else None


def device_peak_flops(override_tflops: float | None = None, device_kind: str | None = None) -> float | None:
    """The device's peak FLOP/s: the override, or the table entry its kind names, or None."""
    tflops = override_tflops or _device_entry(PEAK_TFLOPS, device_kind)
    return tflops * 1e12 if tflops else None


def device_memory_bandwidth(device_kind: str | None = None) -> float | None:
    """The device's memory bandwidth in bytes/s, from the table entry its kind names, or None."""
    tbps = _device_entry(PEAK_HBM_TBPS, device_kind)
    return tbps * 1e12 if tbps else None


def _tcmalloc_loaded() -> bool:
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: what was asked for is all one can tell
        return "tcmalloc" in os.environ.get("LD_PRELOAD", "")


def process_settings() -> str:
    """Which of the command line's process settings (hybrid_jax/runtime.py) this process has, for a table header."""
    malloc = ("TCMalloc" if _tcmalloc_loaded() else
              "glibc malloc, tuned" if os.environ.get("GLIBC_TUNABLES") == GLIBC_MALLOC_TUNABLES else "system malloc")
    xla_convs = all(flag in os.environ.get("XLA_FLAGS", "") for flag in DEFAULT_FLAGS)
    set_malloc = malloc != "system malloc"
    kind = ("command line (hybrid_jax/runtime.py)" if set_malloc and xla_convs else
            "library (jaxlib's and the system's defaults)" if not (set_malloc or xla_convs) else "mixed")
    return f"{kind}: {malloc}, {'XLA' if xla_convs else 'default (YNNPACK)'} CPU convolutions"


def planned_bytes(compiled) -> int:
    """XLA's planned device bytes of a compiled program: arguments + outputs + temporaries, less aliasing."""
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)


def _median_seconds(run, steps: int) -> float:
    """Median wall time of `run()` over `steps` calls, after one untimed warm-up call."""
    jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _alternating_medians(ours: Callable[[], Any], theirs: Callable[[], Any], steps: int) -> tuple[float, float]:
    """Median seconds of `ours()` and `theirs()` (each blocking), called in turn so a busy machine slows both alike."""
    ours_s, theirs_s = [], []
    for _ in range(steps):
        start = time.perf_counter()
        ours()
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs()
        theirs_s.append(time.perf_counter() - start)
    return statistics.median(ours_s), statistics.median(theirs_s)


def _timed_compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def jax_cpu_threads() -> int:
    """Threads XLA's CPU backend runs an op on: the schedulable cores, unless XLA_FLAGS limits them."""
    flags = os.environ.get("XLA_FLAGS", "")
    if re.search(r"--xla_cpu_multi_thread_eigen=(false|0)", flags):
        return 1
    match = re.search(r"intra_op_parallelism_threads=(\d+)", flags)
    if match:
        return int(match.group(1))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_load() -> str:
    """The load average beside the core count, with a warning when other work competes for the cores.

    On a busy machine PyTorch's OpenMP threads lose far more than XLA's thread pool (resnet18's
    batch-2 forward on 2 busy cores: 1.0 s on 2 threads, 0.09 s on 1), so ratios measured there mislead.
    """
    load, cores = os.getloadavg()[0], jax_cpu_threads()
    busy = load >= 0.5 * cores
    return (f"load average {load:.1f} on {cores} cores at the start"
            + ("; BUSY MACHINE: the PyTorch ratios are not to be trusted" if busy else ""))


def timm_reference(name: str, model: nn.Module) -> Any:
    """timm's model `name` with random weights and `model`'s number of classes."""
    import timm

    if not timm.is_model(name):
        raise TorchUnavailable(f"timm has no model named {name!r}")
    return timm.create_model(name, pretrained=False, num_classes=model.num_classes)


def _torch_pair(name: str, model: nn.Module, reference_fn: Callable[[nn.Module], Any] | None) -> tuple[Any, dict]:
    """The PyTorch reference (eval mode) and its weights converted into `model`'s variables."""
    from hybrid_jax.convert import ConversionError, convert_state_dict, converter_module

    try:
        converter_module(model_info(name).family)
        import torch  # noqa: F401
    except (ConversionError, ImportError) as error:
        hint = " (pip install -e '.[parity]')" if isinstance(error, ImportError) else ""
        raise TorchUnavailable(f"{error}{hint}") from error
    reference = (reference_fn or functools.partial(timm_reference, name))(model).eval()
    try:
        variables = convert_state_dict(name, reference.state_dict(), model)
    except ConversionError as error:
        raise TorchUnavailable(f"{type(reference).__name__} does not convert into {name}: {error}") from error
    return reference, variables


def _torch_logits(out: Any) -> Any:
    """The logits of a torch model's output: a tensor, an object with `.logits`, or a tuple of heads (averaged)."""
    out = getattr(out, "logits", out)
    return sum(out) / len(out) if isinstance(out, (tuple, list)) else out


def _with_torch_threads(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` with PyTorch on as many threads as XLA's CPU backend, and that thread count."""
    import torch

    saved, threads = torch.get_num_threads(), jax_cpu_threads()
    torch.set_num_threads(threads)
    try:
        return fn(), threads
    finally:
        torch.set_num_threads(saved)


def _compare_with_torch(model: nn.Module, reference: Any, variables: dict, images: np.ndarray,
                        steps: int) -> tuple[float, float, float, int]:
    """Ours and PyTorch's inference on the host CPU: (our img/s, PyTorch img/s, max |logit diff|, threads)."""
    import torch

    cpu = jax.devices("cpu")[0]
    variables, x = jax.device_put((variables, images), cpu)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    reference.eval()

    def measure():
        with torch.inference_mode():
            ours, theirs = np.asarray(compiled(variables, x)), _torch_logits(reference(x_torch)).float().numpy()
            seconds = _alternating_medians(lambda: jax.block_until_ready(compiled(variables, x)),
                                           lambda: reference(x_torch), steps)
        return float(np.max(np.abs(ours - theirs))), seconds

    (max_diff, (ours_s, theirs_s)), threads = _with_torch_threads(measure)
    return len(images) / ours_s, len(images) / theirs_s, max_diff, threads


def compiled_sgd_step(model: nn.Module, variables: dict, images, labels) -> tuple[Callable, list]:
    """The step PyTorch runs beside ours, compiled for this batch: forward in train mode, cross-entropy,
    backward, SGD with momentum.

    Returns:
      (step, state): `*state[:], loss = step(*state, images, labels)` trains one step in place, the state
      [params, batch_stats, opt_state] donated to it as PyTorch updates its tensors in place; models
      without BatchNorm carry batch_stats={}.
    """
    tx = optax.sgd(SGD_LR, momentum=SGD_MOMENTUM)

    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(p):
            variables = {"params": p, "batch_stats": batch_stats} if batch_stats else {"params": p}
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.key(0)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, updates.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    state = [variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"])]
    return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, images, labels).compile(), state


def _compare_train_with_torch(model: nn.Module, reference: Any, variables: dict, images: np.ndarray,
                              steps: int) -> tuple[float, float, float]:
    """Ours and PyTorch's SGD train step on the host CPU: (our img/s, PyTorch img/s, max |loss difference|).

    Both start from the same weights and train on the same batch, step for step, so their losses
    agree at every step when both compute the same update.
    """
    import torch

    labels = np.random.default_rng(1).integers(0, model.num_classes, len(images)).astype(np.int32)
    variables, x, y = jax.device_put((variables, images, labels), jax.devices("cpu")[0])
    compiled, state = compiled_sgd_step(model, variables, x, y)
    x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y_torch = torch.from_numpy(labels.astype(np.int64))
    optimizer = torch.optim.SGD(reference.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
    losses: tuple[list[float], list[float]] = ([], [])

    def ours():
        *state[:], loss = compiled(*state, x, y)
        jax.block_until_ready(state)
        losses[0].append(float(loss))

    def theirs():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(_torch_logits(reference(x_torch)), y_torch)
        loss.backward()
        optimizer.step()
        losses[1].append(loss.item())

    def measure():
        reference.train()
        try:
            ours()  # the warm-up, on identical weights
            theirs()
            seconds = _alternating_medians(ours, theirs, steps)
        finally:
            reference.eval()
        return max(abs(a - b) for a, b in zip(*losses)), seconds

    (loss_diff, (ours_s, theirs_s)), _ = _with_torch_threads(measure)
    return len(images) / ours_s, len(images) / theirs_s, loss_diff


def _model_and_impls(name: str, impls: list[str], dtype) -> list[tuple[nn.Module, str]]:
    """One model per attention implementation it can run here ("-" for models without attention)."""
    probe = create_model(name)
    if not hasattr(probe, "attn_impl"):
        return [(create_model(name, dtype=dtype), "-")]
    runnable = [impl for impl in impls if impl != "cudnn" or jax.default_backend() == "gpu"]
    return [(create_model(name, dtype=dtype, attn_impl=impl), impl) for impl in runnable]


def loop_train_step(model: nn.Module, size: int, batch: int) -> tuple[Any, Any, dict[str, jax.Array]]:
    """The training loop's step for `model`, jitted as the loop jits it, with a fresh state and a random batch.

    The loop's own pieces (`hybrid_jax.train`): AdamW from the default config, flip augmentation,
    EMA off, one device, the state donated, the logical axis rules in scope when it traces.

    Returns:
      (jitted step: (state, batch) -> (state, metrics), state, batch of uint8 images and int labels).
    """
    from hybrid_jax.data.augment import AugmentConfig
    from hybrid_jax.parallel.mesh import make_mesh
    from hybrid_jax.parallel.placement import Placement
    from hybrid_jax.parallel.rules import DEFAULT_RULES
    from hybrid_jax.train.config import default_config
    from hybrid_jax.train.optim import make_optimizer
    from hybrid_jax.train.state import create_train_state
    from hybrid_jax.train.step import train_step

    tx, schedule = make_optimizer(default_config(), 1000)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, shardings = create_train_state(model, tx, (size, size, 3), seed=0, use_ema=False, mesh=mesh,
                                          rules=DEFAULT_RULES)
    placement = Placement(mesh, DEFAULT_RULES, shardings)
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=AugmentConfig(),
                             num_classes=model.num_classes, label_smoothing=0.1, ema_decay=0.0, grad_accum_steps=1)
    jitted = placement.jit(step, in_shardings=(shardings, placement.batch),
                           out_shardings=(shardings, placement.replicated), donate_argnums=0)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, model.num_classes, (batch,), dtype=np.int32)}
    return jitted, state, jax.device_put(host, placement.batch)


def stepper(compiled, state, batch) -> Callable[[], Any]:
    """A call that runs one step on the state the last call returned (the step donates its input state)."""
    latest = [state]

    def run():
        latest[0], metrics = compiled(latest[0], batch)
        return latest[0], metrics

    return run


def _train_step(model: nn.Module, size: int, batch: int, peak: float | None, steps: int):
    jitted, state, batch_ = loop_train_step(model, size, batch)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch_).compile()
    compile_s = time.perf_counter() - start
    seconds = _median_seconds(stepper(compiled, state, batch_), steps)
    mfu = xla_cost(compiled) / seconds / peak if peak else None
    return compile_s, batch / seconds, planned_bytes(compiled), mfu


def _inference(model: nn.Module, images: jax.Array, steps: int) -> tuple[int, float, float, float, Any]:
    """(params, GMACs per image, compile s, median s per step, compiled forward) of `model`'s inference on `images`."""
    variables = jax.jit(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x[:1], train=False)))(images)
    forward = lambda v, x: model.apply(v, x.astype(model.dtype), train=False)
    compiled, compile_s = _timed_compile(forward, variables, images)
    seconds = _median_seconds(lambda: compiled(variables, images), steps)
    params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    return params, count_macs(forward, variables, images[:1]) / 1e9, compile_s, seconds, compiled


def benchmark(name: str, *, batch: int = 32, impls: tuple[str, ...] = ("xla",), dtype: str = "float32",
              steps: int = 5, train: bool = False, peak_tflops: float | None = None,
              torch: bool | Callable[[nn.Module], Any] = False) -> list[Result]:
    """Results for `name` at its registered resolution, one per runnable attention implementation.

    Args:
      torch: also time the PyTorch model with the same weights on the host CPU: True for timm's
        model of the same name, or a function of our model returning the torch module (a timm
        model under another name or with other arguments). With `train`, the SGD train step too.

    Raises:
      TorchUnavailable: with `torch`, before anything is timed, when the model cannot be compared.
    """
    entry, size = model_info(name), model_info(name).input_size
    peak = device_peak_flops(peak_tflops)
    if torch and dtype != "float32":
        raise TorchUnavailable(f"the PyTorch comparison runs in float32, not {dtype}")
    results = []
    for model, impl in _model_and_impls(name, list(impls), jnp.dtype(dtype)):
        host_images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
        # cuDNN attention cannot run on the CPU, where PyTorch runs.
        pair = _torch_pair(name, model, None if torch is True else torch) if torch and impl != "cudnn" else None
        params, gmacs, compile_s, seconds, compiled = _inference(model, jnp.asarray(host_images), steps)
        result = Result(name, impl, batch, dtype, params, gmacs, entry.paper and entry.paper.params_m,
                        entry.paper and entry.paper.gmacs, compile_s, batch / seconds, planned_bytes(compiled),
                        xla_cost(compiled) / seconds / peak if peak else None)
        result.category = entry.category
        if train:
            result.train_compile_s, result.train_img_s, result.train_bytes, result.train_mfu = _train_step(
                model, size, batch, peak, steps)
        if pair:
            result.cpu_img_s, result.torch_img_s, result.torch_max_diff, result.torch_threads = _compare_with_torch(
                model, *pair, host_images, steps)
            result.torch_ratio = result.cpu_img_s / result.torch_img_s
            if train:
                result.cpu_train_img_s, result.torch_train_img_s, result.torch_train_loss_diff = (
                    _compare_train_with_torch(model, *pair, host_images, steps))
                result.torch_train_ratio = result.cpu_train_img_s / result.torch_train_img_s
        results.append(result)
    return results


# The ratio each mode of the PyTorch comparison reports.
RATIO_FIELDS = {"inference": "torch_ratio", "training": "torch_train_ratio"}


def geometric_mean(values: Iterable[float]) -> float:
    """exp(mean(log x)): the mean of ratios that treats 2x and 0.5x as cancelling."""
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def torch_ratios(results: list[Result], mode: str) -> dict[str, float]:
    """ours/PyTorch per model for `mode` ("inference" or "training"), for the models compared."""
    return {r.model: getattr(r, RATIO_FIELDS[mode]) for r in results if getattr(r, RATIO_FIELDS[mode]) is not None}


def torch_summary(results: list[Result]) -> list[str]:
    """Per mode: the geometric mean of ours/PyTorch and the slowest model, beside issue 17's targets."""
    lines = []
    for mode in RATIO_FIELDS:
        ratios = torch_ratios(results, mode)
        if ratios:
            slowest = min(ratios, key=ratios.get)
            lines.append(f"{mode}: ours/PyTorch geometric mean {geometric_mean(ratios.values()):.2f}x over "
                         f"{len(ratios)} model(s) (target >= 1.0x); lowest {slowest} {ratios[slowest]:.2f}x "
                         "(target >= 0.7x)")
    return lines


def format_cell(value, fmt: str) -> str:
    """`value` formatted for a table cell, "-" for None."""
    return "-" if value is None else format(value, fmt)


def _gib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2 ** 30


# (header, cell) per column; the PyTorch ones appear only when some result has them.
_COLUMNS: list[tuple[str, Callable[[Result], str]]] = [
    ("model", lambda r: r.model), ("category", lambda r: r.category or "-"), ("attn", lambda r: r.attn_impl),
    ("params", lambda r: f"{r.params:,}"), ("paper M", lambda r: format_cell(r.paper_params_m, ".3f")),
    ("GMACs", lambda r: f"{r.gmacs:.3f}"), ("paper GMACs", lambda r: format_cell(r.paper_gmacs, ".3f")),
    ("compile s", lambda r: f"{r.compile_s:.1f}"), ("infer img/s", lambda r: f"{r.infer_img_s:.1f}"),
    ("infer GiB", lambda r: f"{_gib(r.infer_bytes):.2f}"), ("infer MFU", lambda r: format_cell(r.infer_mfu, ".1%")),
    ("train compile s", lambda r: format_cell(r.train_compile_s, ".1f")),
    ("train img/s", lambda r: format_cell(r.train_img_s, ".1f")),
    ("train GiB", lambda r: format_cell(_gib(r.train_bytes), ".2f")),
    ("train MFU", lambda r: format_cell(r.train_mfu, ".1%")),
]
_TORCH_COLUMNS: list[tuple[str, Callable[[Result], str]]] = [
    ("CPU infer img/s", lambda r: format_cell(r.cpu_img_s, ".1f")),
    ("PyTorch infer img/s", lambda r: format_cell(r.torch_img_s, ".1f")),
    ("infer ours/PyTorch", lambda r: format_cell(r.torch_ratio, ".2f")),
    ("max abs diff", lambda r: format_cell(r.torch_max_diff, ".1e")),
]
_TORCH_TRAIN_COLUMNS: list[tuple[str, Callable[[Result], str]]] = [
    ("CPU train img/s", lambda r: format_cell(r.cpu_train_img_s, ".1f")),
    ("PyTorch train img/s", lambda r: format_cell(r.torch_train_img_s, ".1f")),
    ("train ours/PyTorch", lambda r: format_cell(r.torch_train_ratio, ".2f")),
]
_RATIO_COLUMNS = {"inference": "infer ours/PyTorch", "training": "train ours/PyTorch"}


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table; with PyTorch columns (and a geometric-mean row) when any result has them."""
    columns = list(_COLUMNS)
    if any(r.torch_img_s is not None for r in results):
        columns += _TORCH_COLUMNS
    if any(r.torch_train_img_s is not None for r in results):
        columns += _TORCH_TRAIN_COLUMNS
    line = lambda cells: "| " + " | ".join(cells) + " |"
    rows = [line(header for header, _ in columns), "|---|---|---|" + "---:|" * (len(columns) - 3)]
    rows += [line(cell(r) for _, cell in columns) for r in results]
    means = {_RATIO_COLUMNS[mode]: geometric_mean(ratios.values())
             for mode in RATIO_FIELDS if (ratios := torch_ratios(results, mode))}
    if means:
        first = f"geometric mean (n={max(len(torch_ratios(results, mode)) for mode in RATIO_FIELDS)})"
        rows.append(line([first] + [f"{means[h]:.2f}" if h in means else "" for h, _ in columns[1:]]))
    return "\n".join(rows)


# `--suite accelerator` alone, read first: the suite's own flags are accelerator.main's.
_SUITE_ARG = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_SUITE_ARG.add_argument("--suite", choices=("accelerator",), default=None)


def main(argv: list[str] | None = None) -> None:
    """Benchmarks the models the command line names; `--suite accelerator` hands the rest to `accelerator.main`."""
    suite, rest = _SUITE_ARG.parse_known_args(sys.argv[1:] if argv is None else argv)
    if suite.suite:
        from hybrid_jax.analysis import accelerator  # imports this module: only here, not at the top

        accelerator.main(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="",
                        help="comma-separated shell-style patterns over registered names: 'conformer*,tccnet*'")
    parser.add_argument("--category", default=None, help="only models of this category (serial, parallel, ...)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--attn", default="xla", help="comma-separated: xla,cudnn (cudnn only on GPU)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--train", action="store_true",
                        help="also time the training step (with --torch: also ours and PyTorch's SGD step)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU, TFLOP/s")
    parser.add_argument("--torch", action="store_true",
                        help="also run timm's model with the same (random, converted) weights on this CPU and "
                             "report both img/s and their ratio (float32; needs the parity extra)")
    parser.add_argument("--library", action="store_true",
                        help="run without the command line's process settings (hybrid_jax/runtime.py: TCMalloc, "
                             "XLA's CPU convolutions), as a project importing hybrid_jax does")
    parser.add_argument("--out", default="", help="write OUT.md and OUT.json")
    parser.add_argument("--suite", choices=("accelerator",), default=None,
                        help="accelerator: python -m hybrid_jax.analysis.accelerator with the other arguments "
                             "(--smoke, --time_budget_s, --out_dir, ...; its --help lists them)")
    args = parser.parse_args(argv)
    if not args.models:
        parser.error("--models is required (or --suite accelerator)")
    names = sorted({name for pattern in args.models.split(",") for name in list_models(pattern.strip(),
                                                                                        category=args.category)})
    if not names:
        raise SystemExit(f"no registered model matches {args.models!r}; see hybrid_jax.list_models()")
    peak = device_peak_flops(args.peak_tflops)
    header = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), peak for MFU: "
              f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}",
              f"process settings: {process_settings()}"]
    if args.torch:
        header.append(f"PyTorch comparison on the host CPU with {jax_cpu_threads()} threads (XLA's CPU threads), "
                      "float32, timed steps alternating" + (f"; train step: cross-entropy, SGD lr {SGD_LR} momentum "
                                                            f"{SGD_MOMENTUM}" if args.train else ""))
        header.append(machine_load())
    print("\n".join(header), flush=True)
    results = []
    for name in names:
        kwargs = dict(batch=args.batch, impls=tuple(args.attn.split(",")), dtype=args.dtype, steps=args.steps,
                      train=args.train, peak_tflops=args.peak_tflops)
        try:
            results += benchmark(name, torch=args.torch, **kwargs)
        except TorchUnavailable as error:  # raised before anything is timed
            print(f"{name}: no PyTorch comparison: {error}", flush=True)
            results += benchmark(name, **kwargs)
        print(markdown_table(results[-1:]).splitlines()[2], flush=True)
    table, summary = markdown_table(results), torch_summary(results)
    print("\n" + table + "".join("\n" + line for line in summary))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text("\n\n".join(header) + "\n\n" + table + "\n"
                                          + "".join("\n" + line for line in summary) + ("\n" if summary else ""))
        out.with_suffix(".json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    if "--library" not in sys.argv[1:]:  # before anything else: configure_process may re-execute this process
        configure_process()
    main()
