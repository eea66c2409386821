"""The study's axes by name, and how a model is labelled: shared by the engine, the report and the figures."""

from typing import Any

PATTERNS = ("parallel", "serial", "hierarchical", "cnn", "vit")
FUSIONS = ("concat", "add", "gating", "cross_attention", "fcu", "bridge")  # the parallel pattern's
CORRUPTIONS = ("gaussian_noise", "blur", "contrast")


def label(row: dict[str, Any]) -> str:
    """'parallel_hybrid (gating)' or 'resnet'."""
    return f"{row['model']} ({row['fusion']})" if row["fusion"] else row["model"]
