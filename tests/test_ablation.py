"""The matched-compute ablation engine (experiments/ablation): solver, corruptions, sweep, report."""

import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments.ablation import config as ablation_config
from experiments.ablation import grid, plots, report, run, shift, solver
from experiments.ablation import stats as ablation_stats
from hybrid_jax import create_model
from hybrid_jax.analysis.flops import measure
from hybrid_jax.data.pipeline import get_builder
from hybrid_jax.train.config import model_changes

BUDGETS = (0.0015, 0.003, 0.006)  # GMACs; 0.003 is the real sweep's
# The default tests give each budget two of the six fusions, so every fusion is solved once; -m slow solves all 18.
FUSIONS_PER_BUDGET = dict(zip(BUDGETS, (("concat", "add"), ("gating", "cross_attention"), ("fcu", "bridge"))))


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> str:
    """A tfds data dir with the real Fashion-MNIST prepared once from the Debian files."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    get_builder("fashion_mnist", data_dir)
    return data_dir


# --------------------------------------------------------------------------- #
# Width/depth solver
# --------------------------------------------------------------------------- #


def _check_solution(solution: solver.Solution, budget: float) -> None:
    assert abs(solution.error) <= 0.05, solver.solutions_table([solution])
    # Counted again from scratch, outside the solver's cache: the model it names really costs that much.
    model = create_model(solution.model, num_classes=10, **solution.overrides)
    counted = measure(model, 32, 1, xla=False)
    assert counted.gmacs == pytest.approx(solution.gmacs) and counted.params == solution.params
    assert abs(counted.gmacs / budget - 1) <= 0.05


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("pattern", grid.PATTERNS)
def test_solver_hits_the_budget_within_5_percent(pattern, budget):
    fusions = FUSIONS_PER_BUDGET[budget] if pattern == "parallel" else (None,)
    for fusion in fusions:
        _check_solution(solver.solve(pattern, budget, fusion=fusion, image_size=32), budget)


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_solver_hits_the_budget_for_every_fusion(budget):
    for fusion in grid.FUSIONS:
        _check_solution(solver.solve("parallel", budget, fusion=fusion, image_size=32), budget)


def test_solver_refuses_a_budget_it_cannot_reach():
    with pytest.raises(solver.SolverError, match="closest"):
        solver.solve("vit", 1e-6, image_size=32)
    with pytest.raises(ValueError, match="parallel pattern only"):
        solver.solve("cnn", 0.003, fusion="gating")


# --------------------------------------------------------------------------- #
# Domain shift
# --------------------------------------------------------------------------- #


def test_corruptions_are_deterministic_and_shift_the_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    severity = dict(noise_std=0.2, blur_sigma=1.0, contrast=0.3)
    for name in grid.CORRUPTIONS:
        a, b = (shift.corrupt(images, name, severity=severity, seed=3) for _ in range(2))
        assert a.dtype == np.uint8 and a.shape == images.shape
        np.testing.assert_array_equal(a, b)
        assert np.mean(a != images) > 0.5
    contrast = shift.corrupt(images, "contrast", severity=severity).astype(float)
    assert contrast.std(axis=(1, 2, 3)) == pytest.approx(0.3 * images.astype(float).std(axis=(1, 2, 3)), rel=0.02)
    blurred = shift.corrupt(images, "blur", severity=severity).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(images.astype(float), axis=1)).mean()
    other_seed = shift.corrupt(images, "gaussian_noise", severity=severity, seed=4)
    assert not np.array_equal(other_seed, shift.corrupt(images, "gaussian_noise", severity=severity, seed=3))
    assert shift.resize(images, (32, 32)).shape == (6, 32, 32, 1)


# --------------------------------------------------------------------------- #
# The study, end to end
# --------------------------------------------------------------------------- #


def _tiny_config(data_dir: str, results_dir: Path):
    config = ablation_config.get_config("tiny")
    config.train.data_dir = data_dir
    config.budgets = (0.001,)  # the other cells (a second budget, 10% data) are the notebook's, and the plan's
    config.train_fractions = (1.0,)  # order is test_study_plan_*'s
    config.results_dir = str(results_dir)
    return config


def test_tiny_study_searches_rates_trains_skips_finished_runs_and_resumes(tmp_path, fmnist_dir, capsys, caplog):
    """2 models x 2 rates of search on held-out data, then each model at its best rate: tables, plots, a rerun
    that trains nothing, one from a lost workdir that reads the results instead, a part that stops at its
    deadline, then a resume."""
    config = _tiny_config(fmnist_dir, tmp_path / "results")
    first = run.run_sweep(config, tmp_path / "runs")
    out = capsys.readouterr().out
    assert "GMACs budgets: 0.001 per 32x32x1 image" in out
    assert len(first["search"]) == 4 and len(first["trained"]) == 4 + 2 and not first["unstarted"]
    for record in first["search"]:  # trained on the first 90% of the training split, scored on the rest
        saved = json.loads((tmp_path / "runs" / "lr_search" / f"{record['name']}_lr{record['learning_rate']:g}"
                            / "config.json").read_text())
        assert (saved["train_split"], saved["eval_split"]) == ("train[:90%]", "train[90%:]")
    for name in {r["name"] for r in first["search"]}:
        best = max((r for r in first["search"] if r["name"] == name), key=lambda r: r["heldout_accuracy"])
        assert first["rates"][name] == best["learning_rate"]
        assert {r["learning_rate"] for r in first["records"] if r["name"] == name} == {best["learning_rate"]}
    for name in ("runs.csv", "lr_search.csv", "curves.csv", "results.csv", "results.md", "finding.md",
                 *plots.all_figures([], [], [])):
        path = tmp_path / "results" / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report.read_csv(tmp_path / "results" / "results.csv")
    assert {(r["budget_gmacs"], r["train_fraction"], r["model"], r["fusion"]) for r in rows} == {
        (0.001, 1.0, "parallel_hybrid", "gating"), (0.001, 1.0, "resnet", "")}
    for r in rows:
        assert abs(r["gmacs"] / r["budget_gmacs"] - 1) <= 0.05 and r["params"] > 0 and r["seeds"] == 1
    curves = report.read_csv(tmp_path / "results" / "curves.csv")
    assert {c["step"] for c in curves} == {3, 6} and len(curves) == 2 * 2
    branches = report.read_csv(tmp_path / "results" / "attribution.csv")
    assert {b["head"] for b in branches} == {"cnn", "transformer", "mean"}
    shares = [b["share"] for b in branches if b["head"] != "mean"]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5) and all(0 <= s <= 1 for s in shares)
    for record in first["records"]:
        # The shift subset is the whole (tiny) eval split here: the hook must reproduce the loop's accuracy.
        assert record["clean_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
        levels = [record[f"severity{k}_accuracy"] for k in (1, 2, 3)]
        assert record["shift_accuracy"] == pytest.approx(statistics.fmean(levels))

    again = run.run_sweep(config, tmp_path / "runs")
    assert not again["trained"] and again["records"] == first["records"] and again["search"] == first["search"]

    # The workdir lost (a fresh machine): the results record every run, so nothing trains and they stay as they were.
    written = {name: (tmp_path / "results" / name).read_bytes() for name in ("runs.csv", "lr_search.csv",
                                                                             "curves.csv", "attribution.csv")}
    lost = run.run_sweep(config, tmp_path / "lost_workdir")
    assert not lost["trained"] and lost["records"] == first["records"] and lost["search"] == first["search"]
    assert written == {name: (tmp_path / "results" / name).read_bytes() for name in written}
    config.seeds = (0, 1)  # another study's settings: its results are neither read nor replaced
    with pytest.raises(ValueError, match=r"other settings \(seeds: \[0\] -> \[0, 1\]\).*another --results_dir"):
        run.run_sweep(config, tmp_path / "lost_workdir")
    assert written == {name: (tmp_path / "results" / name).read_bytes() for name in written}
    config.seeds = (0,)

    # Interrupt one run after its first checkpoint. A part whose time is up starts nothing and says what is left;
    # the next part trains that run alone, from its checkpoint. (Fresh results: the old ones would record it.)
    config.results_dir = str(tmp_path / "results_after_interrupt")
    victim = tmp_path / "runs" / "gmacs0.001" / "data100" / "resnet_none_seed0"
    for name in ("summary.json", "shift.json"):
        (victim / name).unlink()
    shutil.rmtree(victim / "checkpoints" / str(config.train.total_steps))
    capsys.readouterr()
    stopped = run.run_sweep(config, tmp_path / "runs", max_hours=1e-9)
    assert stopped["unstarted"] == 1 and not stopped["trained"] and len(stopped["records"]) == 1
    assert "1 runs left for the next part: rerun the same command" in capsys.readouterr().out
    caplog.set_level("INFO", logger="hybrid_jax")
    resumed = run.run_sweep(config, tmp_path / "runs")
    assert resumed["trained"] == ["gmacs0.001/data100/resnet_none_seed0"] and not resumed["unstarted"]
    assert f"resumed from step {config.train.checkpoint_every}" in caplog.text
    assert json.loads((victim / "summary.json").read_text())["steps"] == config.train.total_steps


def test_results_of_another_study_are_told_apart_by_what_their_runs_compute():
    """Where the data lives or how often a run checkpoints may change between parts; the recipe may not."""
    recorded = {"notes": "old wording", "seeds": [0], "train": {"data_dir": "/a", "learning_rate": 0.1}}
    moved = {"seeds": [0], "train": {"data_dir": "/b", "learning_rate": 0.1}}
    assert report.setting_differences(recorded, moved) == []
    changed = {"seeds": [0, 1], "train": {"learning_rate": 0.2, "remat": "block"}}
    assert report.setting_differences(recorded, changed) == [
        "seeds: [0] -> [0, 1]", "train.learning_rate: 0.1 -> 0.2", "train.remat: unset -> block"]


def _solution(budget: float = 0.001) -> solver.Solution:
    return solver.Solution("cnn", None, "resnet18", "resnet", dict(block="basic", layers=(1, 1, 1),
                                                                     widths=(8, 16, 32), stem_width=8),
                           1.0, 1.0, 1, 1000, budget, budget)


def test_run_names_and_configs_carry_the_solution_rate_and_split():
    config = ablation_config.get_config()
    job = run.Job(_solution(), 0.1, 2, 4e-3)
    c = run.run_config(config, job, total_steps=234)
    assert (c.model.name, c.seed, c.train_fraction, c.total_steps, c.learning_rate) == ("resnet18", 2, 0.1, 234, 4e-3)
    assert (c.train_split, c.eval_split) == ("train", "test")
    assert {key: c.model[key] for key in job.solution.overrides} == job.solution.overrides
    name, changes = model_changes(c.model)  # a solved field equal to the variant's value is no change
    assert name == "resnet18" and changes.items() <= job.solution.overrides.items() and "widths" in changes
    assert model_changes(ml_collections.ConfigDict(json.loads(c.to_json())).model) == (name, changes)
    assert job.directory(Path("w")) == Path("w/gmacs0.001/data10/resnet_none_seed2")
    search = run.Job(_solution(), 1.0, 0, 2e-3, search=True)
    assert search.directory(Path("w")) == Path("w/lr_search/resnet_none_lr0.002")
    c = run.run_config(config, search, total_steps=10)
    assert (c.train_split, c.eval_split, c.learning_rate) == ("train[:90%]", "train[90%:]", 2e-3)


def test_study_plan_puts_the_main_cell_first_and_small_data_and_budget_on_chosen_fusions():
    config = ablation_config.get_config()
    main, small = (solver.Solution("parallel", f, "parallel_hybrid_tiny", "parallel_hybrid", {}, 1, 1, 1, 1, b, b)
                   for f, b in (("gating", 0.02), ("concat", 0.005)))
    concat_main, fcu_small = dataclasses.replace(main, fusion="concat"), dataclasses.replace(small, fusion="fcu")
    solutions = [main, concat_main, small, fcu_small, _solution(0.02)]
    rates = {s.name: 1e-3 for s in solutions}
    jobs = run.study_jobs(config, solutions, rates)
    cells = [(j.solution.budget_gmacs, j.fraction) for j in jobs]
    assert cells == sorted(cells, key=lambda c: (c != (0.02, 1.0), c[1] != 1.0))  # main, other budget, less data
    assert len([c for c in cells if c == (0.02, 1.0)]) == 3 * 3
    assert {j.solution.fusion for j in jobs if j.solution.budget_gmacs == 0.005} == {"fcu"}  # concat is not chosen
    assert len([c for c in cells if c[0] == 0.005]) == 3
    small_data = {j.solution.name for j in jobs if j.fraction == 0.1}
    assert small_data == {"parallel_hybrid_gating", "resnet_none"}  # concat is not in small_data_fusions
    assert [j.seed for j in jobs if (j.solution.budget_gmacs, j.fraction) == (0.02, 1.0)] == [0] * 3 + [1] * 3 + [2] * 3
    assert run.choose_learning_rates([{"name": "a", "learning_rate": 1e-3, "heldout_accuracy": 0.5},
                                      {"name": "a", "learning_rate": 2e-3, "heldout_accuracy": 0.7},
                                      {"name": "b", "learning_rate": 4e-3, "heldout_accuracy": 0.1}]) == {
        "a": 2e-3, "b": 4e-3}
    # A model whose every search run diverged has no rate: it is left out, the others keep their runs.
    del rates["resnet_none"]
    assert {j.solution.name for j in run.study_jobs(config, solutions, rates)} == {
        "parallel_hybrid_gating", "parallel_hybrid_concat", "parallel_hybrid_fcu"}


def test_the_search_follows_a_best_rate_past_the_grids_edge_once():
    config = ablation_config.get_config()  # grid (2e-3, 4e-3, 8e-3), one doubling or halving past it
    models = {name: dataclasses.replace(_solution(0.02), fusion=name) for name in "ABCDE"}
    scores = {"A": {2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.7},  # best at the top: try 1.6e-2
              "B": {2e-3: 0.7, 4e-3: 0.6, 8e-3: 0.5},  # best at the bottom: try 1e-3
              "C": {2e-3: 0.5, 4e-3: 0.7, 8e-3: 0.6},  # inside: done
              "D": {2e-3: 0.5, 4e-3: 0.6, 8e-3: 0.7, 1.6e-2: 0.8},  # at the top, but one doubling past it already
              "E": {1e-3: 0.8, 2e-3: 0.7, 4e-3: 0.6, 8e-3: 0.5}}  # likewise at the bottom
    search = [{"name": models[m].name, "learning_rate": rate, "heldout_accuracy": acc}
              for m, by_rate in scores.items() for rate, acc in by_rate.items()]
    small = dataclasses.replace(models["A"], budget_gmacs=0.005)  # searched at the main budget only
    jobs = run.beyond_the_edge_jobs(config, [*models.values(), small], search)
    assert {(job.solution.fusion, job.learning_rate) for job in jobs} == {("A", 1.6e-2), ("B", 1e-3)}
    assert all(job.search and job.seed == config.lr_search.seed for job in jobs)


# --------------------------------------------------------------------------- #
# Statistics and report
# --------------------------------------------------------------------------- #


def test_intervals_and_paired_tests_match_textbook_values():
    # t(0.975, 2) = 4.3027; the half-width is t * s / sqrt(n).
    assert ablation_stats.interval([1.0, 2.0, 3.0]) == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(ablation_stats.interval([1.0]))
    a, b = {0: 0.90, 1: 0.91, 2: 0.92}, {0: 0.88, 1: 0.90, 2: 0.90, 3: 0.5}  # seed 3 has no partner
    c = ablation_stats.paired("a", "b", a, b)
    differences = [0.02, 0.01, 0.02]
    t = statistics.fmean(differences) / (statistics.stdev(differences) / math.sqrt(3))
    assert c.seeds == 3 and c.difference == pytest.approx(statistics.fmean(differences))
    assert c.p_value == pytest.approx(2 * (1 - scipy_stats.t.cdf(t, 2)))
    # Holm: sorted p (0.01, 0.02, 0.04) x (3, 2, 1) -> 0.03, 0.04, 0.04 (monotone), in the input's order.
    tests = [dataclasses.replace(c, p_value=p) for p in (0.04, 0.01, 0.02)]
    assert [x.p_adjusted for x in ablation_stats.holm(tests)] == pytest.approx([0.04, 0.03, 0.04])
    assert [x.significant for x in ablation_stats.holm(tests)] == [True, True, True]
    assert not dataclasses.replace(c, p_value=0.2, p_adjusted=0.06).significant



def test_rank_correlation_of_few_models_has_an_exact_p_value():
    """Seven models ranked alike: rho = 1 and p = 2 / 7! (the two perfect pairings), not the t approximation's 0."""
    ranked = {name: float(i) for i, name in enumerate("abcdefg")}
    reversed_ = {name: -score for name, score in ranked.items()}
    assert ablation_stats.rank_correlation(ranked, ranked) == pytest.approx((1.0, 2 / math.factorial(7), 7))
    assert ablation_stats.rank_correlation(ranked, reversed_) == pytest.approx((-1.0, 2 / math.factorial(7), 7))
    # One swap of neighbours: rho = 1 - 6 * 2 / (7 * 48); pairings at least that close to a perfect ranking,
    # counted over both signs: 2 perfect + 2 * 6 single swaps = 14 of 5,040.
    swapped = dict(ranked, a=1.0, b=0.0)
    rho, p, n = ablation_stats.rank_correlation(ranked, swapped)
    assert rho == pytest.approx(1 - 12 / 336) and p == pytest.approx(14 / 5040) and n == 7

