"""Re-ID training losses: identity cross-entropy through the BNNeck, batch-hard triplet, center loss.

The BNNeck (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-identification", arXiv 1903.07071) puts a BatchNorm between the embedding and the
identity classifier. The triplet and center losses act on the features before it,
where Euclidean distances are free; the cross-entropy acts after it, on normalised
features that a linear classifier separates by angle. Pulling one feature space in
both directions makes the two losses fight; the BNNeck gives each its own.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.reid.distance import pairwise_distance


@dataclasses.dataclass(frozen=True)
class ReidLossConfig:
    """Weights and settings of the combined loss; hashable so jit can treat it as static."""

    id_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    triplet_margin: float = 0.3  # 0 uses the soft margin log(1 + exp(d_ap - d_an))
    center_weight: float = 0.0  # 0 turns the center loss off; Bag of Tricks uses 5e-4


def identity_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Mean cross-entropy of identity logits against label-smoothed one-hot targets."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def batch_hard_triplet_loss(embeddings: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """Mean over anchors of [d(a, hardest positive) - d(a, hardest negative) + margin]_+.

    For every anchor the farthest image of the same identity and the nearest of another
    (Hermans et al., arXiv 1703.07737). `margin=0` uses the soft margin softplus(d_ap - d_an).
    Anchors without a positive or without a negative in the batch are left out.
    """
    distances = pairwise_distance(embeddings, embeddings, "euclidean")
    same = labels[:, None] == labels[None, :]
    positive = same & ~jnp.eye(len(labels), dtype=bool)
    hardest_positive = jnp.max(jnp.where(positive, distances, -jnp.inf), axis=1)
    hardest_negative = jnp.min(jnp.where(same, jnp.inf, distances), axis=1)
    valid = positive.any(axis=1) & (~same).any(axis=1)
    # Invalid anchors get a finite stand-in before the hinge, so no inf reaches the gradient.
    gap = jnp.where(valid, hardest_positive - hardest_negative, 0.0)
    per_anchor = jax.nn.softplus(gap) if margin == 0 else jax.nn.relu(gap + margin)
    return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array) -> jax.Array:
    """Half the mean squared distance of each feature to its identity's learned centre (Wen et al., ECCV 2016)."""
    offsets = features.astype(jnp.float32) - centers[labels].astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.sum(offsets * offsets, axis=-1))


def reid_loss(outputs: dict[str, jax.Array], labels: jax.Array,
              config: ReidLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted total and its parts, wired through the BNNeck (see the module docstring).

    Args:
      outputs: `ReidModel` outputs: "features" (before the BNNeck), "logits" (after it),
        and "centers" when the center loss is on.
      labels: int [B] identity indices.
    """
    parts = {"id_loss": identity_loss(outputs["logits"], labels, config.label_smoothing),
             "triplet_loss": batch_hard_triplet_loss(outputs["features"], labels, config.triplet_margin)}
    total = config.id_weight * parts["id_loss"] + config.triplet_weight * parts["triplet_loss"]
    if config.center_weight:
        parts["center_loss"] = center_loss(outputs["features"], labels, outputs["centers"])
        total = total + config.center_weight * parts["center_loss"]
    return total, parts
