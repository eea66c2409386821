"""README.md stays true: its model table is the registry's, its Python examples run, its commands point at real things.

Python code blocks run one by one, each in a fresh namespace with a temporary working directory; a block right
after a `<!-- no-test -->` line is only parsed (it needs a GPU, a checkpoint file, a dataset or a pod). Shell
blocks are not run: the test command must be there (.ci/run runs it), and the modules, configs and files they
and the links name must exist.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

from hybrid_jax import list_models, model_info
from hybrid_jax.analysis import model_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = "python -m pytest -n 2"  # .ci/run runs exactly this
# Install, and train the default model on the embedded data.
NEWCOMER_COMMANDS = ('pip install -e ".[test]"',
                     "python -m hybrid_jax.main --config configs/fashion_mnist.py --workdir ")
NO_TEST = "<!-- no-test -->"
REGENERATE = "regenerate it: python -m hybrid_jax.analysis.model_table --write README.md"

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[ ]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)


@functools.cache
def readme() -> str:
    return README.read_text()


def code_blocks(language: str) -> list[tuple[int, str, bool]]:
    """(line, code, runnable) of every fenced block in `language`; runnable unless NO_TEST precedes it."""
    text, blocks = readme(), []
    for match in FENCE.finditer(text):
        if match["lang"] != language:
            continue
        before = [line.strip() for line in text[:match.start()].splitlines() if line.strip()]
        body = "\n".join(line[len(match["indent"]):] for line in match["body"].splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, body, not before or before[-1] != NO_TEST))
    return blocks


PYTHON = code_blocks("python")
SHELL = "\n".join(code for language in ("bash", "sh", "shell") for _, code, _ in code_blocks(language))


def test_readme_has_runnable_python_examples():
    assert any(runnable for _, _, runnable in PYTHON)


@pytest.mark.parametrize("code", [pytest.param(code, id=f"README.md:{line}") for line, code, _ in PYTHON])
def test_every_python_block_parses(code):
    ast.parse(code, "README.md")


@pytest.mark.parametrize("code", [pytest.param(code, id=f"README.md:{line}") for line, code, run in PYTHON if run])
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_the_commands_a_newcomer_types_are_there():
    for command in (TEST_COMMAND, *NEWCOMER_COMMANDS):
        assert command in SHELL, f"README.md no longer shows {command!r} in a shell block"


def test_modules_configs_and_links_exist():
    text = readme()
    modules = set(re.findall(r"python -m ((?:hybrid_jax|experiments)(?:\.\w+)+)", text))
    for module in modules:
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
    for config in set(re.findall(r"\bconfigs/\w+\.py", text)):
        assert (ROOT / config).is_file(), config
    for target in set(re.findall(r"\]\(((?!https?://|#)[^)\s#]+)(?:#[^)]*)?\)", text)):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# --- the model table -------------------------------------------------------------------------------------------

NAMES = model_table.table_names()


@functools.cache
def stored() -> dict[str, str]:
    return model_table.stored_lines(readme())


def test_table_lists_every_registered_model_in_order():
    assert list(stored()) == NAMES, f"README's model table and the registry name different models; {REGENERATE}"


@pytest.mark.parametrize("name", NAMES)
def test_table_row_matches_the_registry(name):
    """Names, category, input size, top-1 and parity exactly, and the parameters counted afresh (eval_shape).

    GMACs are recounted for models without paper figures; for the others README's figure must lie within 5% of
    the paper's, as tests/test_models.py holds the live count to be (`-m slow` recounts them too).
    """
    line = stored().get(name)
    assert line is not None, f"{name} is missing from README's model table; {REGENERATE}"
    paper = model_info(name).paper
    gmacs = None
    if paper is not None:
        gmacs = model_table.stored_gmacs(line)
        assert gmacs == pytest.approx(paper.gmacs, rel=0.05), f"{name}: README's GMACs are far from the paper's"
    assert model_table.row(name, gmacs).markdown() == line, REGENERATE


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in NAMES if model_info(name).paper is not None])
def test_table_gmacs_are_the_count(name):
    assert model_table.row(name).markdown() == stored()[name], REGENERATE


@pytest.mark.parametrize("parity", model_table.PARITY, ids=lambda p: p.pattern)
def test_parity_column_names_tests_that_exist(parity):
    assert list_models(parity.pattern), f"{parity.pattern} matches no registered model"
    for test in parity.tests:
        path, function = test.split("::")
        assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.M), f"{test} does not exist"


def test_every_model_a_parity_test_names_has_its_reference_in_the_table():
    for path in sorted((ROOT / "tests").glob("test_parity*.py")):
        for name in sorted(set(re.findall(r"\"(\w+)\"", path.read_text())) & set(NAMES)):
            assert model_table.parity_of(name) is not None, f"{path.name} checks {name}: add it to model_table.PARITY"
