"""Every registered model: runs, is finite, uses every parameter, and matches its paper's size and cost."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model, list_models, model_info
from hybrid_jax.analysis.flops import count_params, measure_registered
from hybrid_jax.layers import resample_pos_embed

ALL_MODELS = list_models()
PAPER_MODELS = [name for name in ALL_MODELS if model_info(name).paper is not None]
TINY_MODELS = [name for name in ALL_MODELS if model_info(name).paper is None]


def _smallest_paper_model_per_family() -> set[str]:
    smallest = {}
    for name in PAPER_MODELS:
        family = model_info(name).family
        if family not in smallest or model_info(name).paper.gmacs < model_info(smallest[family]).paper.gmacs:
            smallest[family] = name
    return set(smallest.values())


# Compiling a full-size model on CPU takes 10-60 s, so the default suite runs the small models (every
# family has one) and compiles one full-size model per family (its smallest) for XLA's FLOP count;
# `-m slow` runs the rest. Parameter and MAC counts need no compilation and run for every model.
SMALL_MODELS = {name for name in TINY_MODELS if model_info(name).input_size <= 64}
REPRESENTATIVES = _smallest_paper_model_per_family()


def default_or_slow(names: list[str], fast: set[str] = SMALL_MODELS) -> list:
    """`names` as test parameters, those outside `fast` marked slow."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in names]


def images(name: str, batch: int = 2) -> jax.Array:
    size = model_info(name).input_size
    return jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)


def init(model, x):
    return jax.jit(lambda x: nn.meta.unbox(model.init(jax.random.key(1), x, train=False)))(x)


@pytest.mark.parametrize("name", default_or_slow(ALL_MODELS))
def test_forward_in_train_and_eval_mode(name):
    model = create_model(name)
    x = images(name)
    variables = init(model, x)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits.shape == (2, model.num_classes)
    assert np.all(np.isfinite(logits))
    train_logits, updates = jax.jit(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}))(variables, x)
    assert np.all(np.isfinite(train_logits))
    if "batch_stats" in variables:
        # Training mode normalises with batch statistics and updates the running ones.
        assert not np.allclose(train_logits, logits)
        # Each norm layer's running statistics move; its mean alone may not: a BatchNorm fed by a linear
        # map of another BatchNorm's output sees a batch mean of exactly 0 at init (Mobile-Former-52M).
        old_stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
        new_stats = flax.traverse_util.flatten_dict(updates["batch_stats"])
        moved = {}
        for path, value in old_stats.items():
            moved[path[:-1]] = moved.get(path[:-1], False) or not np.allclose(value, new_stats[path])
        assert all(moved.values()), [path for path, ok in moved.items() if not ok]


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_params_and_gmacs_match_paper(name):
    paper = model_info(name).paper
    measured = measure_registered(name, xla=False)
    assert measured.params / 1e6 == pytest.approx(paper.params_m, rel=0.01), paper.source
    assert measured.gmacs == pytest.approx(paper.gmacs, rel=0.05), paper.source


# XLA expands exact (erf) GELU into ~64 flops per element: families with wide GELU MLPs on high-resolution
# maps and few multiply-adds (EdgeNeXt-XXS: XLA/2 = 1.24 x MACs, CoAtNet-0: 1.12; 1.02 with ReLU; CMT-Ti:
# 1.28) exceed 10%.
ERF_GELU_HEAVY = {"edgenext", "maxxvit", "cmt"}


@pytest.mark.parametrize("name", default_or_slow(PAPER_MODELS, fast=REPRESENTATIVES))
def test_xla_flops_agree_with_the_mac_count(name):
    """XLA's own count differs only by elementwise work and padded conv taps.

    Elementwise work (norms, activations) weighs more where multiply-adds are few (Mobile-Former-26M: +15%).
    """
    measured = measure_registered(name)
    tolerance = 0.10 if measured.gmacs >= 0.1 else 0.20
    if model_info(name).family in ERF_GELU_HEAVY:
        tolerance = 0.30
    assert measured.xla_gflops / 2 == pytest.approx(measured.gmacs, rel=tolerance)


