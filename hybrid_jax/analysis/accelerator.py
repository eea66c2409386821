"""The accelerator suite (issue 17, item 4): the training step of six models in bf16 on one device.

  python -m hybrid_jax.analysis.accelerator [--smoke] [--time_budget_s 450] [--out_dir experiments/benchmarks]
      [--models 'vit*'] [--batch N] [--peak_tflops T] [--in_process] [--library]
      [--resume PREVIOUS.json | FOLDER [--refresh]] [--compile_ahead N]

(`python -m hybrid_jax.analysis.benchmark --suite accelerator ...` runs the same.) It trains the models
of `ACCELERATOR_SUITE` (ViT-B/16, Conformer-S, CoAtNet-0, MaxViT-T, Mobile-Former-508M, the 224-px
parallel hybrid) with the training loop's own step (`benchmark.loop_train_step`) in bfloat16 with
float32 parameters, with each attention implementation, and reports train img/s, MFU against the
device's bf16 peak, peak device memory and where each stands against NVIDIA's ViT-B/16 anchor and the
50% MFU goal (`run_suite`), each row in a process of its own within a time budget; it writes
OUT_DIR/<device>/accelerator.md and .json. `--resume` keeps the measured rows of an earlier table of the
same device (a file, or this device's table in a benchmarks folder) and runs only the rest, so short
device sessions complete the table between them; `--refresh` then measures the kept rows again too,
last, keeping each old one where its new measurement fails or finds no time. `--compile_ahead N`
compiles the rows' train steps first, N processes at once, into the run's compilation cache, then times
each row alone, loading its step from there: on a GPU a row's time is mostly compiling, not stepping.
`--smoke` runs the same path with the registry's tiny stand-ins on any device, for tests.
experiments/benchmarks/README.md explains the numbers.
"""

import argparse
import collections
import dataclasses
import fnmatch
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.analysis.benchmark import (
    device_memory_bandwidth,
    device_peak_flops,
    format_cell,
    loop_train_step,
    planned_bytes,
    process_settings,
    stepper,
)
from hybrid_jax.analysis.flops import count_macs, xla_cost
from hybrid_jax.registry import create_model, model_info
from hybrid_jax.runtime import configure_process


@dataclasses.dataclass(frozen=True)
class SuiteModel:
    """A model of the accelerator suite: its name in the issue, the registry's, its batch, its tiny stand-in."""

    label: str
    name: str
    batch: int
    smoke_name: str


