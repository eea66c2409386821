"""Benchmarks of registered models on the current device: cost, compile time, throughput, memory, MFU.

  python -m hybrid_jax.analysis.benchmark --models 'conformer*,tccnet*' --batch 32 [--train] [--attn xla,cudnn]
      [--dtype bfloat16] [--out results/bench]
  python -m hybrid_jax.analysis.benchmark --models 'resnet50' --batch 8 --torch   # against PyTorch on this CPU

Per model and attention implementation: parameters and GMACs (beside the paper's),
the compile time of the jitted forward (and train step), inference (and training)
images per second as the median of timed steps after a warm-up, each ended by
`block_until_ready`, the memory XLA plans for the program, and the model FLOP
utilisation: the compiled program's flops (XLA cost analysis) per second over the
device's peak. The peak is only known for the accelerators in `PEAK_TFLOPS` (bf16
dense); elsewhere pass `--peak_tflops` or MFU is left out. The train step is the
training loop's own (`hybrid_jax.train.step.train_step`: augmentation, AdamW, EMA off).

`--torch` also runs the same model in PyTorch on the host CPU: timm's model of the
same name with random weights, converted into ours with `hybrid_jax.convert` so both
hold identical weights (the largest logit difference is reported). Both run inference
at the same batch in float32, PyTorch in eval mode under `torch.inference_mode()` with
as many threads as XLA's CPU backend uses, their timed steps alternating so both see
the same machine load; the table gains our CPU img/s, PyTorch's, and their ratio.
Only families with a converter (`hybrid_jax.convert.converter_module`) and names timm
knows can be compared; others are benchmarked without PyTorch, with a note saying why.
"""

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.analysis.flops import count_macs
from hybrid_jax.registry import create_model, list_models, model_info
from hybrid_jax.runtime import configure_process

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; H100 PCIe is about 756).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


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
    category: str = ""  # the survey's category in the registry: cnn, vit, serial, parallel, hierarchical


class TorchUnavailable(ValueError):
    """A model that cannot be compared with PyTorch here (no converter, unknown to timm, no torch)."""


def device_peak_flops(override_tflops: float | None = None) -> float | None:
    """The device's peak FLOP/s: the override, or the table entry its kind names, or None."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), None)


def _planned_bytes(compiled) -> int:
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


def _median_seconds(run, steps: int) -> float:
    """Median wall time of `run()` over `steps` calls, after one untimed warm-up call."""
    jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _compare_with_torch(model: nn.Module, reference: Any, variables: dict, images: np.ndarray,
                        steps: int) -> tuple[float, float, float, int]:
    """Ours and PyTorch's inference on the host CPU: (our img/s, PyTorch img/s, max |logit diff|, threads)."""
    import torch

    cpu = jax.devices("cpu")[0]
    variables, x = jax.device_put((variables, images), cpu)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    torch_logits = lambda: getattr(out := reference(x_torch), "logits", out)
    saved_threads, threads = torch.get_num_threads(), jax_cpu_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ours, theirs = np.asarray(compiled(variables, x)), torch_logits().float().numpy()  # also the warm-up
            ours_s, theirs_s = [], []
            for _ in range(steps):  # alternating, so a busy machine slows both alike
                start = time.perf_counter()
                jax.block_until_ready(compiled(variables, x))
                ours_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                torch_logits()
                theirs_s.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved_threads)
    batch = len(images)
    return (batch / statistics.median(ours_s), batch / statistics.median(theirs_s),
            float(np.max(np.abs(ours - theirs))), threads)


def _model_and_impls(name: str, impls: list[str], dtype) -> list[tuple[nn.Module, str]]:
    """One model per attention implementation it can run here ("-" for models without attention)."""
    probe = create_model(name)
    if not hasattr(probe, "attn_impl"):
        return [(create_model(name, dtype=dtype), "-")]
    runnable = [impl for impl in impls if impl != "cudnn" or jax.default_backend() == "gpu"]
    return [(create_model(name, dtype=dtype, attn_impl=impl), impl) for impl in runnable]


