"""The re-ID train and embed steps: pure functions of (state, batch), jitted by the loop with explicit shardings."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hybrid_jax.data.augment import AugmentConfig, augment_batch, eval_batch
from hybrid_jax.reid.losses import ReidLossConfig, reid_loss
from hybrid_jax.reid.model import ReidModel
from hybrid_jax.train.state import TrainState
from hybrid_jax.train.step import Metrics, apply_gradients, model_variables, update_metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: ReidModel,
               tx: optax.GradientTransformation, schedule: optax.Schedule, augment: AugmentConfig,
               losses: ReidLossConfig, ema_decay: float, grad_accum_steps: int,
               freeze: tuple[str, ...] = ()) -> tuple[TrainState, Metrics]:
    """One optimizer micro-step on a P x K batch: identity loss through the BNNeck plus triplet (and center) loss.

    Mixup and cutmix must be off (the config check ensures it): a blended image has no
    single identity for the triplet loss.
    """
    aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    images, _ = augment_batch(aug_rng, batch["image"], batch["label"], model.num_classes, augment)
    labels = batch["label"]

    def loss_fn(params):
        outputs, updates = model.apply(model_variables(params, state.batch_stats), images.astype(model.dtype),
                                       train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
        loss, parts = reid_loss(outputs, labels, losses)
        return loss, (parts, outputs["logits"], updates.get("batch_stats", {}))

    (loss, (parts, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, batch_stats, tx=tx, ema_decay=ema_decay,
                                grad_accum_steps=grad_accum_steps)
    metrics = {
        "loss": loss,
        **parts,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),  # identity classification on the batch
        **update_metrics(grads, new_state.params, state.step, schedule=schedule, grad_accum_steps=grad_accum_steps,
                         freeze=freeze),
    }
    return new_state, metrics


def embed_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model: ReidModel,
               augment: AugmentConfig) -> dict[str, jax.Array]:
    """Retrieval embeddings (after the BNNeck) of an eval batch, with its person and camera ids passed through."""
    images = eval_batch(batch["image"], augment).astype(model.dtype)
    outputs = model.apply(model_variables(params, batch_stats), images, train=False)
    return {"embedding": outputs["embedding"].astype(jnp.float32), "person_id": batch["person_id"],
            "camera_id": batch["camera_id"]}
