"""Conformer: the FCU against numpy references, the official block wiring, the two heads, and the MAC counts."""

import math

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from hybrid_jax import create_model
from hybrid_jax.analysis.flops import count_macs, count_params
from hybrid_jax.fusion import get_fusion
from hybrid_jax.fusion.fcu import FCUDown, FCUUp, FeatureCouplingUnit
from hybrid_jax.models.conformer import ConvBlock, ConvTransBlock


def random_variables(module, *args, scale=0.3, seed=0, **kwargs):
    """Variables of `module` filled from numpy: random weights (norm scales around 1), random running statistics.

    Built from the shapes alone (jax.eval_shape), so no initializer is compiled.
    """
    shapes = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        noise = scale * rng.standard_normal(leaf.shape)
        return jnp.asarray(noise + 1.0 if "scale" in name else noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _inputs(b=2, h=8, w=8, c=6, grid=4, d=10, prefix=1):
    kl, kt = jax.random.split(jax.random.key(7))
    return jax.random.normal(kl, (b, h, w, c)), jax.random.normal(kt, (b, prefix + grid * grid, d))


def naive_down(local, p, grid):
    """1x1 conv with bias, average pool to the grid, LayerNorm (eps 1e-6), exact GELU: [B, h*w, D]."""
    b, h, _, _ = local.shape
    y = local @ p["conv_project"]["kernel"][0, 0] + p["conv_project"]["bias"]
    r = h // grid
    y = y.reshape(b, grid, r, grid, r, -1).mean(axis=(2, 4)).reshape(b, grid * grid, -1)
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
    y = y * p["ln"]["scale"] + p["ln"]["bias"]
    return 0.5 * y * (1 + erf(y / np.sqrt(2)))


def naive_up(grid_tokens, p, stats, size, train):
    """Grid tokens as a map, 1x1 conv with bias, BatchNorm (eps 1e-6), ReLU, nearest upsample."""
    b, n, _ = grid_tokens.shape
    g = math.isqrt(n)
    y = grid_tokens.reshape(b, g, g, -1) @ p["conv_project"]["kernel"][0, 0] + p["conv_project"]["bias"]
    mean, var = (y.mean((0, 1, 2)), y.var((0, 1, 2))) if train else (stats["mean"], stats["var"])
    y = np.maximum((y - mean) / np.sqrt(var + 1e-6) * p["bn"]["scale"] + p["bn"]["bias"], 0)
    r = size // g
    return y.repeat(r, axis=1).repeat(r, axis=2)


def _fcu_variables(local, tokens):
    """An FCU with random weights and random running statistics."""
    fcu = FeatureCouplingUnit(num_prefix_tokens=1)
    return fcu, random_variables(fcu, local, tokens, train=False)


def test_fcu_down_adds_conv_pool_layernorm_gelu_to_the_grid_and_keeps_the_class_token():
    local, tokens = _inputs()
    fcu, variables = _fcu_variables(local, tokens)
    out = fcu.apply(variables, local, tokens, train=False, method=fcu.to_tokens)
    p = _np(variables["params"])
    np.testing.assert_array_equal(out[:, 0], tokens[:, 0])
    np.testing.assert_allclose(out[:, 1:], np.asarray(tokens[:, 1:]) + naive_down(_np(local), p["squeeze_block"], 4),
                               atol=1e-5, rtol=1e-5)
    # The token width comes from the tokens, the conv's input width from the map.
    assert p["squeeze_block"]["conv_project"]["kernel"].shape == (1, 1, 6, 10)


def test_fcu_down_of_a_constant_map_adds_one_vector_to_every_grid_token():
    """Every position projects to W c + b; pooling keeps it; LayerNorm and GELU act per token."""
    local, tokens = _inputs()
    c = jax.random.normal(jax.random.key(9), (6,))
    fcu, variables = _fcu_variables(local, tokens)
    out = fcu.apply(variables, jnp.broadcast_to(c, local.shape), tokens, train=False, method=fcu.to_tokens)
    p = _np(variables["params"])["squeeze_block"]
    y = np.asarray(c, np.float64) @ p["conv_project"]["kernel"][0, 0] + p["conv_project"]["bias"]
    y = (y - y.mean()) / np.sqrt(y.var() + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]
    increment = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    np.testing.assert_allclose(out[:, 1:] - tokens[:, 1:], np.broadcast_to(increment, (2, 16, 10)), atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_fcu_up_adds_conv_batchnorm_relu_upsampled_tokens_and_ignores_the_class_token(train):
    local, tokens = _inputs()
    fcu, variables = _fcu_variables(local, tokens)
    run = lambda t: fcu.apply(variables, local, t, train=train, method=fcu.to_local, mutable=["batch_stats"])[0]
    out = run(tokens)
    p, stats = _np(variables["params"]), _np(variables["batch_stats"])["expand_block"]["bn"]
    expected = _np(local) + naive_up(_np(tokens)[:, 1:], p["expand_block"], stats, 8, train)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(run(tokens.at[:, 0].set(100.0)), out)


def test_fcu_through_the_generic_fusion_interface():
    """get_fusion("fcu"): a map and a class token + grid; __call__ is to_tokens, then to_local on the new tokens."""
    local, tokens = _inputs(h=12, w=12, grid=3)
    fusion = get_fusion("fcu", num_prefix_tokens=1)
    assert isinstance(fusion, FeatureCouplingUnit)
    variables = random_variables(fusion, local, tokens, train=False)
    new_local, new_tokens = fusion.apply(variables, local, tokens, train=False)
    assert new_local.shape == local.shape and new_tokens.shape == tokens.shape
    p, stats = _np(variables["params"]), _np(variables["batch_stats"])["expand_block"]["bn"]
    ref_tokens = _np(tokens)
    ref_tokens[:, 1:] += naive_down(_np(local), p["squeeze_block"], 3)
    np.testing.assert_allclose(new_tokens, ref_tokens, atol=1e-5, rtol=1e-5)
    ref_local = _np(local) + naive_up(ref_tokens[:, 1:], p["expand_block"], stats, 12, False)
    np.testing.assert_allclose(new_local, ref_local, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="square token grid"):
        fusion.apply(variables, local, tokens[:, :-1], train=False)


def test_fcu_submodules_return_the_official_shapes():
    local, tokens = _inputs(h=8, w=8, c=6, grid=2, d=10)
    grid = tokens[:, 1:].reshape(2, 2, 2, 10)
    init = lambda module, *args, **kw: jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), *args, **kw))
    assert init(FCUDown(), local, grid)[0].shape == (2, 2, 2, 10)
    assert init(FCUUp(), grid, local, train=False)[0].shape == local.shape


