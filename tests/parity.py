"""Shared by the parity tests: random-weight PyTorch references against our converted models.

Each reference is built with random weights (nothing is downloaded), its norm
statistics and scales randomised too (a fresh BatchNorm is the identity, which would
hide a mixed-up mean and variance), converted with `hybrid_jax.convert`, and both
run in eval mode on the same random images.
"""

import jax
import numpy as np
import torch

from hybrid_jax import create_model, model_info
from hybrid_jax.convert import convert_state_dict

TOLERANCE = 1e-4  # max abs logit difference in float32, per unit of the largest logit


def tolerance(logits: np.ndarray) -> float:
    """TOLERANCE scaled by the logits' magnitude (at least 1).

    Float32 rounding grows with the values rounded and with depth: ResNet-50's logits
    (up to 3) differ by 1e-4 between XLA's and PyTorch's convolution orders. A
    conversion mistake moves logits by a sizeable fraction of themselves, thousands of
    times this.
    """
    return TOLERANCE * max(1.0, float(np.max(np.abs(logits))))


def randomize_norms_(model: "torch.nn.Module", seed: int = 0, image_size: int = 64) -> "torch.nn.Module":
    """Random norm affines and LayerScale gammas, BatchNorm statistics measured on random images.

    Measuring the running statistics (one train-mode pass, cumulative average) keeps
    activations at the scale a trained network has, so logits stay O(1) and an
    absolute tolerance means what it says.
    """
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda t, low, high: t.copy_(low + (high - low) * torch.rand(t.shape, generator=generator))
    batch_norms = []
    with torch.no_grad():
        for module in model.modules():
            norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)
            if isinstance(module, norms) and module.weight is not None:
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.2, 0.2)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average
                batch_norms.append(module)
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale
                uniform(param, 0.5, 1.5)
        if batch_norms:
            model.train()
            model(2 * torch.rand((8, 3, image_size, image_size), generator=generator) - 1)
    return model.eval()


def torch_logits(model: "torch.nn.Module", images: np.ndarray) -> np.ndarray:
    """The reference's logits for NHWC `images` (Hugging Face models return them in `.logits`)."""
    with torch.no_grad():
        out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return getattr(out, "logits", out).numpy()


def check_parity(name: str, reference: "torch.nn.Module", size: int | None = None, batch: int = 2,
                 **overrides) -> float:
    """Converts `reference` into the registered model `name` (with `overrides`) and compares eval logits.

    Returns the max abs logit difference, asserted <= tolerance(reference logits).
    """
    size = size or model_info(name).input_size
    images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    reference = randomize_norms_(reference, image_size=size)
    model = create_model(name, **overrides)
    variables = convert_state_dict(name, reference.state_dict(), model)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    theirs = torch_logits(reference, images)
    assert ours.shape == theirs.shape
    difference = np.max(np.abs(np.asarray(ours) - theirs))
    assert difference <= tolerance(theirs), (f"{name}: max |logit difference| {difference:.2e} "
                                             f"(logits up to {np.abs(theirs).max():.1f})")
    return difference
