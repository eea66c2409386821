"""Runs the matched-compute ablation sweep and writes its tables and plots.

python -m experiments.ablation.run --config experiments/ablation/config.py --workdir runs/ablation
python -m experiments.ablation.run --config experiments/ablation/config.py:tiny --workdir /tmp/abl \
    --results_dir /tmp/abl/results
python -m experiments.ablation.run --config experiments/ablation/config.py --workdir runs/ablation --solve_only

1. Solves every model of the sweep to the GMACs budget (experiments/ablation/solver.py) and prints
   the budget and the solved widths and depths.
2. For each seed, train fraction and model: one `train_and_evaluate` call in
   {workdir}/data{percent}/{model}_{fusion}_seed{k}. A run with a summary.json is finished and
   skipped; an interrupted one resumes from its newest checkpoint (the training loop does that).
3. Scores each finished checkpoint on corrupted copies of the test split ({run}/shift.json).
4. Writes runs.csv, results.csv, results.md, finding.md and the PNG plots to the results directory.

SIGTERM stops the current run after a checkpoint; rerunning the same command carries on.
"""

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections

from experiments.ablation import report, shift, solver
from hybrid_jax.data import pipeline
from hybrid_jax.runtime import compilation_cache
from hybrid_jax.train.config import model_config
from hybrid_jax.train.loop import TrainingDiverged, train_and_evaluate

log = logging.getLogger("experiments.ablation")


class SweepInterrupted(RuntimeError):
    """A run stopped before its last step (SIGTERM); rerunning the sweep resumes it."""


def run_directory(workdir: Path, solution: solver.Solution, fraction: float, seed: int) -> Path:
    """{workdir}/data{percent}/{model}_{fusion}_seed{k}."""
    return Path(workdir) / f"data{100 * fraction:g}" / f"{solution.name}_seed{seed}"


