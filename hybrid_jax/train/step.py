"""The train and eval steps: pure functions of (state, batch), jitted by the loop with explicit shardings."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hybrid_jax.data.augment import AugmentConfig, augment_batch, eval_batch
from hybrid_jax.layers.model import BranchClassifier
from hybrid_jax.train.config import HEAD_LOSSES
from hybrid_jax.train.optim import freeze_labels
from hybrid_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def head_logits(model: nn.Module, variables: Any, images: jax.Array, *, train: bool,
                rngs: dict | None = None) -> tuple[dict[str, jax.Array], Any]:
    """Logits per classifier head and the updated batch statistics.

    Models with several heads (Conformer's CNN and transformer heads, parallel hybrids)
    are `BranchClassifier`s, whose `branch_logits` gives each; their mean is the prediction
    (`head_loss` says how they train).
    """
    method = "branch_logits" if isinstance(model, BranchClassifier) else None
    out, updates = model.apply(variables, images, train=train, rngs=rngs, mutable=["batch_stats"], method=method)
    heads = out if isinstance(out, dict) else {"logits": out}
    return {name: logits.astype(jnp.float32) for name, logits in heads.items()}, updates.get("batch_stats", {})


def prediction(heads: dict[str, jax.Array]) -> jax.Array:
    """The model's prediction: the mean of its heads' logits."""
    return sum(heads.values()) / len(heads)


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The variables dict `model.apply` takes; batch statistics only for models that have them."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def apply_gradients(state: TrainState, grads: Any, batch_stats: Any, *, tx: optax.GradientTransformation,
                    ema_decay: float, grad_accum_steps: int) -> TrainState:
    """The state after one micro-step: optimizer update, new batch statistics, their EMA, step + 1."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
    if ema_params is not None:
        # Under accumulation params only move on the last micro-step; so does the average.
        is_update = (state.step + 1) % grad_accum_steps == 0
        decay = jnp.where(is_update, ema_decay, 1.0)
        average = lambda e, x: decay * e + (1 - decay) * x
        ema_params = jax.tree.map(average, ema_params, params)
        # Batch statistics too, as timm's ModelEmaV2 averages buffers: the raw model's fit the raw weights.
        ema_batch_stats = jax.tree.map(average, ema_batch_stats, batch_stats)
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                         ema_params=ema_params, ema_batch_stats=ema_batch_stats)


def trained_gradients(grads: Any, freeze: tuple[str, ...]) -> Any:
    """The gradients the optimizer applies: those of parameters a `freeze` pattern matches are left out."""
    if not freeze:
        return grads
    return jax.tree.map(lambda label, grad: grad if label == "train" else None, freeze_labels(grads, freeze), grads)


def update_metrics(grads: Any, params: Any, step: jax.Array, *, schedule: optax.Schedule,
                   grad_accum_steps: int, freeze: tuple[str, ...] = ()) -> Metrics:
    """What every train step logs about its update: gradient norm, parameter norm, learning rate.

    The gradient norm is the one `clip_norm` clips: over the trained parameters, frozen ones left out.
    """
    return {
        "grad_norm": optax.tree.norm(trained_gradients(grads, freeze)),
        "param_norm": optax.tree.norm(params),  # non-finite once the update overflowed: the run diverged
        "learning_rate": schedule(step // grad_accum_steps),
    }


def classification_loss(heads: dict[str, jax.Array], targets: jax.Array, head_loss: str = "each") -> jax.Array:
    """Cross-entropy of the heads' logits against (smoothed) one-hot targets.

    "each": every head its own cross-entropy, summed (Conformer): each branch learns to classify alone.
    "mean": one cross-entropy of the mean logits, the prediction itself: the heads act as one linear
    classifier over both branches' features, and a branch may specialise in what the other misses.
    With a single head the two are the same.
    """
    if head_loss == "each":
        return sum(optax.softmax_cross_entropy(logits, targets).mean() for logits in heads.values())
    if head_loss == "mean":
        return optax.softmax_cross_entropy(prediction(heads), targets).mean()
    raise ValueError(f"head_loss={head_loss!r}; choose one of {HEAD_LOSSES}")


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, augment: AugmentConfig,
               num_classes: int, label_smoothing: float, ema_decay: float,
               grad_accum_steps: int, head_loss: str = "each",
               freeze: tuple[str, ...] = ()) -> tuple[TrainState, Metrics]:
    """One optimizer micro-step on a global batch of uint8 images, augmented on device."""
    aug_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    images, labels = augment_batch(aug_rng, batch["image"], batch["label"], num_classes, augment)
    targets = optax.smooth_labels(labels, label_smoothing) if label_smoothing else labels

    def loss_fn(params):
        heads, batch_stats = head_logits(model, model_variables(params, state.batch_stats),
                                         images.astype(model.dtype), train=True, rngs={"dropout": dropout_rng})
        return classification_loss(heads, targets, head_loss), (prediction(heads), batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, batch_stats, tx=tx, ema_decay=ema_decay,
                                grad_accum_steps=grad_accum_steps)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1)),
        **update_metrics(grads, new_state.params, state.step, schedule=schedule, grad_accum_steps=grad_accum_steps,
                         freeze=freeze),
    }
    return new_state, metrics


def eval_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              augment: AugmentConfig) -> Metrics:
    """Sums of loss, correct predictions and real examples over a padded eval batch."""
    images = eval_batch(batch["image"], augment).astype(model.dtype)
    heads, _ = head_logits(model, model_variables(params, batch_stats), images, train=False)
    logits = prediction(heads)
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask)}