# Batches: the largest power of two, at most 256, whose activations saved for the backward pass stay
# under ~40 GiB in bf16 (jaxpr residuals per image: ViT-B/16 152 MiB, Conformer-S 314, CoAtNet-0 419,
# MaxViT-T 533, Mobile-Former-508M 133, parallel_hybrid_s_224 72), so each step fits an 80 GB H100 with
# its temporaries and fills an H200 with work; experiments/benchmarks/README.md has the numbers.
ACCELERATOR_SUITE = (
    SuiteModel("ViT-B/16", "vit_base_patch16_224", 256, "test_vit"),
    SuiteModel("Conformer-S", "conformer_small_patch16", 128, "conformer_tiny_32"),
    SuiteModel("CoAtNet-0", "coatnet_0_224", 64, "test_coatnet"),
    SuiteModel("MaxViT-T", "maxvit_tiny_tf_224", 64, "test_maxvit"),
    SuiteModel("Mobile-Former-508M", "mobile_former_508m", 256, "mobile_former_tiny_32"),
    SuiteModel("parallel hybrid 224", "parallel_hybrid_s_224", 256, "parallel_hybrid_tiny"),
)
SMOKE_BATCH = 2
# Steps timed per row: warm-up steps, then windows of back-to-back steps, the median window counting.
SUITE_TIMING, SMOKE_TIMING = dict(warmup=2, windows=3, per_window=5), dict(warmup=1, windows=1, per_window=1)
# Model FLOPs of a train step per forward multiply-add: 2 per MAC, times 3 for forward + backward.
TRAIN_FLOPS_PER_MAC = 6
# The anchor: NVIDIA's JAX ViT-B/16 pre-training, ~1,460 img/s per H100 (989 TFLOP/s) in bf16; the goal: 50% MFU.
ANCHOR_IMG_S, GOAL_IMG_S, GOAL_MFU = 1460.0, 4700.0, 0.5
ANCHOR_MFU = ANCHOR_IMG_S * TRAIN_FLOPS_PER_MAC * 17.58e9 / 989e12  # ViT-B/16: 17.58 GMACs; ~15.6%
ANCHOR_MODEL = "vit_base_patch16_224"
ROW_PREFIX = "SUITE_ROW "  # marks the line a row's own process answers with
# The compile-ahead phase ends in time to leave each row this long to be timed from the cache: its process's
# start, the state's init, the step's lowering and cache load, and its steps. On the project's 2-core CPU,
# Conformer-S's stand-in took 16 s so, and lowering Conformer-S's own step 7.5 s.
MEASURE_FROM_CACHE_S = 25.0
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class SuiteRow:
    """One model and attention implementation of the suite: what was measured, or why nothing was."""

    label: str
    model: str
    attn_impl: str  # xla | cudnn | "-" (no attention)
    batch: int
    status: str = "ok"  # ok | unavailable | failed | skipped
    note: str = ""
    device_kind: str = ""
    jax_version: str = ""
    gmacs: float | None = None  # forward multiply-adds per image (the model's own count)
    setup_s: float | None = None  # the model, its initialised train state and the batch, on the device
    compile_s: float | None = None  # lowering + compiling the train step
    row_s: float | None = None  # the whole row, its process's start included: what it cost of the time budget
    step_ms: float | None = None
    xla_gb: float | None = None  # XLA's "bytes accessed" per step: each op's operands and outputs, once per op
    memory_floor_ms: float | None = None  # xla_gb over the device's memory bandwidth: the step if it only moved bytes
    train_img_s: float | None = None
    mfu: float | None = None  # TRAIN_FLOPS_PER_MAC * MACs * img/s over the device's bf16 peak
    vs_anchor: float | None = None  # ViT-B/16: img/s over 1,460; others: MFU over the anchor's
    vs_goal: float | None = None  # ViT-B/16: img/s over 4,700; others: MFU over 50%
    peak_gib: float | None = None
    memory_source: str = ""  # "memory_stats": the row's own process's allocator peak; "planned": XLA's plan
    param_dtypes: str = ""  # of the parameters the compiled step returns
    matmul_dtypes: str = ""  # operand dtypes of the step's dot_general / convolution ops, with counts
    step_cached: bool | None = None  # the row's process loaded its train step from the compilation cache
    ahead_compile_s: float | None = None  # the step's compile in the compile-ahead phase, alongside others
    measured_at: str = ""  # when the row was measured, UTC


_OPERANDS = re.compile(r":\s*\(tensor<(?:[0-9?]+x)*(\w+)>, tensor<(?:[0-9?]+x)*(\w+)>\)")


def _matmul_dtypes(stablehlo: str) -> dict[str, int]:
    """How many of the lowered step's matrix products and convolutions take each operand dtype pair.

    Keys: "bf16" or "f32" when both operands have it, "f32xbf16" (left x right) when they differ.
    """
    counts: dict[str, int] = {}
    for line in stablehlo.splitlines():
        if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
            match = _OPERANDS.search(line)
            if match:
                lhs, rhs = match.groups()
                key = lhs if lhs == rhs else f"{lhs}x{rhs}"
                counts[key] = counts.get(key, 0) + 1
    return counts


def _suite_model(name: str, impl: str) -> nn.Module:
    """`name` computing in bfloat16 with float32 parameters, with attention implementation `impl`."""
    return create_model(name, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                        **({} if impl == "-" else {"attn_impl": impl}))


@functools.cache
def _monitoring_events() -> collections.Counter:
    """jax.monitoring's events in this process from the first call on, counted: `[CACHE_HIT_EVENT]` is the
    persistent compilation cache's hits."""
    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
    return events


def _time_steps(compiled, state, batch, *, warmup: int, windows: int, per_window: int) -> tuple[float, Any]:
    """Median seconds per step over `windows` runs of `per_window` back-to-back steps, after `warmup` steps.

    Steps within a window are not synchronised with the host, as in training, so dispatch overlaps compute.

    Returns:
      (seconds per step, the state the last step returned).
    """
    run = stepper(compiled, state, batch)
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / per_window)
    return statistics.median(times), out[0]