def _fake_records() -> list[dict]:
    """A full study's records (10 models at the main budget, 3 seeds, plus a second budget and 10% data) with
    made-up accuracies: vit best by a wide margin, the fusions within noise of each other."""
    rng = np.random.default_rng(0)
    models = [("parallel_hybrid", "parallel", f) for f in grid.FUSIONS] + [
        ("coatnet", "serial", ""), ("maxvit", "hierarchical", ""), ("resnet", "cnn", ""), ("vit", "vit", "")]
    records = []
    for i, (model, pattern, fusion) in enumerate(models):
        for budget, fraction in ((0.02, 1.0), (0.005, 1.0), (0.02, 0.1)):
            for seed in range(3):
                acc = (0.85 + (0.05 if model == "vit" else 0.0005 * i) - (0.04 if fraction < 1 else 0)
                       - (0.02 if budget < 0.02 else 0) + 0.003 * rng.standard_normal())
                shifted = {f"{c}_s{k}_accuracy": acc - 0.05 * k - 0.01 * j
                           for j, c in enumerate(grid.CORRUPTIONS) for k in (1, 2, 3)}
                by_corruption = {f"{c}_accuracy": statistics.fmean(shifted[f"{c}_s{k}_accuracy"] for k in (1, 2, 3))
                                 for c in grid.CORRUPTIONS}
                by_level = {f"severity{k}_accuracy": statistics.fmean(shifted[f"{c}_s{k}_accuracy"]
                                                                      for c in grid.CORRUPTIONS) for k in (1, 2, 3)}
                records.append(dict(name=f"{model}_{fusion or 'none'}", model=model, pattern=pattern, fusion=fusion,
                                    budget_gmacs=budget, train_fraction=fraction, seed=seed, learning_rate=2e-3,
                                    steps=234, params=40000 + 1000 * i, gmacs=budget * (1 + 0.01 * (i - 5)),
                                    accuracy=acc, train_accuracy=acc + 0.01, clean_accuracy=acc + 0.001,
                                    shift_accuracy=statistics.fmean(by_corruption.values()), **shifted,
                                    **by_corruption, **by_level, train_images_per_sec=500.0 + i,
                                    infer_images_per_sec=3000.0, wall_time_s=30.0))
    return records


