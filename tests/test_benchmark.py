"""The benchmark reports what it measures: the registry's counts, positive rates, MFU only with a known peak."""

import dataclasses
import json
import time

import jax
import pytest

from hybrid_jax.analysis import accelerator, benchmark, step_profile
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
    # Peaks by device kind: the longest table name the kind contains.
    assert benchmark.device_peak_flops(device_kind="NVIDIA H100 PCIe") == 756e12
    assert benchmark.device_peak_flops(device_kind="NVIDIA H100 80GB HBM3") == 989e12
    assert benchmark.device_memory_bandwidth("NVIDIA H200") == 4.8e12
    assert benchmark.device_memory_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert benchmark.device_memory_bandwidth("cpu") is None


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


def test_torch_mode_runs_identical_weights_and_reports_the_ratios():
    """--torch --train on a tiny ViT: timm's model under another name, converted; the same logits, the same
    training losses; both rates and the ratio for inference and for the SGD train step; the geometric-mean row."""
    timm = pytest.importorskip("timm")
    reference = lambda model: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                                                embed_dim=32, depth=2, num_heads=2, num_classes=model.num_classes)
    (result,) = benchmark.benchmark("test_vit", batch=2, steps=1, torch=reference, train=True)
    assert result.torch_max_diff <= 1e-4  # the same weights: the same logits
    assert result.torch_train_loss_diff <= 1e-5  # and the same losses, step after step
    for rate in (result.cpu_img_s, result.torch_img_s, result.cpu_train_img_s, result.torch_train_img_s):
        assert 0 < rate < float("inf")
    assert result.torch_ratio == pytest.approx(result.cpu_img_s / result.torch_img_s)
    assert result.torch_train_ratio == pytest.approx(result.cpu_train_img_s / result.torch_train_img_s)
    assert result.torch_threads == benchmark.jax_cpu_threads()
    header, _, row, mean = benchmark.markdown_table([result]).splitlines()
    assert header.endswith("| CPU infer img/s | PyTorch infer img/s | infer ours/PyTorch | max abs diff | "
                           "CPU train img/s | PyTorch train img/s | train ours/PyTorch |")
    assert len(row.split("|")) == len(header.split("|")) == len(mean.split("|"))
    means = dict(zip(header.split("|"), mean.split("|")))
    assert means[" model "] == " geometric mean (n=1) "
    assert means[" infer ours/PyTorch "].strip() == f"{result.torch_ratio:.2f}"
    assert means[" train ours/PyTorch "].strip() == f"{result.torch_train_ratio:.2f}"
    assert "ours/PyTorch" not in benchmark.markdown_table([dataclasses.replace(
        result, torch_img_s=None, torch_ratio=None, torch_train_img_s=None, torch_train_ratio=None)])

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


@pytest.mark.slow  # ~2 minutes on 2 busy cores: the 11.7M parameters' init and four compiles
def test_torch_train_mode_on_resnet18_trains_batchnorm_alike():
    """--torch --train on resnet18: BatchNorm in train mode on both sides gives the same first loss."""
    pytest.importorskip("timm")
    (result,) = benchmark.benchmark("resnet18", batch=2, steps=1, torch=True, train=True)
    assert result.torch_max_diff <= 1e-3 and result.torch_train_loss_diff <= 1e-4
    assert 0 < result.torch_ratio < float("inf") and 0 < result.torch_train_ratio < float("inf")


def test_geometric_mean_row_and_summary_over_the_models_compared():
    base = benchmark.Result("m", "-", 2, "float32", 1, 0.0, None, None, 0.1, 10.0, 1, None, category="cnn")
    results = [dataclasses.replace(base, model="a", torch_img_s=1.0, torch_ratio=0.5, torch_train_img_s=1.0,
                                   torch_train_ratio=0.25),
               dataclasses.replace(base, model="b", torch_img_s=1.0, torch_ratio=2.0, torch_train_img_s=1.0,
                                   torch_train_ratio=1.0),
               dataclasses.replace(base, model="c", torch_img_s=1.0, torch_ratio=4.0),  # no train comparison
               dataclasses.replace(base, model="d")]  # not compared at all
    assert benchmark.geometric_mean([0.5, 2.0, 4.0]) == pytest.approx(4 ** (1 / 3))  # 0.5 * 2 cancel
    assert benchmark.torch_ratios(results, "training") == {"a": 0.25, "b": 1.0}
    table = benchmark.markdown_table(results).splitlines()
    header, mean = table[0].split("|"), table[-1].split("|")
    assert len(table) == 2 + 4 + 1 and mean[1].strip() == "geometric mean (n=3)"
    assert mean[header.index(" infer ours/PyTorch ")].strip() == f"{4 ** (1 / 3):.2f}" == "1.59"
    assert mean[header.index(" train ours/PyTorch ")].strip() == "0.50"  # sqrt(0.25 * 1.0)
    targets = "(target >= 0.7x)"
    assert benchmark.torch_summary(results) == [
        f"inference: ours/PyTorch geometric mean 1.59x over 3 model(s) (target >= 1.0x); lowest a 0.50x {targets}",
        f"training: ours/PyTorch geometric mean 0.50x over 2 model(s) (target >= 1.0x); lowest a 0.25x {targets}"]


