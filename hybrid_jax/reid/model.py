"""A re-ID network from any registry backbone: pooled features -> BNNeck -> identity classifier."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.layers.axes import with_logical_partitioning
from hybrid_jax.layers.dense import Dense

Dtype = Any


class ReidModel(nn.Module):
    """Embeds person images; the classifier exists for the identity loss only.

    `backbone` is any registry model built with `num_classes=0`, so it returns its pooled
    features (for the TCCNet-style network, its CNN and transformer features side by
    side). The BNNeck is a BatchNorm without shift, as in Bag of Tricks (arXiv
    1903.07071); its output is the embedding that retrieval compares.

    Returns a dict: "features" [B, D] (before the BNNeck: triplet and center losses),
    "embedding" [B, D] (after it: retrieval), "logits" [B, num_classes] (identity loss),
    and "centers" [num_classes, D] when `center_loss` is on.
    """

    backbone: nn.Module
    num_classes: int  # identities in the training split
    center_loss: bool = False  # learn one centre per identity for the center loss
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        if getattr(self.backbone, "num_classes", 0):
            raise ValueError(f"the backbone has a {self.backbone.num_classes}-class head; build it with "
                             f"num_classes=0 so that it returns its pooled features")
        features = self.backbone(x, train=train)
        embedding = nn.BatchNorm(
            use_running_average=not train, use_bias=False, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            param_dtype=self.param_dtype, scale_init=with_logical_partitioning(nn.initializers.ones, ("embed",)),
            name="bnneck")(features)
        logits = Dense(
            self.num_classes, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=with_logical_partitioning(nn.initializers.normal(1e-3), ("embed", "classes")),
            name="classifier")(embedding)
        outputs = {"features": features, "embedding": embedding, "logits": logits}
        if self.center_loss:
            outputs["centers"] = self.param(
                "centers", with_logical_partitioning(nn.initializers.normal(1.0), ("classes", "embed")),
                (self.num_classes, features.shape[-1]), self.param_dtype)
        return outputs
