"""Process settings of the command-line entry points: XLA flags and the TCMalloc restart."""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from hybrid_jax import runtime


def test_default_xla_flags_join_the_users_and_never_override_them():
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
