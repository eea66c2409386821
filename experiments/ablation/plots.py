"""The study's figures, from aggregated rows (report.aggregate), the search records and the training curves.

Every error bar is a 95% t interval over seeds. A figure whose runs are not finished yet
says so on its axes instead of failing, so a part of the study can be plotted as it stands.
"""

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from experiments.ablation.grid import CORRUPTIONS, FUSIONS, label

PATTERN_COLORS = {"parallel": "tab:blue", "serial": "tab:orange", "hierarchical": "tab:green", "cnn": "tab:red",
                  "vit": "tab:purple"}


def _ci(row: dict[str, Any], metric: str = "accuracy") -> float:
    ci = row[f"{metric}_ci"]
    return 100 * ci if ci == ci else 0.0


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _full_data(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    top = max((float(r["train_fraction"]) for r in rows), default=1.0)
    return [r for r in rows if float(r["train_fraction"]) == top]


def _main_cell(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    full = _full_data(rows)
    budget = max((float(r["budget_gmacs"]) for r in full), default=0.0)
    return [r for r in full if float(r["budget_gmacs"]) == budget]


def accuracy_vs_gmacs(rows: Sequence[dict[str, Any]]) -> Figure:
    """Test accuracy against GMACs, one line per model across the budgets, coloured by pattern (all the data)."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    full = _full_data(rows)
    if not full:
        _empty(ax, "no finished runs yet")
        return fig
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in full:
        by_model.setdefault(label(r), []).append(r)
    seen = set()
    for name, points in by_model.items():
        points.sort(key=lambda r: float(r["gmacs"]))
        pattern = points[0]["pattern"]
        ax.errorbar([float(r["gmacs"]) for r in points], [100 * r["accuracy_mean"] for r in points],
                    yerr=[_ci(r) for r in points], fmt="-o", color=PATTERN_COLORS.get(pattern, "k"), capsize=3,
                    alpha=0.85, label=None if pattern in seen else pattern)
        seen.add(pattern)
        last = points[-1]
        ax.annotate(name.replace("parallel_hybrid ", ""), (float(last["gmacs"]), 100 * last["accuracy_mean"]),
                    fontsize=7, xytext=(4, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST accuracy against compute, per pattern (95% intervals over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fusion_bars(rows: Sequence[dict[str, Any]]) -> Figure:
    """The parallel hybrid's fusions, one group of bars per (budget, data size) cell."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    parallel = [r for r in rows if r["pattern"] == "parallel"]
    if not parallel:
        _empty(ax, "no parallel runs yet")
        return fig
    names = [f for f in FUSIONS if any(r["fusion"] == f for r in parallel)]
    cells = sorted({(float(r["budget_gmacs"]), float(r["train_fraction"])) for r in parallel},
                   key=lambda c: (-c[1], -c[0]))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        found = {r["fusion"]: r for r in parallel if (float(r["budget_gmacs"]), float(r["train_fraction"])) == cell}
        ax.bar([j + (i - (len(cells) - 1) / 2) * width for j in range(len(names))],
               [100 * found[n]["accuracy_mean"] if n in found else math.nan for n in names], width,
               yerr=[_ci(found[n]) if n in found else 0.0 for n in names], capsize=3,
               label=f"{cell[0]:g} GMACs, {100 * cell[1]:g}% data")
    means = [100 * r["accuracy_mean"] for r in parallel]
    ax.set_ylim(max(0.0, min(means) - 4), min(100.0, max(means) + 2))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Parallel hybrid: fusions at matched GMACs (95% intervals over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def data_size(rows: Sequence[dict[str, Any]]) -> Figure:
    """Accuracy against the fraction of the training set (same steps), per model, at the main budget."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    budget = max((float(r["budget_gmacs"]) for r in rows), default=0.0)
    chosen = [r for r in rows if float(r["budget_gmacs"]) == budget]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in chosen:
        by_model.setdefault(label(r), []).append(r)
    by_model = {k: v for k, v in by_model.items() if len(v) > 1}
    if not by_model:
        _empty(ax, "no model has finished runs at two data sizes yet")
        return fig
    for name, points in by_model.items():
        points.sort(key=lambda r: float(r["train_fraction"]))
        ax.errorbar([100 * float(r["train_fraction"]) for r in points], [100 * r["accuracy_mean"] for r in points],
                    yerr=[_ci(r) for r in points], fmt="-o", capsize=3, label=name,
                    color=PATTERN_COLORS.get(points[0]["pattern"], "k"))
    ax.set_xscale("log")
    ax.set_xlabel("% of the training set (every size trains the same number of steps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Training-set size at {budget:g} GMACs (95% intervals over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def shift_curves(rows: Sequence[dict[str, Any]]) -> Figure:
    """Accuracy against severity (0 = clean) per corruption and averaged, at the main budget on all the data."""
    chosen = _main_cell(rows)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, len(CORRUPTIONS) + 1, sharey=True)
    if not chosen or chosen[0]["shift_accuracy_mean"] != chosen[0]["shift_accuracy_mean"]:
        _empty(axes[0], "no shift scores yet")
        return fig
    panels = [(c.replace("_", " "), [f"{c}_s{k}_accuracy" for k in (1, 2, 3)]) for c in CORRUPTIONS]
    panels.append(("mean of the three", [f"severity{k}_accuracy" for k in (1, 2, 3)]))
    for ax, (title, metrics) in zip(axes, panels):
        for r in chosen:
            values = [r["clean_accuracy_mean"], *(r.get(f"{m}_mean", math.nan) for m in metrics)]
            ax.plot(range(len(values)), [100 * v for v in values], "-o", ms=3, label=label(r),
                    color=PATTERN_COLORS.get(r["pattern"], "k"), alpha=0.4 if r["pattern"] == "parallel" else 0.9)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(4), ["clean", "1", "2", "3"])
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=6)
    return fig


def training_curves(rows: Sequence[dict[str, Any]], curves: Sequence[dict[str, Any]]) -> Figure:
    """Training loss and accuracy of the best model of each pattern (main budget, all the data, seed 0)."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    chosen = _main_cell(rows)
    best: dict[str, dict[str, Any]] = {}
    for r in chosen:
        if r["pattern"] not in best or r["accuracy_mean"] > best[r["pattern"]]["accuracy_mean"]:
            best[r["pattern"]] = r
    if not best or not curves:
        _empty(loss_ax, "no training curves yet")
        return fig
    budget, fraction = float(chosen[0]["budget_gmacs"]), float(chosen[0]["train_fraction"])
    for pattern, r in best.items():
        name = f"{r['model']}_{r['fusion'] or 'none'}"
        points = sorted((c for c in curves if c["name"] == name and float(c["budget_gmacs"]) == budget
                         and float(c["train_fraction"]) == fraction and int(c["seed"]) == 0), key=lambda c: c["step"])
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot([c["step"] for c in points], [c[key] * (100 if key == "accuracy" else 1) for c in points],
                    label=label(r), color=PATTERN_COLORS.get(pattern, "k"))
    loss_ax.set_ylabel("training loss (label-smoothed)")
    acc_ax.set_ylabel("training accuracy, augmented batches (%)")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    fig.suptitle("Best model of each pattern, seed 0: has training plateaued?", fontsize=10)
    return fig


def lr_search(search: Sequence[dict[str, Any]]) -> Figure:
    """Held-out accuracy against the learning rate, per model (one seed)."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in search:
        by_model.setdefault(label(r), []).append(r)
    if not by_model:
        _empty(ax, "no search runs yet")
        return fig
    for i, (name, points) in enumerate(by_model.items()):
        points.sort(key=lambda r: float(r["learning_rate"]))
        ax.plot([float(r["learning_rate"]) for r in points], [100 * float(r["heldout_accuracy"]) for r in points],
                marker="osD^v<>"[i % 7], linestyle=("-", "--", ":", "-.")[i % 4], label=name,
                color=PATTERN_COLORS.get(points[0]["pattern"], "k"))
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Learning-rate search on the training split's last 10%")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return fig


def branches(summary: Sequence[dict[str, Any]]) -> Figure:
    """Per fusion (main budget, all the data): each head's accuracy alone beside the model's, and each branch's
    share of the predicted logit."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    accuracy_ax, share_ax = fig.subplots(1, 2)
    if not summary:
        _empty(accuracy_ax, "no parallel runs attributed yet")
        return fig
    main = max((r["train_fraction"], r["budget_gmacs"]) for r in summary)
    chosen = [r for r in summary if (r["train_fraction"], r["budget_gmacs"]) == main]
    fusions = [f for f in FUSIONS if any(r["fusion"] == f for r in chosen)]
    heads = sorted({r["head"] for r in chosen} - {"mean"}) + ["mean"]
    width = 0.8 / len(heads)
    for i, head in enumerate(heads):
        found = {r["fusion"]: r for r in chosen if r["head"] == head}
        offsets = [j + (i - (len(heads) - 1) / 2) * width for j in range(len(fusions))]
        accuracy_ax.bar(offsets, [100 * found[f]["accuracy_mean"] if f in found else math.nan for f in fusions],
                        width, yerr=[_ci(found[f]) if f in found else 0.0 for f in fusions], capsize=2,
                        label="model (mean of heads)" if head == "mean" else f"{head} head alone")
    bottom = [0.0] * len(fusions)
    for head in heads[:-1]:
        found = {r["fusion"]: r for r in chosen if r["head"] == head}
        share = [100 * found[f]["share_mean"] if f in found else 0.0 for f in fusions]
        share_ax.bar(range(len(fusions)), share, 0.6, bottom=bottom, label=f"{head} branch")
        bottom = [b + s for b, s in zip(bottom, share)]
    for ax, ylabel in ((accuracy_ax, "test accuracy (%)"), (share_ax, "share of |gradient x input| (%)")):
        ax.set_xticks(range(len(fusions)), fusions, rotation=20, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Parallel hybrid branches at {main[1]:g} GMACs: head ablation and attribution", fontsize=10)
    return fig


def all_figures(rows: Sequence[dict[str, Any]], search: Sequence[dict[str, Any]],
                curves: Sequence[dict[str, Any]], branch_summary: Sequence[dict[str, Any]] = ()) -> dict[str, Figure]:
    """Every figure of results.md by file name."""
    return {"accuracy_vs_gmacs.png": accuracy_vs_gmacs(rows), "fusion_bars.png": fusion_bars(rows),
            "data_size.png": data_size(rows), "shift_curves.png": shift_curves(rows),
            "training_curves.png": training_curves(rows, curves), "lr_search.png": lr_search(search),
            "branches.png": branches(branch_summary)}


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (for notebooks: IPython.display.Image(png(fig)))."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
