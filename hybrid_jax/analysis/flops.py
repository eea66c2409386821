"""Parameter counts, multiply-adds and XLA flops of a model's inference forward.

Two counts, because they answer different questions:
- `gmacs` counts the multiply-adds of every convolution and matrix product in the
  traced forward (attention's QK^T and AV included), each output element times its
  full kernel. This is how papers, fvcore and timm count, so it is what the registry's
  paper figures are checked against.
- `xla_gflops` is XLA's `cost_analysis()` of the compiled forward: the work the device
  really does. It includes elementwise ops (norms, softmax, activations) and leaves out
  the taps of a padded convolution that fall on the padding: ResNet-18's small late
  feature maps make its XLA count about 7% lower than the paper's, ViTs' about 1% higher.
  Throughput and MFU use this count.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from hybrid_jax.layers.conv import grouped_conv_by_shifts
from hybrid_jax.registry import create_model, model_info


@dataclasses.dataclass(frozen=True)
class Complexity:
    """What a model costs at one input size, batch 1."""

    params: int
    gmacs: float  # paper convention: conv + matmul multiply-adds, billions
    xla_gflops: float | None  # XLA cost analysis of the compiled forward, billions; None if not compiled
    input_size: int


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (boxed or plain)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))


def _eqn_macs(eqn: jex_core.JaxprEqn) -> int:
    if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    if eqn.primitive.name == "conv_general_dilated":
        kernel = eqn.invars[1].aval.shape
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // kernel[out_feature_dim]
    if _is_grouped_conv_by_shifts(eqn):
        kernel_height, kernel_width, in_per_group, _ = eqn.invars[1].aval.shape
        return math.prod(eqn.outvars[0].aval.shape) * kernel_height * kernel_width * in_per_group
    return 0


def _is_grouped_conv_by_shifts(eqn: jex_core.JaxprEqn) -> bool:
    """CPU's grouped convolution (layers.conv): counted whole, as the convolution it computes."""
    return eqn.params.get("name") == grouped_conv_by_shifts.__name__


def _jaxpr_macs(jaxpr: jex_core.Jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        if _is_grouped_conv_by_shifts(eqn):
            continue  # its per-group products are the convolution's, counted above
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        # Nested jaxprs: jit, remat, custom derivatives, scan bodies (run `length` times).
        for sub in jex_core.jaxprs_in_params(eqn.params):
            total += repeat * _jaxpr_macs(sub)
    return total


def count_macs(fn: Callable, *args: Any) -> int:
    """Multiply-adds of every conv and matrix product `fn(*args)` traces to."""
    return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_cost(compiled, key: str = "flops") -> float:
    """XLA's cost analysis of a compiled program: its "flops", or its "bytes accessed" (each op's operands
    and outputs, counted once per op: the memory traffic of a device that caches nothing between ops)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
        analysis = analysis[0]
    return float(analysis[key])


def xla_flops(fn: Callable, *args: Any) -> float:
    """XLA's flop count for the compiled `fn(*args)`; args may be ShapeDtypeStructs."""
    return xla_cost(jax.jit(fn).lower(*args).compile())


def measure(model: nn.Module, input_size: int, channels: int = 3, *, xla: bool = True) -> Complexity:
    """Parameters, GMACs and XLA flops of `model` at a square `input_size`, without allocating it.

    `xla=False` skips compiling the forward (the slow part for large models) and leaves xla_gflops None.
    """
    image = jax.ShapeDtypeStruct((1, input_size, input_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image)
    variables = nn.meta.unbox(variables)
    forward = lambda v, x: model.apply(v, x, train=False)
    gflops = xla_flops(forward, variables, image) / 1e9 if xla else None
    return Complexity(count_params(variables["params"]), count_macs(forward, variables, image) / 1e9, gflops,
                      input_size)


def measure_registered(name: str, input_size: int | None = None, *, xla: bool = True) -> Complexity:
    """`measure` for a registered model, at its paper's input size unless told otherwise."""
    return measure(create_model(name), input_size or model_info(name).input_size, xla=xla)


def _ratio(measured: float, paper: float | None) -> str:
    return f"{measured / paper:.3f}" if paper else "-"


def complexity_table(names: list[str]) -> str:
    """A markdown table of measured parameters and GMACs beside each paper's figures."""
    rows = ["| model | params | paper params (M) | ratio | GMACs | paper GMACs | ratio | XLA GFLOPs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        c, paper = measure_registered(name), model_info(name).paper
        rows.append(f"| {name} | {c.params:,} | {paper.params_m if paper else '-'} | "
                    f"{_ratio(c.params / 1e6, paper and paper.params_m)} | {c.gmacs:.3f} | "
                    f"{paper.gmacs if paper else '-'} | {_ratio(c.gmacs, paper and paper.gmacs)} | "
                    f"{c.xla_gflops:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from hybrid_jax.registry import list_models

    parser = argparse.ArgumentParser(description="Parameters and GMACs of registered models vs their papers.")
    parser.add_argument("--models", default="*", help="shell-style pattern over registered names")
    names = list_models(parser.parse_args(argv).models)
    if not names:
        raise SystemExit(f"no registered model matches; names are: {', '.join(list_models())}")
    print(complexity_table(names))


if __name__ == "__main__":
    main()