def test_process_settings_say_which_the_command_line_applies(monkeypatch):
    monkeypatch.setattr(benchmark, "_tcmalloc_loaded", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", " ".join(benchmark.DEFAULT_FLAGS))
    assert benchmark.process_settings().startswith("command line (hybrid_jax/runtime.py): TCMalloc, XLA CPU")
    monkeypatch.setattr(benchmark, "_tcmalloc_loaded", lambda: False)
    monkeypatch.setenv("GLIBC_TUNABLES", benchmark.GLIBC_MALLOC_TUNABLES)  # the restart where TCMalloc is missing
    assert benchmark.process_settings().startswith("command line (hybrid_jax/runtime.py): glibc malloc, tuned, XLA")
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert benchmark.process_settings().startswith("library (jaxlib's and the system's defaults): system malloc")


def test_accelerator_suite_smoke_trains_in_bf16_with_float32_params(tmp_path, capsys):
    """The whole suite path on CPU with ViT-B/16's tiny stand-in: an XLA row measured, the cuDNN row unavailable."""
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path)])
    report = json.loads((tmp_path / "cpu" / "accelerator.json").read_text())
    xla, cudnn = (accelerator.SuiteRow(**row) for row in report["rows"])
    assert (xla.label, xla.model, xla.attn_impl, xla.batch, xla.status) == ("ViT-B/16", "test_vit", "xla", 2, "ok")
    assert xla.train_img_s > 0 and xla.gmacs > 0 and xla.peak_gib > 0 and xla.memory_source == "planned"
    assert xla.mfu is None and xla.memory_floor_ms is None  # no known peak or memory bandwidth for a CPU
    # XLA's bytes: at least the parameters, their gradients and AdamW's two moments, each read or written once.
    assert xla.xla_gb * 1e9 > 4 * 4 * measure_registered("test_vit", xla=False).params
    assert xla.param_dtypes == "float32"  # the master weights the compiled step returns
    matmuls = dict(item.split() for item in xla.matmul_dtypes.split(", "))
    assert "f32" not in matmuls and int(matmuls["bf16"]) > 10 * int(matmuls.get("f32xbf16", 0))
    assert (cudnn.attn_impl, cudnn.status) == ("cudnn", "unavailable") and "NVIDIA GPU" in cudnn.note
    md = (tmp_path / "cpu" / "accelerator.md").read_text()
    assert "| ViT-B/16 | test_vit | xla | 2 |" in md and "| ViT-B/16 | test_vit | cudnn | 2 |" in md
    assert "SMOKE RUN" in md and "SMOKE RUN" in capsys.readouterr().out
    assert xla.setup_s > 0 and xla.compile_s > 0 and xla.row_s >= xla.setup_s + xla.compile_s
    assert xla.jax_version == jax.__version__ and time.strptime(xla.measured_at, "%Y-%m-%d %H:%M")

    # --resume keeps the measured row as it was and runs only the rest: here the cuDNN row, unavailable again.
    earlier = tmp_path / "earlier.json"
    earlier.write_bytes((tmp_path / "cpu" / "accelerator.json").read_bytes())
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path / "again"),
                      "--resume", str(earlier)])
    again = json.loads((tmp_path / "again" / "cpu" / "accelerator.json").read_text())
    assert again["rows"][0] == dataclasses.asdict(xla) and again["rows"][1]["status"] == "unavailable"
    assert "keeping 1 row(s) measured by an earlier run" in again["header"][-1]
    assert "(kept from the earlier table)" in capsys.readouterr().out
    # --refresh measures the kept row again, and keeps the earlier one where the new one finds no time.
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path / "fresh"),
                      "--resume", str(earlier), "--refresh"])
    fresh = json.loads((tmp_path / "fresh" / "cpu" / "accelerator.json").read_text())
    assert fresh["rows"][0]["status"] == "ok" and fresh["rows"][0] != dataclasses.asdict(xla)
    assert "keeping" not in fresh["header"][-1]
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path / "late"),
                      "--resume", str(earlier), "--refresh", "--time_budget_s", "1e-9"])
    late = json.loads((tmp_path / "late" / "cpu" / "accelerator.json").read_text())
    assert late["rows"][0] == dataclasses.asdict(xla) and "keeping 1 row(s)" in late["header"][-1]
    assert f"(its earlier measurement, of {xla.measured_at}, kept)" in capsys.readouterr().out
    # A benchmarks folder resumes from this device's table in it, and from nothing where it has none yet.
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path / "again"),
                      "--resume", str(tmp_path)])
    assert "keeping 1 row(s) measured by an earlier run" in capsys.readouterr().out
    (tmp_path / "no_tables").mkdir()
    accelerator.main(["--smoke", "--models", "test_vit", "--resume", str(tmp_path / "no_tables")])
    assert "keeping" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such file or folder.*leave --resume out"):
        accelerator.main(["--smoke", "--resume", str(tmp_path / "missing.json")])
    other = json.loads(earlier.read_text()) | {"device_kind": "NVIDIA H200"}
    earlier.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="on 'NVIDIA H200', and this is 'cpu'.*benchmarks/cpu/accelerator.json"):
        accelerator.main(["--smoke", "--resume", str(earlier)])


