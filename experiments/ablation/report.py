"""Tables and the finding of the study, from its per-run records.

Light on purpose (csv, statistics, scipy; no JAX), so the notebook that draws the committed
results starts in a second. A record is one run: a (budget, model, fusion, train fraction,
seed) with its accuracies (see `run.run_one`). `aggregate` folds the seeds of each cell into
mean, standard deviation and a 95% t interval; `comparisons` pairs models on shared seeds
(experiments/ablation/stats.py) and `finding` writes each claim with its verdict.
"""

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.ablation import plots, stats
from experiments.ablation.grid import CORRUPTIONS, FUSIONS, PATTERNS, label

RUN_FIELDS = ("name", "model", "pattern", "fusion", "budget_gmacs", "train_fraction", "seed", "learning_rate", "steps",
              "params", "gmacs", "accuracy", "train_accuracy", "clean_accuracy", "shift_accuracy",
              *(f"{c}_accuracy" for c in CORRUPTIONS), *(f"severity{k}_accuracy" for k in (1, 2, 3)),
              *(f"{c}_s{k}_accuracy" for k in (1, 2, 3) for c in CORRUPTIONS),
              "train_images_per_sec", "infer_images_per_sec", "wall_time_s")
SEARCH_FIELDS = ("name", "model", "pattern", "fusion", "budget_gmacs", "learning_rate", "steps", "params", "gmacs",
                 "heldout_accuracy", "train_accuracy", "chosen", "wall_time_s")
CURVE_FIELDS = ("name", "budget_gmacs", "train_fraction", "seed", "step", "loss", "accuracy")
BRANCH_FIELDS = ("name", "model", "fusion", "budget_gmacs", "train_fraction", "seed", "head", "head_accuracy", "share")
# Summarised per cell: the test accuracy (the loop's, whole split) first, then the shift subset's.
METRICS = ("accuracy", "train_accuracy", "clean_accuracy", "shift_accuracy", *(f"{c}_accuracy" for c in CORRUPTIONS),
           *(f"severity{k}_accuracy" for k in (1, 2, 3)))
CELL = ("budget_gmacs", "model", "pattern", "fusion", "train_fraction")
RESULT_FIELDS = (*CELL, "learning_rate", "params", "gmacs", "seeds",
                 *(f"{m}_{s}" for m in METRICS for s in ("mean", "std", "ci")),
                 "train_images_per_sec", "infer_images_per_sec")


# --------------------------------------------------------------------------- #
# Records and aggregation
# --------------------------------------------------------------------------- #


def _number(text: str) -> Any:
    """A CSV cell back to int / float where it is one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# Settings that say where and how a run executes, not what it computes: parts of a study may differ in them.
EXECUTION_SETTINGS = frozenset({
    "data_dir", "manual_dir", "compilation_cache_dir", "coordinator_address", "distributed", "num_processes",
    "process_id", "async_checkpoint", "checkpoint_every", "max_to_keep", "progress_bar", "profile_steps",
    "cache_max_mb", "read_threads", "worker_count"})


def setting_differences(recorded: dict[str, Any], settings: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: recorded -> now' for each setting (nested keys dotted) that changes what the runs compute."""
    differences = []
    for key in sorted((set(recorded) | set(settings)) - {"notes"} - EXECUTION_SETTINGS):  # notes: derived text
        old, new = recorded.get(key, "unset"), settings.get(key, "unset")
        if isinstance(old, dict) and isinstance(new, dict):
            differences += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old} -> {new}")
    return differences


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path, fields: Sequence[str]) -> None:
    """Rows as CSV with the given columns (floats at full precision)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV this module wrote, numbers as numbers."""
    with open(path, newline="") as f:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(f)]


def order(row: dict[str, Any]) -> tuple:
    """Budgets largest first, then pattern, fusion, model, data size largest first."""
    fusion = row["fusion"]
    return (-float(row["budget_gmacs"]), PATTERNS.index(row["pattern"]) if row["pattern"] in PATTERNS else 99,
            FUSIONS.index(fusion) if fusion in FUSIONS else -1, row["model"],
            -float(row.get("train_fraction", 1.0)))


