"""Scales each integration pattern's model to a multiply-add budget by its width (and, if need be, depth).

Every pattern is a registered family built through `create_model(name, **overrides)`:

  parallel      parallel_hybrid (CNN + ViT branches, fused after stages 1-3 by the named fusion)
  serial        CoAtNet-style C-T: an MBConv stage, then a relative-attention transformer stage
  hierarchical  MaxViT-style M-M: MBConv + block attention + grid attention in every stage
  cnn           ResNet with basic blocks (three stages)
  vit           ViT with 4 px patches

A template turns a width multiplier `scale` and a depth option into the family's
fields. Widths are rounded to even numbers (token widths of the parallel hybrid to
multiples of 4, for cross-attention's 4 heads), so multiply-adds grow monotonically,
in small steps, with `scale`: the solver homes in on the budget with a few
quadratic-model guesses, brackets it, bisects to the two neighbouring configurations
and keeps the closer. Where both miss (a token width stepping by 4 moves a small
model by more than 5%), a second multiplier `fine` on the stem (on the parallel
hybrid, its whole CNN branch, within 0.8x-1.25x) fills the gap. Depth options are tried in order
only when no width lands within the tolerance.

Multiply-adds come from `hybrid_jax.analysis.flops.measure(..., xla=False)`: the
paper convention (every conv and matmul, attention included) counted on the traced
jaxpr, so solving needs no compilation.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from experiments.ablation.grid import FUSIONS, PATTERNS
from hybrid_jax import create_model
from hybrid_jax.analysis.flops import measure

GOOD_ENOUGH = 0.01  # a width this close to the budget ends the search; farther ones are refined with `fine`


class SolverError(ValueError):
    """No width and depth of a pattern's template lands within the tolerance of the budget."""


def _round(value: float, divisor: int) -> int:
    """Nearest multiple of `divisor`, at least `divisor` (monotone in `value`)."""
    return max(divisor, int(round(value / divisor)) * divisor)


def _widths(scale: float, bases: Sequence[int], divisor: int = 2) -> tuple[int, ...]:
    return tuple(_round(base * scale, divisor) for base in bases)


def _stage_sides(image_size: int, num_stages: int) -> list[int]:
    """Map sides after a stride-2 stem and `num_stages` stride-2 stages (MaxxVit's rounding)."""
    side, sides = (image_size + 1) // 2, []
    for _ in range(num_stages):
        side = (side + 1) // 2
        sides.append(side)
    return sides


def _parallel(scale: float, depth: int, *, image_size: int, fusion: str, fine: float = 1.0) -> dict[str, Any]:
    # parallel_hybrid_tiny's layout: stride-2 stem, CNN strides (1, 2, 1, 1), tokens every 4 px, fused by
    # `fusion` after stages 1-3. The token width stays a multiple of 4 (cross_attention splits it into 4 heads);
    # `fine` moves the CNN branch alone.
    return dict(img_size=image_size, stem_width=_round(16 * scale * fine, 2), layers=(depth,) * 4,
                widths=_widths(scale * fine, (16, 32, 64, 96)), embed_dim=_round(64 * scale, 4), depths=(depth,) * 4,
                num_heads=2, fusion=fusion, fusion_stages=(1, 2, 3))


def _serial(scale: float, depth: tuple[int, int], *, image_size: int, fusion: None = None,
            fine: float = 1.0) -> dict[str, Any]:
    # Conv stage at stride 4, transformer stage at stride 8 (4 x 4 tokens at 32 px: R50+ViT's stride 16 at 224 px,
    # scaled down), attention heads of width 8; `fine` moves the stem.
    return dict(img_size=image_size, block_types=("C", "T"), depths=depth, embed_dims=_widths(scale, (32, 64)),
                stem_widths=_widths(scale * fine, (16, 16)), head_dim=8, head_hidden=None)


def _hierarchical(scale: float, depth: tuple[int, int], *, image_size: int, fusion: None = None,
                  fine: float = 1.0) -> dict[str, Any]:
    # Windows and grids of the largest side that divides every stage's map (4 at 32 px: local 4 x 4 windows and a
    # dilated 4 x 4 grid in stage 1, global attention in stage 2); heads of width 8; `fine` moves the stem.
    partition = math.gcd(*_stage_sides(image_size, len(depth)))
    if partition < 2:
        raise SolverError(f"MaxViT stages at {image_size} px have map sides {_stage_sides(image_size, len(depth))} "
                          f"with no common window size; use an image size such as 32")
    return dict(img_size=image_size, block_types=("M",) * len(depth), depths=depth,
                embed_dims=_widths(scale, (32, 64)),
                stem_widths=_widths(scale * fine, (16, 16)), head_dim=8, partition_size=partition, head_hidden=None)


