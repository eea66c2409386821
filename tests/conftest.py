"""Test setup: 8 simulated CPU devices, so sharding is exercised on every machine."""

import os

from hybrid_jax.runtime import set_default_xla_flags

# Must happen before jax initialises its backends; the platform first, since the CPU flags depend on it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
