"""Every notebook under experiments/ runs top to bottom in its default (tiny) setting, as part of the test command.

Each notebook is one test, so `-n 2` spreads them over the workers and `-m "not slow"` applies: a notebook
too long for the default run sets `"hybrid_jax": {"slow": true}` in its metadata and runs only with `-m slow`.
The kernel is the running interpreter's (ipykernel), started in the notebook's directory with the
repository root on PYTHONPATH, as plain CPU JAX (without the 8 simulated devices of conftest.py), and with
HYBRID_JAX_NOTEBOOK_SIZE=tiny and HYBRID_JAX_NOTEBOOK_OUT set to a temporary directory for what it writes.
"""

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "experiments").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CELL_TIMEOUT_S = 600


def _param(path: Path):
    slow = json.loads(path.read_text()).get("metadata", {}).get("hybrid_jax", {}).get("slow", False)
    return pytest.param(path, id=str(path.relative_to(ROOT)), marks=[pytest.mark.slow] if slow else [])


def kernel_env(out_dir: Path) -> dict[str, str]:
    """The notebook kernel's environment: this one, minus the simulated devices, plus the notebook settings."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HYBRID_JAX_NOTEBOOK_SIZE"] = "tiny"
    env["HYBRID_JAX_NOTEBOOK_OUT"] = str(out_dir)
    env["IPYTHONDIR"] = str(out_dir / ".ipython")  # no shared history database between parallel kernels
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.parametrize("path", [_param(p) for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, ipykernel)")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=kernel_env(tmp_path))
    except nbclient.exceptions.CellExecutionError as error:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel's traceback comes coloured
        pytest.fail(f"{path.relative_to(ROOT)} failed:\n{plain}", pytrace=False)