def _cnn(scale: float, depth: int, *, image_size: int, fusion: None = None, fine: float = 1.0) -> dict[str, Any]:
    # ResNet's own 7x7/2 stem and max pool (stride 4), then stages at strides 4, 8, 16; `fine` moves the stem.
    del image_size
    return dict(block="basic", layers=(depth,) * 3, widths=_widths(scale, (16, 32, 64)),
                stem_width=_round(16 * scale * fine, 2))


def _vit(scale: float, depth: int, *, image_size: int, fusion: None = None, fine: float = 1.0) -> dict[str, Any]:
    # 4 px patches (8 x 8 tokens at 32 px, the parallel hybrid's token grid), 2 heads; depth is the fine knob.
    del fine
    return dict(img_size=image_size, patch_size=4, embed_dim=_round(64 * scale, 2), depth=depth, num_heads=2)


@dataclasses.dataclass(frozen=True)
class Template:
    """How one pattern's model grows: a registered family and its fields as a function of (scale, depth)."""

    pattern: str
    model: str  # registered name whose fields the overrides start from
    label: str  # short model name for tables and run directories
    build: Callable[..., dict[str, Any]]
    depths: tuple  # depth options, preferred first
    fine_bounds: tuple[float, float] = (0.6, 1.6)  # range of the `fine` multiplier


TEMPLATES = {
    "parallel": Template("parallel", "parallel_hybrid_tiny", "parallel_hybrid", _parallel, (1, 2), (0.8, 1.25)),
    "serial": Template("serial", "coatnet_0_224", "coatnet", _serial, ((2, 2), (1, 2), (2, 3), (1, 1))),
    "hierarchical": Template("hierarchical", "maxvit_tiny_tf_224", "maxvit", _hierarchical,
                             ((1, 1), (1, 2), (2, 2))),
    "cnn": Template("cnn", "resnet18", "resnet", _cnn, (2, 1, 3)),
    "vit": Template("vit", "vit_tiny_patch16_224", "vit", _vit, (4, 3, 5, 6, 2), (1.0, 1.0)),
}


@dataclasses.dataclass(frozen=True)
class Solution:
    """A pattern's model at a budget: what to build and what it costs."""

    pattern: str
    fusion: str | None  # the parallel pattern's fusion; None for the others
    model: str  # registered name
    label: str
    overrides: dict[str, Any]  # create_model(model, **overrides) builds it
    scale: float  # width multiplier of the template
    fine: float  # extra multiplier of the stem (the parallel hybrid: of its CNN branch)
    depth: Any  # the template's depth option
    params: int  # with the sweep's classifier
    gmacs: float
    budget_gmacs: float

    @property
    def error(self) -> float:
        """Relative distance from the budget, signed."""
        return self.gmacs / self.budget_gmacs - 1

    @property
    def name(self) -> str:
        """Model and fusion, as run directories and tables name them."""
        return f"{self.label}_{self.fusion or 'none'}"

    def widths(self) -> str:
        """The solved widths and depths, briefly, for tables."""
        keys = ("stem_width", "stem_widths", "widths", "embed_dims", "embed_dim", "layers", "depths", "depth")
        return ", ".join(f"{k}={self.overrides[k]}" for k in keys if k in self.overrides)


@functools.lru_cache(maxsize=4096)
def _cost(model: str, items: tuple, image_size: int, channels: int, num_classes: int) -> tuple[int, float]:
    """(params, GMACs) of `model` with the given overrides at batch 1, by tracing only."""
    c = measure(create_model(model, num_classes=num_classes, **dict(items)), image_size, channels, xla=False)
    return c.params, c.gmacs


def cost(model: str, overrides: dict[str, Any], image_size: int, channels: int = 1,
         num_classes: int = 10) -> tuple[int, float]:
    """(params, GMACs) of `create_model(model, num_classes=num_classes, **overrides)` on one image."""
    return _cost(model, tuple(sorted(overrides.items())), image_size, channels, num_classes)