def _peak_memory(compiled, own_process: bool) -> tuple[float, str]:
    """Peak device memory in GiB and its source: the allocator's peak in a process of its own, else XLA's plan."""
    stats = jax.local_devices()[0].memory_stats() if own_process else None
    if stats and "peak_bytes_in_use" in stats:  # the allocator's peak never resets: only meaningful per process
        return stats["peak_bytes_in_use"] / 2 ** 30, "memory_stats"
    return planned_bytes(compiled) / 2 ** 30, "planned"


def _measure_row(row: SuiteRow, *, smoke: bool, peak_tflops: float | None, own_process: bool,
                 compile_only: bool) -> None:
    """Fills `row` with its train step's compile time, rate, MFU, peak memory and dtypes (only the first
    and the last, and its setup, with `compile_only`)."""
    start = time.perf_counter()
    model = _suite_model(row.model, row.attn_impl)
    size = model_info(row.model).input_size
    jitted, state, batch = loop_train_step(model, size, row.batch)
    jax.block_until_ready(state)
    row.setup_s = time.perf_counter() - start
    start, hits = time.perf_counter(), _monitoring_events()[CACHE_HIT_EVENT]
    lowered = jitted.lower(state, batch)
    compiled = lowered.compile()
    row.compile_s = time.perf_counter() - start
    row.step_cached = _monitoring_events()[CACHE_HIT_EVENT] > hits
    row.matmul_dtypes = ", ".join(f"{k} {v}" for k, v in sorted(_matmul_dtypes(lowered.as_text()).items()))
    if compile_only:
        return
    # MACs of the same math through XLA's attention (cuDNN's is one opaque call to a MAC counter).
    twin = _suite_model(row.model, "xla" if row.attn_impl == "cudnn" else row.attn_impl)
    variables = jax.eval_shape(lambda s: {"params": s.params, "batch_stats": s.batch_stats}, state)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    row.gmacs = count_macs(lambda v, x: twin.apply(v, x, train=False), variables, image) / 1e9
    seconds, state = _time_steps(compiled, state, batch, **(SMOKE_TIMING if smoke else SUITE_TIMING))
    row.step_ms, row.train_img_s = seconds * 1e3, row.batch / seconds
    row.xla_gb = xla_cost(compiled, "bytes accessed") / 1e9
    bandwidth = device_memory_bandwidth(row.device_kind)
    row.memory_floor_ms = row.xla_gb * 1e9 / bandwidth * 1e3 if bandwidth else None
    row.peak_gib, row.memory_source = _peak_memory(compiled, own_process)
    row.param_dtypes = ", ".join(sorted({str(leaf.dtype) for leaf in jax.tree.leaves(state.params)}))
    peak = device_peak_flops(peak_tflops)
    row.mfu = TRAIN_FLOPS_PER_MAC * row.gmacs * 1e9 * row.train_img_s / peak if peak else None
    if row.model == ANCHOR_MODEL:  # the anchor and the goal are ViT-B/16 rates: compare rates
        row.vs_anchor, row.vs_goal = row.train_img_s / ANCHOR_IMG_S, row.train_img_s / GOAL_IMG_S
    elif row.mfu is not None:
        row.vs_anchor, row.vs_goal = row.mfu / ANCHOR_MFU, row.mfu / GOAL_MFU


