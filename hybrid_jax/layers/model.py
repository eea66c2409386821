"""What every model of the zoo shares: stage maps -> pooled features -> dropout -> classifier.

A family's model subclasses `ImageClassifier` and writes only what is its own:

  forward_stages(x, *, train) -> dict    the map (or tokens) after the stem and after each stage / block
  forward_pool(features, *, train) -> dict    "pooled" [B, C] (and any other pooled entries)
  feature_info -> tuple[FeatureInfo]     the entries of forward_stages that are feature maps: width, stride
  setup: head_drop, head = classifier(num_classes, drop_rate, ...), or its own `forward_head`

The rest is here, once: `forward_features` (every entry, for interpretation),
`__call__` (logits, or the pooled features when num_classes=0) and input checks.
`create_model(name, features_only=True)` wraps a model in
`hybrid_jax.layers.features.FeatureExtractor`, which reads `forward_stages` and
`feature_info`. Models with one classifier per branch subclass `BranchClassifier`,
the interface training and interpretation look for.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.features import FeatureInfo
from hybrid_jax.layers.inputs import check_images

Dtype = Any


def run_stages(x: jax.Array, stages: Sequence[nn.Module], *, train: bool) -> dict[str, jax.Array]:
    """{"stem": x, "stage1": ..., "stage2": ...}: the stem's map through each stage in turn, every output kept."""
    features = {"stem": x}
    for i, stage in enumerate(stages, start=1):
        x = features[f"stage{i}"] = stage(x, train=train)
    return features


class ImageClassifier(nn.Module, kw_only=True):
    """Base of every zoo model: `forward_stages`, then `forward_pool`, then dropout and a linear classifier.

    Its fields are keyword-only and common to every model.
    """

    num_classes: int = 1000  # 0: no classifier; __call__ returns the pooled features
    drop_rate: float = 0.0  # dropout before the classifier (and where the family's reference puts it)
    drop_path_rate: float = 0.0  # stochastic depth, scheduled over the blocks as the family's reference does
    dtype: Dtype = jnp.float32  # compute dtype, e.g. jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    remat: str = "none"  # none | block | full: what each block recomputes in the backward pass (layers/remat.py)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Every feature map the model gives, in the order `out_indices` counts them."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_info")

    def forward_stages(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """The map (or tokens) after the stem and after every stage or block, by name."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_stages")

    def forward_pool(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """{"pooled": [B, C]} from `forward_stages`' dict; by default the spatial mean of the last feature map."""
        return {"pooled": jnp.mean(features[self.feature_info[-1].name], axis=(1, 2))}

    def forward_features(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Every entry of `forward_stages` and of `forward_pool`: the maps, tokens and pooled features."""
        check_images(x)
        features = self.forward_stages(x, train=train)
        return {**features, **self.forward_pool(features, train=train)}

    def forward_head(self, features: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """Logits from `forward_features`' dict: dropout on the pooled features, then the classifier."""
        return self.head(self.head_drop(features["pooled"], deterministic=not train))

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits [B, num_classes] for NHWC images; the pooled features when num_classes=0."""
        features = self.forward_features(x, train=train)
        if not self.num_classes:
            return features["pooled"]
        return self.forward_head(features, train=train)


class BranchClassifier(ImageClassifier):
    """A model with one classifier per branch (a parallel hybrid's CNN and transformer): logits are their mean.

    The interface for several heads: training gives each head its loss
    (`hybrid_jax.train.step.head_logits`), interpretation explains one head or
    compares them (`hybrid_jax.analysis.interpret`). A subclass defines `branch_heads`.
    """

    def branch_heads(self, features: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        """Each head's logits from `forward_features`' dict, by branch name."""
        raise NotImplementedError(f"{type(self).__name__} must define branch_heads")

    def branch_logits(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """Each head's logits, e.g. {"cnn": [B, classes], "transformer": [B, classes]}, for one loss per head."""
        if not self.num_classes:
            raise ValueError(f"branch logits need the classifiers; this {type(self).__name__} was built with "
                             f"num_classes=0")
        return self.branch_heads(self.forward_features(x, train=train), train=train)

    def forward_head(self, features: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """The mean of the heads' logits."""
        logits = self.branch_heads(features, train=train)
        return sum(logits.values()) / len(logits)
