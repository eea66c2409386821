"""Where a run's train step spends its time: XLA's ops by kind and by model module, from a profiler trace.

  python -m hybrid_jax.analysis.step_profile --config configs/fashion_mnist.py [--set key=value ...] [--steps 10]
  python -m hybrid_jax.analysis.step_profile --model levit_256 [--batch 8] [--steps 3]

Builds the run the command line would from the same config (`--set learning_rate=6e-3`,
`--set model.embed_dim=64`: values parsed as the command line parses a model field), compiles its
train step, times it on a random batch, traces `--steps` more with jax.profiler and sums each XLA
op's time in the trace (on a GPU, the time of the kernels each op launched, found through the op their
annotation names). `--model` profiles instead the plain SGD step that `benchmark --torch --train`
races against PyTorch's, for a registered model at its default input size.
Each op is attributed to the module its HLO metadata names (`blocks_1/attn`), forward or backward.
Op time is per device (a mesh of N runs the program N times); it can exceed the step where ops
overlap on a device's threads, and falls short of it by what the device waits between ops. The
command line's process settings apply (`runtime.configure_process`).
"""

import argparse
import collections
import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np

from hybrid_jax.runtime import configure_process

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MODULE = re.compile(r"HloModule ([^\s,]+)")
_ANNOTATED_OP = re.compile(r"[#,]hlo_op=([^,#]+)")
_ANNOTATED_MODULE = re.compile(r"[#,]hlo_module=([^,#]+)")


@dataclasses.dataclass
class StepProfile:
    """A train step's wall time and its ops' summed time, in seconds per step."""

    model: str
    batch: int
    step_s: float  # best of the timed steps
    op_s: dict[tuple[str, str], float]  # (op name, HLO op_name metadata) -> seconds per step and device

    def by_kind(self) -> collections.Counter:
        """Seconds per step by op kind: the instruction name without its number (`transpose_copy_fusion`)."""
        kinds = collections.Counter()
        for (name, _), seconds in self.op_s.items():
            kinds[re.sub(r"\.\d+$", "", name)] += seconds
        return kinds

    def by_module(self, depth: int = 2) -> collections.Counter:
        """Seconds per step by (forward | backward | - for ops without metadata, module path to `depth` names)."""
        modules = collections.Counter()
        for (_, op_name), seconds in self.op_s.items():
            direction = "backward" if "transpose(" in op_name else "forward" if op_name else "-"
            modules[(direction, module_path(op_name, depth))] += seconds
        return modules


def module_path(op_name: str, depth: int) -> str:
    """The module scope in an op's metadata: "jit(train_step)/jvp(M)/M.forward/blocks_1/attn/vmap()/reduce_max"
    gives "blocks_1/attn" at depth 2. Transformations ("vmap()"), methods of the top model ("M.forward") and
    the primitive itself (the last name) are not modules; an op outside every module is "(step)", one XLA
    made without metadata (a layout copy, say) "(XLA)"."""
    if not op_name:
        return "(XLA)"
    names = op_name.split("/")[:-1]
    top = names[1].split("(")[-1].rstrip(")").split(".")[0] if len(names) > 1 and "(" in names[1] else None
    scope = [n for n in names if "(" not in n and not (top and n.startswith(top + "."))]
    return "/".join(scope[:depth]) or "(step)"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its op_name metadata ("" where XLA made it without one, as layout copies), for every
    instruction of a compiled module's text."""
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            names.setdefault(match.group(1), op_name.group(1) if op_name else "")
    return names


def traced_op(event) -> tuple[str, str | None]:
    """The HLO instruction a profiler event ran, and its module where the trace says: from the `hlo_op` and
    `hlo_module` stats of XLA:CPU's events, or from the annotation a GPU kernel carries
    ("XlaModule:#hlo_module=jit_step#::Thunk:#name=blocks_1/attn,hlo_op=fusion.6#", the innermost op);
    else the event's own name."""
    op, module = event.name, None
    for key, value in event.stats:
        if key == "hlo_op":
            op = value
        elif key == "hlo_module":
            module = value
        elif isinstance(value, str) and "hlo_op=" in value:
            op = _ANNOTATED_OP.findall(value)[-1]
            module = (_ANNOTATED_MODULE.findall(value) or [module])[-1]
    return op, module


def op_seconds(trace_dir: str | Path, hlo_text: str) -> collections.Counter:
    """Total seconds of each traced event that ran an instruction of the compiled module `hlo_text`, keyed
    (name, op_name metadata). Where an accelerator's plane ("/device:GPU:0") has such events, only its
    events count: the kernels' time on the device, not the host's launches of them."""
    from jax.profiler import ProfileData

    op_names, module = hlo_op_names(hlo_text), _MODULE.search(hlo_text)
    module = module.group(1) if module else None
    host, device = collections.Counter(), collections.Counter()
    for path in Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            totals = device if plane.name.startswith("/device:") else host
            for line in plane.lines:
                for event in line.events:
                    op, event_module = traced_op(event)
                    if op in op_names and event_module in (None, module):
                        totals[(op, op_names[op])] += event.duration_ns * 1e-9
    return device or host


