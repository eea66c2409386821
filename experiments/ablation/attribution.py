"""How much each branch of a trained parallel hybrid gives its prediction, per fusion.

For every finished parallel run the study scores the clean shift subset with
`hybrid_jax.analysis.interpret.branch_attribution`: the accuracy of each head alone (head
ablation; the model's output is the heads' mean) and each branch's share of the
|gradient x input| at the heads' inputs (how much of the predicted logit each branch's pooled
features carry). Written once per run to {run}/attribution.json; report and notebook read the
table, so they need no JAX.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments.ablation import shift
from hybrid_jax.analysis.interpret import branch_attribution
from hybrid_jax.data.augment import eval_batch

BATCH = 250


def attribute_run(workdir: str | Path, shift_config: Any) -> dict[str, Any]:
    """{"step", "num_examples", "branches": {name: {"accuracy", "share"}}} of the run in `workdir`, on the clean
    images of the shift subset (the same images the shift scores use)."""
    run = shift.load_run(workdir)
    sets, labels = shift.shifted_sets(run.config, shift_config)
    images = sets["clean"]
    correct: dict[str, int] = {}
    shares: dict[str, list[np.ndarray]] = {}
    for first in range(0, len(images), BATCH):
        batch = np.asarray(eval_batch(images[first:first + BATCH], run.augment))
        result = branch_attribution(run.model, run.variables, batch)
        for name, logits in result.logits.items():
            correct[name] = correct.get(name, 0) + int(np.sum(np.argmax(logits, -1) == labels[first:first + BATCH]))
        for name, share in result.share().items():
            shares.setdefault(name, []).append(share)
    branches = {name: {"accuracy": correct[name] / len(images),
                       "share": float(np.mean(np.concatenate(shares[name]))) if name in shares else float("nan")}
                for name in correct}
    return {"step": run.step, "num_examples": len(images), "branches": branches}


def cached_attribution(workdir: str | Path, shift_config: Any, step: int) -> dict[str, Any]:
    """The run's attribution.json, computed now if it is missing or from another step."""
    path = Path(workdir) / "attribution.json"
    found = json.loads(path.read_text()) if path.exists() else None
    if found is None or found.get("step") != step:
        found = attribute_run(workdir, shift_config)
        path.write_text(json.dumps(found, indent=2))
    return found


def rows(record: dict[str, Any], attribution: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per head (and "mean", the model) of attribution.csv for a run's record."""
    keys = ("name", "model", "fusion", "budget_gmacs", "train_fraction", "seed")
    return [{**{k: record[k] for k in keys}, "head": head, "head_accuracy": values["accuracy"],
             "share": values["share"]} for head, values in attribution["branches"].items()]