def measure_suite_row(label: str, model: str, attn_impl: str, batch: int, *, smoke: bool = False,
                      peak_tflops: float | None = None, own_process: bool = False,
                      compile_only: bool = False) -> SuiteRow:
    """One row of the suite, measured in this process; an error becomes the row's note, not the suite's end.

    Args:
      own_process: this process runs this row alone, so the allocator's peak is the row's peak memory.
      compile_only: stop once the train step is compiled (the compile-ahead phase: the programs go to
        the compilation cache that the row's own process then reads).
    """
    row = SuiteRow(label, model, attn_impl, batch, device_kind=jax.devices()[0].device_kind,
                   jax_version=jax.__version__, measured_at=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
    if attn_impl == "cudnn" and jax.default_backend() != "gpu":
        row.status, row.note = "unavailable", f"cuDNN attention needs an NVIDIA GPU; this is {jax.default_backend()}"
        return row
    try:
        _measure_row(row, smoke=smoke, peak_tflops=peak_tflops, own_process=own_process, compile_only=compile_only)
    except Exception as error:  # out of memory, a shape cuDNN refuses: report it, go on
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        refused = row.attn_impl == "cudnn" and re.search(r"cudnn|cuDNN|flash", message)
        row.status = "unavailable" if refused else "failed"
        row.note = f"{type(error).__name__}: {message[:300]}"
    return row


def _unmeasured(kwargs: dict[str, Any], status: str, note: str) -> SuiteRow:
    """The row a plan (`measure_suite_row`'s keyword arguments) gets when nothing was measured, saying why."""
    return SuiteRow(kwargs["label"], kwargs["model"], kwargs["attn_impl"], kwargs["batch"], status=status, note=note)


# What a row's own process runs: the row's arguments come as JSON in argv[1], the row goes back on stdout.
_ROW_PROCESS = ("import dataclasses, json, sys; from hybrid_jax.analysis import accelerator as a; "
                "row = a.measure_suite_row(**json.loads(sys.argv[1]), own_process=True); "
                "print(a.ROW_PREFIX + json.dumps(dataclasses.asdict(row)), flush=True)")


def _row_in_own_process(kwargs: dict[str, Any], timeout_s: float, cache_dir: str | None = None) -> SuiteRow:
    """`measure_suite_row(**kwargs)` in a fresh Python process: its own allocator peak, and killable at the budget.

    Args:
      cache_dir: JAX's persistent compilation cache for the process, shared by the suite's rows (every
        program, however quick to compile): a model's cuDNN row then loads the train state's init program
        its XLA row compiled, and a row compiled ahead loads its step. JAX keeps XLA's per-fusion GPU
        autotuning results there too, so a compile stopped at the budget leaves what it tuned.
    """
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
    if cache_dir:
        environ.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if kwargs.get("compile_only"):  # it runs beside other rows' compiles: take device memory as needed
        environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    try:
        done = subprocess.run([sys.executable, "-c", _ROW_PROCESS, json.dumps(kwargs)], capture_output=True,
                              text=True, timeout=timeout_s, env=environ, check=False)
    except subprocess.TimeoutExpired:
        return _unmeasured(kwargs, "skipped", f"stopped after {timeout_s:.0f} s, at the end of the time budget")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(ROW_PREFIX):
            return SuiteRow(**json.loads(line[len(ROW_PREFIX):]))
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return _unmeasured(kwargs, "failed", f"its process exited with {done.returncode}: {last[:300]}")


def suite_plan(*, smoke: bool = False, patterns: list[str] | None = None,
               batch: int | None = None) -> list[dict[str, Any]]:
    """The suite's rows in the order they run: ViT-B/16 (the anchor) both ways, then every XLA row, then cuDNN.

    Each row is the keyword arguments of `measure_suite_row`; `patterns` keep the models whose registry
    name (or tiny stand-in's) matches one of them.
    """
    rows = []
    for entry in ACCELERATOR_SUITE:
        name = entry.smoke_name if smoke else entry.name
        if patterns and not any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(entry.name, p) for p in patterns):
            continue
        impls = ("xla", "cudnn") if hasattr(create_model(name), "attn_impl") else ("-",)
        rows += [dict(label=entry.label, model=name, attn_impl=impl, smoke=smoke,
                      batch=batch or (SMOKE_BATCH if smoke else entry.batch)) for impl in impls]
    first = [r for r in rows if r["model"] == rows[0]["model"]] if rows else []
    rest = [r for r in rows if r not in first]
    return first + [r for r in rest if r["attn_impl"] != "cudnn"] + [r for r in rest if r["attn_impl"] == "cudnn"]


def _key(row: SuiteRow | dict[str, Any]) -> tuple[str, str, int]:
    get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
    return get("model"), get("attn_impl"), get("batch")


