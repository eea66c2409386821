"""Tables, plots and the headline of an ablation sweep, from its per-run records.

Light on purpose (csv, statistics, matplotlib; no JAX), so the notebook that draws the
committed results starts in a second. Records are dicts, one per (model, train
fraction, seed) run: see `RUN_FIELDS`. `aggregate` folds the seeds into mean and
sample standard deviation per (model, fusion, train fraction).
"""

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure

PATTERN_ORDER = ("parallel", "serial", "hierarchical", "cnn", "vit")
FUSION_ORDER = ("concat", "add", "gating", "cross_attention", "fcu", "bridge")
CORRUPTION_LABELS = {"gaussian_noise": "noise", "blur": "blur", "contrast": "contrast"}
RUN_FIELDS = ("name", "model", "pattern", "fusion", "train_fraction", "seed", "steps", "params", "gmacs",
              "accuracy", "clean_accuracy", "gaussian_noise_accuracy", "blur_accuracy", "contrast_accuracy",
              "shift_accuracy", "train_images_per_sec", "infer_images_per_sec", "wall_time_s")
# accuracy: the whole test split (the training loop's figure); the others on the shift subset of it.
METRICS = ("accuracy", "shift_accuracy", "clean_accuracy", "gaussian_noise_accuracy", "blur_accuracy",
           "contrast_accuracy")
CORRUPTION_METRICS = METRICS[3:]
RESULT_FIELDS = ("model", "pattern", "fusion", "train_fraction", "params", "gmacs", "seeds",
                 *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")), "train_images_per_sec",
                 "infer_images_per_sec")
_PATTERN_COLORS = {"parallel": "tab:blue", "serial": "tab:orange", "hierarchical": "tab:green", "cnn": "tab:red",
                   "vit": "tab:purple"}


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


def _order(row: dict[str, Any]) -> tuple:
    fusion = row["fusion"]
    return (PATTERN_ORDER.index(row["pattern"]) if row["pattern"] in PATTERN_ORDER else 99,
            FUSION_ORDER.index(fusion) if fusion in FUSION_ORDER else -1, row["model"], -float(row["train_fraction"]))


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]  # NaN-free
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, fusion, train fraction): seed means and sample standard deviations."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["pattern"], r["fusion"], float(r["train_fraction"])), []).append(r)
    rows = []
    for (model, pattern, fusion, fraction), runs in groups.items():
        row = {"model": model, "pattern": pattern, "fusion": fusion, "train_fraction": fraction,
               "params": runs[0]["params"], "gmacs": runs[0]["gmacs"], "seeds": len(runs)}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([float(r[metric]) for r in runs])
        for speed in ("train_images_per_sec", "infer_images_per_sec"):
            row[speed] = _mean_std([float(r[speed]) for r in runs if r.get(speed) not in (None, "")])[0]
        rows.append(row)
    return sorted(rows, key=_order)


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #


def _pct(mean: float, std: float) -> str:
    return "-" if mean != mean else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def fractions(rows: Sequence[dict[str, Any]]) -> list[float]:
    """The sweep's train fractions, largest first."""
    return sorted({float(r["train_fraction"]) for r in rows}, reverse=True)