def _randomized(params, key):
    """Random nonzero weights, so zero-initialised layers (e.g. last BN of a block) pass gradient on."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([0.1 * jax.random.normal(k, p.shape, p.dtype) + p for k, p in zip(keys, leaves)])


def _unreachable_by_design(name: str) -> set[str]:
    """Parameters that cannot reach the logits in the network's own design.

    CvT classifies from a class token that joins in the last stage and is never convolved, so the last block's
    convolutional query projection acts only on patch tokens whose outputs no later layer reads.
    """
    model = create_model(name)
    if model_info(name).family != "cvt" or not model.cls_token:
        return set()
    stage, block = len(model.depths) - 1, model.depths[-1] - 1
    return {f"['stages_{stage}']['blocks_{block}']['attn']['conv_proj_q']{leaf}"
            for leaf in ("['conv']['kernel']", "['norm']['bias']", "['norm']['scale']")}


def _check_every_parameter_gets_gradient(name):
    model = create_model(name)
    x = images(name)
    variables = init(model, x)
    params = _randomized(variables["params"], jax.random.key(3))

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(4)})
        return jnp.sum(logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if not np.any(np.asarray(g) != 0)]
    assert set(dead) == _unreachable_by_design(name), f"parameters without gradient: {dead}"
    assert count_params(grads) == count_params(params)


@pytest.mark.parametrize("name", default_or_slow(TINY_MODELS))
def test_every_parameter_gets_gradient(name):
    _check_every_parameter_gets_gradient(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_every_parameter_gets_gradient_full_size(name):
    _check_every_parameter_gets_gradient(name)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_vit_r50"])
def test_num_classes_zero_returns_pooled_features(name):
    model = create_model(name, num_classes=0)
    x = images(name)
    variables = init(model, x)
    pooled = model.apply(variables, x, train=False)
    features = model.apply(variables, x, train=False, method=model.forward_features)
    np.testing.assert_array_equal(pooled, features["pooled"])
    assert "head" not in variables["params"]
    with_head = create_model(name)
    head_vars = init(with_head, x)
    head = head_vars["params"]["head"]
    shared = {**head_vars, "params": {**variables["params"], "head": head}}
    np.testing.assert_allclose(with_head.apply(shared, x, train=False),
                               pooled @ head["kernel"] + head["bias"], atol=1e-5)


def test_forward_features_gives_every_stage():
    x = images("test_resnet")
    model = create_model("test_resnet")
    features = model.apply(init(model, x), x, train=False, method=model.forward_features)
    assert [features[f"stage{i}"].shape for i in range(1, 5)] == [
        (2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16), (2, 1, 1, 32)]
    np.testing.assert_allclose(features["pooled"], features["stage4"].mean((1, 2)), atol=1e-6)

    vit = create_model("test_vit_r50")
    x = images("test_vit_r50")
    features = vit.apply(init(vit, x), x, train=False, method=vit.forward_features)
    assert features["stage2"].shape == (2, 8, 8, 512)
    assert features["patch_embed"].shape == (2, 8, 8, 32)
    assert features["block0"].shape == (2, 65, 32)
    np.testing.assert_array_equal(features["pooled"], features["tokens"][:, 0])


@pytest.mark.parametrize("size", [160, 288])
def test_vit_built_at_224_runs_at_other_sizes(size):
    """On-the-fly resampling equals building the model at the new size with resampled weights."""
    model = create_model("vit_tiny_patch16_224", depth=2)
    variables = init(model, images("vit_tiny_patch16_224", batch=1))
    x = jax.random.uniform(jax.random.key(5), (1, size, size, 3))
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    grid = size // 16
    resized = dict(variables["params"], pos_embed=resample_pos_embed(variables["params"]["pos_embed"], (grid, grid)))
    native = create_model("vit_tiny_patch16_224", depth=2, img_size=size)
    np.testing.assert_allclose(native.apply({"params": resized}, x, train=False), logits, atol=1e-5)
    assert resized["pos_embed"].shape == (1, 1 + grid * grid, 192)