def _compile_ahead(plans: list[dict[str, Any]], workers: int, until: float, cache_dir: str,
                   clock: Callable[[], float]) -> dict[tuple[str, str, int], SuiteRow]:
    """Compiles the train steps of `plans` into `cache_dir`, `workers` processes at once, each stopped at `until`.

    Returns:
      Each plan's compile-only row, by `_key`: "ok" with its compile seconds, or why not.
    """
    def compile_one(kwargs):
        left = until - clock()
        if left <= 0:
            return _unmeasured(kwargs, "skipped", "not compiled ahead: the compile-ahead phase was over")
        return _row_in_own_process({**kwargs, "compile_only": True}, left, cache_dir)

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:  # threads only wait on their processes
        return {_key(kwargs): row for kwargs, row in zip(plans, pool.map(compile_one, plans))}


def run_suite(*, smoke: bool = False, patterns: list[str] | None = None, batch: int | None = None,
              time_budget_s: float = 450.0, own_processes: bool | None = None, peak_tflops: float | None = None,
              measured: list[SuiteRow] | None = None, refresh: bool = False, compile_ahead: int = 0,
              clock: Callable[[], float] = time.monotonic, log: Callable[[str], Any] = print,
              progress: Callable[[list[SuiteRow]], Any] | None = None) -> list[SuiteRow]:
    """The accelerator suite's rows (see `suite_plan`), stopping itself within `time_budget_s`.

    A row starts only with time left (10 s outside smoke mode); in its own process (the default outside
    smoke mode) it is stopped when the budget ends, and the rows' processes share a compilation cache for
    the run. Rows not run are kept, with a note saying why. A row of `measured` (an earlier table's
    measured rows, `read_measured`) with the same model, attention and batch is kept as it was instead
    of run again; with `refresh` it is run again after the rows `measured` lacks, and replaced only by a
    measurement that succeeds (the code measured may have changed since; the old one is the fallback).

    With `compile_ahead` N > 0 (rows in their own processes only), the rows to run first have their train
    steps compiled into that cache, N processes at once, until `MEASURE_FROM_CACHE_S` per row `measured`
    lacks (per row to run, where it lacks none) is left of the budget; then each row is timed alone, as
    without it, loading its step from the cache (a compile stopped or failed there is done again in the
    row's own process). No step is timed while others compile.

    `progress`, if given, gets the table as it stands after each row: the rows run so far, and the
    earlier table's rows not (yet) run again.

    Returns:
      The rows in the suite's model order, each model's XLA row before its cuDNN row.
    """
    own_processes = not smoke if own_processes is None else own_processes
    if compile_ahead and not own_processes:
        raise ValueError("compile_ahead needs each row in its own process: it hands the rows their steps "
                         "through the compilation cache; leave out --in_process (or --compile_ahead)")
    deadline, min_left = clock() + time_budget_s, 0.0 if smoke else 10.0
    plans = [{**kwargs, "peak_tflops": peak_tflops}
             for kwargs in suite_plan(smoke=smoke, patterns=patterns, batch=batch)]
    planned = {_key(kwargs) for kwargs in plans}
    earlier = {_key(r): r for r in measured or [] if _key(r) in planned}
    order = [e.smoke_name if smoke else e.name for e in ACCELERATOR_SUITE]
    in_table_order = lambda rows: sorted(rows, key=lambda r: (order.index(r.model), r.attn_impl == "cudnn"))
    missing = [kwargs for kwargs in plans if _key(kwargs) not in earlier]
    to_run = missing + ([kwargs for kwargs in plans if _key(kwargs) in earlier] if refresh else [])
    rows = {}
    with tempfile.TemporaryDirectory(prefix="suite_compilation_cache_") as cache_dir:
        ahead = {}
        if compile_ahead and to_run:
            started = clock()
            until = deadline - MEASURE_FROM_CACHE_S * (len(missing) or len(to_run))  # the table's gaps come first
            ahead = _compile_ahead(to_run, compile_ahead, until, cache_dir, clock)
            done = [r for r in ahead.values() if r.status == "ok"]
            log(f"compile-ahead phase: {len(done)} of {len(to_run)} train step(s) compiled, {compile_ahead} at "
                f"once, in {clock() - started:.0f} s: "
                + "; ".join(f"{r.model} {r.attn_impl} " + (f"{r.compile_s:.0f} s" if r.status == "ok" else r.status)
                            for r in ahead.values()))
        for kwargs in to_run:
            started, left, kept = clock(), deadline - clock(), earlier.get(_key(kwargs))
            if left <= min_left:
                row = _unmeasured(kwargs, "skipped", f"not started: the {time_budget_s:g} s time budget was spent")
            else:
                row = _row_in_own_process(kwargs, left, cache_dir) if own_processes else measure_suite_row(**kwargs)
                row.row_s = clock() - started
                compiled = ahead.get(_key(kwargs))
                if compiled and compiled.status == "ok":
                    row.ahead_compile_s = compiled.compile_s
            line = suite_table([row]).splitlines()[-1]
            if kept and row.status != "ok":
                row, line = kept, f"{line} (its earlier measurement, of {kept.measured_at or 'an earlier run'}, kept)"
            log(line)
            rows[_key(kwargs)] = row
            if progress:
                progress(in_table_order({**earlier, **rows}.values()))
    for key in [key for key in earlier if key not in rows]:  # in the earlier table, not run
        log(suite_table([earlier[key]]).splitlines()[-1] + " (kept from the earlier table)")
        rows[key] = earlier[key]
    return in_table_order(rows.values())