def test_a_suite_stopped_from_outside_leaves_the_rows_it_measured_for_resume(tmp_path, monkeypatch):
    """A device session's run is killed at its time limit: the table on disk holds every row finished by then."""
    measure = accelerator.measure_suite_row

    def stopped_at_the_cudnn_row(*args, **kwargs):
        if kwargs["attn_impl"] == "cudnn":
            raise KeyboardInterrupt  # the run ends here, before the suite writes its final table
        return measure(*args, **kwargs)

    monkeypatch.setattr(accelerator, "measure_suite_row", stopped_at_the_cudnn_row)
    with pytest.raises(KeyboardInterrupt):
        accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path)])
    partial = json.loads((tmp_path / "cpu" / "accelerator.json").read_text())
    assert [(row["attn_impl"], row["status"]) for row in partial["rows"]] == [("xla", "ok")]
    assert "PARTIAL TABLE" in partial["header"][-1]
    assert "PARTIAL TABLE" in (tmp_path / "cpu" / "accelerator.md").read_text()

    monkeypatch.setattr(accelerator, "measure_suite_row", measure)
    accelerator.main(["--smoke", "--models", "test_vit", "--out_dir", str(tmp_path), "--resume", str(tmp_path)])
    done = json.loads((tmp_path / "cpu" / "accelerator.json").read_text())
    assert done["rows"][0] == partial["rows"][0] and done["rows"][1]["status"] == "unavailable"
    assert "PARTIAL" not in done["header"][-1] and "keeping 1 row(s)" in done["header"][-1]


def test_accelerator_suite_time_budget_skips_rows_with_a_note(tmp_path):
    plan = accelerator.suite_plan()
    assert [(r["model"], r["attn_impl"]) for r in plan[:3]] == [
        ("vit_base_patch16_224", "xla"), ("vit_base_patch16_224", "cudnn"), ("conformer_small_patch16", "xla")]
    assert {r["model"] for r in plan} == {m.name for m in accelerator.ACCELERATOR_SUITE}
    rows = accelerator.run_suite(time_budget_s=1e-9, log=lambda _: None)  # nothing starts, nothing is compiled
    assert [r.label for r in rows[::2]] == [m.label for m in accelerator.ACCELERATOR_SUITE]
    assert all(r.status == "skipped" and "time budget" in r.note for r in rows)
    assert "| skipped: not started: the 1e-09 s time budget was spent |" in accelerator.suite_table(rows)
    # A row in its own process (as on an accelerator) answers with its row, and is stopped at the budget;
    # the programs it compiles go to the suite's shared compilation cache.
    kwargs = dict(label="ViT-B/16", model="test_vit", attn_impl="cudnn", batch=2, smoke=True)
    answered = accelerator._row_in_own_process(kwargs, timeout_s=300)
    assert (answered.status, answered.device_kind) == ("unavailable", "cpu")
    measured = accelerator._row_in_own_process({**kwargs, "attn_impl": "xla"}, timeout_s=300, cache_dir=str(tmp_path))
    assert measured.status == "ok" and len(list(tmp_path.iterdir())) >= 2  # the state's init and the train step
    stopped = accelerator._row_in_own_process({**kwargs, "attn_impl": "xla"}, timeout_s=0.01)
    assert stopped.status == "skipped" and "stopped after" in stopped.note
    assert accelerator._device_kind(own_process=True) == "cpu"  # --resume's check, without taking the device here


