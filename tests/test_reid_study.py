"""The re-ID seed study reads finished runs instead of retraining them, stops starting runs at its deadline,
and reports intervals and paired tests on shared seeds."""

import json

import pytest

from experiments.reid import run as reid_study

RANK1 = {"tccnet": (50.0, 52.0), "cnn": (40.0, 41.0), "vit": (49.0, 53.0)}


def _finished(workdir, backbone: str, seed: int) -> None:
    directory = workdir / f"{backbone}_seed{seed}"
    directory.mkdir(parents=True)
    rank1 = RANK1[backbone][seed]
    (directory / "summary.json").write_text(json.dumps(
        {"finished": True, "test_rank1": rank1, "test_rank5": rank1 + 20, "test_mAP": rank1 - 10,
         "wall_time_s": 120.0}))


def test_finished_runs_are_read_and_compared_on_shared_seeds(tmp_path):
    for backbone in reid_study.BACKBONES:
        for seed in (0, 1):
            _finished(tmp_path, backbone, seed)
    records, unstarted = reid_study.run_all(tmp_path, seeds=(0, 1))
    assert unstarted == 0
    assert [(r["backbone"], r["seed"], r["rank1"]) for r in records] == [
        ("tccnet", 0, 50.0), ("cnn", 0, 40.0), ("vit", 0, 49.0), ("tccnet", 1, 52.0), ("cnn", 1, 41.0),
        ("vit", 1, 53.0)]
    assert {r["model"] for r in records} == {"tccnet_tiny", "resnet18", "test_vit"}
    text = reid_study.report(records)
    assert "| tccnet | tccnet_tiny | 2 | 51.0 ± 1.4 [±12.7] |" in text  # t(0.975, 1) = 12.71
    # Differences 10 and 11: t = 21 on 1 df, p = 0.030, doubled by Holm against the vit comparison (p = 1).
    assert "rank-1: tccnet - cnn = +10.5 points (±6.4), not significant (p=0.061, Holm-adjusted, 2 seeds)" in text
    assert "rank-1: tccnet - vit = +0.0 points" in text
    reid_study.write_results(records, tmp_path / "results", "python -m experiments.reid.run --workdir w",
                             reid_study.settings())
    assert (tmp_path / "results" / "runs.csv").read_text().count("\n") == 7
    assert (tmp_path / "results" / "results.md").read_text().startswith("`python -m experiments.reid.run")

    # The workdir lost (a fresh machine): every run is read from the results, none trains or waits.
    recorded = reid_study.recorded_runs(tmp_path / "results", reid_study.settings())
    again, unstarted = reid_study.run_all(tmp_path / "lost", seeds=(0, 1), max_hours=-1.0, recorded=recorded)
    assert again == records and unstarted == 0
    with pytest.raises(ValueError, match=r"other configs \(cnn.total_steps: 600 -> 10; tccnet.total_steps"):
        reid_study.recorded_runs(tmp_path / "results", reid_study.settings(total_steps=10))


def test_a_part_past_its_deadline_starts_nothing_and_counts_what_is_left(tmp_path):
    _finished(tmp_path, "tccnet", 0)
    records, unstarted = reid_study.run_all(tmp_path, seeds=(0,), max_hours=-1.0)
    assert [r["backbone"] for r in records] == ["tccnet"] and unstarted == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tccnet_seed0"]
