"""Re-ID at equal compute with error bars: the TCCNet-style default against its CNN and ViT backbones, 3 seeds each.

    python -m experiments.reid.run --workdir runs/reid_seeds --results_dir experiments/reid/results \
        [--max_hours 2.5]

Each run is configs/reid_synthetic.py with its backbone (tccnet | cnn | vit, about 0.035 GMACs each at 32 px)
and its seed, trained by the main loop into {workdir}/{backbone}_seed{seed}. Runs go seed by seed, so a part
that stops early leaves whole seeds; a finished run is read, not retrained, and an interrupted one resumes,
so the same command carries on. A run the results directory records (with the same configs) counts as
finished too, so a fresh machine carries on from the committed results. Quiet on 2 CPU cores a seed of the
three takes about 14 minutes.

Writes runs.csv (one row per run), settings.json (each backbone's config) and results.md: mean ± std and the
95% t interval of rank-1, rank-5 and mAP per backbone, and the default against each backbone alone, paired on
shared seeds (Holm-corrected per metric).
"""

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.ablation import stats
from experiments.ablation.report import read_csv, setting_differences, write_csv

ROOT = Path(__file__).resolve().parents[2]
BACKBONES = ("tccnet", "cnn", "vit")
DEFAULT = "tccnet"
SEEDS = (0, 1, 2)
METRICS = {"rank1": "rank-1", "rank5": "rank-5", "mAP": "mAP"}
FIELDS = ("backbone", "seed", "model", *METRICS, "wall_time_s")


def run_config(backbone: str, seed: int):
    """configs/reid_synthetic.py with `backbone` and `seed`."""
    from hybrid_jax.train.config import load_config_file

    config = load_config_file(f"{ROOT / 'configs' / 'reid_synthetic.py'}:{backbone}")
    config.seed = seed
    config.progress_bar = False
    return config


def settings(**overrides: Any) -> dict[str, Any]:
    """Each backbone's run config, seed aside: what a recorded run must have been trained with to be reused."""
    configs = {}
    for backbone in BACKBONES:
        config = run_config(backbone, 0)
        config.update(overrides)
        configs[backbone] = {k: v for k, v in config.to_dict().items() if k != "seed"}
    return json.loads(json.dumps(configs))


