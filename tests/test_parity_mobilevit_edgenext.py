"""Same weights, same logits: MobileViT against timm and Hugging Face, EdgeNeXt against timm (parity extra).

The default suite runs the smallest variant of each: MobileViT-XXS at 96 px (its last
map is 3 x 3, so the resize before unfolding into 2 x 2 patches is compared too) and
EdgeNeXt-XXS at 64 px and reduced depth (neither has a fixed input size). `-m slow` runs every variant at
its own 256 px.

Both references initialise linear layers with std 0.02 and EdgeNeXt's LayerScale at
1e-6, which makes attention almost uniform and its branch almost invisible in the
logits: a wrong temperature or query projection would pass. `randomized` therefore
draws every weight at a variance-preserving scale, biases, LayerScales and XCA
temperatures at O(1), so each path moves the logits well beyond the tolerance.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from hybrid_jax import create_model  # noqa: E402
from hybrid_jax.convert import convert_state_dict  # noqa: E402
from parity import check_parity, randomize_norms_, tolerance, torch_logits  # noqa: E402

# PyTorch's intra-op threads spin while they wait; on a busy 2-core CI machine (pytest -n 2) its default of one
# thread per core made these small references 10-50x slower than one thread does (measured: 0.8 s vs 0.05 s for
# one MobileViT-XXS forward). Process-wide, so it also speeds up the other parity files in this worker.
torch.set_num_threads(1)

# Hugging Face configs of apple/mobilevit-{xx-small, x-small, small}: transformer widths, stage widths, expansion.
HF_CONFIGS = {
    "mobilevit_xxs": dict(hidden_sizes=(64, 80, 96), neck_hidden_sizes=(16, 16, 24, 48, 64, 80, 320), expand_ratio=2.0),
    "mobilevit_xs": dict(hidden_sizes=(96, 120, 144), neck_hidden_sizes=(16, 32, 48, 64, 80, 96, 384)),
    "mobilevit_s": dict(hidden_sizes=(144, 192, 240), neck_hidden_sizes=(16, 32, 64, 96, 128, 160, 640)),
}


def randomized(reference: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Weights at a variance-preserving scale; biases, LayerScales and temperatures at O(1) (norms: parity.py)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("temperature"):
                param.copy_(0.5 + 2 * torch.rand(param.shape, generator=generator))
            elif name.endswith(("gamma", "gamma_xca")):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5)
    return reference


def timm_model(name: str, **kwargs) -> "torch.nn.Module":
    return randomized(timm.create_model(name, pretrained=False, **kwargs))


def hf_mobilevit(name: str) -> "torch.nn.Module":
    config = transformers.MobileViTConfig(num_labels=1000, **HF_CONFIGS[name])
    return randomized(transformers.MobileViTForImageClassification(config))


def test_mobilevit_xxs_matches_timm_and_hugging_face():
    """`check_parity` for both references, with one compiled forward (compiling dominates on CPU)."""
    images = np.random.default_rng(0).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    model = create_model("mobilevit_xxs")
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    for reference in (timm_model("mobilevit_xxs"), hf_mobilevit("mobilevit_xxs")):
        reference = randomize_norms_(reference, image_size=96)
        ours = forward(convert_state_dict("mobilevit_xxs", reference.state_dict(), model), images)
        theirs = torch_logits(reference, images)
        np.testing.assert_allclose(ours, theirs, atol=tolerance(theirs), rtol=0)


def test_edgenext_xx_small_matches_timm():
    """At reduced depth: every stage keeps a conv encoder and (stages 2-4) its SDTA encoder."""
    depths = (1, 2, 2, 2)
    check_parity("edgenext_xx_small", timm_model("edgenext_xx_small", depths=depths), size=64, depths=depths)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_mobilevit_matches_timm_full_size(name):
    check_parity(name, timm_model(name), batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_mobilevit_matches_hugging_face_full_size(name):
    check_parity(name, hf_mobilevit(name), batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["edgenext_xx_small", "edgenext_x_small", "edgenext_small", "edgenext_base"])
def test_edgenext_matches_timm_full_size(name):
    check_parity(name, timm_model(name), batch=1)