def _train_step(model: nn.Module, size: int, batch: int, peak: float | None, steps: int):
    from hybrid_jax.data.augment import AugmentConfig
    from hybrid_jax.parallel.mesh import make_mesh
    from hybrid_jax.parallel.rules import DEFAULT_RULES
    from hybrid_jax.train.config import default_config
    from hybrid_jax.train.optim import make_optimizer
    from hybrid_jax.train.state import create_train_state
    from hybrid_jax.train.step import train_step

    tx, schedule = make_optimizer(default_config(), 1000)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, _ = create_train_state(model, tx, (size, size, 3), seed=0, use_ema=False, mesh=mesh, rules=DEFAULT_RULES)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, model.num_classes, (batch,), dtype=np.int32))
    step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, augment=AugmentConfig(),
                             num_classes=model.num_classes, label_smoothing=0.1, ema_decay=0.0, grad_accum_steps=1)
    batch_ = {"image": images, "label": labels}
    compiled, compile_s = _timed_compile(step, state, batch_)
    seconds = _median_seconds(lambda: compiled(state, batch_)[1]["loss"], steps)
    mfu = _flops(compiled) / seconds / peak if peak else None
    return compile_s, batch / seconds, _planned_bytes(compiled), mfu


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
        model under another name or with other arguments).

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
                        entry.paper and entry.paper.gmacs, compile_s, batch / seconds, _planned_bytes(compiled),
                        _flops(compiled) / seconds / peak if peak else None)
        result.category = entry.category
        if train:
            result.train_compile_s, result.train_img_s, result.train_bytes, result.train_mfu = _train_step(
                model, size, batch, peak, steps)
        if pair:
            result.cpu_img_s, result.torch_img_s, result.torch_max_diff, result.torch_threads = _compare_with_torch(
                model, *pair, host_images, steps)
            result.torch_ratio = result.cpu_img_s / result.torch_img_s
        results.append(result)
    return results


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table; PyTorch columns appear when any result has them."""
    with_torch = any(r.torch_img_s is not None for r in results)
    header = ("| model | category | attn | params | paper M | GMACs | paper GMACs | compile s | infer img/s | "
              "infer GiB | infer MFU | train compile s | train img/s | train GiB | train MFU |")
    if with_torch:
        header += " CPU img/s | PyTorch CPU img/s | ours/PyTorch | max abs diff |"
    rows = [header, "|---|---|---|" + "---:|" * (16 if with_torch else 12)]
    gib = lambda b: None if b is None else b / 2 ** 30
    for r in results:
        row = (f"| {r.model} | {r.category or '-'} | {r.attn_impl} | {r.params:,} | {_cell(r.paper_params_m, '.3f')} | "
               f"{r.gmacs:.3f} | {_cell(r.paper_gmacs, '.3f')} | {r.compile_s:.1f} | {r.infer_img_s:.1f} | "
               f"{gib(r.infer_bytes):.2f} | {_cell(r.infer_mfu, '.1%')} | {_cell(r.train_compile_s, '.1f')} | "
               f"{_cell(r.train_img_s, '.1f')} | {_cell(gib(r.train_bytes), '.2f')} | "
               f"{_cell(r.train_mfu, '.1%')} |")
        if with_torch:
            row += (f" {_cell(r.cpu_img_s, '.1f')} | {_cell(r.torch_img_s, '.1f')} | {_cell(r.torch_ratio, '.2f')} | "
                    f"{_cell(r.torch_max_diff, '.1e')} |")
        rows.append(row)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True,
                        help="comma-separated shell-style patterns over registered names: 'conformer*,tccnet*'")
    parser.add_argument("--category", default=None, help="only models of this category (serial, parallel, ...)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--attn", default="xla", help="comma-separated: xla,cudnn (cudnn only on GPU)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--train", action="store_true", help="also time the training step")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU, TFLOP/s")
    parser.add_argument("--torch", action="store_true",
                        help="also run timm's model with the same (random, converted) weights on this CPU and "
                             "report both img/s and their ratio (float32; needs the parity extra)")
    parser.add_argument("--out", default="", help="write OUT.md and OUT.json")
    args = parser.parse_args(argv)
    names = sorted({name for pattern in args.models.split(",") for name in list_models(pattern.strip(),
                                                                                        category=args.category)})
    if not names:
        raise SystemExit(f"no registered model matches {args.models!r}; see hybrid_jax.list_models()")
    peak = device_peak_flops(args.peak_tflops)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), peak for MFU: "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}", flush=True)
    if args.torch:
        print(f"PyTorch comparison on the host CPU with {jax_cpu_threads()} threads (XLA's CPU threads)", flush=True)
    results = []
    for name in names:
        kwargs = dict(batch=args.batch, impls=tuple(args.attn.split(",")), dtype=args.dtype, steps=args.steps,
                      train=args.train, peak_tflops=args.peak_tflops)
        try:
            results += benchmark(name, torch=args.torch, **kwargs)
        except TorchUnavailable as error:  # raised before anything is timed
            print(f"{name}: no PyTorch comparison: {error}", flush=True)
            results += benchmark(name, **kwargs)
        print(markdown_table(results[-1:]).splitlines()[-1], flush=True)
    table = markdown_table(results)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    configure_process()
    main()