def test_conv_trans_block_follows_the_official_wiring():
    """Transformer input = stream + [class token, FCUDown(x2)], i.e. the class token doubled; the fusion
    bottleneck's 3x3 conv reads its first activation plus FCUUp(new tokens)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    tokens = jax.random.normal(jax.random.key(1), (2, 5, 8))
    block = ConvTransBlock(16, num_heads=2)
    variables = random_variables(block, x, tokens, train=False)
    same = {}  # facts about which traced array flows where, decided while tracing

    @jax.jit
    def run(variables, x, tokens):
        seen = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            seen.setdefault("/".join(context.module.path) + f".{context.method_name}", (args, out))
            return out

        with nn.intercept_methods(record):
            x_out, tokens_out = block.apply(variables, x, tokens, train=False)
        same["down reads x2"] = seen["fcu/squeeze_block.__call__"][0][0] is seen["cnn_block.__call__"][1][1]
        same["up reads the new tokens"] = seen["fcu.to_local"][0][1] is tokens_out
        same["3x3 conv reads the coupled map"] = seen["fusion_block/conv2.__call__"][0][0] is seen["fcu.to_local"][1]
        return dict(x_out=x_out, tokens_out=tokens_out, down=seen["fcu/squeeze_block.__call__"][1],
                    trans_in=seen["trans_block.__call__"][0][0], act1=seen["fcu.to_local"][0][0],
                    fusion_in=seen["fusion_block.__call__"][0][0])

    out = run(variables, x, tokens)
    assert all(same.values()), same
    np.testing.assert_allclose(out["trans_in"][:, 0], 2 * tokens[:, 0], atol=1e-6)
    np.testing.assert_allclose(out["trans_in"][:, 1:], tokens[:, 1:] + out["down"].reshape(2, 4, 8), atol=1e-6)
    assert out["act1"].shape == (2, 8, 8, 4)  # coupled at the bottleneck's mid width
    # Without the coupling, the same fusion bottleneck gives another output.
    fusion_vars = {"params": variables["params"]["fusion_block"],
                   "batch_stats": variables["batch_stats"]["fusion_block"]}
    plain, _ = jax.jit(lambda v, y: ConvBlock(16).apply(v, y, train=False))(fusion_vars, out["fusion_in"])
    assert not np.allclose(plain, out["x_out"], atol=1e-3)


@pytest.fixture(scope="module")
def tiny():
    """The 32 px variant cut to depth 3, with random weights, on a 28 px batch: variables, features, logits."""
    model = create_model("conformer_tiny_32", depth=3)
    x = jax.random.uniform(jax.random.key(6), (2, 28, 28, 1))
    variables = random_variables(model, x, scale=0.1, train=False)

    @jax.jit
    def run(variables, x):
        features = model.apply(variables, x, train=False, method=model.forward_features)
        return features, model.apply(variables, x, train=False, method=model.branch_logits), model.apply(
            variables, x, train=False)

    return x, variables, *run(variables, x)


def test_logits_are_the_mean_of_the_two_heads(tiny):
    _, variables, features, branches, logits = tiny
    assert set(branches) == {"cnn", "transformer"}
    np.testing.assert_allclose(logits, (branches["cnn"] + branches["transformer"]) / 2, atol=1e-6)
    assert not np.allclose(branches["cnn"], branches["transformer"], atol=1e-2)
    p = variables["params"]
    np.testing.assert_allclose(branches["cnn"], features["cnn_pooled"] @ p["conv_cls_head"]["kernel"]
                               + p["conv_cls_head"]["bias"], atol=1e-5)
    np.testing.assert_allclose(branches["transformer"], features["tokens"][:, 0] @ p["trans_cls_head"]["kernel"]
                               + p["trans_cls_head"]["bias"], atol=1e-5)


def test_num_classes_zero_returns_both_pooled_features(tiny):
    x, variables, features, _, logits = tiny
    headless = create_model("conformer_tiny_32", depth=3, num_classes=0)
    params = {k: v for k, v in variables["params"].items() if not k.endswith("cls_head")}
    headless_vars = {**variables, "params": params}
    pooled = jax.jit(lambda v, x: headless.apply(v, x, train=False))(headless_vars, x)
    np.testing.assert_allclose(pooled, features["pooled"], atol=1e-5)
    # One linear layer on the concatenation, holding both heads at half weight, gives the averaged logits.
    p = variables["params"]
    kernel = np.concatenate([p["conv_cls_head"]["kernel"], p["trans_cls_head"]["kernel"]]) / 2
    bias = (p["conv_cls_head"]["bias"] + p["trans_cls_head"]["bias"]) / 2
    np.testing.assert_allclose(pooled @ kernel + bias, logits, atol=1e-5)
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(lambda v, x: headless.apply(v, x, train=False, method="branch_logits"), headless_vars, x)


def test_forward_features_has_both_branches_after_every_block(tiny):
    """28 px, 3x3 stem: CNN at 28, 14, 7 (4 after the last fusion), tokens every 4 px: 7x7 grid + class token."""
    _, _, features, _, _ = tiny
    assert features["stem"].shape == (2, 28, 28, 32)
    assert [features[f"cnn{i}"].shape for i in (1, 2, 3)] == [(2, 28, 28, 32), (2, 14, 14, 64), (2, 4, 4, 128)]
    assert all(features[f"transformer{i}"].shape == (2, 50, 64) for i in (1, 2, 3))
    np.testing.assert_allclose(features["cnn_pooled"], features["cnn3"].mean((1, 2)), atol=1e-6)
    np.testing.assert_array_equal(features["transformer_pooled"], features["tokens"][:, 0])
    assert features["pooled"].shape == (2, 128 + 64)


def test_training_updates_every_batchnorm_and_drops_paths_in_the_transformer_only(tiny):
    x, variables, _, _, _ = tiny
    dropping = create_model("conformer_tiny_32", depth=3, drop_path_rate=0.5)
    run = jax.jit(lambda key: dropping.apply(variables, x, train=True, mutable=["batch_stats"],
                                             method="forward_features", rngs={"dropout": key}))
    (a, stats), (b, _) = run(jax.random.key(0)), run(jax.random.key(1))
    # The CNN blocks have no stochastic depth and the first transformer block's rate is 0 (linear schedule).
    np.testing.assert_array_equal(a["cnn1"], b["cnn1"])
    np.testing.assert_array_equal(a["transformer1"], b["transformer1"])
    assert not np.allclose(a["transformer3"], b["transformer3"])
    moved = jax.tree_util.tree_map(lambda old, new: not np.allclose(old, new), variables["batch_stats"],
                                   stats["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))


def test_inputs_off_the_token_stride_fail_clearly():
    model = create_model("conformer_tiny_32", depth=3)
    with pytest.raises(ValueError, match="multiple of Conformer's stride 4"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((1, 30, 30, 3), jnp.float32))
    with pytest.raises(ValueError, match="multiple of 3"):
        jax.eval_shape(lambda x: create_model("conformer_tiny_32", depth=4).init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def mmcv_flops(model, input_size=224):
    """Parameters and mmcv's hook-based FLOP count of the backbone (what mmpretrain's metafile lists).

    Counted: conv multiply-adds plus one per output for a bias; Linear input elements x output width (no
    bias); 2 per element for BatchNorm and LayerNorm; one per ReLU output and per pooled input element.
    Not counted: the heads, and functional ops (attention matmuls, softmax, GELU, upsampling).
    """
    image = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image))
    total = 0

    def hook(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module, kind = context.module, type(context.module).__name__
        if context.method_name != "__call__":
            return out
        if kind == "Conv2d":
            total += math.prod(out.shape) * (module.kernel_size ** 2 * args[0].shape[-1] + module.use_bias)
        elif kind == "Dense":
            total += math.prod(args[0].shape) * out.shape[-1]
        elif kind in ("BatchNorm", "LayerNorm"):
            total += 2 * math.prod(out.shape)
        return out

    with nn.intercept_methods(hook):
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False, method=model.forward_features))(
            variables, image).jaxpr

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            shape = eqn.outvars[0].aval.shape
            if eqn.primitive.name == "max" and len(shape) == 4 and shape[-1] > 1:  # ReLU on a map
                total += math.prod(shape)
            elif eqn.primitive.name in ("reduce_window_max", "reduce_window_sum"):  # max pool, FCUDown's pool
                total += math.prod(eqn.invars[0].aval.shape)
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr)
    last = (input_size // 32) ** 2 * model.base_channel * model.channel_ratio * 4
    return count_params(variables["params"]), total + last  # + the final global average pool


@pytest.mark.parametrize("name, params, flops", [
    ("conformer_tiny_patch16", 23524704, 4899611328),
    ("conformer_small_patch32", 38853072, 7087281792),
    ("conformer_small_patch16", 37673424, 10311309312),
    ("conformer_base_patch16", 83289136, 22892078080),
])
def test_mmpretrain_counts_are_reproduced_to_the_unit(name, params, flops):
    """mmpretrain's metafile (converted official weights) gives exact parameters and mmcv-rule FLOPs."""
    assert mmcv_flops(create_model(name)) == (params, flops)


def test_readme_macs_count_the_attention_matmuls():
    """The README's 5.2 GMACs for Ti is count_macs (conv, Linear, attention matmuls): 0.358 G above mmcv's rule."""
    model = create_model("conformer_tiny_patch16")
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), image))
    macs = count_macs(lambda v, x: model.apply(v, x, train=False), variables, image)
    attention = 12 * 2 * 197 ** 2 * 384  # QK^T and AV in each of the 12 transformer blocks
    assert round(macs / 1e9, 1) == 5.2
    assert round((macs - attention) / 1e9, 2) == 4.87  # below mmcv's 4.90, which adds norms and ReLUs
