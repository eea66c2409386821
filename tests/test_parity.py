"""Same weights, same logits: ResNet, ViT / DeiT and R50+ViT against timm (needs the parity extra)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")

from hybrid_jax import create_model  # noqa: E402
from hybrid_jax.convert import ConversionError, convert_state_dict  # noqa: E402
from parity import check_parity, randomize_norms_, tolerance, torch_logits  # noqa: E402


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_matches_timm(name):
    check_parity(name, timm.create_model(name, pretrained=False), size=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet101"])
def test_resnet_matches_timm_all_sizes(name):
    check_parity(name, timm.create_model(name, pretrained=False), size=64)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_vit_matches_timm(name):
    check_parity(name, timm.create_model(name, pretrained=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
                                  "vit_large_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"])
def test_vit_matches_timm_all_sizes(name):
    check_parity(name, timm.create_model(name, pretrained=False), batch=1)


def test_r50_vit_hybrid_matches_timm():
    """The serial hybrid at reduced depth (same code paths: BiT stem, 1x1 patch projection, blocks)."""
    reference = timm.create_model("vit_base_r50_s16_224", pretrained=False, depth=2, num_classes=1000)
    check_parity("vit_base_r50_s16_224", reference, batch=1, depth=2)


def test_create_model_loads_a_local_checkpoint(tmp_path):
    from safetensors.torch import save_file

    reference = randomize_norms_(timm.create_model("resnet18", pretrained=False, num_classes=7))
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = create_model("resnet18", num_classes=7, pretrained=path)
    images = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    theirs = torch_logits(reference, images)
    np.testing.assert_allclose(model(images, train=False), theirs, atol=tolerance(theirs), rtol=0)


def test_a_checkpoint_for_another_model_is_refused_clearly():
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    with pytest.raises(ConversionError, match="no tensor 'layer1.0.conv3.weight'"):
        convert_state_dict("resnet50", state)
    with pytest.raises(ConversionError, match="shape mismatches: .*head/kernel"):
        convert_state_dict("resnet18", state, create_model("resnet18", num_classes=10))
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="no place in the model: extra.weight"):
        convert_state_dict("resnet18", state)