def load_config(spec: str, assignments: list[str]) -> ml_collections.ConfigDict:
    """A config file's `get_config(arg)` ("configs/fashion_mnist.py:smoke"), with `key=value` assignments."""
    from hybrid_jax.train.config import load_config_file, parse_value, set_model_fields

    config = load_config_file(spec)
    model_fields = {}
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        if key.startswith("model."):
            model_fields[key.removeprefix("model.")] = text
            continue
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if last not in node:
            raise KeyError(f"--set {assignment}: the config has no key {key!r}")
        node[last] = parse_value(text, node.get_ref(last).get_type())
    set_model_fields(config, model_fields)
    return config


def _time_and_trace(run_steps: Callable[[int], None], compiled, steps: int, timed: int) -> tuple[float, dict]:
    """The best of `timed` rounds of `steps` steps (seconds per step), and each op's seconds per step in a trace
    of `steps` more; `run_steps(n)` runs n steps of `compiled` and waits for them."""
    run_steps(2)
    best = float("inf")
    for _ in range(timed):
        start = time.perf_counter()
        run_steps(steps)
        best = min(best, (time.perf_counter() - start) / steps)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run_steps(steps)
        totals = op_seconds(trace_dir, compiled.as_text())
    return best, {key: seconds / steps for key, seconds in totals.items()}


def profile_step(config: ml_collections.ConfigDict, steps: int = 10, timed: int = 5) -> StepProfile:
    """Compiles the run's train step, times `timed` rounds of `steps` steps, then traces `steps` more."""
    from hybrid_jax.train.loop import build_run

    run = build_run(config)
    state = [run.build_state()]
    shape = run.task.image_shape
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (config.batch_size, *shape), dtype=np.uint8),
            "label": rng.integers(0, run.model.num_classes, (config.batch_size,), dtype=np.int32)}
    batch = run.placement.global_batch(host)
    compiled = run.train_step.lower(state[0], batch).compile()

    def run_steps(count):
        for _ in range(count):
            state[0], metrics = compiled(state[0], batch)
        jax.block_until_ready(metrics)

    best, op_s = _time_and_trace(run_steps, compiled, steps, timed)
    devices = run.placement.mesh.size  # each runs the same program: op time per device
    return StepProfile(config.model.name, config.batch_size, best,
                       {key: seconds / devices for key, seconds in op_s.items()})


def profile_sgd_step(name: str, batch: int = 8, steps: int = 3, timed: int = 5) -> StepProfile:
    """The same for the plain SGD step that `benchmark --torch --train` runs beside PyTorch's, on one device."""
    from hybrid_jax.analysis.benchmark import compiled_sgd_step
    from hybrid_jax.registry import create_model, model_info

    model, size = create_model(name), model_info(name).input_size
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, model.num_classes, batch).astype(np.int32)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images[:1], train=False)
    compiled, state = compiled_sgd_step(model, variables, images, labels)

    def run_steps(count):
        for _ in range(count):
            *state[:], _ = compiled(*state, images, labels)
        jax.block_until_ready(state)

    return StepProfile(name, batch, *_time_and_trace(run_steps, compiled, steps, timed))


def report(profile: StepProfile, top: int = 20, depth: int = 2) -> str:
    """Two markdown tables: ms per step by op kind and by module, each with its share of all op time."""
    total = sum(profile.op_s.values())
    lines = [f"{profile.model}, batch {profile.batch}: train step {profile.step_s * 1e3:.1f} ms "
             f"({profile.batch / profile.step_s:.0f} img/s), op time {total * 1e3:.1f} ms per step and device", "",
             "| op kind | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| {kind} | {s * 1e3:.2f} | {s / total:.1%} |" for kind, s in profile.by_kind().most_common(top)]
    lines += ["", "| pass | module | ms/step | share |", "|---|---|---:|---:|"]
    lines += [f"| {direction} | {module} | {s * 1e3:.2f} | {s / total:.1%} |"
              for (direction, module), s in profile.by_module(depth).most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a config file, with ':arg' if it takes one: the run's own train step")
    source.add_argument("--model", help="a registered model: the SGD step `benchmark --torch --train` times")
    parser.add_argument("--batch", type=int, default=8, help="batch of the --model step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config key (repeatable); model.FIELD sets a model field")
    parser.add_argument("--steps", type=int, help="steps per timed round, and steps traced "
                        "(default: 10 for --config, 3 for --model)")
    parser.add_argument("--top", type=int, default=20, help="rows per table")
    parser.add_argument("--depth", type=int, default=2, help="module names kept in the module column")
    args = parser.parse_args(argv)
    if args.model:
        profile = profile_sgd_step(args.model, args.batch, args.steps or 3)
    else:
        profile = profile_step(load_config(args.config, args.set), args.steps or 10)
    print(report(profile, args.top, args.depth))


if __name__ == "__main__":
    configure_process()
    main()