def run_config(config: ml_collections.ConfigDict, solution: solver.Solution, *, seed: int, fraction: float,
               total_steps: int) -> ml_collections.ConfigDict:
    """The training config of one run: the sweep's recipe with this model, seed and train fraction."""
    c = ml_collections.ConfigDict(config.train.to_dict())
    c.model = model_config(solution.model, **solution.overrides)
    c.seed = seed
    c.train_fraction = fraction
    c.total_steps = total_steps
    return c


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Steps of every run when `same_steps` (the full training set's count at num_epochs), else 0 (per run)."""
    t = config.train
    if not config.same_steps or t.total_steps:
        return t.total_steps
    spec = pipeline.describe(t.dataset, t.train_split, t.data_dir or None)
    return int(math.ceil(t.num_epochs * max(spec.num_examples // t.batch_size, 1)))


def _severity(config: ml_collections.ConfigDict) -> dict[str, float]:
    return dict(noise_std=config.shift.noise_std, blur_sigma=config.shift.blur_sigma, contrast=config.shift.contrast)


def run_one(config: ml_collections.ConfigDict, solution: solver.Solution, *, seed: int, fraction: float, steps: int,
            workdir: Path) -> tuple[dict[str, Any], bool]:
    """Trains (or resumes, or skips) one run and scores it under shift; returns (its record, whether it trained).

    Raises:
      SweepInterrupted: the run was stopped by SIGTERM before its last step.
    """
    directory = run_directory(workdir, solution, fraction, seed)
    summary_path, shift_path = directory / "summary.json", directory / "shift.json"
    trained = not summary_path.exists()
    if trained:
        summary = train_and_evaluate(run_config(config, solution, seed=seed, fraction=fraction, total_steps=steps),
                                     directory)
        if not summary.get("finished"):
            raise SweepInterrupted(f"{directory} stopped at step {summary.get('step')}; rerun the sweep to resume")
    else:
        summary = json.loads(summary_path.read_text())
    shifted = json.loads(shift_path.read_text()) if shift_path.exists() else None
    settings = json.loads(json.dumps(config.shift.to_dict()))
    if shifted is None or shifted.get("settings") != settings or shifted.get("step") != summary["steps"]:
        shifted = shift.evaluate_run(directory, config.shift)
        shift_path.write_text(json.dumps(shifted, indent=2))
    record = {"name": solution.name, "model": solution.label, "pattern": solution.pattern,
              "fusion": solution.fusion or "", "train_fraction": fraction, "seed": seed, "steps": summary["steps"],
              "params": solution.params, "gmacs": solution.gmacs, "accuracy": summary["test_accuracy"],
              "clean_accuracy": shifted["clean_accuracy"], "shift_accuracy": shifted["shift_accuracy"],
              "train_images_per_sec": summary.get("train_images_per_sec"),
              "infer_images_per_sec": shifted["infer_images_per_sec"], "wall_time_s": summary.get("wall_time_s")}
    record.update({f"{name}_accuracy": shifted[f"{name}_accuracy"] for name in config.shift.corruptions})
    return record, trained


def _input_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
    t = config.train
    spec = pipeline.describe(t.dataset, t.train_split, t.data_dir or None, tuple(t.resize) or None)
    if spec.image_shape[0] != spec.image_shape[1]:
        raise ValueError(f"the solver sizes models for square images; {t.dataset} gives {spec.image_shape}: set "
                         f"config.train.resize")
    return spec.image_shape, spec.num_classes


def solve(config: ml_collections.ConfigDict) -> list[solver.Solution]:
    """Every model of the sweep at the budget (fails if one cannot come within the tolerance)."""
    shape, num_classes = _input_shape(config)
    return solver.solve_all(config.budget_gmacs, tuple(config.patterns), tuple(config.fusions), image_size=shape[0],
                            channels=shape[2], num_classes=num_classes, tolerance=config.tolerance)


def budget_text(config: ml_collections.ConfigDict) -> str:
    """One line naming the budget and the input it is counted on."""
    shape, num_classes = _input_shape(config)
    return (f"GMACs budget: {config.budget_gmacs:g} per {shape[0]}x{shape[1]}x{shape[2]} image "
            f"({num_classes} classes), every model within {config.tolerance:.0%}")


def notes(config: ml_collections.ConfigDict, steps: int) -> str:
    """The sweep's settings in a paragraph, for the head of results.md."""
    t, shift_config = config.train, config.shift
    severity = ", ".join(f"{k}={v}" for k, v in _severity(config).items())
    subset = f"the first {shift_config.num_examples} images" if shift_config.num_examples else "all"
    return (f"{budget_text(config)}. {t.dataset} resized to {tuple(t.resize) or 'its stored size'}, "
            f"{steps or 'num_epochs of'} steps of batch {t.batch_size} per run"
            f"{' (every training-set size trains for the same number of steps)' if config.same_steps else ''}, "
            f"AdamW at {t.learning_rate:g}, seeds {tuple(config.seeds)}. Accuracy: the whole {t.eval_split} split. "
            f"Shift: {subset} of it, corrupted by {', '.join(shift_config.corruptions)} ({severity}), averaged; "
            f"'clean' in the corruption table is the same images uncorrupted. img/s: steady training throughput "
            f"at batch {t.batch_size} and inference throughput at batch {t.eval_batch_size}, on this machine "
            f"(sensitive to other load).")


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path,
              results_dir: str | Path | None = None) -> dict[str, Any]:
    """Solves, trains (resuming or skipping), scores and reports the whole sweep.

    Returns:
      {"records": one dict per run, "trained": names of the runs trained now, "skipped": those already
      finished, "solutions": the solved models, "paths": the written result files}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir or config.results_dir)
    print(budget_text(config), flush=True)
    solutions = solve(config)
    table = solver.solutions_table(solutions)
    print(table, flush=True)
    (workdir / "solutions.json").write_text(json.dumps([
        {"name": s.name, "pattern": s.pattern, "fusion": s.fusion, "model": s.model, "overrides": s.overrides,
         "params": s.params, "gmacs": s.gmacs, "budget_gmacs": s.budget_gmacs, "error": s.error} for s in solutions],
        indent=2, default=list))
    steps = total_steps(config)
    plan = [(seed, fraction, s) for seed in config.seeds for fraction in config.train_fractions for s in solutions]
    records, trained, skipped = [], [], []
    start = time.perf_counter()
    cache = workdir / "jax_cache" if config.compilation_cache else None
    with compilation_cache(cache):
        for i, (seed, fraction, solution) in enumerate(plan):
            began = time.perf_counter()
            name = str(run_directory(workdir, solution, fraction, seed).relative_to(workdir))
            try:
                record, ran = run_one(config, solution, seed=seed, fraction=fraction, steps=steps, workdir=workdir)
            except TrainingDiverged as error:  # one bad run must not end an hour's sweep; it stays out of the tables
                print(f"[{i + 1}/{len(plan)}] {name}: left out, {error}", flush=True)
                continue
            records.append(record)
            (trained if ran else skipped).append(name)
            elapsed = time.perf_counter() - start
            left = len(plan) - i - 1
            eta = f", about {elapsed / len(trained) * left / 60:.0f} min left" if trained and left else ""
            print(f"[{i + 1}/{len(plan)}] {name}: accuracy {100 * record['accuracy']:.2f}%, shifted "
                  f"{100 * record['shift_accuracy']:.2f}%, {'trained in' if ran else 'finished before; scored in'} "
                  f"{time.perf_counter() - began:.0f} s (sweep {elapsed / 60:.1f} min{eta})", flush=True)
    rows = report.aggregate(records)
    paths = report.write_results(records, results_dir, budget=config.budget_gmacs, tolerance=config.tolerance,
                                 solver_table=table, notes=notes(config, steps),
                                 settings={"steps": steps, "seeds": list(config.seeds),
                                           "train_fractions": list(config.train_fractions),
                                           "image_shape": list(_input_shape(config)[0]), "train": config.train.to_dict(),
                                           "shift": config.shift.to_dict(), "budget": budget_text(config)})
    print(f"\n{report.markdown_table(rows)}\n\n{report.finding(rows, config.budget_gmacs)}" if rows else "no runs")
    print(f"\nresults in {results_dir}: {', '.join(sorted(p.name for p in paths.values()))}")
    return {"records": records, "trained": trained, "skipped": skipped, "solutions": solutions, "paths": paths}


def main(argv: list[str]) -> None:
    del argv
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds narrate every step at INFO
    logging.getLogger("hybrid_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if _SOLVE_ONLY.value:
        print(budget_text(config))
        print(solver.solutions_table(solve(config)))
        return
    try:
        run_sweep(config, _WORKDIR.value, _RESULTS_DIR.value)
    except (SweepInterrupted, solver.SolverError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from hybrid_jax.runtime import configure_process

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/ablation/config.py[:tiny]")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs; rerunning resumes and skips.")
    _RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where tables and plots go (default: config.results_dir).")
    _SOLVE_ONLY = flags.DEFINE_bool("solve_only", False, "Print the budget and the solved models, then stop.")
    flags.mark_flags_as_required(["config", "workdir"])
    configure_process()
    app.run(main)
