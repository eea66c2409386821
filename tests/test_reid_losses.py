"""Re-ID losses against brute-force numpy, and the BNNeck model that feeds them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.reid.losses import ReidLossConfig, batch_hard_triplet_loss, center_loss, identity_loss, reid_loss
from hybrid_jax.reid.model import ReidModel


def _triplet_by_brute_force(embeddings: np.ndarray, labels: np.ndarray, margin: float) -> float:
    """Hardest positive and negative per anchor by explicit loops over every pair."""
    losses = []
    for a in range(len(labels)):
        positives = [np.linalg.norm(embeddings[a] - embeddings[p]) for p in range(len(labels))
                     if p != a and labels[p] == labels[a]]
        negatives = [np.linalg.norm(embeddings[a] - embeddings[n]) for n in range(len(labels))
                     if labels[n] != labels[a]]
        if not positives or not negatives:
            continue
        gap = max(positives) - min(negatives)
        losses.append(np.log1p(np.exp(gap)) if margin == 0 else max(gap + margin, 0.0))
    return float(np.mean(losses))


@pytest.mark.parametrize("margin", [0.3, 0.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_triplet_equals_brute_force(margin, seed):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(12, 5)).astype(np.float32)
    labels = np.repeat(np.arange(4), 3)  # P = 4 identities x K = 3
    got = float(batch_hard_triplet_loss(jnp.asarray(embeddings), jnp.asarray(labels), margin))
    want = _triplet_by_brute_force(embeddings, labels, margin)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_anchors_without_a_positive_are_left_out():
    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(7, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3])  # person 3 has one image: no positive
    got = float(batch_hard_triplet_loss(jnp.asarray(embeddings), jnp.asarray(labels), 1.0))
    np.testing.assert_allclose(got, _triplet_by_brute_force(embeddings, labels, 1.0), rtol=1e-5)
    only_one_person = batch_hard_triplet_loss(jnp.asarray(embeddings), jnp.zeros(7, int), 1.0)
    assert float(only_one_person) == 0.0  # no negatives anywhere


def test_triplet_gradient_is_finite_for_identical_embeddings():
    """Duplicates put zero distances off the diagonal; the square root must not turn them into NaN."""
    embeddings = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0], [0.0, 1.0]])
    grad = jax.grad(batch_hard_triplet_loss)(embeddings, jnp.array([0, 0, 1, 1]), 0.3)
    assert bool(jnp.isfinite(grad).all())


def test_identity_loss_is_smoothed_cross_entropy():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    eps = 0.1
    targets = (1 - eps) * np.eye(3)[labels] + eps / 3
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -(targets * log_probs).sum(1).mean()
    np.testing.assert_allclose(float(identity_loss(jnp.asarray(logits), jnp.asarray(labels), eps)), want, rtol=1e-6)


def test_center_loss_is_half_mean_squared_distance():
    features = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]], np.float32)
    centers = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    labels = np.array([1, 0, 1])
    want = 0.5 * np.mean([0 + 1, 9 + 1, 1 + 1])
    np.testing.assert_allclose(float(center_loss(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(centers))),
                               want, rtol=1e-6)


def test_reid_loss_wires_triplet_before_and_identity_after_the_bnneck():
    rng = np.random.default_rng(4)
    labels = jnp.repeat(jnp.arange(3), 2)
    outputs = {"features": jnp.asarray(rng.normal(size=(6, 8))), "logits": jnp.asarray(rng.normal(size=(6, 3))),
               "centers": jnp.asarray(rng.normal(size=(3, 8)))}
    config = ReidLossConfig(id_weight=0.5, label_smoothing=0.1, triplet_weight=2.0, triplet_margin=0.3,
                            center_weight=0.01)
    total, parts = reid_loss(outputs, labels, config)
    expected = {"id_loss": identity_loss(outputs["logits"], labels, 0.1),
                "triplet_loss": batch_hard_triplet_loss(outputs["features"], labels, 0.3),
                "center_loss": center_loss(outputs["features"], labels, outputs["centers"])}
    for key, value in expected.items():
        np.testing.assert_allclose(parts[key], value, rtol=1e-6)
    np.testing.assert_allclose(total, 0.5 * expected["id_loss"] + 2.0 * expected["triplet_loss"]
                               + 0.01 * expected["center_loss"], rtol=1e-6)
    _, without_center = reid_loss(outputs, labels, ReidLossConfig())
    assert "center_loss" not in without_center


def test_bnneck_model_embeds_the_tccnet_style_pooled_features():
    model = ReidModel(create_model("tccnet_tiny", num_classes=0), num_classes=7, center_loss=True)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), images)
    outputs, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, images)
    width = model.backbone.num_features  # the CNN's pooled map and the class token, side by side
    assert outputs["features"].shape == outputs["embedding"].shape == (4, width)
    assert outputs["logits"].shape == (4, 7) and outputs["centers"].shape == (7, width)
    assert "bias" not in variables["params"]["bnneck"]  # BNNeck: scale only, its shift stays at zero
    # In training the BNNeck standardises each feature over the batch (scale starts at one, no shift).
    features = np.asarray(outputs["features"])
    standardised = (features - features.mean(0)) / np.sqrt(features.var(0) + 1e-5)
    np.testing.assert_allclose(outputs["embedding"], standardised, atol=1e-4)


def test_a_backbone_with_a_classifier_is_refused():
    model = ReidModel(create_model("test_resnet"), num_classes=3)  # num_classes left at 10: logits, not features
    with pytest.raises(ValueError, match="num_classes=0"):
        model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)