_SUITE_COLUMNS: list[tuple[str, Callable[[SuiteRow], str]]] = [
    ("model", lambda r: r.label), ("registry name", lambda r: r.model), ("attn", lambda r: r.attn_impl),
    ("batch", lambda r: str(r.batch)), ("setup s", lambda r: format_cell(r.setup_s, ".1f")),
    ("compile s", lambda r: format_cell(r.compile_s, ".1f")),
    ("cached", lambda r: "-" if r.step_cached is None else ("yes" if r.step_cached else "no")),
    ("ahead s", lambda r: format_cell(r.ahead_compile_s, ".1f")), ("row s", lambda r: format_cell(r.row_s, ".0f")),
    ("step ms", lambda r: format_cell(r.step_ms, ".1f")), ("XLA GB", lambda r: format_cell(r.xla_gb, ".3g")),
    ("HBM floor ms", lambda r: format_cell(r.memory_floor_ms, ".1f")),
    ("train img/s", lambda r: format_cell(r.train_img_s, ",.0f")),
    ("GMACs/img", lambda r: format_cell(r.gmacs, ".3g")), ("MFU", lambda r: format_cell(r.mfu, ".1%")),
    ("x anchor", lambda r: format_cell(r.vs_anchor, ".2f")), ("x goal", lambda r: format_cell(r.vs_goal, ".2f")),
    ("peak GiB", lambda r: format_cell(r.peak_gib, ".3g")), ("memory", lambda r: r.memory_source or "-"),
    ("params", lambda r: r.param_dtypes or "-"), ("matmuls", lambda r: r.matmul_dtypes or "-"),
    ("measured (UTC)", lambda r: r.measured_at or "-"),
    ("note", lambda r: (r.status if r.status != "ok" else "") + (f": {r.note}" if r.note else "")),
]


def suite_table(rows: list[SuiteRow]) -> str:
    """The suite's rows as a markdown table (pipes in notes escaped)."""
    line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    text = {"model", "registry name", "attn", "cached", "memory", "params", "matmuls", "measured (UTC)", "note"}
    rule = "|" + "".join("---|" if h in text else "---:|" for h, _ in _SUITE_COLUMNS)
    return "\n".join([line(h for h, _ in _SUITE_COLUMNS), rule, *(line(cell(r) for _, cell in _SUITE_COLUMNS)
                                                                   for r in rows)])


