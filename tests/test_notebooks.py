"""Every notebook under experiments/ runs top to bottom in each of its sizes, as part of the test command.

A notebook's sizes are the values of HYBRID_JAX_NOTEBOOK_SIZE it is tested with: `"hybrid_jax": {"sizes": [...]}`
in its metadata, default ["tiny"]. Each (notebook, size) is one test, so `-n 2` spreads them over the workers and
`-m "not slow"` applies: sizes too long for the default run are also listed under `"slow_sizes"` and run only
with `-m slow`. (ablation.ipynb: "committed", its default, reads the committed study in the default run; "tiny"
trains a study of its own, which tests/test_ablation.py already trains through the same `run_sweep`, so it is slow.)
The kernel is the running interpreter's (ipykernel), started in the notebook's directory with the
repository root on PYTHONPATH, as plain CPU JAX (without the 8 simulated devices of conftest.py), and with
HYBRID_JAX_NOTEBOOK_OUT set to a temporary directory for what it writes.
"""

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "experiments").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CELL_TIMEOUT_S = 600


def _params(path: Path) -> list:
    """One test per size the notebook's metadata lists, the slow ones marked."""
    settings = json.loads(path.read_text()).get("metadata", {}).get("hybrid_jax", {})
    slow = set(settings.get("slow_sizes", []))
    return [pytest.param(path, size, id=f"{path.relative_to(ROOT)}[{size}]",
                         marks=[pytest.mark.slow] if size in slow else [])
            for size in settings.get("sizes", ["tiny"])]


def kernel_env(out_dir: Path, size: str) -> dict[str, str]:
    """The notebook kernel's environment: this one, minus the simulated devices, plus the notebook settings."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["HYBRID_JAX_NOTEBOOK_SIZE"] = size
    env["HYBRID_JAX_NOTEBOOK_OUT"] = str(out_dir)
    env["IPYTHONDIR"] = str(out_dir / ".ipython")  # no shared history database between parallel kernels
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.parametrize("path,size", [param for p in NOTEBOOKS for param in _params(p)])
def test_notebook_runs_top_to_bottom(path, size, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' (nbclient, ipykernel)")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=kernel_env(tmp_path, size))
    except nbclient.exceptions.CellExecutionError as error:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel's traceback comes coloured
        pytest.fail(f"{path.relative_to(ROOT)} failed:\n{plain}", pytrace=False)
    figures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, f"{path.relative_to(ROOT)} ({size}) drew no figure"
