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
   A run the results directory already records, with the same settings, is finished too: a study
   whose workdir was lost (a fresh machine, another host) carries on from its committed results.
3. Scores each finished checkpoint on corrupted copies of the test split ({run}/shift.json).
4. Writes runs.csv, results.csv, results.md, finding.md and the PNG plots to the results directory.

SIGTERM stops the current run after a checkpoint; rerunning the same command carries on.
"""

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from experiments.ablation import attribution, report, shift, solver
from hybrid_jax.data import pipeline
from hybrid_jax.runtime import compilation_cache
from hybrid_jax.train.config import model_config
from hybrid_jax.train.loop import TrainingDiverged, train_and_evaluate

log = logging.getLogger("experiments.ablation")


class SweepInterrupted(RuntimeError):
    """A run stopped before its last step (SIGTERM); rerunning the sweep resumes it."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of the study: a solved model at a budget, a train fraction, a seed and a learning rate.

    `search` marks a learning-rate search run: trained on the first 90% of the training split, scored on the rest.
    """

    solution: solver.Solution
    fraction: float
    seed: int
    learning_rate: float
    search: bool = False

    def directory(self, workdir: Path) -> Path:
        """{workdir}/lr_search/{model}_{fusion}_lr{rate}, or
        {workdir}/gmacs{budget}/data{percent}/{model}_{fusion}_seed{k}."""
        if self.search:
            return Path(workdir) / "lr_search" / f"{self.solution.name}_lr{self.learning_rate:g}"
        return (Path(workdir) / f"gmacs{self.solution.budget_gmacs:g}" / f"data{100 * self.fraction:g}"
                / f"{self.solution.name}_seed{self.seed}")

    @property
    def key(self) -> tuple:
        """The run's identity in the results' tables: lr_search.csv, or runs.csv, curves.csv and attribution.csv."""
        if self.search:
            return "search", self.solution.name, self.learning_rate
        return self.solution.name, self.solution.budget_gmacs, self.fraction, self.seed


@dataclasses.dataclass(frozen=True)
class Ledger:
    """The finished runs a results directory records, by `Job.key`: what an earlier part wrote there.

    The workdir's checkpoints are scratch; the results are the study's record. Their runs count as finished when the
    workdir has lost them, so that a study carries on from its results instead of training them again.
    """

    records: dict[tuple, dict[str, Any]] = dataclasses.field(default_factory=dict)
    curves: dict[tuple, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    branches: dict[tuple, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, results_dir: Path, settings: dict[str, Any]) -> "Ledger":
        """The results directory's runs, if it holds any; they must have been run with these settings.

        Raises:
          ValueError: the directory records a study with other settings, which writing would replace.
        """
        if not (results_dir / "sweep.json").exists():
            return cls()
        recorded = report.load(results_dir)
        if differences := report.setting_differences(recorded["settings"], settings):
            raise ValueError(
                f"{results_dir} records a study with other settings ({'; '.join(differences)}); its runs are not "
                f"this study's, and writing this one's results there would replace them. Pass another "
                f"--results_dir, or move that one away to start afresh.")
        by_run = lambda r: (r["name"], r["budget_gmacs"], r["train_fraction"], r["seed"])  # noqa: E731
        ledger = cls(records={("search", r["name"], r["learning_rate"]): {k: v for k, v in r.items() if k != "chosen"}
                              for r in recorded["search"]})  # "chosen": the report's mark, not the run's
        ledger.records.update({by_run(r): r for r in recorded["records"]})
        for kind, rows in (("curves", recorded["curves"]), ("branches", recorded["branches"])):
            for r in rows:
                getattr(ledger, kind).setdefault(by_run(r), []).append(r)
        return ledger


def holdout_splits(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(train, held-out) tfds splits of the learning-rate search: the training split's first and last part."""
    keep = round(100 * (1 - config.lr_search.holdout))
    split = config.train.train_split
    return f"{split}[:{keep}%]", f"{split}[{keep}%:]"


def run_config(config: ml_collections.ConfigDict, job: Job, total_steps: int) -> ml_collections.ConfigDict:
    """The training config of one run: the study's recipe with this model, seed, fraction and learning rate."""
    c = ml_collections.ConfigDict(config.train.to_dict())
    c.model = model_config(job.solution.model, **job.solution.overrides)
    c.seed = job.seed
    c.train_fraction = job.fraction
    c.learning_rate = job.learning_rate
    c.total_steps = total_steps
    if job.search:
        c.train_split, c.eval_split = holdout_splits(config)
    return c