def _floats(runs: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in runs if r.get(key) not in (None, "") and float(r[key]) == float(r[key])]


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, model, fusion, train fraction): seed mean, sample std and 95% interval per metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(float(r[k]) if k in ("budget_gmacs", "train_fraction") else r[k] for k in CELL),
                          []).append(r)
    rows = []
    for cell, runs in groups.items():
        row = dict(zip(CELL, cell))
        row.update(learning_rate=runs[0]["learning_rate"], params=runs[0]["params"], gmacs=runs[0]["gmacs"],
                   seeds=len(runs))
        for metric in METRICS:
            values = _floats(runs, metric)
            row[f"{metric}_mean"] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            row[f"{metric}_ci"] = stats.interval(values)
        for speed in ("train_images_per_sec", "infer_images_per_sec"):
            values = _floats(runs, speed)
            row[speed] = statistics.fmean(values) if values else math.nan
        rows.append(row)
    return sorted(rows, key=order)


def cells(rows: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """The study's (budget, train fraction) cells present, main budget and all data first."""
    return sorted({(float(r["budget_gmacs"]), float(r["train_fraction"])) for r in rows}, key=lambda c: (-c[1], -c[0]))


def in_cell(rows: Sequence[dict[str, Any]], cell: tuple[float, float]) -> list[dict[str, Any]]:
    return [r for r in rows if (float(r["budget_gmacs"]), float(r["train_fraction"])) == cell]


def cell_label(cell: tuple[float, float]) -> str:
    return f"{cell[0]:g} GMACs, {100 * cell[1]:g}% data"


def per_seed(records: Sequence[dict[str, Any]], cell: tuple[float, float], metric: str = "accuracy"
             ) -> dict[str, dict[int, float]]:
    """{model label: {seed: metric}} of one cell's runs."""
    table: dict[str, dict[int, float]] = {}
    for r in records:
        if (float(r["budget_gmacs"]), float(r["train_fraction"])) == cell and r.get(metric) not in (None, ""):
            table.setdefault(label(r), {})[int(r["seed"])] = float(r[metric])
    return table


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #


def pct(row: dict[str, Any], metric: str = "accuracy", interval: bool = True) -> str:
    """'91.23 ± 0.21 [±0.52]': mean ± std over seeds, and the 95% interval's half-width (percent)."""
    mean, std, ci = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_ci"]
    if mean != mean:
        return "-"
    text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std == std else "")
    return text + (f" [±{100 * ci:.2f}]" if interval and ci == ci else "")