def suite_header(rows: list[SuiteRow], *, smoke: bool, time_budget_s: float, elapsed_s: float,
                 peak_tflops: float | None, kept: int = 0, compile_ahead: int = 0,
                 partial: bool = False) -> list[str]:
    """What the table measured, how, and on what: the lines above it (`partial`: for the table written
    after each row, which the final one replaces)."""
    kind = next((r.device_kind for r in rows if r.device_kind), "") or jax.devices()[0].device_kind
    peak, bandwidth = device_peak_flops(peak_tflops, kind), device_memory_bandwidth(kind)
    timing = SMOKE_TIMING if smoke else SUITE_TIMING
    versions = sorted({r.jax_version for r in rows if r.jax_version}) or [jax.__version__]
    return [
        f"device: {kind}; bf16 peak for MFU: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (--peak_tflops)'}; "
        f"memory bandwidth for the HBM floor: {f'{bandwidth / 1e12:g} TB/s' if bandwidth else 'unknown'}; "
        f"jax {', '.join(versions)}; process settings: {process_settings()}"
        + ("; SMOKE RUN (tiny stand-ins, batch 2): the path, not the numbers" if smoke else ""),
        "Train step: the training loop's own (AdamW, flip augmentation, EMA off), bfloat16 compute with float32 "
        f"parameters, one device; img/s = batch over the median step time of {timing['windows']} window(s) of "
        f"{timing['per_window']} unsynchronised step(s) after {timing['warmup']} warm-up step(s). MFU = 6 x forward "
        "MACs (the model's own count) x img/s / peak. Peak memory: the allocator's peak in the row's own process "
        "(memory_stats), else XLA's planned bytes (planned). XLA GB: the bytes XLA's cost analysis counts the step "
        "moving (each op's operands and outputs, once per op); HBM floor ms: those bytes over the device's memory "
        "bandwidth, the step's time were it bound by memory traffic alone. Matmuls: operand dtypes of the step's "
        "matrix products and convolutions as lowered, with counts (f32xbf16: an f32 gradient times bf16 activations).",
        f"Anchor: NVIDIA's JAX ViT-B/16 pre-training, {ANCHOR_IMG_S:,.0f} img/s per H100 in bf16 "
        f"({ANCHOR_MFU:.1%} MFU); goal: {GOAL_MFU:.0%} MFU ({GOAL_IMG_S:,.0f} img/s for ViT-B/16). 'x anchor' and "
        "'x goal': ViT-B/16 by img/s, the other models by MFU.",
        (f"PARTIAL TABLE, written {elapsed_s:.0f} s into a {time_budget_s:g} s time budget: the run ended before "
         "its last row, and the rows it had not reached are missing" if partial else
         f"Time budget {time_budget_s:g} s; the suite took {elapsed_s:.0f} s")
        + (f", keeping {kept} row(s) measured by an earlier run (--resume)." if kept else ".")
        + " Setup s: building the model, its initialised train state and the batch; compile s: lowering and "
        "compiling the train step in the row's process, or loading it where 'cached' says it came from the run's "
        "compilation cache; row s: the whole row, its process's start included."
        + (f" Ahead s: the step's compile in the compile-ahead phase (--compile_ahead {compile_ahead}: up to "
           f"{compile_ahead} rows' steps compiled at once before any row was timed, so XLA's autotuning timed "
           "its kernels beside other compiles)." if compile_ahead else ""),
    ]


def device_slug(kind: str) -> str:
    """A folder name for a device kind: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "unknown"


def write_suite(rows: list[SuiteRow], header: list[str], out_dir: str | os.PathLike) -> Path:
    """Writes OUT_DIR/<device>/accelerator.md and .json; returns the .md path."""
    kind = next((r.device_kind for r in rows if r.device_kind), "") or jax.devices()[0].device_kind
    folder = Path(out_dir) / device_slug(kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "accelerator.md").write_text(
        f"# Accelerator suite: {kind}\n\n" + "\n\n".join(header) + "\n\n" + suite_table(rows) + "\n")
    (folder / "accelerator.json").write_text(json.dumps(
        {"device_kind": kind, "header": header, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    return folder / "accelerator.md"


def _device_kind(own_process: bool) -> str:
    """This machine's first device kind; from a child process when rows run in their own, so that this
    process never takes the accelerator's memory from them."""
    if not own_process:
        return jax.devices()[0].device_kind
    done = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def resume_table(path: str | os.PathLike) -> Path:
    """The earlier table `--resume PATH` names, checked to exist before any device is asked for its kind.

    PATH is an accelerator.json, or a benchmarks folder (experiments/benchmarks) holding this device's
    table as <device>/accelerator.json.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such file or folder; give the accelerator.json of an earlier "
                                "run on this device kind or the benchmarks folder holding it, or leave --resume out")
    return path


def read_measured(path: Path, device_kind: str) -> list[SuiteRow]:
    """The measured rows of an earlier table of this device kind: PATH's own, or, for a folder, the table of
    this device's folder in it (none yet: no rows)."""
    if path.is_dir():
        path = path / device_slug(device_kind) / "accelerator.json"
        if not path.is_file():
            return []
    table = json.loads(path.read_text())
    if table.get("device_kind") != device_kind:
        raise ValueError(f"--resume {path} was measured on {table.get('device_kind')!r}, and this is {device_kind!r}: "
                         f"give this device's table (experiments/benchmarks/{device_slug(device_kind)}/"
                         "accelerator.json), or leave --resume out")
    return [row for row in (SuiteRow(**fields) for fields in table["rows"]) if row.status == "ok"]


