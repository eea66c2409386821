"""The benchmark reports what it measures: the registry's counts, positive rates, MFU only with a known peak."""

import json

import pytest

from hybrid_jax.analysis import benchmark
from hybrid_jax.analysis.flops import measure_registered


def test_benchmark_counts_match_the_flop_counter_and_mfu_needs_a_peak():
    (result,) = benchmark.benchmark("test_vit", batch=4, impls=("xla", "cudnn"), steps=1, train=True)
    measured = measure_registered("test_vit", xla=False)
    assert result.attn_impl == "xla"  # cudnn is skipped on CPU, not an error
    assert result.params == measured.params
    assert result.gmacs == pytest.approx(measured.gmacs, rel=1e-6)
    assert result.infer_img_s > 0 and result.train_img_s > 0 and result.train_bytes > result.infer_bytes > 0
    assert result.infer_mfu is None  # no known peak for a CPU

    (with_peak,) = benchmark.benchmark("test_resnet", batch=4, steps=1, peak_tflops=1.0)
    assert with_peak.attn_impl == "-"  # a CNN has no attention to switch
    assert 0 < with_peak.infer_mfu < 1  # a CPU core does not reach a petaflop-scale peak


def test_benchmark_cli_writes_table_and_json(tmp_path, capsys):
    benchmark.main(["--models", "test_resnet", "--batch", "2", "--steps", "1", "--out", str(tmp_path / "bench")])
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [row["model"] for row in rows] == ["test_resnet"]
    assert "| test_resnet | - |" in (tmp_path / "bench.md").read_text()
    assert "peak for MFU: unknown" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no registered model matches"):
        benchmark.main(["--models", "no_such_model*"])