def headline_table(rows: Sequence[dict[str, Any]]) -> str:
    """Models down, (budget, data size) cells across: test accuracy, mean ± std [95% interval] over seeds (%)."""
    columns = cells(rows)
    by_model: dict[tuple, dict[tuple, dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault((r["pattern"], r["fusion"], r["model"]), {})[
            (float(r["budget_gmacs"]), float(r["train_fraction"]))] = r
    head = ["pattern", "fusion", "model", *(cell_label(c) for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(columns)]
    for (pattern, fusion, model), found in sorted(by_model.items(), key=lambda kv: order(next(iter(kv[1].values())))):
        lines.append("| " + " | ".join([pattern, fusion or "-", model,
                                        *(pct(found[c]) + f" ({found[c]['seeds']})" if c in found else "-"
                                          for c in columns)]) + " |")
    return "\n".join(lines)


def detail_table(rows: Sequence[dict[str, Any]], cell: tuple[float, float]) -> str:
    """One cell's models: size, learning rate, train and test accuracy, shift, speed."""
    head = ["model", "pattern", "params", "GMACs", "lr", "seeds", "train acc.", "test acc.", "shifted acc.",
            "train img/s", "infer img/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in in_cell(rows, cell):
        lines.append("| " + " | ".join([label(r), r["pattern"], f"{int(r['params']):,}", f"{float(r['gmacs']):.4f}",
                                        f"{float(r['learning_rate']):g}", str(r["seeds"]),
                                        pct(r, "train_accuracy", False), pct(r), pct(r, "shift_accuracy"),
                                        f"{float(r['train_images_per_sec']):,.0f}",
                                        f"{float(r['infer_images_per_sec']):,.0f}"]) + " |")
    return "\n".join(lines)


def corruption_table(rows: Sequence[dict[str, Any]], cell: tuple[float, float]) -> str:
    """Accuracy per corruption and per severity (averaged over the other), beside the clean accuracy (%)."""
    head = ["model", "clean", *CORRUPTIONS, *(f"severity {k}" for k in (1, 2, 3)), "mean shifted"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in in_cell(rows, cell):
        lines.append("| " + " | ".join([label(r), pct(r, "clean_accuracy", False),
                                        *(pct(r, f"{c}_accuracy", False) for c in CORRUPTIONS),
                                        *(pct(r, f"severity{k}_accuracy", False) for k in (1, 2, 3)),
                                        pct(r, "shift_accuracy")]) + " |")
    return "\n".join(lines)


def search_table(search: Sequence[dict[str, Any]], grid: Sequence[float] | None = None) -> str:
    """The learning-rate search: held-out accuracy per model and rate of the grid (default: the rates found), the
    chosen rate in bold; a rate not run yet is '-'."""
    rates = sorted(grid or {float(r["learning_rate"]) for r in search})
    by_model: dict[str, dict[float, dict[str, Any]]] = {}
    for r in sorted(search, key=order):
        by_model.setdefault(label(r), {})[float(r["learning_rate"])] = r
    lines = ["| model | " + " | ".join(f"lr {rate:g}" for rate in rates) + " | chosen |",
             "|---|" + "---:|" * (len(rates) + 1)]
    for name, found in by_model.items():
        best = max(found.values(), key=lambda r: r["heldout_accuracy"])
        edge = " (edge of the grid)" if len(rates) > 1 and float(best["learning_rate"]) in (rates[0], rates[-1]) else ""
        cells_ = [(f"**{100 * found[rate]['heldout_accuracy']:.2f}**" if found[rate] is best
                   else f"{100 * found[rate]['heldout_accuracy']:.2f}") if rate in found else "-" for rate in rates]
        lines.append(f"| {name} | " + " | ".join(cells_) + f" | {float(best['learning_rate']):g}{edge} |")
    return "\n".join(lines)


def branch_summary(branches: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (budget, fusion, data size, head): mean over seeds of the head's accuracy alone and its share."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in branches:
        groups.setdefault((float(r["budget_gmacs"]), r["fusion"], float(r["train_fraction"]), r["head"]), []).append(r)
    out = []
    for (budget, fusion, fraction, head), runs in groups.items():
        accuracy, share = _floats(runs, "head_accuracy"), _floats(runs, "share")
        out.append({"budget_gmacs": budget, "fusion": fusion, "train_fraction": fraction, "head": head,
                    "seeds": len(runs), "accuracy_mean": statistics.fmean(accuracy),
                    "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else math.nan,
                    "accuracy_ci": stats.interval(accuracy),
                    "share_mean": statistics.fmean(share) if share else math.nan})
    return sorted(out, key=lambda r: (-r["budget_gmacs"], -r["train_fraction"],
                                      FUSIONS.index(r["fusion"]) if r["fusion"] in FUSIONS else 99,
                                      r["head"]))


def branch_table(branches: Sequence[dict[str, Any]]) -> str:
    """Per fusion: each head's accuracy alone, the model's (the heads' mean), and each branch's share (%)."""
    summary = branch_summary(branches)
    heads = sorted({r["head"] for r in summary} - {"mean"}) + ["mean"]
    by_fusion: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in summary:
        by_fusion.setdefault((r["budget_gmacs"], r["train_fraction"], r["fusion"]), {})[r["head"]] = r
    head = ["cell", "fusion", *(f"{h} head alone" if h != "mean" else "both (model)" for h in heads),
            *(f"{h} share" for h in heads if h != "mean")]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for (budget, fraction, fusion), found in by_fusion.items():
        lines.append("| " + " | ".join([cell_label((budget, fraction)), fusion,
                                        *(pct(found[h], interval=False) if h in found else "-" for h in heads),
                                        *(f"{100 * found[h]['share_mean']:.1f}" if h in found else "-"
                                          for h in heads if h != "mean")]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Comparisons and the finding
# --------------------------------------------------------------------------- #


def _best_by(rows: Sequence[dict[str, Any]], key: str, metric: str = "accuracy") -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r[key] not in best or r[f"{metric}_mean"] > best[r[key]][f"{metric}_mean"]:
            best[r[key]] = r
    return best


def against_best(records: Sequence[dict[str, Any]], candidates: Sequence[dict[str, Any]],
                 cell: tuple[float, float], metric: str = "accuracy") -> list[stats.Comparison]:
    """The most accurate candidate (by mean) against each other one, paired on seeds, Holm-corrected."""
    if len(candidates) < 2:
        return []
    seeds = per_seed(records, cell, metric)
    ranked = sorted(candidates, key=lambda r: -r[f"{metric}_mean"])
    best = label(ranked[0])
    return stats.holm([stats.paired(best, label(r), seeds.get(best, {}), seeds.get(label(r), {}))
                       for r in ranked[1:]])


def comparison_table(comparisons: Sequence[stats.Comparison]) -> str:
    lines = ["| better | than | difference (points) | 95% interval | p | Holm p | verdict |",
             "|---|---|---:|---:|---:|---:|---|"]
    for c in comparisons:
        lines.append(f"| {c.first} | {c.second} | {100 * c.difference:+.2f} | ±{100 * c.half_width:.2f} | "
                     f"{c.p_value:.2g} | {c.p_adjusted:.2g} | {_verdict(c)} |")
    return "\n".join(lines)


def _verdict(c: stats.Comparison) -> str:
    return ("significant" if c.significant else "not significant") if c.tested else "untested"


def _claim_against(comparisons: Sequence[stats.Comparison]) -> str:
    """'significantly above X and Y; not significantly different from Z (p=...); untested against W'."""
    def cite(c: stats.Comparison) -> str:
        return f"{c.second} ({c.difference * 100:+.2f} points, p={c.p_adjusted:.2g})"

    above = [cite(c) for c in comparisons if c.tested and c.significant]
    level = [cite(c) for c in comparisons if c.tested and not c.significant]
    untested = [f"{c.second} ({c.difference * 100:+.2f} points)" for c in comparisons if not c.tested]
    parts = []
    if above:
        parts.append(f"significantly above {', '.join(above)}")
    if level:
        parts.append(f"not significantly different from {', '.join(level)}")
    if untested:
        parts.append(f"untested against {', '.join(untested)} (fewer than two shared seeds)")
    return "; ".join(parts) if parts else "with nothing to compare"


def finding(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]] | None = None,
            branches: Sequence[dict[str, Any]] = ()) -> str:
    """The study's claims in a few paragraphs, each marked significant or not (paired t-tests on shared seeds,
    Holm-corrected per family, 5%)."""
    if not rows:
        return "No finished runs yet."
    records = records or []
    present = cells(rows)
    main = present[0]
    text = []
    for cell in [c for c in present if c[1] == main[1]]:
        chosen = in_cell(rows, cell)
        best_per_pattern = _best_by(chosen, "pattern")
        ranking = sorted(best_per_pattern.values(), key=lambda r: -r["accuracy_mean"])
        order_text = " > ".join(f"{r['pattern']} {pct(r, interval=False)}" for r in ranking)
        seeds = min(int(r["seeds"]) for r in chosen)
        text.append(f"**{cell_label(cell)}** ({seeds}+ seeds). Best model per pattern: {order_text}.")
        if records and len(ranking) > 1:
            text.append(f"The best, {label(ranking[0])}, against the best of each other pattern (Holm over "
                        f"{len(ranking) - 1}): {_claim_against(against_best(records, ranking, cell))}.")
        fusions = [r for r in chosen if r["pattern"] == "parallel"]
        if records and len(fusions) > 1:
            ranked = sorted(fusions, key=lambda r: -r["accuracy_mean"])
            spread = ranked[0]["accuracy_mean"] - ranked[-1]["accuracy_mean"]
            text.append(f"Fusions: {ranked[0]['fusion']} leads ({pct(ranked[0], interval=False)}), "
                        f"{ranked[-1]['fusion']} trails ({pct(ranked[-1], interval=False)}), a "
                        f"{100 * spread:.2f}-point spread; {ranked[0]['fusion']} is "
                        f"{_claim_against(against_best(records, ranked, cell))}.")
    budgets = sorted({c[0] for c in present if c[1] == main[1]}, reverse=True)
    if len(budgets) > 1:
        big = {label(r): r["accuracy_mean"] for r in in_cell(rows, (budgets[0], main[1]))}
        small = {label(r): r["accuracy_mean"] for r in in_cell(rows, (budgets[-1], main[1]))}
        rho, p, n = stats.rank_correlation(big, small)
        gains = sorted((big[k] - small[k], k) for k in set(big) & set(small))
        if gains:
            ranking = (f"; the ranking of the {n} models at the two budgets correlates at Spearman rho={rho:.2f} "
                       f"(p={p:.2g})" if rho == rho else "")
            text.append(f"Compute: from {budgets[-1]:g} to {budgets[0]:g} GMACs every model's accuracy changes by "
                        f"{100 * gains[0][0]:+.2f} ({gains[0][1]}) to {100 * gains[-1][0]:+.2f} ({gains[-1][1]}) "
                        f"points{ranking}.")
    smaller = [c for c in present if c[0] == main[0] and c[1] < main[1]]
    for cell in smaller:
        few = {label(r): r for r in in_cell(rows, cell)}
        full = {label(r): r for r in in_cell(rows, main)}
        drops = sorted((full[k]["accuracy_mean"] - few[k]["accuracy_mean"], k) for k in set(few) & set(full))
        if drops:
            text.append(f"Data: with {100 * cell[1]:g}% of the training set (same steps) the models lose "
                        f"{100 * drops[0][0]:.2f} ({drops[0][1]}) to {100 * drops[-1][0]:.2f} ({drops[-1][1]}) "
                        f"points.")
            if records and len(drops) > 1:
                full_seeds, few_seeds = per_seed(records, main), per_seed(records, cell)
                loss = {k: {s: full_seeds[k][s] - few_seeds[k][s] for s in set(full_seeds.get(k, {}))
                            & set(few_seeds.get(k, {}))} for _, k in drops}
                c = stats.paired(drops[-1][1], drops[0][1], loss[drops[-1][1]], loss[drops[0][1]])
                text.append(f"{drops[-1][1]} loses more than {drops[0][1]}: {c.verdict()}.")
    chosen = in_cell(rows, main)
    if records and any(r["shift_accuracy_mean"] == r["shift_accuracy_mean"] for r in chosen):
        robust = sorted(chosen, key=lambda r: -r["shift_accuracy_mean"])
        drop = {label(r): r["clean_accuracy_mean"] - r["shift_accuracy_mean"] for r in chosen}
        least, most = min(drop, key=drop.get), max(drop, key=drop.get)
        text.append(f"Shift ({cell_label(main)}; noise, blur and contrast at three severities): "
                    f"{label(robust[0])} is most accurate on the corrupted images "
                    f"({pct(robust[0], 'shift_accuracy')}), "
                    f"{_claim_against(against_best(records, robust, main, 'shift_accuracy'))}. "
                    f"{least} loses least to the shift ({100 * drop[least]:.2f} points) and {most} most "
                    f"({100 * drop[most]:.2f}).")
    summary = [r for r in branch_summary(branches) if (r["budget_gmacs"], r["train_fraction"]) == main
               and r["head"] != "mean"]
    if summary:
        by_fusion: dict[str, dict[str, dict[str, Any]]] = {}
        for r in summary:
            by_fusion.setdefault(r["fusion"], {})[r["head"]] = r
        parts = []
        for fusion, heads in by_fusion.items():
            top = max(heads.values(), key=lambda r: r["share_mean"])
            parts.append(f"{fusion} {top['head']} {100 * top['share_mean']:.0f}%")
        text.append(f"Branches ({cell_label(main)}): the larger share of the predicted logit (gradient x input at "
                    f"the heads) per fusion: {', '.join(parts)}.")
    return "\n\n".join(text)


# --------------------------------------------------------------------------- #
# Everything at once
# --------------------------------------------------------------------------- #


def load(results_dir: str | Path) -> dict[str, Any]:
    """A results directory `write_results` filled: {"rows", "records", "search", "curves", "branches", "settings"}."""
    results_dir = Path(results_dir)
    read = lambda name: read_csv(results_dir / name) if (results_dir / name).exists() else []  # noqa: E731
    return {"rows": read("results.csv"), "records": read("runs.csv"), "search": read("lr_search.csv"),
            "curves": read("curves.csv"), "branches": read("attribution.csv"),
            "settings": json.loads((results_dir / "sweep.json").read_text())}


def write_results(records: Sequence[dict[str, Any]], results_dir: str | Path, *, search: Sequence[dict[str, Any]],
                  curves: Sequence[dict[str, Any]] = (), branches: Sequence[dict[str, Any]] = (), tolerance: float,
                  solver_table: str = "", notes: str = "",
                  settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """runs.csv, lr_search.csv, curves.csv, attribution.csv, results.csv, results.md, finding.md, sweep.json and the
    plots.

    Returns:
      The written files by name.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    chosen = {(r["name"], float(r["learning_rate"])) for r in records}
    search = [{**r, "chosen": (r["name"], float(r["learning_rate"])) in chosen} for r in search]
    names = ("runs.csv", "lr_search.csv", "curves.csv", "attribution.csv", "results.csv", "results.md", "finding.md",
             "sweep.json")
    paths = {name: results_dir / name for name in names}
    paths["sweep.json"].write_text(json.dumps({"tolerance": tolerance, "notes": notes, **(settings or {})},
                                              indent=2) + "\n")
    write_csv(sorted(records, key=lambda r: (order(r), r["seed"])), paths["runs.csv"], RUN_FIELDS)
    write_csv(sorted(search, key=lambda r: (order(r), r["learning_rate"])),
              paths["lr_search.csv"], SEARCH_FIELDS)
    write_csv(curves, paths["curves.csv"], CURVE_FIELDS)
    write_csv(branches, paths["attribution.csv"], BRANCH_FIELDS)
    write_csv(rows, paths["results.csv"], RESULT_FIELDS)
    headline = finding(rows, records, branches)
    paths["finding.md"].write_text(headline + "\n")
    sections = ["# Hybrid CNN + ViT patterns and fusions at matched compute", notes,
                "## Test accuracy (mean ± std over seeds [95% interval], %; seeds in brackets)",
                headline_table(rows) if rows else "No finished runs yet.",
                "## Learning rates (held-out accuracy, %)",
                search_table(search, (settings or {}).get("lr_search", {}).get("learning_rates")) if search else ""]
    for cell in cells(rows):
        comparisons = against_best(records, in_cell(rows, cell), cell)
        sections += [f"## {cell_label(cell)}", detail_table(rows, cell),
                     "Paired against the most accurate model (same seeds; Holm-corrected within the cell):",
                     comparison_table(comparisons) if comparisons else ""]
    if rows:
        sections += [f"## Accuracy per corruption and severity, {cell_label(cells(rows)[0])}",
                     corruption_table(rows, cells(rows)[0])]
    if branches:
        sections += ["## Branches of the parallel hybrids (head ablation and gradient x input share, mean over seeds)",
                     branch_table(branches)]
    sections += ["## Solved widths and depths", solver_table, "## Finding", headline]
    paths["results.md"].write_text("\n\n".join(part for part in sections if part) + "\n")
    for name, fig in plots.all_figures(rows, search, curves, branch_summary(branches)).items():
        paths[name] = results_dir / name
        fig.savefig(paths[name], dpi=110)
    return paths
