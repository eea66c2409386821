"""The features API: every registered model gives its stage maps, with the widths and strides it declares."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.layers.features import FeatureExtractor, FeatureInfo
from hybrid_jax.layers.model import BranchClassifier, ImageClassifier

ALL_MODELS = list_models()
TINY = {name for name in ALL_MODELS if model_info(name).paper is None and model_info(name).input_size <= 64}


def _smallest_per_family() -> set[str]:
    smallest = {}
    for name in sorted(ALL_MODELS, key=lambda name: model_info(name).paper.gmacs if model_info(name).paper else 0):
        if model_info(name).paper:
            smallest.setdefault(model_info(name).family, name)
    return set(smallest.values())


# Tracing a full-size model costs seconds on CPU: the default run checks every tiny model and the smallest
# paper model of each family; `-m slow` checks the rest.
FAST = TINY | _smallest_per_family()
# Their fusions need a square token grid, so their second size is square.
SQUARE_ONLY = {"conformer", "parallel_hybrid"}


def _sizes(name: str) -> list[tuple[int, int]]:
    """The registered input size and a larger one that every window, patch and stride of the model allows."""
    size = model_info(name).input_size
    return [(size, size), (2 * size, 2 * size) if model_info(name).family in SQUARE_ONLY else (size, 2 * size)]


def _shapes(model: nn.Module, *sizes: tuple[int, int]) -> list:
    """The maps for a batch of two images of each size, traced only (no compilation, no values): one init, then
    an apply per further size."""
    def run(*images):
        maps, variables = model.init_with_output(jax.random.key(0), images[0], train=False)
        return [maps] + [model.apply(variables, x, train=False) for x in images[1:]]

    return jax.eval_shape(run, *(jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32) for h, w in sizes))


@pytest.mark.parametrize("name", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
                                  for name in ALL_MODELS])
def test_feature_info_matches_the_maps_at_two_sizes(name):
    model = create_model(name, features_only=True)
    infos = model.feature_info
    assert infos and infos == model_info(name).feature_info
    assert len({info.name for info in infos}) == len(infos)
    for (height, width), maps in zip(_sizes(name), _shapes(model, *_sizes(name))):
        got = [tuple(m.shape) for m in maps]
        want = [(2, math.ceil(height / i.reduction), math.ceil(width / i.reduction), i.channels) for i in infos]
        assert got == want, [info.name for info in infos]


@pytest.mark.parametrize("name", ["conformer_tiny_32", "parallel_hybrid_tiny", "tccnet_tiny"])
def test_parallel_hybrids_give_both_branches(name):
    infos = create_model(name, features_only=True).feature_info
    cnn = [info for info in infos if info.branch == "cnn"]
    transformer = [info for info in infos if info.branch == "transformer"]
    assert cnn and len(cnn) == len(transformer)
    assert all(info.num_prefix_tokens == 1 for info in transformer)  # the class token is dropped from the map
    assert isinstance(create_model(name), BranchClassifier)


def test_out_indices_choose_maps_in_their_order_by_position_or_name():
    model = create_model("test_resnet", features_only=True, out_indices=(3, 1, "stem", -1))
    assert [info.name for info in model.feature_info] == ["stage3", "stage1", "stem", "stage4"]
    (maps,) = _shapes(model, (32, 64))
    assert [m.shape for m in maps] == [(2, 2, 4, 16), (2, 8, 16, 8), (2, 8, 16, 8), (2, 1, 2, 32)]
    assert [i.name for i in create_model("test_resnet", features_only=True, out_indices=2).feature_info] == ["stage2"]


def test_bad_out_indices_and_arguments_fail_with_the_choices():
    with pytest.raises(ValueError, match=r"out_indices: 5 is out of range; this model gives 5 feature maps: 0\.\.4 "
                                         r"\(or -5\.\.-1\), or names: stem, stage1, stage2, stage3, stage4"):
        create_model("test_resnet", features_only=True, out_indices=(1, 5))
    with pytest.raises(ValueError, match="no feature map 'stage9'; choose from 0..4"):
        create_model("test_resnet", features_only=True, out_indices=("stage9",))
    with pytest.raises(ValueError, match="must name distinct feature maps"):
        create_model("test_resnet", features_only=True, out_indices=(1, "stage1"))
    with pytest.raises(ValueError, match="pass features_only=True"):
        create_model("test_resnet", out_indices=(1,))
    with pytest.raises(ValueError, match="leave num_classes out"):
        create_model("test_resnet", features_only=True, num_classes=10)


def test_token_maps_lay_patch_tokens_row_major_and_share_the_classifier_variables():
    """On a non-square ViT grid the map is the block's patch tokens in row-major order, class token dropped;
    the extractor runs on the classifier's own variables and has none besides them."""
    classifier = create_model("test_vit")
    extractor = create_model("test_vit", features_only=True, out_indices=(0, -1))
    x = jax.random.normal(jax.random.key(0), (2, 16, 32, 3))
    variables = jax.jit(lambda x: nn.meta.unbox(classifier.init(jax.random.key(1), x, train=False)))(x)
    own = jax.eval_shape(lambda: nn.meta.unbox(extractor.init(jax.random.key(1), x, train=False)))
    assert set(own["params"]) == set(variables["params"]) - {"head", "norm"}
    run = lambda v, x: (extractor.apply(v, x, train=False),
                        classifier.apply(v, x, train=False, method="forward_features"))
    maps, features = jax.jit(run)(variables, x)
    for out, key in zip(maps, ("block0", "block1")):
        assert out.shape == (2, 4, 8, 32)
        np.testing.assert_array_equal(out, np.asarray(features[key])[:, 1:].reshape(2, 4, 8, 32))


def test_every_model_is_an_image_classifier_with_feature_info():
    for name in ALL_MODELS:
        module = model_info(name).module
        assert issubclass(module, ImageClassifier), name
        assert all(isinstance(info, FeatureInfo) for info in model_info(name).feature_info)
    assert isinstance(create_model("test_cvt", features_only=True), FeatureExtractor)


@pytest.mark.parametrize("images, message", [
    (jnp.zeros((2, 3, 32, 32)), "look channels-first"),
    (jnp.zeros((32, 32, 3)), "must be a batch"),
    (jnp.zeros((2, 32, 32, 3), jnp.uint8), "must be floating point"),
])
def test_wrong_images_fail_with_a_clear_message(images, message):
    model = create_model("test_resnet", features_only=True)
    with pytest.raises((AssertionError, ValueError), match=message):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    with pytest.raises((AssertionError, ValueError), match=message):
        jax.eval_shape(lambda x: create_model("test_resnet").init(jax.random.key(0), x, train=False), images)
