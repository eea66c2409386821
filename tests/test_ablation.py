"""The matched-compute ablation engine (experiments/ablation): solver, corruptions, sweep, report."""

import json
import shutil
import statistics
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from experiments.ablation import config as ablation_config
from experiments.ablation import report, run, shift, solver
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
@pytest.mark.parametrize("pattern", solver.PATTERNS)
def test_solver_hits_the_budget_within_5_percent(pattern, budget):
    fusions = FUSIONS_PER_BUDGET[budget] if pattern == "parallel" else (None,)
    for fusion in fusions:
        _check_solution(solver.solve(pattern, budget, fusion=fusion, image_size=32), budget)


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_solver_hits_the_budget_for_every_fusion(budget):
    for fusion in solver.FUSIONS:
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
    for name in shift.CORRUPTIONS:
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
# The sweep, end to end
# --------------------------------------------------------------------------- #


def _tiny_config(data_dir: str, results_dir: Path):
    config = ablation_config.get_config("tiny")
    config.train.data_dir = data_dir
    config.train_fractions = (1.0,)  # the report's side-by-side layout is covered by test_report_*
    config.results_dir = str(results_dir)
    return config


def test_tiny_sweep_writes_results_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, fmnist_dir, capsys,
                                                                                    caplog):
    """2 models x 2 seeds at a tiny budget: tables, plots, then a rerun that trains nothing, then a resume."""
    config = _tiny_config(fmnist_dir, tmp_path / "results")
    first = run.run_sweep(config, tmp_path / "runs")
    out = capsys.readouterr().out
    assert f"GMACs budget: {config.budget_gmacs:g} per 32x32x1 image" in out
    assert len(first["trained"]) == 4 and not first["skipped"]
    for name in ("runs.csv", "results.csv", "results.md", "finding.md", *report.PLOTS):
        path = tmp_path / "results" / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report.read_csv(tmp_path / "results" / "results.csv")
    assert {(r["model"], r["pattern"], r["fusion"], r["seeds"]) for r in rows} == {
        ("parallel_hybrid", "parallel", "gating", 2), ("resnet", "cnn", "", 2)}
    for r in rows:
        assert abs(r["gmacs"] / config.budget_gmacs - 1) <= 0.05 and r["params"] > 0
        assert 0 <= r["accuracy_mean"] <= 1 and r["accuracy_std"] >= 0 and r["train_images_per_sec"] > 0
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| parallel_hybrid | parallel | gating |" in table and "| resnet | cnn | - |" in table
    for record in first["records"]:
        # The shift subset is the whole (tiny) eval split here: the hook must reproduce the loop's accuracy.
        assert record["clean_accuracy"] == pytest.approx(record["accuracy"], abs=1e-6)
        for corruption in shift.CORRUPTIONS:
            assert 0 <= record[f"{corruption}_accuracy"] <= 1

    again = run.run_sweep(config, tmp_path / "runs")
    assert not again["trained"] and sorted(again["skipped"]) == sorted(first["trained"])
    assert again["records"] == first["records"]

    # Interrupt one run after its first checkpoint: rerunning trains it alone, from that checkpoint.
    victim = tmp_path / "runs" / "data100" / "resnet_none_seed1"
    for name in ("summary.json", "shift.json"):
        (victim / name).unlink()
    shutil.rmtree(victim / "checkpoints" / str(config.train.total_steps))
    caplog.set_level("INFO", logger="hybrid_jax")
    resumed = run.run_sweep(config, tmp_path / "runs")
    assert resumed["trained"] == ["data100/resnet_none_seed1"]
    assert f"resumed from step {config.train.checkpoint_every}" in caplog.text
    assert json.loads((victim / "summary.json").read_text())["steps"] == config.train.total_steps


def test_run_names_and_configs_carry_the_solution():
    solution = solver.Solution("cnn", None, "resnet18", "resnet", dict(block="basic", layers=(1, 1, 1),
                                                                         widths=(8, 16, 32), stem_width=8),
                               1.0, 1.0, 1, 1000, 0.001, 0.001)
    config = ablation_config.get_config()
    c = run.run_config(config, solution, seed=2, fraction=0.1, total_steps=234)
    assert (c.model.name, c.seed, c.train_fraction, c.total_steps) == ("resnet18", 2, 0.1, 234)
    assert {key: c.model[key] for key in solution.overrides} == solution.overrides
    name, changes = model_changes(c.model)  # a solved field equal to the variant's value is no change
    assert name == "resnet18" and changes.items() <= solution.overrides.items() and "widths" in changes
    assert model_changes(ml_collections.ConfigDict(json.loads(c.to_json())).model) == (name, changes)
    assert run.run_directory(Path("w"), solution, 0.1, 2) == Path("w/data10/resnet_none_seed2")
    assert run.run_directory(Path("w"), solution, 1.0, 0) == Path("w/data100/resnet_none_seed0")


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def _fake_records() -> list[dict]:
    """A full sweep's records (10 models x 2 data sizes x 3 seeds) with made-up accuracies."""
    rng = np.random.default_rng(0)
    models = [("parallel_hybrid", "parallel", f) for f in report.FUSION_ORDER] + [
        ("coatnet", "serial", ""), ("maxvit", "hierarchical", ""), ("resnet", "cnn", ""), ("vit", "vit", "")]
    records = []
    for i, (model, pattern, fusion) in enumerate(models):
        for fraction in (1.0, 0.1):
            for seed in range(3):
                acc = 0.85 + 0.005 * i - (0.04 if fraction < 1 else 0) + 0.003 * rng.standard_normal()
                corrupted = {f"{c}_accuracy": acc - 0.1 - 0.02 * j for j, c in enumerate(shift.CORRUPTIONS)}
                records.append(dict(name=f"{model}_{fusion or 'none'}", model=model, pattern=pattern, fusion=fusion,
                                    train_fraction=fraction, seed=seed, steps=234, params=40000 + 1000 * i,
                                    gmacs=0.003 * (1 + 0.01 * (i - 5)), accuracy=acc, clean_accuracy=acc + 0.001,
                                    shift_accuracy=statistics.fmean(corrupted.values()), **corrupted,
                                    train_images_per_sec=500.0 + i, infer_images_per_sec=3000.0, wall_time_s=30.0))
    return records


def test_report_aggregates_seeds_and_writes_tables_plots_and_finding(tmp_path):
    records = _fake_records()
    paths = report.write_results(records, tmp_path, budget=0.003, tolerance=0.05, solver_table="| solver |")
    rows = report.read_csv(paths["results.csv"])
    assert len(rows) == 20 and all(r["seeds"] == 3 for r in rows)
    vit_full = [r for r in records if r["model"] == "vit" and r["train_fraction"] == 1.0]
    row = next(r for r in rows if r["model"] == "vit" and r["train_fraction"] == 1.0)
    assert row["accuracy_mean"] == pytest.approx(statistics.fmean(r["accuracy"] for r in vit_full))
    assert row["accuracy_std"] == pytest.approx(statistics.stdev(r["accuracy"] for r in vit_full))
    assert [r["pattern"] for r in rows[::2]] == ["parallel"] * 6 + ["serial", "hierarchical", "cnn", "vit"]
    table = report.markdown_table(report.aggregate(records))
    assert "accuracy, 100% data | accuracy, 10% data | shifted accuracy, 100% data" in table
    assert len(table.splitlines()) == 2 + 10
    text = paths["finding.md"].read_text()
    assert "vit (vit) is most accurate" in text and "fusions" in text and "10% of the data" in text
    assert len(report.read_csv(paths["runs.csv"])) == 60
    for name in report.PLOTS:
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