def main(argv: list[str] | None = None) -> None:
    """Runs, prints and (outside smoke mode, or with --out_dir) writes the suite's table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated patterns: keep only the suite's models that "
                                                      "match (registry name or tiny stand-in)")
    parser.add_argument("--batch", type=int, default=None, help="one batch for every model (default: each its own)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device bf16 peak for MFU, TFLOP/s")
    parser.add_argument("--smoke", action="store_true", help="the tiny stand-ins at batch 2, on any device")
    parser.add_argument("--time_budget_s", type=float, default=450.0,
                        help="rows not finished by then are stopped or skipped, with a note")
    parser.add_argument("--in_process", action="store_true",
                        help="run every row in this process (peak memory is then XLA's plan)")
    parser.add_argument("--out_dir", default="", help="write OUT_DIR/<device>/accelerator.md and .json "
                                                      "(default experiments/benchmarks; nothing in smoke mode)")
    parser.add_argument("--library", action="store_true",
                        help="run without the command line's process settings (hybrid_jax/runtime.py)")
    parser.add_argument("--compile_ahead", type=int, default=0, metavar="N",
                        help="first compile the rows' train steps, N processes at once, into the run's compilation "
                        "cache; then time each row alone from it (0: compile each in its row)")
    parser.add_argument("--resume", default="", help="an earlier accelerator.json of this device kind, or the "
                        "benchmarks folder holding this device's: keep its measured rows, run only the others")
    parser.add_argument("--refresh", action="store_true", help="with --resume: after the rows it lacks, measure "
                        "its rows again too, each kept where its new measurement does not succeed")
    args = parser.parse_args(argv)
    start = time.monotonic()
    patterns = [p.strip() for p in args.models.split(",")] if args.models else None
    own_processes = not (args.in_process or args.smoke)
    if args.compile_ahead and not own_processes:
        parser.error("--compile_ahead hands each row's process its step through the compilation cache: "
                     "it cannot go with --in_process or --smoke (which run the rows in this process)")
    measured = read_measured(resume_table(args.resume), _device_kind(own_processes)) if args.resume else []
    print(f"accelerator suite{' (smoke)' if args.smoke else ''}: time budget {args.time_budget_s:g} s"
          + (f"; {len(measured)} measured row(s) in {args.resume}" if args.resume else ""), flush=True)
    out_dir = args.out_dir or (None if args.smoke else "experiments/benchmarks")
    header = lambda rows, partial=False: suite_header(
        rows, smoke=args.smoke, time_budget_s=args.time_budget_s, elapsed_s=time.monotonic() - start,
        peak_tflops=args.peak_tflops, kept=sum(row in measured for row in rows), compile_ahead=args.compile_ahead,
        partial=partial)

    def save_partial(rows: list[SuiteRow]) -> None:
        """The table so far, so that a run stopped from outside keeps its rows (--resume reads them)."""
        if any(row.device_kind for row in rows):  # the device is never asked here: the rows' processes hold it
            write_suite(rows, header(rows, partial=True), out_dir)

    rows = run_suite(smoke=args.smoke, patterns=patterns, batch=args.batch, time_budget_s=args.time_budget_s,
                     own_processes=own_processes, peak_tflops=args.peak_tflops, measured=measured,
                     refresh=args.refresh, compile_ahead=args.compile_ahead, log=lambda text: print(text, flush=True),
                     progress=save_partial if out_dir else None)
    print("\n" + "\n".join(header(rows)) + "\n\n" + suite_table(rows))
    if out_dir:
        print(f"wrote {write_suite(rows, header(rows), out_dir)}")


if __name__ == "__main__":
    if "--library" not in sys.argv[1:]:  # before anything else: configure_process may re-execute this process
        configure_process()
    main()
