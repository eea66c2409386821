"""README's model table: every registered model, its size and cost, its paper's top-1, and its parity check.

python -m hybrid_jax.analysis.model_table                        # print the table
python -m hybrid_jax.analysis.model_table --write README.md      # put it between README's markers
python -m hybrid_jax.analysis.model_table --check README.md      # exit 1 where README and registry disagree

Parameters are counted from `jax.eval_shape` of each model's init, so nothing is allocated or compiled.
GMACs are `hybrid_jax.analysis.flops.count_macs` of the inference forward at the registered input size:
the count tests/test_models.py holds within 5% of each paper's figure. Counting every registered model
takes about two minutes of CPU time (measured: 3-4 min wall on two cores shared with other work), a little
more than half of it parameters. `--stored-gmacs` (and tests/test_readme.py) take the GMACs of models with
paper figures from README's own column instead of recounting them, which saves most of the rest; it still
recounts the models without paper figures, which nothing else checks.

The registry says nothing of parity, so `PARITY` below names, per group of models, the PyTorch
reference whose logits the tests compare ours with (same converted weights, max |difference| <= 1e-4
in float32) and the tests that do it; tests/test_readme.py checks that those tests exist and that
every registered model a parity test file names is covered.
"""

import argparse
import dataclasses
import fnmatch
import re
import sys
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.analysis.flops import count_macs, count_params
from hybrid_jax.registry import create_model, list_models, model_info

BEGIN = "<!-- model-table:begin (generated: python -m hybrid_jax.analysis.model_table --write README.md) -->"
END = "<!-- model-table:end -->"
HEADER = ("| model | category | input px | params | GMACs | ImageNet top-1 (%) | logits checked against |\n"
          "|---|---|---:|---:|---:|---:|---|")
# Table order: the survey's categories, baselines first; the tiny `test_*` variants (registered for tests) last.
CATEGORY_ORDER = ("cnn", "vit", "serial", "parallel", "hierarchical")


@dataclasses.dataclass(frozen=True)
class Parity:
    """Registered models whose converted weights give the reference's logits, and the tests that compare them."""

    pattern: str  # shell-style, over registered names
    reference: str  # what the logits are compared with
    tests: tuple[str, ...]  # "tests/FILE.py::FUNCTION"


PARITY = (
    Parity("resnet*", "timm", ("tests/test_parity.py::test_resnet_matches_timm",
                               "tests/test_parity.py::test_resnet_matches_timm_all_sizes")),
    Parity("vit_*_patch*_224", "timm", ("tests/test_parity.py::test_vit_matches_timm",
                                        "tests/test_parity.py::test_vit_matches_timm_all_sizes")),
    Parity("deit_*", "timm", ("tests/test_parity.py::test_vit_matches_timm",
                              "tests/test_parity.py::test_vit_matches_timm_all_sizes")),
    Parity("vit_base_r50_s16_224", "timm (2 of 12 blocks)",
           ("tests/test_parity.py::test_r50_vit_hybrid_matches_timm",)),
    Parity("coatnet_*", "timm", ("tests/test_parity_maxxvit.py::test_coatnet_rw_matches_timm",
                                 "tests/test_parity_maxxvit.py::test_maxxvit_matches_timm_full_size")),
    Parity("maxvit_*", "timm", ("tests/test_parity_maxxvit.py::test_maxvit_tf_matches_timm",
                                "tests/test_parity_maxxvit.py::test_maxxvit_matches_timm_full_size")),
    Parity("levit_*", "timm, HF transformers",
           ("tests/test_parity_levit_convit.py::test_levit_matches_timm_all_sizes",
            "tests/test_parity_levit_convit.py::test_levit_matches_hugging_face_all_sizes")),
    Parity("convit_*", "timm", ("tests/test_parity_levit_convit.py::test_convit_tiny_matches_timm",
                                "tests/test_parity_levit_convit.py::test_convit_matches_timm_all_sizes")),
    Parity("botnet26t_256", "timm", ("tests/test_parity_cvt_botnet.py::test_botnet26t_matches_timm",
                                     "tests/test_parity_cvt_botnet.py::test_botnet26t_matches_timm_full_size")),
    Parity("botnet50", "timm ByobNet, same layout (1-block conv stages)",
           ("tests/test_parity_cvt_botnet.py::test_botnet50_matches_timm_byobnet_with_the_paper_layout",)),
    Parity("cvt_*", "HF transformers", ("tests/test_parity_cvt_botnet.py::test_cvt_matches_hugging_face",
                                        "tests/test_parity_cvt_botnet.py::test_cvt_matches_hugging_face_full_size")),
    Parity("mobilevit_*", "timm, HF transformers",
           ("tests/test_parity_mobilevit_edgenext.py::test_mobilevit_matches_timm_full_size",
            "tests/test_parity_mobilevit_edgenext.py::test_mobilevit_matches_hugging_face_full_size")),
    Parity("edgenext_*", "timm", ("tests/test_parity_mobilevit_edgenext.py::test_edgenext_xx_small_matches_timm",
                                  "tests/test_parity_mobilevit_edgenext.py::test_edgenext_matches_timm_full_size")),
)


def parity_of(name: str) -> Parity | None:
    """The parity entry covering `name`, or None where no reference's logits are compared with ours."""
    matches = [p for p in PARITY if fnmatch.fnmatch(name, p.pattern)]
    if len(matches) > 1:
        raise ValueError(f"{name!r} matches several parity patterns: {[p.pattern for p in matches]}")
    return matches[0] if matches else None


