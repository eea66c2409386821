"""The registry: names, patterns, overrides and the errors a user meets."""

import pytest

import hybrid_jax
from hybrid_jax.models.resnet import ResNet
from hybrid_jax.models.vit import VisionTransformer
from hybrid_jax.registry import PaperFigures, register_model


def test_list_models_matches_patterns_and_categories():
    assert hybrid_jax.list_models("resnet*") == ["resnet101", "resnet18", "resnet34", "resnet50"]
    assert hybrid_jax.list_models("vit_*_r50_*") == ["vit_base_r50_s16_224"]
    assert "vit_base_r50_s16_224" in hybrid_jax.list_models(category="serial")
    assert "resnet50" not in hybrid_jax.list_models(category="vit")
    assert hybrid_jax.list_models("no_such_*") == []


def test_create_model_merges_overrides_into_variant_fields():
    model = hybrid_jax.create_model("vit_small_patch16_224", num_classes=7, drop_path_rate=0.1)
    assert isinstance(model, VisionTransformer)
    assert (model.embed_dim, model.depth, model.num_heads) == (384, 12, 6)
    assert (model.num_classes, model.drop_path_rate) == (7, 0.1)
    resnet = hybrid_jax.create_model("resnet50")
    assert isinstance(resnet, ResNet) and tuple(resnet.layers) == (3, 4, 6, 3)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*Did you mean: .*resnet50"):
        hybrid_jax.create_model("resnet5")


def test_unknown_field_suggests_close_fields():
    with pytest.raises(TypeError, match="no field 'drop_path' \\(did you mean drop_path_rate"):
        hybrid_jax.create_model("vit_tiny_patch16_224", drop_path=0.1)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("resnet18", ResNet, {}, category="cnn")


def test_registration_checks_category_and_fields():
    with pytest.raises(ValueError, match="unknown category"):
        register_model("new_model_a", ResNet, {}, category="cnnn")
    with pytest.raises(TypeError, match="no field 'depth'"):
        register_model("new_model_b", ResNet, {"depth": 3}, category="cnn")


def test_model_info_carries_paper_figures():
    info = hybrid_jax.model_info("resnet50")
    assert info.family == "resnet" and info.category == "cnn" and info.input_size == 224
    assert isinstance(info.paper, PaperFigures)
    assert info.paper.top1 == pytest.approx(76.13) and "torchvision" in info.paper.source


def test_package_import_stays_light():
    """`import hybrid_jax` must not pull in data or training dependencies."""
    import subprocess
    import sys
    code = ("import sys, hybrid_jax; hybrid_jax.list_models(); "
            "heavy = [m for m in ('tensorflow_datasets', 'grain', 'orbax', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