def recorded_runs(results_dir: str | Path, expected: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The runs results_dir records, by (backbone, seed), if their configs are `expected` (see `settings`).

    Raises:
      ValueError: the directory records runs of other configs, which writing would replace.
    """
    results_dir = Path(results_dir)
    if not (results_dir / "settings.json").exists():
        return {}
    if differences := setting_differences(json.loads((results_dir / "settings.json").read_text()), expected):
        raise ValueError(f"{results_dir} records runs of other configs ({'; '.join(differences)}); writing these "
                         f"results there would replace them. Pass another --results_dir, or move that one away.")
    return {(r["backbone"], r["seed"]): r for r in read_csv(results_dir / "runs.csv")}


def _record(backbone: str, seed: int, summary: dict[str, Any], model: str) -> dict[str, Any]:
    return {"backbone": backbone, "seed": seed, "model": model, "wall_time_s": summary.get("wall_time_s"),
            **{metric: summary[f"test_{metric}"] for metric in METRICS}}


def run_all(workdir: str | Path, *, backbones: Sequence[str] = BACKBONES, seeds: Sequence[int] = SEEDS,
            max_hours: float | None = None, recorded: dict[tuple[str, int], dict[str, Any]] | None = None,
            **overrides: Any) -> tuple[list[dict[str, Any]], int]:
    """Trains (or reads) every run; returns (one record per finished run, runs left for the next part).

    `recorded`: finished runs by (backbone, seed) (`recorded_runs`), read where the workdir lacks them.
    `overrides` are config fields set on every run (data_dir, a shorter schedule for a check).
    """
    from hybrid_jax.train.loop import train_and_evaluate

    workdir = Path(workdir)
    deadline = time.monotonic() + 3600 * max_hours if max_hours else float("inf")
    records, unstarted = [], 0
    for seed in seeds:
        for backbone in backbones:
            directory = workdir / f"{backbone}_seed{seed}"
            config = run_config(backbone, seed)
            config.update(overrides)
            if (directory / "summary.json").exists():
                summary = json.loads((directory / "summary.json").read_text())
            elif (backbone, seed) in (recorded or {}):
                records.append(recorded[backbone, seed])
                print(f"{directory.name}: recorded in the results", flush=True)
                continue
            elif time.monotonic() > deadline:
                unstarted += 1
                continue
            else:
                summary = train_and_evaluate(config, directory)
            records.append(_record(backbone, seed, summary, config.model.name))
            print(f"{directory.name}: rank-1 {records[-1]['rank1']:.1f}, mAP {records[-1]['mAP']:.1f}", flush=True)
    return records, unstarted


def report(records: list[dict[str, Any]]) -> str:
    """results.md: per backbone mean ± std [95% interval] of each metric, then the default against the others."""
    by_backbone = {b: [r for r in records if r["backbone"] == b] for b in dict.fromkeys(r["backbone"] for r in records)}
    lines = ["| backbone | model | seeds | " + " | ".join(METRICS.values()) + " | wall time (mean) |",
             "|---|---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for backbone, rows in by_backbone.items():
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in rows]
            spread = f" ± {statistics.stdev(values):.1f} [±{stats.interval(values):.1f}]" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.1f}{spread}")
        walls = [r["wall_time_s"] for r in rows if r["wall_time_s"]]
        wall = f"{statistics.fmean(walls) / 60:.1f} min" if walls else "-"
        lines.append(f"| {backbone} | {rows[0]['model']} | {len(rows)} | {' | '.join(cells)} | {wall} |")
    lines += ["", "Mean ± std over seeds [half-width of the 95% t interval]. The default against each backbone "
              "alone, paired on shared seeds, Holm-corrected over the comparisons of one metric:", ""]
    others = [b for b in by_backbone if b != DEFAULT]
    if DEFAULT in by_backbone and others:
        per_seed = {b: {metric: {r["seed"]: r[metric] for r in rows} for metric in METRICS}
                    for b, rows in by_backbone.items()}
        for metric, label in METRICS.items():
            for c in stats.holm([stats.paired(DEFAULT, other, per_seed[DEFAULT][metric], per_seed[other][metric])
                                 for other in others]):
                lines.append(f"- {label}: {c.first} - {c.second} = {c.difference:+.1f} points "
                             f"(±{c.half_width:.1f}), {c.verdict()}")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict[str, Any]], results_dir: str | Path, command: str,
                  configs: dict[str, Any]) -> None:
    """runs.csv, settings.json (`configs`, from `settings`) and results.md."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, results_dir / "runs.csv", FIELDS)
    (results_dir / "settings.json").write_text(json.dumps(configs, indent=2) + "\n")
    (results_dir / "results.md").write_text(f"`{command}`\n\n{report(records)}")


def main(argv: list[str]) -> None:
    del argv
    configs = settings()
    try:
        recorded = recorded_runs(_RESULTS_DIR.value, configs)
    except ValueError as error:
        sys.exit(f"error: {error}")
    records, unstarted = run_all(_WORKDIR.value, max_hours=_MAX_HOURS.value, recorded=recorded)
    if records:
        write_results(records, _RESULTS_DIR.value, " ".join(["python -m experiments.reid.run", *sys.argv[1:]]),
                      configs)
        print(report(records))
    if unstarted:
        print(f"{unstarted} runs left for the next part: rerun the same command to carry on.")


if __name__ == "__main__":
    from absl import app, flags

    from hybrid_jax.runtime import configure_process

    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs; rerunning resumes and skips.")
    _RESULTS_DIR = flags.DEFINE_string("results_dir", str(ROOT / "experiments" / "reid" / "results"),
                                       "Where runs.csv and results.md go.")
    _MAX_HOURS = flags.DEFINE_float("max_hours", None, "Start no new run after this many hours; the same command "
                                    "carries on.")
    flags.mark_flags_as_required(["workdir"])
    configure_process()
    app.run(main)