def _by_model(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[float, dict[str, Any]]]:
    table: dict[tuple, dict[float, dict[str, Any]]] = {}
    for r in rows:
        table.setdefault((r["model"], r["pattern"], r["fusion"]), {})[float(r["train_fraction"])] = r
    return table


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Models down, data sizes side by side: clean and shifted accuracy (mean ± std over seeds, %), speed."""
    fracs = fractions(rows)
    head = ["model", "pattern", "fusion", "params", "GMACs", "seeds",
            *(f"accuracy, {_fraction_label(f)} data" for f in fracs),
            *(f"shifted accuracy, {_fraction_label(f)} data" for f in fracs), "train img/s", "infer img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for (model, pattern, fusion), by_fraction in _by_model(rows).items():
        first = by_fraction[max(by_fraction)]
        cells = [model, pattern, fusion or "-", f"{int(first['params']):,}", f"{float(first['gmacs']):.4f}",
                 "/".join(str(by_fraction[f]["seeds"]) for f in fracs if f in by_fraction)]
        for metric in ("accuracy", "shift_accuracy"):
            cells += [_pct(by_fraction[f][f"{metric}_mean"], by_fraction[f][f"{metric}_std"]) if f in by_fraction
                      else "-" for f in fracs]
        cells += [f"{float(first['train_images_per_sec']):,.0f}", f"{float(first['infer_images_per_sec']):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def corruption_table(rows: Sequence[dict[str, Any]], fraction: float | None = None) -> str:
    """Accuracy per corruption (%) beside the clean accuracy of the same images, at one train fraction."""
    fraction = max(fractions(rows)) if fraction is None else fraction
    names = [m.removesuffix("_accuracy") for m in CORRUPTION_METRICS]
    head = ["model", "fusion", "clean", *(CORRUPTION_LABELS.get(n, n) for n in names), "mean shifted", "drop"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        if float(r["train_fraction"]) != fraction:
            continue
        drop = r["clean_accuracy_mean"] - r["shift_accuracy_mean"]
        lines.append("| " + " | ".join([r["model"], r["fusion"] or "-",
                                        _pct(r["clean_accuracy_mean"], r["clean_accuracy_std"]),
                                        *(_pct(r[f"{n}_accuracy_mean"], r[f"{n}_accuracy_std"]) for n in names),
                                        _pct(r["shift_accuracy_mean"], r["shift_accuracy_std"]),
                                        f"{100 * drop:.2f}"]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #


def _label(row: dict[str, Any]) -> str:
    return f"{row['model']} ({row['fusion']})" if row["fusion"] else row["model"]


def plot_accuracy_vs(rows: Sequence[dict[str, Any]], x: str = "gmacs", budget: float | None = None,
                     tolerance: float = 0.05) -> Figure:
    """Accuracy (mean ± std over seeds) against GMACs or params, one colour per pattern, one marker per data size."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    markers = dict(zip(fractions(rows), ("o", "^", "s", "D")))
    if x == "gmacs" and budget:
        ax.axvspan(budget * (1 - tolerance), budget * (1 + tolerance), color="0.92", label=f"budget ±{tolerance:.0%}")
    seen = set()
    for r in rows:
        fraction = float(r["train_fraction"])
        key = (r["pattern"], fraction)
        ax.errorbar(float(r[x]), 100 * r["accuracy_mean"], yerr=100 * r["accuracy_std"], fmt=markers[fraction],
                    color=_PATTERN_COLORS.get(r["pattern"], "k"), capsize=3, mfc="white" if fraction < 1 else None,
                    label=None if key in seen else f"{r['pattern']}, {_fraction_label(fraction)} data")
        seen.add(key)
        if r["fusion"]:
            ax.annotate(r["fusion"], (float(r[x]), 100 * r["accuracy_mean"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    if x == "params":
        ax.set_xscale("log")
    ax.set_xlabel({"gmacs": "GMACs per image", "params": "parameters"}[x])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST accuracy vs {'multiply-adds' if x == 'gmacs' else 'parameters'} "
                 f"(mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_fusions(rows: Sequence[dict[str, Any]]) -> Figure:
    """The parallel pattern's fusions: clean accuracy per data size and shifted accuracy, with seed std bars."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    parallel = [r for r in rows if r["pattern"] == "parallel"]
    names = [f for f in FUSION_ORDER if any(r["fusion"] == f for r in parallel)]
    names += sorted({r["fusion"] for r in parallel} - set(names))
    series = [(f"clean, {_fraction_label(f)} data", f, "accuracy") for f in fractions(parallel)]
    series.append((f"shifted, {_fraction_label(max(fractions(parallel) or [1.0]))} data",
                   max(fractions(parallel) or [1.0]), "shift_accuracy"))
    width = 0.8 / len(series)
    for i, (label, fraction, metric) in enumerate(series):
        found = {r["fusion"]: r for r in parallel if float(r["train_fraction"]) == fraction}
        means = [100 * found[n][f"{metric}_mean"] if n in found else math.nan for n in names]
        stds = [100 * found[n][f"{metric}_std"] if n in found else 0.0 for n in names]
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], means, width, yerr=stds,
               capsize=3, label=label)
    ax.set_xticks(range(len(names)), names)
    finite = [100 * r[m] for r in parallel for m in ("accuracy_mean", "shift_accuracy_mean") if r[m] == r[m]]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
    else:
        ax.text(0.5, 0.5, "no parallel runs in this sweep", ha="center", transform=ax.transAxes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Parallel hybrid: fusion modules at matched GMACs (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_robustness(rows: Sequence[dict[str, Any]], fraction: float | None = None) -> Figure:
    """Per model: clean accuracy beside each corruption's, at one data size."""
    fraction = max(fractions(rows)) if fraction is None else fraction
    chosen = [r for r in rows if float(r["train_fraction"]) == fraction]
    fig = Figure(figsize=(max(7.5, 0.75 * len(chosen) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    series = [("clean", "clean_accuracy")] + [(CORRUPTION_LABELS[m.removesuffix("_accuracy")], m)
                                              for m in CORRUPTION_METRICS]
    width = 0.8 / len(series)
    for i, (label, metric) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(chosen))],
               [100 * r[f"{metric}_mean"] for r in chosen], width, yerr=[100 * r[f"{metric}_std"] for r in chosen],
               capsize=2, label=label)
    ax.set_xticks(range(len(chosen)), [_label(r) for r in chosen], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Domain shift: corrupted Fashion-MNIST test set ({_fraction_label(fraction)} training data)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (for notebooks: IPython.display.Image(png(fig)))."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


# --------------------------------------------------------------------------- #
# The finding
# --------------------------------------------------------------------------- #


def load(results_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-model rows, sweep settings) of a results directory `write_results` filled."""
    results_dir = Path(results_dir)
    return read_csv(results_dir / "results.csv"), json.loads((results_dir / "sweep.json").read_text())


def finding(rows: Sequence[dict[str, Any]], budget: float | None = None) -> str:
    """A few sentences on what the numbers say: the ranking, the fusion spread against seed noise, data and shift."""
    if not rows:
        return "No finished runs yet."
    fracs = fractions(rows)
    full = [r for r in rows if float(r["train_fraction"]) == fracs[0]]
    ranked = sorted(full, key=lambda r: -r["accuracy_mean"])
    noise = statistics.fmean([r["accuracy_std"] for r in full])
    seeds = min(int(r["seeds"]) for r in full)

    def acc(r: dict[str, Any], metric: str = "accuracy") -> str:
        return f"{100 * r[metric + '_mean']:.2f} ± {100 * r[metric + '_std']:.2f}%"

    best, worst = ranked[0], ranked[-1]
    budget_text = f"at {budget:g} GMACs" if budget else "at matched GMACs"
    text = [f"With every model {budget_text} and {_fraction_label(fracs[0])} of the training set, "
            f"{_label(best)} ({best['pattern']}) is most accurate ({acc(best)}, {seeds}+ seeds) and "
            f"{_label(worst)} ({worst['pattern']}) least ({acc(worst)}); the seed standard deviation averages "
            f"{100 * noise:.2f} points, so gaps below about {200 * noise:.2f} points are within noise."]
    per_pattern = {}
    for r in ranked:
        per_pattern.setdefault(r["pattern"], r)
    order = " > ".join(f"{p} {100 * r['accuracy_mean']:.2f}" for p, r in per_pattern.items())
    text.append(f"Best per pattern: {order}.")
    fusions = [r for r in full if r["pattern"] == "parallel"]
    if len(fusions) > 1:
        f_best = max(fusions, key=lambda r: r["accuracy_mean"])
        f_worst = min(fusions, key=lambda r: r["accuracy_mean"])
        spread = f_best["accuracy_mean"] - f_worst["accuracy_mean"]
        verdict = "more than" if spread > 2 * noise else "within"
        text.append(f"Among the parallel hybrid's fusions {f_best['fusion']} leads ({acc(f_best)}) and "
                    f"{f_worst['fusion']} trails ({acc(f_worst)}): a {100 * spread:.2f}-point spread, "
                    f"{verdict} twice the seed noise.")
    if len(fracs) > 1:
        small = {(r["model"], r["fusion"]): r for r in rows if float(r["train_fraction"]) == fracs[-1]}
        drops = sorted(((r["accuracy_mean"] - small[(r["model"], r["fusion"])]["accuracy_mean"], r) for r in full
                        if (r["model"], r["fusion"]) in small), key=lambda d: d[0])
        if drops:
            small_best = max(small.values(), key=lambda r: r["accuracy_mean"])
            text.append(f"With {_fraction_label(fracs[-1])} of the data (same number of steps) {_label(small_best)} "
                        f"leads ({acc(small_best)}); {_label(drops[0][1])} loses least "
                        f"({100 * drops[0][0]:.2f} points) and {_label(drops[-1][1])} most "
                        f"({100 * drops[-1][0]:.2f}).")
    robust = sorted(full, key=lambda r: -r["shift_accuracy_mean"])
    if robust and robust[0]["shift_accuracy_mean"] == robust[0]["shift_accuracy_mean"]:
        drop = lambda r: 100 * (r["clean_accuracy_mean"] - r["shift_accuracy_mean"])
        gaps = sorted(full, key=drop)
        text.append(f"On the corrupted test images (noise, blur, contrast) {_label(robust[0])} is most accurate "
                    f"({acc(robust[0], 'shift_accuracy')}); {_label(gaps[0])} loses least to the shift "
                    f"({drop(gaps[0]):.2f} points) and {_label(gaps[-1])} most ({drop(gaps[-1]):.2f}).")
    return " ".join(text)


# --------------------------------------------------------------------------- #
# Everything at once
# --------------------------------------------------------------------------- #

PLOTS = ("accuracy_vs_gmacs.png", "accuracy_vs_params.png", "fusion_bars.png", "robustness.png")


def write_results(records: Sequence[dict[str, Any]], results_dir: str | Path, *, budget: float,
                  tolerance: float, solver_table: str = "", notes: str = "",
                  settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """runs.csv (per seed), results.csv and results.md (per model), sweep.json, finding.md and the plots.

    Returns:
      The written files by name.
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    paths = {name: results_dir / name for name in ("runs.csv", "results.csv", "results.md", "finding.md", "sweep.json",
                                                    *PLOTS)}
    paths["sweep.json"].write_text(json.dumps({"budget_gmacs": budget, "tolerance": tolerance, "notes": notes,
                                               **(settings or {})}, indent=2) + "\n")
    write_csv(sorted(records, key=lambda r: (_order(r), r["seed"])), paths["runs.csv"], RUN_FIELDS)
    write_csv(rows, paths["results.csv"], RESULT_FIELDS)
    headline = finding(rows, budget)
    paths["finding.md"].write_text(headline + "\n")
    paths["results.md"].write_text("\n\n".join(part for part in [
        f"# Matched-compute ablation: {budget:g} GMACs per image (every model within {tolerance:.0%})",
        notes,
        "## Accuracy (mean ± std over seeds, %), clean and under shift, by training-set size",
        markdown_table(rows),
        f"## Accuracy per corruption, {_fraction_label(max(fractions(rows)))} training data",
        corruption_table(rows),
        "## Solved widths and depths", solver_table,
        "## Finding", headline] if part) + "\n")
    figures = {"accuracy_vs_gmacs.png": plot_accuracy_vs(rows, "gmacs", budget, tolerance),
               "accuracy_vs_params.png": plot_accuracy_vs(rows, "params"),
               "fusion_bars.png": plot_fusions(rows), "robustness.png": plot_robustness(rows)}
    for name, fig in figures.items():
        fig.savefig(paths[name], dpi=110)
    return paths