def test_report_aggregates_seeds_marks_significance_and_writes_tables_and_plots(tmp_path):
    records = _fake_records()
    search = [{**{k: r[k] for k in ("name", "model", "pattern", "fusion", "budget_gmacs", "params", "gmacs")},
               "learning_rate": rate, "steps": 10, "heldout_accuracy": 0.8 + rate, "train_accuracy": 0.8,
               "wall_time_s": 1.0} for r in records if r["seed"] == 0 and r["budget_gmacs"] == 0.02
              and r["train_fraction"] == 1.0 for rate in (1e-3, 2e-3, 4e-3)]
    curves = [{"name": "vit_none", "budget_gmacs": 0.02, "train_fraction": 1.0, "seed": 0, "step": step,
               "loss": 1 / step, "accuracy": 0.5} for step in (50, 100)]
    branches = [{**{k: r[k] for k in ("name", "model", "fusion", "budget_gmacs", "train_fraction", "seed")},
                 "head": head, "head_accuracy": r["accuracy"] - 0.01, "share": share}
                for r in records if r["pattern"] == "parallel"
                for head, share in (("cnn", 0.3), ("transformer", 0.7), ("mean", math.nan))]
    paths = report.write_results(records, tmp_path, search=search, curves=curves, branches=branches,
                                 tolerance=0.05, solver_table="| solver |")
    rows = report.read_csv(paths["results.csv"])
    assert len(rows) == 30 and all(r["seeds"] == 3 for r in rows)
    vit = [r["accuracy"] for r in records if r["model"] == "vit" and r["budget_gmacs"] == 0.02
           and r["train_fraction"] == 1.0]
    row = next(r for r in rows if r["model"] == "vit" and r["budget_gmacs"] == 0.02 and r["train_fraction"] == 1.0)
    assert row["accuracy_mean"] == pytest.approx(statistics.fmean(vit))
    assert row["accuracy_std"] == pytest.approx(statistics.stdev(vit))
    assert row["accuracy_ci"] == pytest.approx(ablation_stats.interval(vit))
    main = [r for r in rows if r["budget_gmacs"] == 0.02 and r["train_fraction"] == 1.0]
    assert [r["pattern"] for r in main] == ["parallel"] * 6 + ["serial", "hierarchical", "cnn", "vit"]
    table = report.headline_table(report.aggregate(records))
    assert "0.02 GMACs, 100% data | 0.005 GMACs, 100% data | 0.02 GMACs, 10% data" in table
    assert len(table.splitlines()) == 2 + 10
    text = paths["finding.md"].read_text()
    # 5 points over the rest at 0.3 points of seed noise; the family is the best of each other pattern
    assert "The best, vit, against the best of each other pattern (Holm over 4): significantly above" in text
    assert "Fusions:" in text and "not significantly different from" in text  # fusions 0.05 points apart
    assert "Spearman" in text and "10% of the training set" in text and " loses more than " in text
    assert "Shift" in text
    assert "gating transformer 70%" in text  # the branch with the larger share, per fusion
    markdown = paths["results.md"].read_text()
    assert "| vit | parallel_hybrid (concat) |" in markdown and "**" in markdown  # a comparison row; the chosen rate
    assert "| 0.02 GMACs, 100% data | gating |" in markdown and "| 30.0 | 70.0 |" in markdown  # branch table
    assert len(report.read_csv(paths["runs.csv"])) == 90 and len(report.read_csv(paths["lr_search.csv"])) == 30
    assert sum(r["chosen"] == "True" for r in report.read_csv(paths["lr_search.csv"])) == 10
    for name in plots.all_figures([], [], []):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    assert len(report.read_csv(paths["attribution.csv"])) == 3 * len([r for r in records if r["pattern"] == "parallel"])
    loaded = report.load(tmp_path)
    assert len(loaded["records"]) == 90 and loaded["curves"][0]["step"] == 50


def test_a_comparison_on_one_seed_is_called_untested_not_insignificant():
    records = [r for r in _fake_records() if r["seed"] == 0]
    text = report.finding(report.aggregate(records), records)
    assert "untested against" in text and "(fewer than two shared seeds)" in text
    assert "not significantly different" not in text and "p=nan" not in text
    table = report.comparison_table(report.against_best(records, report.aggregate(records)[:3],
                                                        (0.02, 1.0)))
    assert table.splitlines()[2].endswith("| untested |")
