"""The generic parallel hybrid: fusions swap by config, config errors are clear, heads average, TCCNet couples twice."""

import functools
import importlib
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from hybrid_jax import create_model, model_info
from hybrid_jax.fusion import FUSIONS
from hybrid_jax.models.parallel_hybrid import ParallelHybrid

# Two stages at 16 px: maps 16x16 and 8x8, a 4x4 token grid (token stride 4), so every fusion fits both.
MICRO = dict(img_size=16, stem_width=8, stem_stride=1, layers=(1, 1), widths=(8, 16), strides=(1, 2), patch_size=4,
             embed_dim=16, depths=(1, 1), num_heads=2, fusion_stages=(1, 2), num_classes=5)


def images(size=16, channels=3, batch=2):
    return jax.random.uniform(jax.random.key(0), (batch, size, size, channels), minval=-1, maxval=1)


def init(model, x):
    """Variables of the model's shapes filled with random values from numpy.

    The real initialisers (and even jax.random per leaf shape) compile for every kernel
    shape, which costs seconds on a shared CPU; nothing here depends on them.
    """
    abstract = jax.eval_shape(lambda x: nn.meta.unbox(model.init(jax.random.key(1), x, train=False)), x)
    rng = np.random.default_rng(1)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return np.full(leaf.shape, 1.0 if name.endswith("['var']") else 0.0, np.float32)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if leaf.ndim >= 2:
            return noise / math.sqrt(math.prod(leaf.shape[:-1]))
        return (1.0 if name.endswith("['scale']") else 0.0) + 0.1 * noise

    return jax.tree_util.tree_map_with_path(fill, abstract)


def available(name):
    """Whether the fusion's module exists yet (fcu and bridge are written separately)."""
    module = FUSIONS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        return False
    return True


@pytest.mark.parametrize("name", list(FUSIONS))
def test_each_fusion_swaps_in_by_config(name):
    if not available(name):
        pytest.skip(f"fusion {name!r} is not written yet")
    model = ParallelHybrid(**MICRO, fusion=name)
    x = images()
    variables = init(model, x)
    assert sorted(k for k in variables["params"] if k.startswith("fusions")) == ["fusions_1", "fusions_2"]
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(2)})
    assert np.all(np.isfinite(train_logits))


def test_different_fusions_give_different_parameter_trees():
    x = images()
    trees = {}
    for name in filter(available, FUSIONS):
        model = ParallelHybrid(**MICRO, fusion=name)
        shapes = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, jax.random.key(0), train=False), x))
        trees[name] = str(jax.tree_util.tree_map(lambda s: s.shape, shapes["params"]["fusions_1"]))
    assert len(set(trees.values())) == len(trees), trees


@pytest.mark.parametrize("fields,message", [
    (dict(fusion_stages=(0, 1)), r"among 1\.\.2 .*out of range: \[0\]"),
    (dict(fusion_stages=(3,)), r"among 1\.\.2 .*out of range: \[3\]"),
    (dict(fusion_stages=(1, 1)), "distinct stages"),
    (dict(fusion="concat,add,gating"), "names 3 fusions for 2 fusion_stages"),
    (dict(fusion="gatting"), "Did you mean gating"),
    (dict(layers=(1, 1, 1)), "one entry per stage"),
    (dict(stem_stride=3), "stem_stride must be one of"),
])
def test_config_errors_are_clear(fields, message):
    model = ParallelHybrid(**{**MICRO, **fields})
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images())


def test_input_size_must_be_a_multiple_of_the_stride():
    model = ParallelHybrid(**MICRO)
    assert model.stride == 4
    with pytest.raises(ValueError, match="18x18 is not a multiple of the model's stride 4"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images(size=18))


