"""Input data: offline tfds builders, the grain pipeline and on-device augmentation.

Entry points load lazily so that `hybrid_jax.data.augment` (used inside the
train step) does not pull in tensorflow_datasets and grain.
"""

import importlib
from typing import Any

_PIPELINE_EXPORTS = (
    "DataError",
    "DatasetSpec",
    "describe",
    "eval_steps",
    "make_eval_dataset",
    "make_train_dataset",
)
__all__ = list(_PIPELINE_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports the pipeline on first use of one of its entry points."""
    if name in _PIPELINE_EXPORTS:
        return getattr(importlib.import_module("hybrid_jax.data.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
