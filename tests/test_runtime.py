"""Process settings of the command-line entry points: XLA flags and the TCMalloc restart."""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from hybrid_jax import runtime


def test_default_xla_flags_join_the_users_and_never_override_them(monkeypatch):
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda environ=None: [])  # a CPU-only machine
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    runtime.set_default_xla_flags(environ)
    assert environ["XLA_FLAGS"].split() == [*runtime.DEFAULT_FLAGS, "--xla_force_host_platform_device_count=8"]
    runtime.set_default_xla_flags(environ)  # idempotent
    assert environ["XLA_FLAGS"].split() == [*runtime.DEFAULT_FLAGS, "--xla_force_host_platform_device_count=8"]

    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    runtime.set_default_xla_flags(mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    empty = {}
    runtime.set_default_xla_flags(empty)
    assert empty["XLA_FLAGS"] == " ".join(runtime.DEFAULT_FLAGS)


def test_default_xla_flags_never_reach_an_accelerator_run(monkeypatch):
    """The flags are XLA:CPU's: an accelerator's newer jaxlib may not know them, and XLA aborts on unknown flags."""
    user = "--xla_force_host_platform_device_count=8"
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda environ=None: ["jax_plugins.xla_cuda12"])
    for platforms in ({}, {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "cuda,cpu"}, {"JAX_PLATFORMS": "tpu"}):
        environ = {**platforms, "XLA_FLAGS": user}
        runtime.set_default_xla_flags(environ)
        assert environ["XLA_FLAGS"] == user, platforms
    cpu = {"JAX_PLATFORMS": "cpu"}  # a CUDA plugin is installed, but this run asks for the CPU alone
    runtime.set_default_xla_flags(cpu)
    assert cpu["XLA_FLAGS"] == " ".join(runtime.DEFAULT_FLAGS)
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda environ=None: [])
    gpu = {"JAX_PLATFORMS": "gpu"}  # asked for by name: not a CPU run, plugin or not
    runtime.set_default_xla_flags(gpu)
    assert "XLA_FLAGS" not in gpu

    # What an entry point does on a GPU machine: configure_process leaves XLA_FLAGS as it found it.
    monkeypatch.setattr(runtime, "restart_with_tcmalloc", lambda: None)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("XLA_FLAGS", user)
    runtime.configure_process()
    assert os.environ["XLA_FLAGS"] == user


def test_accelerator_plugins_are_found_as_jax_finds_them(tmp_path, monkeypatch):
    monkeypatch.delenv("PJRT_NAMES_AND_LIBRARY_PATHS", raising=False)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    before = runtime.accelerator_plugins()
    (tmp_path / "jax_plugins" / "xla_fake_gpu").mkdir(parents=True)  # a plugin in jax's namespace package
    (tmp_path / "jax_plugins" / "xla_fake_gpu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "xla_fake_gpu" in runtime.accelerator_plugins() and "xla_fake_gpu" not in before
    assert not runtime.cpu_only_run({})
    assert runtime.cpu_only_run({"JAX_PLATFORMS": "cpu"})
    assert "TPU_LIBRARY_PATH" in runtime.accelerator_plugins({"TPU_LIBRARY_PATH": "/lib/libtpu.so"})


def test_tcmalloc_restart_is_asked_for_once_and_can_be_declined(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    environ = runtime.tcmalloc_environ({"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert environ == {"LD_PRELOAD": "libtcmalloc_minimal.so.4 libother.so", "PATH": "/bin"}
    assert runtime.tcmalloc_environ(environ) is None  # the restarted process goes on
    assert runtime.tcmalloc_environ({runtime.KEEP_MALLOC_ENV: "1"}) is None
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert runtime.tcmalloc_environ({}) is None  # not installed: run with the system allocator


@pytest.mark.skipif(ctypes.util.find_library(runtime.TCMALLOC) is None,
                    reason="TCMalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_entry_point_restarts_itself_with_tcmalloc_loaded(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import sys
        from hybrid_jax.runtime import configure_process
        if __name__ == "__main__":
            configure_process()
            maps = open("/proc/self/maps").read()
            print("tcmalloc" in maps, sys.argv[1:])
    """))
    environ = {key: value for key, value in os.environ.items()
               if key not in ("LD_PRELOAD", runtime.KEEP_MALLOC_ENV)}
    out = subprocess.run([sys.executable, str(script), "--flag", "x y"], env=environ, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "True ['--flag', 'x y']"  # loaded, and the arguments survived the restart