@pytest.mark.parametrize("size,channels", [(12, 1), (20, 3)])
def test_any_multiple_of_the_stride_and_one_or_three_channels(size, channels):
    model = ParallelHybrid(**MICRO)
    x = images(size, channels)
    features = model.apply(init(model, x), x, train=False, method=model.forward_features)
    grid = size // 4
    assert features["cnn1"].shape == (2, size, size, 8) and features["cnn2"].shape == (2, size // 2, size // 2, 16)
    assert features["transformer1"].shape == features["transformer2"].shape == (2, 1 + grid * grid, 16)
    assert features["pooled"].shape == (2, model.num_features) == (2, 16 + 16)
    np.testing.assert_allclose(features["cnn_pooled"], features["cnn2"].mean((1, 2)), atol=1e-6)
    np.testing.assert_array_equal(features["transformer_pooled"], features["tokens"][:, 0])


def test_logits_are_the_mean_of_the_branch_logits():
    model = ParallelHybrid(**MICRO)
    x = images()
    variables = init(model, x)
    p = variables["params"]
    logits = model.apply(variables, x, train=False)
    branches = model.apply(variables, x, train=False, method=model.branch_logits)
    np.testing.assert_allclose(logits, (branches["cnn"] + branches["transformer"]) / 2, atol=1e-6)
    assert not np.allclose(branches["cnn"], branches["transformer"], atol=1e-3)
    features = model.apply(variables, x, train=False, method=model.forward_features)
    for branch, head, pooled in [("cnn", "conv_cls_head", "cnn_pooled"),
                                 ("transformer", "trans_cls_head", "transformer_pooled")]:
        expected = features[pooled] @ p[head]["kernel"] + p[head]["bias"]
        np.testing.assert_allclose(branches[branch], expected, atol=1e-5)

    headless = ParallelHybrid(**{**MICRO, "num_classes": 0})
    headless_vars = {**variables, "params": {k: v for k, v in p.items() if "cls_head" not in k}}
    np.testing.assert_array_equal(headless.apply(headless_vars, x, train=False), features["pooled"])
    with pytest.raises(ValueError, match="num_classes=0"):
        headless.apply(headless_vars, x, train=False, method=headless.branch_logits)


def _perturbed(params, module, seed=3):
    rng = np.random.default_rng(seed)
    moved = jax.tree_util.tree_map(lambda p: p + rng.standard_normal(p.shape, np.float32), params[module])
    return {**params, module: moved}


def test_tccnet_couples_at_exactly_two_points():
    assert model_info("tccnet_tiny").fields["fusion_stages"] == (1, 4)
    model = create_model("tccnet_tiny")
    x = images(size=16, channels=1, batch=1)
    variables = init(model, x)
    params = variables["params"]
    assert sorted(k for k in params if k.startswith("fusions")) == ["fusions_1", "fusions_4"]
    assert "proj_own" in params["fusions_1"]["local_global"]  # LFCM: concat
    assert "attn" in params["fusions_4"]["local_global"]  # HFCM: cross-attention

    @jax.jit
    def features(params):
        return model.apply({**variables, "params": params}, x, train=False, method=model.forward_features)

    base = features(params)
    # The CNN reaches the tokens at stage 1 (LFCM), then not again until stage 4 (HFCM).
    moved = features(_perturbed(params, "stages_1"))  # CNN stage 2
    for i in (1, 2, 3):
        np.testing.assert_array_equal(moved[f"transformer{i}"], base[f"transformer{i}"])
    assert np.abs(moved["transformer4"] - base["transformer4"]).max() > 1e-5
    assert np.abs(features(_perturbed(params, "stages_0"))["transformer1"] - base["transformer1"]).max() > 1e-3
    # And the tokens reach the CNN only at those two points.
    moved = features(_perturbed(params, "blocks_1"))  # transformer stage 2
    for i in (1, 2, 3):
        np.testing.assert_array_equal(moved[f"cnn{i}"], base[f"cnn{i}"])
    assert np.abs(moved["cnn4"] - base["cnn4"]).max() > 1e-5