def total_steps(config: ml_collections.ConfigDict, *, search: bool = False) -> int:
    """Steps of every run when `same_steps`: the full training set's count at num_epochs (the search's epochs for a
    search run), else 0 (each run counts its own)."""
    t = config.train
    epochs = config.lr_search.num_epochs if search else t.num_epochs
    if not config.same_steps or t.total_steps and not (search and epochs):
        return t.total_steps
    split = holdout_splits(config)[0] if search else t.train_split
    spec = pipeline.describe(t.dataset, split, t.data_dir or None)
    return int(math.ceil(epochs * max(spec.num_examples // t.batch_size, 1)))


def _train_metrics(directory: Path) -> list[dict[str, Any]]:
    """The run's logged training records (window means over augmented batches), oldest first."""
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "train"]


def _final_train_accuracy(directory: Path) -> float | None:
    """The last logged training accuracy of a run: has it plateaued?"""
    train = _train_metrics(directory)
    return train[-1].get("accuracy") if train else None


def training_curve(job: Job, workdir: Path) -> list[dict[str, Any]]:
    """The run's training loss and accuracy by step, as rows of curves.csv."""
    return [{"name": job.solution.name, "budget_gmacs": job.solution.budget_gmacs, "train_fraction": job.fraction,
             "seed": job.seed, "step": r["step"], "loss": r.get("loss"), "accuracy": r.get("accuracy")}
            for r in _train_metrics(job.directory(workdir))]


def _train(config: ml_collections.ConfigDict, job: Job, steps: int, workdir: Path) -> tuple[dict[str, Any], bool]:
    """(summary, whether it trained now): trains, resumes or reads a finished run.

    Raises:
      SweepInterrupted: the run was stopped by SIGTERM before its last step.
    """
    directory = job.directory(workdir)
    summary_path = directory / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text()), False
    summary = train_and_evaluate(run_config(config, job, steps), directory)
    if not summary.get("finished"):
        raise SweepInterrupted(f"{directory} stopped at step {summary.get('step')}; rerun the sweep to resume")
    return summary, True


def _solution_fields(job: Job) -> dict[str, Any]:
    s = job.solution
    return {"name": s.name, "model": s.label, "pattern": s.pattern, "fusion": s.fusion or "",
            "budget_gmacs": s.budget_gmacs, "params": s.params, "gmacs": s.gmacs, "learning_rate": job.learning_rate}


def search_one(config: ml_collections.ConfigDict, job: Job, steps: int, workdir: Path) -> tuple[dict[str, Any], bool]:
    """Trains (or reads) one learning-rate search run; returns (its record, whether it trained)."""
    summary, trained = _train(config, job, steps, workdir)
    return {**_solution_fields(job), "steps": summary["steps"], "heldout_accuracy": summary["test_accuracy"],
            "train_accuracy": _final_train_accuracy(job.directory(workdir)),
            "wall_time_s": summary.get("wall_time_s")}, trained


def run_one(config: ml_collections.ConfigDict, job: Job, steps: int, workdir: Path) -> tuple[dict[str, Any], bool]:
    """Trains (or resumes, or reads) one run and scores it under shift; returns (its record, whether it trained)."""
    summary, trained = _train(config, job, steps, workdir)
    directory = job.directory(workdir)
    shift_path = directory / "shift.json"
    shifted = json.loads(shift_path.read_text()) if shift_path.exists() else None
    settings = json.loads(json.dumps(config.shift.to_dict()))
    if shifted is None or shifted.get("settings") != settings or shifted.get("step") != summary["steps"]:
        shifted = shift.evaluate_run(directory, config.shift)
        shift_path.write_text(json.dumps(shifted, indent=2))
    record = {**_solution_fields(job), "train_fraction": job.fraction, "seed": job.seed, "steps": summary["steps"],
              "accuracy": summary["test_accuracy"], "train_accuracy": _final_train_accuracy(directory),
              "train_images_per_sec": summary.get("train_images_per_sec"),
              "infer_images_per_sec": shifted["infer_images_per_sec"], "wall_time_s": summary.get("wall_time_s"),
              **{k: v for k, v in shifted.items() if k.endswith("_accuracy")}}
    return record, trained


def _input_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
    t = config.train
    spec = pipeline.describe(t.dataset, t.train_split, t.data_dir or None, tuple(t.resize) or None)
    if spec.image_shape[0] != spec.image_shape[1]:
        raise ValueError(f"the solver sizes models for square images; {t.dataset} gives {spec.image_shape}: set "
                         f"config.train.resize")
    return spec.image_shape, spec.num_classes


def solve(config: ml_collections.ConfigDict) -> list[solver.Solution]:
    """Every model of the study at every budget (fails if one cannot come within the tolerance)."""
    shape, num_classes = _input_shape(config)
    return [s for budget in config.budgets
            for s in solver.solve_all(budget, tuple(config.patterns), tuple(config.fusions), image_size=shape[0],
                                      channels=shape[2], num_classes=num_classes, tolerance=config.tolerance)]


def budget_text(config: ml_collections.ConfigDict) -> str:
    """One line naming the budgets and the input they are counted on."""
    shape, num_classes = _input_shape(config)
    budgets = " and ".join(f"{b:g}" for b in config.budgets)
    return (f"GMACs budgets: {budgets} per {shape[0]}x{shape[1]}x{shape[2]} image ({num_classes} classes), "
            f"every model within {config.tolerance:.0%}")


def notes(config: ml_collections.ConfigDict, steps: int, search_steps: int) -> str:
    """The study's settings in a paragraph, for the head of results.md."""
    t, shift_config, lr = config.train, config.shift, config.lr_search
    severity = ", ".join(f"{k}={tuple(v)}" for k, v in _severities(config).items())
    subset = f"the first {shift_config.num_examples} images" if shift_config.num_examples else "all"
    train, heldout = holdout_splits(config)
    return (f"{budget_text(config)}. {t.dataset} resized to {tuple(t.resize) or 'its stored size'}, "
            f"{steps or 'num_epochs of'} steps of batch {t.batch_size} per run"
            f"{' (every training-set size trains for the same number of steps)' if config.same_steps else ''}, "
            f"AdamW with each model's learning rate from {tuple(lr.learning_rates)}, chosen by accuracy on "
            f"{heldout} after {search_steps} steps on {train} (seed {lr.seed}, at {config.budgets[0]:g} GMACs; the "
            f"other budgets reuse it); seeds {tuple(config.seeds)}. Accuracy: the whole {t.eval_split} split. "
            f"Shift: {subset} of it, corrupted by {', '.join(shift_config.corruptions)} at severities 1-3 "
            f"({severity}); 'clean' is the same images uncorrupted. img/s: steady training throughput at batch "
            f"{t.batch_size} and inference throughput at batch {t.eval_batch_size}, on this machine (sensitive "
            f"to other load).")


def _severities(config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
    return dict(noise_std=config.shift.noise_std, blur_sigma=config.shift.blur_sigma, contrast=config.shift.contrast)


def choose_learning_rates(search: list[dict[str, Any]]) -> dict[str, float]:
    """Each model's learning rate (by solution name) with the best held-out accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for r in search:
        if r["name"] not in best or r["heldout_accuracy"] > best[r["name"]]["heldout_accuracy"]:
            best[r["name"]] = r
    return {name: r["learning_rate"] for name, r in best.items()}


def search_jobs(config: ml_collections.ConfigDict, solutions: list[solver.Solution]) -> list[Job]:
    """The learning-rate search: every model at the main budget, every candidate rate, one seed."""
    main = config.budgets[0]
    return [Job(s, 1.0, config.lr_search.seed, rate, search=True) for s in solutions if s.budget_gmacs == main
            for rate in config.lr_search.learning_rates]


def beyond_the_edge_jobs(config: ml_collections.ConfigDict, solutions: list[solver.Solution],
                         search: list[dict[str, Any]]) -> list[Job]:
    """A rate twice past each model's best where that best is the largest (or half the smallest) it tried.

    A best rate at the edge of the rates tried says the best may lie beyond; the search follows it for at most
    `lr_search.extend_steps` doublings (or halvings) past the configured grid.
    """
    grid, steps = config.lr_search.learning_rates, config.lr_search.extend_steps
    low, high = min(grid) / 2 ** steps, max(grid) * 2 ** steps
    chosen = choose_learning_rates(search)
    jobs = []
    for s in solutions:
        rates = sorted(r["learning_rate"] for r in search if r["name"] == s.name)
        if s.budget_gmacs != config.budgets[0] or len(rates) < 2:
            continue
        best = chosen[s.name]
        if best == rates[-1] and best * 2 <= high * (1 + 1e-9):
            jobs.append(Job(s, 1.0, config.lr_search.seed, best * 2, search=True))
        elif best == rates[0] and best / 2 >= low * (1 - 1e-9):
            jobs.append(Job(s, 1.0, config.lr_search.seed, best / 2, search=True))
    return jobs


def study_jobs(config: ml_collections.ConfigDict, solutions: list[solver.Solution],
               rates: dict[str, float]) -> list[Job]:
    """The study's runs, in the order that makes a stopped part most useful: the main budget on all the data,
    the other budgets, then the smaller training sets; seed by seed within each. Outside the main cell, the
    parallel pattern trains only the fusions the config names for it. A model without a rate (every search run
    diverged) is left out."""
    main, *others = config.budgets
    full, *smaller = config.train_fractions
    cells = [(main, full), *((b, full) for b in others), *((main, f) for f in smaller)]
    jobs = []
    for budget, fraction in cells:
        for seed in config.seeds:
            for s in solutions:
                chosen = (config.small_data_fusions if fraction != full else
                          config.small_budget_fusions if budget != main else config.fusions)
                if s.budget_gmacs == budget and (not s.fusion or s.fusion in chosen) and s.name in rates:
                    jobs.append(Job(s, fraction, seed, rates[s.name]))
    return jobs


def _execute(jobs: list[Job], do: Callable[[Job], tuple[dict[str, Any], bool]], *, workdir: Path, ledger: Ledger,
             deadline: float) -> tuple[list[tuple[Job, dict[str, Any]]], list[str], int]:
    """Runs `do` on each job until the deadline (time.monotonic()); finished runs are still read after it.

    A job the workdir has not finished but the ledger records is read from the ledger.

    Returns:
      ((job, record) of each finished run, names trained now, how many jobs were left unstarted).
    """
    done, trained, left_out = [], [], 0
    start = time.perf_counter()
    for i, job in enumerate(jobs):
        directory = job.directory(workdir)
        name = str(directory.relative_to(workdir))
        recorded = None if (directory / "summary.json").exists() else ledger.records.get(job.key)
        if time.monotonic() > deadline and not (directory / "summary.json").exists() and recorded is None:
            left_out += 1
            continue
        began = time.perf_counter()
        try:
            record, ran = (recorded, False) if recorded is not None else do(job)
        except TrainingDiverged as error:  # one bad run must not end a study; it stays out of the tables
            print(f"[{i + 1}/{len(jobs)}] {name}: left out, {error}", flush=True)
            continue
        done.append((job, record))
        if ran:
            trained.append(name)
        accuracy = record.get("accuracy", record.get("heldout_accuracy"))
        elapsed = time.perf_counter() - start
        print(f"[{i + 1}/{len(jobs)}] {name}: accuracy {100 * accuracy:.2f}%, "
              f"{'trained in' if ran else 'finished before; read in'} {time.perf_counter() - began:.0f} s "
              f"(this part {elapsed / 60:.1f} min)", flush=True)
    return done, trained, left_out


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path, results_dir: str | Path | None = None, *,
              max_hours: float | None = None) -> dict[str, Any]:
    """Solves, searches learning rates, trains (resuming or skipping), scores and reports the study.

    Args:
      max_hours: start no new run after this long; the next call of the same command carries on.

    Returns:
      {"records": one dict per finished study run, "search": one per search run, "rates": the chosen learning
      rates, "trained": the runs trained now, "unstarted": runs left for the next part, "solutions": the solved
      models, "paths": the written result files}.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results_dir = Path(results_dir or config.results_dir)
    deadline = time.monotonic() + 3600 * max_hours if max_hours else math.inf
    print(budget_text(config), flush=True)
    solutions = solve(config)
    table = solver.solutions_table(solutions)
    print(table, flush=True)
    (workdir / "solutions.json").write_text(json.dumps([
        {"name": s.name, "pattern": s.pattern, "fusion": s.fusion, "model": s.model, "overrides": s.overrides,
         "params": s.params, "gmacs": s.gmacs, "budget_gmacs": s.budget_gmacs, "error": s.error} for s in solutions],
        indent=2, default=list))
    steps, search_steps = total_steps(config), total_steps(config, search=True)
    settings = json.loads(json.dumps(
        {"tolerance": config.tolerance, "steps": steps, "search_steps": search_steps, "seeds": list(config.seeds),
         "budgets": list(config.budgets), "train_fractions": list(config.train_fractions),
         "image_shape": list(_input_shape(config)[0]), "train": config.train.to_dict(),
         "lr_search": config.lr_search.to_dict(), "shift": config.shift.to_dict(), "budget": budget_text(config)}))
    ledger = Ledger.read(results_dir, settings)
    if ledger.records:
        print(f"{len(ledger.records)} runs recorded in {results_dir}: those the workdir lacks are read from there",
              flush=True)
    cache = workdir / "jax_cache" if config.compilation_cache else None
    with compilation_cache(cache):
        jobs, search, trained, unstarted = search_jobs(config, solutions), [], [], 0
        while jobs and not unstarted:  # the grid, then one rate past every edge until no best is at one
            searched, trained_now, unstarted = _execute(
                jobs, lambda job: search_one(config, job, search_steps, workdir), workdir=workdir, ledger=ledger,
                deadline=deadline)
            search += [record for _, record in searched]
            trained += trained_now
            jobs = [] if unstarted else beyond_the_edge_jobs(config, solutions, search)
        rates = choose_learning_rates(search)
        if diverged := sorted({s.name for s in solutions} - set(rates)):
            print(f"left out of the study, every learning rate diverged in the search: {', '.join(diverged)}")
        done = []
        if not unstarted:  # a diverged search run is no candidate; the others decide
            jobs = study_jobs(config, solutions, rates)
            done, trained_now, unstarted = _execute(jobs, lambda job: run_one(config, job, steps, workdir),
                                                    workdir=workdir, ledger=ledger, deadline=deadline)
            trained += trained_now
        else:
            unstarted += len(study_jobs(config, solutions, {s.name: 0.0 for s in solutions}))
        records = [record for _, record in done]
        curves = [row for job, _ in done for row in training_curve(job, workdir) or ledger.curves.get(job.key, [])]
        branches = [row for job, record in done if job.solution.pattern == "parallel"
                    for row in (attribution.rows(record, attribution.cached_attribution(
                        job.directory(workdir), config.shift, record["steps"]))
                        if (job.directory(workdir) / "summary.json").exists() else ledger.branches.get(job.key, []))]
    paths = report.write_results(records, results_dir, search=search, curves=curves, branches=branches,
                                 tolerance=config.tolerance, solver_table=table,
                                 notes=notes(config, steps, search_steps),
                                 settings={k: v for k, v in settings.items() if k != "tolerance"})
    print(f"\n{report.finding(report.aggregate(records), records)}" if records else "no study runs finished yet")
    if unstarted:
        print(f"\n{unstarted} runs left for the next part: rerun the same command to carry on.")
    print(f"\nresults in {results_dir}: {', '.join(sorted(p.name for p in paths.values()))}")
    return {"records": records, "search": search, "rates": rates, "trained": trained, "unstarted": unstarted,
            "solutions": solutions, "paths": paths}


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
        run_sweep(config, _WORKDIR.value, _RESULTS_DIR.value, max_hours=_MAX_HOURS.value)
    except (SweepInterrupted, solver.SolverError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from hybrid_jax.runtime import configure_process

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/ablation/config.py[:tiny]")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs; rerunning resumes and skips.")
    _RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where tables and plots go (default: config.results_dir).")
    _MAX_HOURS = flags.DEFINE_float("max_hours", None, "Start no new run after this many hours (a part of the "
                                    "study); the same command carries on.")
    _SOLVE_ONLY = flags.DEFINE_bool("solve_only", False, "Print the budget and the solved models, then stop.")
    flags.mark_flags_as_required(["config", "workdir"])
    configure_process()
    app.run(main)