@dataclasses.dataclass(frozen=True)
class Row:
    """One model's line of the table."""

    name: str
    category: str
    input_size: int
    params: int
    gmacs: float
    top1: float | None
    parity: str

    def markdown(self) -> str:
        top1 = "-" if self.top1 is None else str(self.top1)
        return (f"| `{self.name}` | {self.category} | {self.input_size} | {self.params:,} | {format_gmacs(self.gmacs)} "
                f"| {top1} | {self.parity} |")


def format_gmacs(gmacs: float) -> str:
    """Three decimals from 1 GMAC up, three significant digits below (Mobile-Former-26M: 0.0236)."""
    return f"{gmacs:.3f}" if gmacs >= 1 else format(gmacs, "#.3g")


def table_names() -> list[str]:
    """Every registered name, in table order (numbers in names compared as numbers: resnet18 before resnet101)."""
    rank = lambda category: CATEGORY_ORDER.index(category) if category in CATEGORY_ORDER else len(CATEGORY_ORDER)
    natural = lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return sorted(list_models(), key=lambda name: (name.startswith("test_"), rank(model_info(name).category),
                                                   natural(name)))


def count(name: str) -> tuple[int, Callable[[], float]]:
    """Parameters of `name` at its registered input size, and a function counting its GMACs there."""
    model, size = create_model(name), model_info(name).input_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image))
    forward = lambda v, x: model.apply(v, x, train=False)
    return count_params(variables["params"]), lambda: count_macs(forward, variables, image) / 1e9


def row(name: str, gmacs: float | None = None) -> Row:
    """The table row of `name`; `gmacs` given is used as it is instead of counting."""
    entry = model_info(name)
    params, count_gmacs = count(name)
    parity = parity_of(name)
    return Row(name, entry.category, entry.input_size, params, count_gmacs() if gmacs is None else gmacs,
               entry.paper.top1 if entry.paper else None, parity.reference if parity else "-")


def render(rows: Iterable[Row]) -> str:
    """The markdown table, header included."""
    return "\n".join([HEADER, *(r.markdown() for r in rows)])


def table_text(readme: str) -> str:
    """What lies between README's markers, stripped."""
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no model table between {BEGIN!r} and {END!r}")
    return readme[begin + len(BEGIN):end].strip()


def replace_table(readme: str, table: str) -> str:
    """README with `table` between its markers."""
    table_text(readme)  # both markers present, in order
    head, rest = readme.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"


_CELL = re.compile(r"^\| `(?P<name>[^`]+)` \|(?:[^|]*\|){3} (?P<gmacs>[0-9.]+) \|")


def stored_lines(readme: str) -> dict[str, str]:
    """README's table rows by model name."""
    lines = {}
    for line in table_text(readme).splitlines()[2:]:
        match = _CELL.match(line)
        if not match:
            raise ValueError(f"unreadable model table row: {line!r}")
        lines[match["name"]] = line
    return lines


def stored_gmacs(line: str) -> float:
    """The GMACs cell of a README row."""
    return float(_CELL.match(line)["gmacs"])


def differences(readme: str, *, stored: bool = False, log: Callable[[str], None] | None = None) -> list[str]:
    """How README's table and the registry disagree, one line each; empty when they agree.

    `stored`: take the GMACs of models with paper figures from README's column (tests/test_models.py
    checks the live count against the papers) rather than recounting every model.
    """
    lines, names = stored_lines(readme), table_names()
    problems = []
    if list(lines) != names:
        missing, extra = sorted(set(names) - set(lines)), sorted(set(lines) - set(names))
        problems.append(f"names differ (missing: {missing or 'none'}; not registered: {extra or 'none'}; "
                        "or out of order)")
    for name in names:
        if name not in lines:
            continue
        if log:
            log(name)
        keep = stored_gmacs(lines[name]) if stored and model_info(name).paper is not None else None
        expected = row(name, keep).markdown()
        if expected != lines[name]:
            problems.append(f"README: {lines[name]}\n  registry: {expected}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="*", help="shell-style pattern over registered names (printing only)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="README", help="replace the table between README's markers")
    action.add_argument("--check", metavar="README", help="exit 1 where README's table and the registry disagree")
    parser.add_argument("--stored-gmacs", action="store_true",
                        help="with --check: take paper models' GMACs from README instead of recounting them")
    args = parser.parse_args(argv)
    progress = lambda name: print(f"  {name}", file=sys.stderr, flush=True)
    if args.check:
        with open(args.check) as f:
            problems = differences(f.read(), stored=args.stored_gmacs, log=progress)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{args.check}'s model table is out of date: python -m hybrid_jax.analysis.model_table "
                  f"--write {args.check}")
        return 1 if problems else 0
    names = [name for name in table_names() if args.write or fnmatch.fnmatch(name, args.models)]
    if not names:
        raise SystemExit(f"no registered model matches {args.models!r}")
    rows = []
    for name in names:
        progress(name)
        rows.append(row(name))
    table = render(rows)
    if not args.write:
        print(table)
        return 0
    with open(args.write) as f:
        readme = f.read()
    with open(args.write, "w") as f:
        f.write(replace_table(readme, table))
    print(f"wrote {len(rows)} rows to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
