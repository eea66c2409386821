"""The benchmark reports what it measures: the registry's counts, positive rates, MFU only with a known peak."""

import dataclasses
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
    # Comma-separated patterns, then the category filter: test_vit is a "vit", so only test_resnet is timed.
    benchmark.main(["--models", "test_resnet, test_vit", "--category", "cnn", "--batch", "2", "--steps", "1",
                    "--out", str(tmp_path / "bench")])
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [row["model"] for row in rows] == ["test_resnet"]
    assert "| test_resnet | cnn | - |" in (tmp_path / "bench.md").read_text()
    assert "peak for MFU: unknown" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no registered model matches"):
        benchmark.main(["--models", "no_such_model*"])


def test_torch_mode_runs_identical_weights_and_reports_the_ratio():
    """--torch on a tiny ViT: timm's model under another name, converted, same logits; both rates and the ratio."""
    timm = pytest.importorskip("timm")
    reference = lambda model: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                                embed_dim=32, depth=2, num_heads=2, num_classes=model.num_classes)
    (result,) = benchmark.benchmark("test_vit", batch=2, steps=1, torch=reference)
    assert result.torch_max_diff <= 1e-4  # the same weights: the same logits
    assert result.cpu_img_s > 0 and result.torch_img_s > 0
    assert result.torch_ratio == pytest.approx(result.cpu_img_s / result.torch_img_s)
    assert result.torch_threads == benchmark.jax_cpu_threads()
    header, _, row = benchmark.markdown_table([result]).splitlines()
    assert header.endswith("| CPU img/s | PyTorch CPU img/s | ours/PyTorch | max abs diff |")
    assert len(row.split("|")) == len(header.split("|"))
    assert "ours/PyTorch" not in benchmark.markdown_table([dataclasses.replace(result, torch_img_s=None)])

    # Refused before anything is timed: a family without a converter, and timm's own, different, test_vit.
    with pytest.raises(benchmark.TorchUnavailable, match="no PyTorch converter for the 'parallel_hybrid' family"):
        benchmark.benchmark("parallel_hybrid_tiny", batch=2, steps=1, torch=True)
    with pytest.raises(benchmark.TorchUnavailable, match="does not convert into test_vit"):
        benchmark.benchmark("test_vit", batch=2, steps=1, torch=True)
    with pytest.raises(benchmark.TorchUnavailable, match="float32"):
        benchmark.benchmark("test_vit", batch=2, steps=1, dtype="bfloat16", torch=True)


def test_torch_cli_benchmarks_without_pytorch_where_it_cannot_compare(capsys, monkeypatch):
    calls = []

    def fake_benchmark(name, *, torch=False, **kwargs):  # the real refusal is tested above
        calls.append(torch)
        if torch:
            raise benchmark.TorchUnavailable("timm has no model named 'x'")
        return [benchmark.Result(name, "-", 2, "float32", 1, 0.0, None, None, 0.1, 10.0, 1, None)]

    monkeypatch.setattr(benchmark, "benchmark", fake_benchmark)
    benchmark.main(["--models", "test_resnet", "--batch", "2", "--steps", "1", "--torch"])
    out = capsys.readouterr().out
    assert calls == [True, False]
    assert "PyTorch comparison on the host CPU with" in out
    assert "test_resnet: no PyTorch comparison: timm has no model named 'x'" in out
    assert "| test_resnet | - | - |" in out and "ours/PyTorch" not in out