def solve(pattern: str, budget_gmacs: float, *, fusion: str | None = None, image_size: int = 32, channels: int = 1,
          num_classes: int = 10, tolerance: float = 0.05) -> Solution:
    """The pattern's model scaled to `budget_gmacs` within `tolerance` (relative).

    For each depth option in turn: one width multiplier for the whole model; unless one of
    its two configurations around the budget is within 1%, each is refined by the template's
    `fine` multiplier (the stem, or the parallel hybrid's CNN branch), whose steps are
    smaller. The closest configuration wins.

    Raises:
      SolverError: no depth option has a width within the tolerance (the closest is named).
    """
    if pattern not in TEMPLATES:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")
    if (pattern == "parallel") != (fusion is not None):
        raise ValueError(f"a fusion is named for the parallel pattern only (pattern={pattern!r}, fusion={fusion!r})")
    template = TEMPLATES[pattern]

    def at(depth: int, scale: float, fine: float = 1.0) -> Solution:
        overrides = template.build(scale, depth, image_size=image_size, fusion=fusion, fine=fine)
        params, gmacs = cost(template.model, overrides, image_size, channels, num_classes)
        return Solution(pattern, fusion, template.model, template.label, overrides, scale, fine, depth, params,
                        gmacs, budget_gmacs)

    best = None
    for depth in template.depths:
        candidates = _search(functools.partial(at, depth), budget_gmacs, bounds=(1e-2, 1e2))
        for coarse in list(candidates):
            if min(abs(c.error) for c in candidates) <= min(GOOD_ENOUGH, tolerance):
                break
            candidates += _search(functools.partial(at, depth, coarse.scale), budget_gmacs,
                                  bounds=template.fine_bounds)
        best = min([best, *candidates] if best else candidates, key=lambda c: abs(c.error))
        if abs(best.error) <= tolerance:
            return best
    raise SolverError(f"{pattern} ({fusion or 'no fusion'}): no width or depth within {tolerance:.0%} of "
                      f"{budget_gmacs} GMACs; the closest is {best.gmacs:.5f} GMACs ({best.error:+.1%}) with "
                      f"{best.widths()}")


def _search(at: Callable[[float], Solution], budget: float, *, bounds: tuple[float, float],
            iterations: int = 30) -> list[Solution]:
    """The configurations just below and just above `budget` as `at(x)` grows with x in `bounds`.

    Only one of them where the budget is out of reach within the bounds.
    """
    lo = hi = None  # (x, point): the largest x seen costing <= budget, the smallest costing more
    x = 1.0
    for _ in range(8):  # multiply-adds grow roughly with x^2: a few multiplicative guesses bracket the budget
        point = at(x)
        if point.gmacs <= budget:
            lo = (x, point) if lo is None or x > lo[0] else lo
        else:
            hi = (x, point) if hi is None or x < hi[0] else hi
        if lo and hi:
            break
        step = min(max(math.sqrt(budget / point.gmacs), 0.5), 2.0) * (1.02 if point.gmacs <= budget else 0.98)
        x_next = min(max(x * step, bounds[0]), bounds[1])
        if x_next == x:
            break
        x = x_next
    if not (lo and hi):
        return [p[1] for p in (lo, hi) if p]
    for _ in range(iterations):  # bisect in log x until the two sides are neighbouring configurations
        if hi[0] / lo[0] < 1.0005:
            break
        x = math.sqrt(lo[0] * hi[0])
        point = at(x)
        if point.gmacs <= budget:
            lo = (x, point)
        else:
            hi = (x, point)
    return [lo[1], hi[1]]


def solve_all(budget_gmacs: float, patterns: Sequence[str] = PATTERNS, fusions: Sequence[str] = FUSIONS,
              **kwargs) -> list[Solution]:
    """Every model of a sweep at one budget: the parallel pattern once per fusion, the others once."""
    return [solve(pattern, budget_gmacs, fusion=fusion, **kwargs) for pattern in patterns
            for fusion in (fusions if pattern == "parallel" else (None,))]


def solutions_table(solutions: Sequence[Solution]) -> str:
    """Markdown: pattern, fusion, solved widths and depths, params, GMACs and the error against the budget."""
    rows = ["| pattern | model | fusion | widths / depths | params | GMACs | budget | error |",
            "|---|---|---|---|---:|---:|---:|---:|"]
    for s in solutions:
        rows.append(f"| {s.pattern} | {s.label} | {s.fusion or '-'} | {s.widths()} | {s.params:,} | {s.gmacs:.5f} | "
                    f"{s.budget_gmacs:g} | {s.error:+.2%} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Solve every pattern's width/depth for GMACs budgets.")
    parser.add_argument("--budgets", default="0.002,0.006,0.02", help="comma-separated GMACs budgets")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    for budget in (float(b) for b in args.budgets.split(",")):
        print(f"\nbudget {budget} GMACs (within {args.tolerance:.0%}), {args.image_size} px, 1 channel, 10 classes\n")
        print(solutions_table(solve_all(budget, image_size=args.image_size, tolerance=args.tolerance)))


if __name__ == "__main__":
    main()