def test_compile_ahead_hands_each_row_its_train_step_through_the_compilation_cache(capsys):
    """Steps compiled first, in processes of their own; each row's own process then loads its step, not compiles it."""
    logged = []
    kept = accelerator.SuiteRow("ViT-B/16", "test_vit", "cudnn", 2, measured_at="2026-12-04 15:00")  # --resume's
    rows = accelerator.run_suite(smoke=True, patterns=["test_vit"], own_processes=True, compile_ahead=2,
                                 time_budget_s=600, measured=[kept], log=logged.append)
    xla, cudnn = rows
    assert xla.status == "ok" and xla.step_cached and xla.ahead_compile_s > 0 and xla.train_img_s > 0
    assert xla.xla_gb > 0  # a step loaded from the cache keeps XLA's cost analysis
    assert cudnn is kept  # only the row the earlier table lacks was compiled and run
    assert logged[0].startswith("compile-ahead phase: 1 of 1 train step(s) compiled, 2 at once")
    assert "| test_vit | xla | 2 |" in logged[1] and "| yes |" in logged[1]
    # Without the phase, the row compiles its own step: nothing in the run's fresh cache to load.
    alone = accelerator.run_suite(smoke=True, patterns=["test_vit"], own_processes=True, time_budget_s=600,
                                  measured=[kept], log=lambda _: None)[0]
    assert alone.status == "ok" and alone.step_cached is False and alone.ahead_compile_s is None
    # A phase already over starts no process: its rows compile in their own processes later.
    plans = accelerator.suite_plan(smoke=True, patterns=["test_vit"])
    late = accelerator._compile_ahead(plans, 2, until=0.0, cache_dir="unused", clock=lambda: 1.0)
    assert [r.status for r in late.values()] == ["skipped", "skipped"]
    with pytest.raises(ValueError, match="compile_ahead needs each row in its own process"):
        accelerator.run_suite(smoke=True, own_processes=False, compile_ahead=2)
    with pytest.raises(SystemExit):
        accelerator.main(["--smoke", "--compile_ahead", "2"])
    assert "cannot go with --in_process or --smoke" in capsys.readouterr().err


def test_benchmark_suite_flag_hands_the_rest_of_the_command_line_to_the_accelerator_suite(monkeypatch):
    calls = []
    monkeypatch.setattr(accelerator, "main", calls.append)
    benchmark.main(["--suite", "accelerator", "--smoke", "--time_budget_s", "60", "--out_dir", "x", "--library"])
    benchmark.main(["--smoke", "--suite=accelerator"])
    assert calls == [["--smoke", "--time_budget_s", "60", "--out_dir", "x", "--library"], ["--smoke"]]
    with pytest.raises(SystemExit):  # the suite's flags are not the model benchmark's
        benchmark.main(["--models", "test_vit", "--smoke"])


def test_step_profile_attributes_the_traced_ops_of_the_runs_own_step():
    """The smoke config's train step: its ops' time is found in the trace and split by kind and by module."""
    config = step_profile.load_config("configs/fashion_mnist.py:smoke",
                                      ["batch_size=16", "model.widths=(8, 16, 16, 16)"])
    assert (config.batch_size, config.model.widths) == (16, (8, 16, 16, 16))
    profile = step_profile.profile_step(config, steps=2, timed=1)
    total = sum(profile.op_s.values())
    assert 0 < total < 10 * profile.step_s  # per step and device
    modules = profile.by_module(depth=1)
    assert modules[("forward", "stem")] > 0 and modules[("backward", "stem")] > 0
    assert sum(profile.by_kind().values()) == pytest.approx(total)
    assert step_profile.report(profile).startswith("test_resnet, batch 16: train step ")
    with pytest.raises(KeyError, match="no key 'batch_sise'"):
        step_profile.load_config("configs/fashion_mnist.py:smoke", ["batch_sise=16"])


def test_step_profile_of_a_models_sgd_step_from_the_command_line(capsys):
    """`--model` profiles the SGD step the PyTorch comparison times: its stem's convolution runs both ways."""
    step_profile.main(["--model", "test_resnet", "--batch", "2", "--steps", "1", "--top", "50", "--depth", "1"])
    table = capsys.readouterr().out
    assert table.startswith("test_resnet, batch 2: train step ")
    assert "| forward | stem |" in table and "| backward | stem |" in table
    with pytest.raises(SystemExit):
        step_profile.main(["--model", "test_resnet", "--config", "configs/fashion_mnist.py"])


_STEP_HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

