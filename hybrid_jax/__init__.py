"""hybrid_jax: hybrid CNN + Vision Transformer models in JAX/Flax.

Importing the package loads only the registry; model families load on first use,
and nothing here imports data or training code.
"""

from hybrid_jax.registry import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "__version__"]
