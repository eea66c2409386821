"""Process settings the command-line entry points apply before JAX starts: XLA flags and the allocator.

Both were measured on this project's 2-core CPU machines, training `parallel_hybrid_tiny_28`
at batch 64 (README, "Install and run"):
- jaxlib 0.10 runs CPU convolutions through YNNPACK by default; XLA's own convolutions
  train these small-image hybrids 1.5-1.8x faster (ResNet-50 at 224 px: 1.7x in training,
  1.8x in inference), so YNNPACK is turned off for convolutions only (matrix products keep
  it). The flag is added for CPU-only runs alone (`cpu_only_run`). Grouped convolutions
  avoid both libraries on CPU (`layers.conv.grouped_conv_by_shifts`), which is faster still.
- XLA's CPU runtime allocates its buffers afresh every step, the temporaries as one block
  (ResNet-50's SGD step at batch 8: 1.08 GiB) from a thread of its pool. glibc's malloc serves
  such a thread from a side arena, whose heaps hold at most 64 MiB, so it maps the block anew
  every step and unmaps it after: a page fault per 4 KiB touched (297k a step there). TCMalloc
  keeps that memory: steps are another 20-30% faster, as on TPU VMs, which preload it too.
  Where it is not installed, glibc itself is told to keep it (`GLIBC_MALLOC_TUNABLES`: one
  arena, no maps, no trimming), which wins part of that (docs/cpu_training.md).
Library users who import hybrid_jax keep their own process settings.

`compilation_cache` turns on JAX's persistent compilation cache for a block: the command line
(`config.compilation_cache_dir`) and the ablation sweep use it so reruns, resumed runs and the
processes of a pod compile each program once.
"""

import contextlib
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import platform
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{_YNN_FUSION_FLAG}=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",)
TCMALLOC = "tcmalloc_minimal"  # Debian: libtcmalloc-minimal4
KEEP_MALLOC_ENV = "HYBRID_JAX_SYSTEM_MALLOC"  # set to 1 to keep the system allocator as it is
# glibc's malloc where TCMalloc is missing: one arena, no memory maps, no trimming. Without the one arena, or
# without the no maps, the faults stay (experiments/benchmarks/cpu_2core/README.md); mallopt() from inside
# the process cannot set all three (its trim threshold stops at 2 GiB).
GLIBC_MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"


def accelerator_plugins(environ: dict[str, str] = os.environ) -> list[str]:
    """The accelerator backends jax would try here (CUDA, ROCm, TPU, ...), found without importing jax.

    What jax itself looks for: modules under the `jax_plugins` namespace package, entry points of
    the `jax_plugins` group, the `libtpu` package, and plugin or TPU libraries named in the environment.
    """
    found = []
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        found += [name for _, name, _ in pkgutil.iter_modules(spec.submodule_search_locations)]
    found += [entry.value for entry in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    found += [name for name in ("PJRT_NAMES_AND_LIBRARY_PATHS", "TPU_LIBRARY_PATH") if environ.get(name)]
    return sorted(set(found))


def cpu_only_run(environ: dict[str, str] = os.environ) -> bool:
    """Whether jax will run on its CPU backend alone, decided before any backend starts.

    JAX_PLATFORMS, when set, lists the backends jax may use: CPU-only when it names cpu alone.
    Unset, jax takes any accelerator plugin it finds installed, so an installed one counts as an
    accelerator run. Erring that way is the safe side: on a machine with a plugin but no device, CPU
    convolutions only stay slower, whereas a CPU flag on an accelerator whose jaxlib is newer than
    ours may be one XLA no longer knows, and XLA aborts on an unknown flag in XLA_FLAGS.
    """
    platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return set(platforms) == {"cpu"}
    return not accelerator_plugins(environ)


def set_default_xla_flags(environ: dict[str, str] = os.environ) -> None:
    """Adds DEFAULT_FLAGS to XLA_FLAGS for a CPU-only run; a flag the user already set is left as they set it.

    Takes effect only if called before JAX's first computation (importing jax is fine). Runs that
    may use an accelerator (`cpu_only_run`) are left alone: the flags are XLA:CPU's.
    """
    if not cpu_only_run(environ):
        return
    user_flags = environ.get("XLA_FLAGS", "")
    added = [flag for flag in DEFAULT_FLAGS if flag.split("=")[0] not in user_flags]
    environ["XLA_FLAGS"] = " ".join([*added, user_flags]).strip()


def allocator_environ(environ: dict[str, str] = os.environ) -> dict[str, str] | None:
    """The environment to restart this process with under a faster allocator, or None to go on as is.

    TCMalloc preloaded where installed; else, for a CPU-only run under glibc, glibc's malloc set to keep
    the memory it maps (`GLIBC_MALLOC_TUNABLES`: what it fixes is XLA:CPU's, and one arena for every thread
    is no choice to impose on an accelerator's host). None when either is in place already, when the user
    set GLIBC_TUNABLES themselves, or when declined with HYBRID_JAX_SYSTEM_MALLOC=1.
    """
    preload = environ.get("LD_PRELOAD", "")
    if environ.get(KEEP_MALLOC_ENV) == "1" or "tcmalloc" in preload:
        return None
    library = ctypes.util.find_library(TCMALLOC)
    if library is not None:
        return {**environ, "LD_PRELOAD": " ".join(filter(None, [library, preload]))}
    if "GLIBC_TUNABLES" in environ or platform.libc_ver()[0] != "glibc" or not cpu_only_run(environ):
        return None
    log.info("TCMalloc not found (`apt-get install libtcmalloc-minimal4` makes CPU training faster still); "
             "tuning glibc's malloc instead")
    return {**environ, "GLIBC_TUNABLES": GLIBC_MALLOC_TUNABLES}


def restart_with_fast_malloc() -> None:
    """Replaces this process by the same command under the allocator `allocator_environ` gives, if any.

    Call first thing in a `__main__` block: nothing done before it survives.
    """
    environ = allocator_environ()
    if environ is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def configure_process() -> None:
    """Both settings, for a command-line entry point: call first thing in its `__main__` block."""
    restart_with_fast_malloc()
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
