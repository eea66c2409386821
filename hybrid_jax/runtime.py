"""Process settings the command-line entry points apply before JAX starts: XLA flags and the allocator.

Both were measured on this project's 2-core CPU machines, training `parallel_hybrid_tiny_28`
at batch 64 (README, "Install and run"):
- jaxlib 0.10 runs CPU convolutions through YNNPACK by default; XLA's own convolutions
  train these small-image hybrids 1.5-1.8x faster (ResNet-50 at 224 px: 1.7x in training,
  1.8x in inference), so YNNPACK is turned off for convolutions only (matrix products keep
  it). GPU and TPU ignore the flag. Depthwise convolutions avoid both libraries on CPU
  (`layers.conv.depthwise_conv_by_shifts`), which is faster still.
- XLA's CPU runtime allocates its buffers afresh every step; glibc's malloc serves the
  large ones with new memory maps, ~22k page faults a step. TCMalloc keeps that memory:
  steps are another 20-30% faster, as on TPU VMs, which preload it too.
Library users who import hybrid_jax keep their own process settings.

`compilation_cache` turns on JAX's persistent compilation cache for a block: the command line
(`config.compilation_cache_dir`) and the ablation sweep use it so reruns, resumed runs and the
processes of a pod compile each program once.
"""

import contextlib
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{_YNN_FUSION_FLAG}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",)
TCMALLOC = "tcmalloc_minimal"  # Debian: libtcmalloc-minimal4
KEEP_MALLOC_ENV = "HYBRID_JAX_SYSTEM_MALLOC"  # set to 1 to keep the system allocator


def set_default_xla_flags(environ: dict[str, str] = os.environ) -> None:
    """Adds DEFAULT_FLAGS to XLA_FLAGS; a flag the user already set is left as they set it.

    Takes effect only if called before JAX's first computation (importing jax is fine).
    """
    user_flags = environ.get("XLA_FLAGS", "")
    added = [flag for flag in DEFAULT_FLAGS if flag.split("=")[0] not in user_flags]
    environ["XLA_FLAGS"] = " ".join([*added, user_flags]).strip()


def tcmalloc_environ(environ: dict[str, str] = os.environ) -> dict[str, str] | None:
    """The environment to restart this process with TCMalloc preloaded, or None to go on as is.

    None when TCMalloc is already preloaded, not installed, or declined with HYBRID_JAX_SYSTEM_MALLOC=1.
    """
    preload = environ.get("LD_PRELOAD", "")
    if environ.get(KEEP_MALLOC_ENV) == "1" or "tcmalloc" in preload:
        return None
    library = ctypes.util.find_library(TCMALLOC)
    if library is None:
        log.info("TCMalloc not found; `apt-get install libtcmalloc-minimal4` makes CPU training faster")
        return None
    return {**environ, "LD_PRELOAD": " ".join(filter(None, [library, preload]))}


def restart_with_tcmalloc() -> None:
    """Replaces this process by the same command with TCMalloc preloaded, where tcmalloc_environ says to.

    Call first thing in a `__main__` block: nothing done before it survives.
    """
    environ = tcmalloc_environ()
    if environ is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def configure_process() -> None:
    """Both settings, for a command-line entry point: call first thing in its `__main__` block."""
    restart_with_tcmalloc()
    set_default_xla_flags()


@contextlib.contextmanager
def compilation_cache(directory: str | os.PathLike | None) -> Iterator[None]:
    """JAX's persistent compilation cache in `directory` (local or gs://) for the block; None leaves it off."""
    if not directory:
        yield
        return
    import jax
    from etils import epath
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {key: jax.config.values[key] for key in keys}
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
        cc.reset_cache()
