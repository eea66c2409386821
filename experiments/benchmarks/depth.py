"""What depth costs: train-step compile time (block loop vs scan) and XLA's temp memory (remat none | block | full).

  python experiments/benchmarks/depth.py --out experiments/benchmarks/cpu_2core/depth.md
  python experiments/benchmarks/depth.py --compile_models test_vit --memory_models test_vit --batch 8 --size 32

Everything is compiled from shapes alone (nothing runs), so the memory figures are XLA's plan for the
step on this backend: `compiled.memory_analysis().temp_size_in_bytes`, the activations and workspace
beyond parameters, gradients and inputs. XLA:CPU's plan does not shrink with remat (even for a plain
`jax.checkpoint` over an MLP), so on CPU the memory table shows the cost of remat's extra buffers,
not its saving; run it on an accelerator for that. The step is the loop's: softmax cross-entropy, gradients of
every parameter, train mode (dropout, stochastic depth, batch statistics).
"""

import argparse
import dataclasses
import datetime
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hybrid_jax import create_model, model_info


def _train_step(model: nn.Module):
    def loss(params, others, images, labels):
        logits, _ = model.apply({"params": params, **others}, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(0)})
        logits = logits[0] if isinstance(logits, tuple) else logits  # two-head models: the first head suffices
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.jit(jax.grad(loss))


def compiled_step(name: str, batch: int, size: int | None, **fields):
    """(seconds to lower and compile, the compiled train step) for `name` built with `fields`."""
    model = create_model(name, **fields)
    size = size or model_info(name).input_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x, train=False)), images)
    params = variables.pop("params")
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    start = time.perf_counter()
    compiled = _train_step(model).lower(params, variables, images, labels).compile()
    return time.perf_counter() - start, compiled


def compile_rows(names: list[str], batch: int, size: int | None) -> list[str]:
    rows = ["| model | depth | loop s | scan s | loop / scan |", "|---|---:|---:|---:|---:|"]
    for name in names:
        loop, _ = compiled_step(name, batch, size)
        model = create_model(name)
        if any(field.name == "scan_blocks" for field in dataclasses.fields(model)):
            scan, _ = compiled_step(name, batch, size, scan_blocks=True)
            cells = f"{scan:.1f} | {loop / scan:.1f}x"
        else:
            cells = "no scan yet | -"
        depth = getattr(model, "depth", "")
        rows.append(f"| {name} | {depth} | {loop:.1f} | {cells} |")
        print(rows[-1], flush=True)
    return rows


def memory_rows(names: list[str], batch: int, size: int | None) -> list[str]:
    rows = ["| model | batch | none MiB | block MiB | full MiB | full / none | compile s (none, block, full) |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for name in names:
        temp, seconds = {}, []
        for remat in ("none", "block", "full"):
            elapsed, compiled = compiled_step(name, batch, size, remat=remat)
            temp[remat] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
            seconds.append(f"{elapsed:.0f}")
        rows.append(f"| {name} | {batch} | {temp['none']:,.0f} | {temp['block']:,.0f} | {temp['full']:,.0f} | "
                    f"{temp['full'] / temp['none']:.2f} | {', '.join(seconds)} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile_models", default="vit_large_patch16_224,conformer_base_patch16")
    parser.add_argument("--memory_models", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=128, help="per-device batch of the memory table")
    parser.add_argument("--compile_batch", type=int, default=8, help="compile time barely depends on it")
    parser.add_argument("--size", type=int, default=None, help="image side; default: each model's own")
    parser.add_argument("--out", default="", help="also write the tables to this markdown file")
    args = parser.parse_args()
    device = jax.devices()[0]
    header = (f"`python {' '.join(sys.argv)}`: backend {device.platform} ({device.device_kind}), "
              f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {datetime.date.today()}.")
    print(header, flush=True)
    sections = [header, "", "Compile time of one train step:", ""]
    sections += compile_rows(args.compile_models.split(","), args.compile_batch, args.size)
    sections += ["", f"XLA's temp memory for one train step at batch {args.batch}:", ""]
    sections += memory_rows(args.memory_models.split(","), args.batch, args.size)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