ENTRY %main.9 () -> f32[] {
  %fusion.6 = f32[8]{0} fusion(), kind=kLoop, metadata={op_name="jit(train_step)/jvp(M)/blocks_1/attn/add"}
  ROOT %custom-call.2 = f32[] custom-call(), metadata={op_name="jit(train_step)/transpose(jvp(M))/head/dot"}
}
"""


_STAT_IDS = {"hlo_op": 1, "hlo_module": 2, "kernel_annotation": 3}
_EVENT_IDS = {"fusion.6": 1, "custom-call.2": 2, "loop_add_fusion": 3, "sm90_xmma_gemm_bf16": 4, "dot.1": 5}


def _event(name: str, duration_us: int, stats: dict[str, str]) -> str:
    """An xplane event in text proto, with string stats."""
    entries = " ".join(f'stats {{ metadata_id: {_STAT_IDS[key]} str_value: "{value}" }}'
                       for key, value in stats.items())
    return f'events {{ metadata_id: {_EVENT_IDS[name]} duration_ps: {duration_us * 10**6} {entries} }}'


def _trace(tmp_path, planes: dict[str, list[str]]):
    """A trace directory holding one xplane with these planes of events (one line each)."""
    from jax.profiler import ProfileData

    metadata = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }} '
                       for name, i in _EVENT_IDS.items())
    metadata += "".join(f'stat_metadata {{ key: {i} value {{ id: {i} name: "{name}" }} }} '
                        for name, i in _STAT_IDS.items())
    text = "".join(f'planes {{ name: "{plane}" lines {{ name: "ops" {" ".join(events)} }} {metadata} }} '
                   for plane, events in planes.items())
    tmp_path.mkdir()
    (tmp_path / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
    return tmp_path


def test_step_profile_reads_a_cpu_trace_by_its_events_stats_and_a_gpu_trace_by_its_kernels_annotations(tmp_path):
    """XLA:CPU names each event's op and module in its stats; a GPU's kernels have their own names and carry
    the op in an annotation, and the host's launch events of them do not count beside the device's time."""
    attn, head = ("fusion.6", "jit(train_step)/jvp(M)/blocks_1/attn/add"), \
        ("custom-call.2", "jit(train_step)/transpose(jvp(M))/head/dot")
    cpu = _trace(tmp_path / "cpu", {"/host:CPU": [
        _event("fusion.6", 30, {"hlo_op": "fusion.6", "hlo_module": "jit_train_step"}),
        _event("fusion.6", 10, {"hlo_op": "fusion.6", "hlo_module": "jit_train_step"}),
        _event("fusion.6", 500, {"hlo_op": "fusion.6", "hlo_module": "jit_init"}),  # another program's op
        _event("dot.1", 7, {"hlo_op": "custom-call.2", "hlo_module": "jit_train_step"})]})
    assert step_profile.op_seconds(cpu, _STEP_HLO) == pytest.approx({attn: 40e-6, head: 7e-6})

    step, init = "XlaModule:#hlo_module=jit_train_step,program_id=4#", "XlaModule:#hlo_module=jit_init#"
    gpu = _trace(tmp_path / "gpu", {
        "/host:CPU": [_event("fusion.6", 3, {"hlo_op": "fusion.6", "hlo_module": "jit_train_step"})],
        "/device:GPU:0": [
            _event("loop_add_fusion", 20, {"kernel_annotation": f"{step}::Thunk:#name=blocks_1/attn,hlo_op=fusion.6#"}),
            _event("sm90_xmma_gemm_bf16", 50, {"kernel_annotation": f"{step}::Thunk:#hlo_op=custom-call.2#"}),
            _event("sm90_xmma_gemm_bf16", 900, {"kernel_annotation": f"{init}::Thunk:#hlo_op=custom-call.2#"})]})
    assert step_profile.op_seconds(gpu, _STEP_HLO) == pytest.approx({attn: 20e-6, head: 50e-6})


def test_module_path_keeps_the_module_scopes_of_an_ops_metadata():
    name = "jit(train_step)/jvp(ParallelHybrid.branch_logits)/ParallelHybrid.forward_features/blocks_1/attn/vmap()/max"
    assert step_profile.module_path(name, 2) == "blocks_1/attn"
    assert step_profile.module_path(name, 1) == "blocks_1"
    assert step_profile.module_path("jit(train_step)/transpose(jvp(ResNet))/stem/conv/conv_general_dilated", 3) == \
        "stem/conv"
    assert step_profile.module_path("jit(train_step)/add", 2) == "(step)"
    assert step_profile.module_path("", 2) == "(XLA)"
