"""Process settings of the command-line entry points: XLA flags and the allocator's restart."""

import ctypes.util
import os
import platform
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
    monkeypatch.setattr(runtime, "restart_with_fast_malloc", lambda: None)
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


def test_allocator_restart_is_asked_for_once_and_can_be_declined(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    environ = runtime.allocator_environ({"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert environ == {"LD_PRELOAD": "libtcmalloc_minimal.so.4 libother.so", "PATH": "/bin"}
    assert runtime.allocator_environ(environ) is None  # the restarted process goes on
    assert runtime.allocator_environ({runtime.KEEP_MALLOC_ENV: "1"}) is None
    # TCMalloc not installed: glibc's malloc told to keep its memory, once, and never over the user's tunables.
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime, "accelerator_plugins", lambda environ=None: [])  # a CPU-only machine
    environ = runtime.allocator_environ({"PATH": "/bin"})
    assert environ == {"PATH": "/bin", "GLIBC_TUNABLES": runtime.GLIBC_MALLOC_TUNABLES}
    assert runtime.allocator_environ({"JAX_PLATFORMS": "cuda"}) is None  # an accelerator's host keeps glibc's
    assert runtime.allocator_environ(environ) is None
    assert runtime.allocator_environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) is None
    assert runtime.allocator_environ({runtime.KEEP_MALLOC_ENV: "1"}) is None
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))  # not glibc (macOS, musl)
    assert runtime.allocator_environ({}) is None


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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables")
def test_without_tcmalloc_the_entry_point_restarts_with_glibc_keeping_a_threads_large_blocks(tmp_path):
    """XLA's pool threads take each step's temporaries as one large block: glibc, tuned, keeps it mapped."""
    script = tmp_path / "entry.py"
    script.write_text(textwrap.dedent("""
        import ctypes.util, os, resource, sys, threading
        import numpy as np
        from hybrid_jax.runtime import configure_process
        ctypes.util.find_library = lambda name: None  # a machine without TCMalloc
        if __name__ == "__main__":
            configure_process()
            faults = []
            def allocate_twice():
                for _ in range(2):
                    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                    block = np.ones(2 ** 25)  # 256 MiB, written
                    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
                    del block
            thread = threading.Thread(target=allocate_twice)
            thread.start()
            thread.join()
            print(os.environ.get("GLIBC_TUNABLES"), *faults, sys.argv[1:])
    """))
    environ = {key: value for key, value in os.environ.items()
               if key not in ("LD_PRELOAD", "GLIBC_TUNABLES", runtime.KEEP_MALLOC_ENV)}
    out = subprocess.run([sys.executable, str(script), "--flag"], env=environ, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=3)
    tunables, first, second, argv = out[0], int(out[1]), int(out[2]), out[3].strip()
    assert (tunables, argv) == (runtime.GLIBC_MALLOC_TUNABLES, "['--flag']")  # restarted once, arguments kept
    assert first >= 128 and second < 16  # the block's pages were mapped once, then kept (glibc's default: again)
