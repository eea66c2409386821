"""Installs hybrid_jax: hybrid CNN + Vision Transformer models in JAX/Flax."""

import pathlib
import re

import setuptools

_ROOT = pathlib.Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"', (_ROOT / "hybrid_jax" / "__init__.py").read_text()).group(1)

_CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "einops>=0.8",
    "ml-collections>=1.0",
    "chex>=0.1.89",
    "numpy>=1.26",
    "flatbuffers>=24.3",  # jax.export's serialisation (hybrid_jax.export)
]
_EXTRAS = {
    # TensorFlow stays optional: tfds is read through array_record data sources.
    "data": [
        "tensorflow-datasets>=4.9.8",
        "grain>=0.2.12",
        "array-record>=0.7",
        "etils[epath]>=1.7",
        "absl-py>=2.1",
        "pillow>=10",
        "importlib_resources>=6",
        "dm-pix>=0.4.4",
    ],
    "train": ["orbax-checkpoint>=0.11", "tqdm>=4.66", "tensorboardX>=2.6", "matplotlib>=3.8"],
    # On these machines the CPU-only torch wheel does not pair with PyPI's torchvision,
    # which timm imports; this pair runs on CPU and works with current timm.
    "parity": ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0.15", "transformers>=4.50", "safetensors>=0.4"],
    "notebooks": ["jupyter", "nbclient>=0.10", "nbformat>=5.10", "matplotlib>=3.8"],
    # `ruff check .` with pyproject.toml's settings; .ci/run installs the same pin before anything else.
    "lint": ["ruff>=0.17,<0.18"],
}
# The tests exercise the data pipeline and the training loop too, and execute experiments/*.ipynb
# (tests/test_notebooks.py: nbclient drives an ipykernel of the running interpreter).
_EXTRAS["test"] = ["pytest>=8", "pytest-xdist>=3.6", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                   *_EXTRAS["data"], *_EXTRAS["train"]]
_EXTRAS["all"] = sorted({req for reqs in _EXTRAS.values() for req in reqs})

setuptools.setup(
    name="hybrid_jax",
    version=_VERSION,
    description="Hybrid CNN + Vision Transformer models, training and experiments in JAX/Flax.",
    long_description=(_ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["hybrid_jax", "hybrid_jax.*"]),
    package_data={"hybrid_jax": ["py.typed"]},  # PEP 561: the package's annotations are for type checkers too
    install_requires=_CORE,
    extras_require=_EXTRAS,
)
