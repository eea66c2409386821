"""Mobile-Former: the bridge and dynamic ReLU against naive numpy references, the model's features and MACs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.analysis.flops import count_macs, count_params
from hybrid_jax.fusion import get_fusion
from hybrid_jax.fusion.bridge import Bridge, FormerToMobile, MobileToFormer
from hybrid_jax.layers.dyrelu import DynamicReLU
from hybrid_jax.models.mobile_former import channel_shuffle


def _randomized(params, key, scale=0.3):
    """Random weights everywhere, so zero-initialised biases and N(0, 0.01) kernels do not hide a mistake."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, p.shape, p.dtype) + (p if p.ndim == 1 else 0)
                              for k, p in zip(keys, leaves)])


def _init(module, *args, **kw):
    variables = nn.meta.unbox(module.init(jax.random.key(0), *args, **kw))
    return {**variables, "params": _randomized(variables["params"], jax.random.key(1))}


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _hard_sigmoid(x):
    return np.clip(x + 3, 0, 6) / 6


def _layer_norm(x, p, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def naive_mobile_to_former(local, tokens, p, heads, gate):
    """Loop over examples and heads: token queries (projected) against raw map channels as keys and values."""
    b, h, w, c = local.shape
    dh = c // heads
    out = np.zeros(tokens.shape[:2] + (c,))
    q = _dense(tokens, p["q"])
    for i in range(b):
        x = local[i].reshape(h * w, c)
        for j in range(heads):
            sl = slice(j * dh, (j + 1) * dh)
            attn = _softmax(q[i][:, sl] @ x[:, sl].T / np.sqrt(dh))  # [T, HW]
            out[i, :, sl] = attn @ x[:, sl]
    if gate:
        out = out * 2 * _hard_sigmoid(_dense(tokens, p["alpha"]))
    return _layer_norm(tokens + _dense(out, p["proj"]), p["layer_norm"])


def naive_former_to_mobile(local, tokens, p, heads):
    """Loop over examples and heads: raw map channels as queries against projected token keys and values."""
    b, h, w, c = local.shape
    dh = c // heads
    k, v = _dense(tokens, p["k"]), _dense(tokens, p["proj"])
    out = np.zeros((b, h * w, c))
    for i in range(b):
        x = local[i].reshape(h * w, c)
        for j in range(heads):
            sl = slice(j * dh, (j + 1) * dh)
            attn = _softmax(x[:, sl] @ k[i][:, sl].T / np.sqrt(dh))  # [HW, T]
            out[i, :, sl] = attn @ v[i][:, sl]
    return local + out.reshape(local.shape)


def _inputs(b=2, h=3, w=5, c=8, t=3, d=12):
    kl, kt = jax.random.split(jax.random.key(7))
    return jax.random.normal(kl, (b, h, w, c)), jax.random.normal(kt, (b, t, d))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("gate", [True, False])
def test_mobile_to_former_matches_naive_reference(heads, gate):
    local, tokens = _inputs()
    module = MobileToFormer(heads, gate=gate, attn_impl="xla")
    variables = _init(module, local, tokens, train=False)
    out = module.apply(variables, local, tokens, train=False)
    ref = naive_mobile_to_former(*_np((local, tokens, variables["params"])), heads, gate)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    # The map side has no projection: only q, the gate and the output projection carry weights.
    assert set(variables["params"]) == {"q", "proj", "layer_norm"} | ({"alpha"} if gate else set())


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_former_to_mobile_matches_naive_reference(heads):
    local, tokens = _inputs()
    module = FormerToMobile(heads, attn_impl="xla")
    variables = _init(module, local, tokens, train=False)
    out = module.apply(variables, local, tokens, train=False)
    ref = naive_former_to_mobile(*_np((local, tokens, variables["params"])), heads)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert set(variables["params"]) == {"k", "proj"}


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_bridge_works_through_the_generic_fusion_interface(num_tokens):
    """Any token count (no grid), maps of any shape; __call__ is to_tokens then to_local."""
    local, tokens = _inputs(h=4, w=6, c=8, t=num_tokens, d=6)
    fusion = get_fusion("bridge", num_prefix_tokens=0)
    assert isinstance(fusion, Bridge)
    variables = _init(fusion, local, tokens, train=False)
    new_local, new_tokens = fusion.apply(variables, local, tokens, train=False)
    assert new_local.shape == local.shape and new_tokens.shape == tokens.shape
    p = _np(variables["params"])
    ref_tokens = naive_mobile_to_former(*_np((local, tokens)), p["local_global"], 2, True)
    np.testing.assert_allclose(new_tokens, ref_tokens, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(new_local, naive_former_to_mobile(np.asarray(local, np.float64), ref_tokens,
                                                                 p["global_local"], 2), atol=2e-5, rtol=2e-5)
    # Tokens see the map as a set: permuting positions leaves them unchanged and permutes the map's update.
    perm = np.random.default_rng(0).permutation(24)
    shuffled = local.reshape(2, 24, 8)[:, perm].reshape(local.shape)
    local2, tokens2 = fusion.apply(variables, shuffled, tokens, train=False)
    np.testing.assert_allclose(tokens2, new_tokens, atol=1e-5)
    np.testing.assert_allclose(local2.reshape(2, 24, 8), new_local.reshape(2, 24, 8)[:, perm], atol=1e-5)


def test_bridge_directions_take_maps_of_different_widths():
    """In a Mobile-Former block, Mobile -> Former reads the block input and Former -> Mobile writes its output."""
    local_in, tokens = _inputs(c=8)
    local_out = jnp.ones((2, 2, 3, 12))
    bridge = Bridge()

    def both(module, a, b, t):
        return module.to_local(b, module.to_tokens(a, t, train=False), train=False)

    variables = nn.meta.unbox(bridge.init(jax.random.key(0), local_in, local_out, tokens, method=both))
    assert variables["params"]["local_global"]["q"]["kernel"].shape == (12, 8)
    assert variables["params"]["global_local"]["k"]["kernel"].shape == (12, 12)
    assert bridge.apply(variables, local_in, local_out, tokens, method=both).shape == local_out.shape


@pytest.mark.parametrize("num_pieces", [2, 3])
def test_dynamic_relu_equals_hand_computation(num_pieces):
    x = jax.random.normal(jax.random.key(2), (2, 3, 3, 5))
    tokens = jax.random.normal(jax.random.key(3), (2, 4, 16))
    module = DynamicReLU(num_pieces=num_pieces)
    variables = _init(module, x, tokens)
    out = module.apply(variables, x, tokens)
    p = _np(variables["params"])
    xn, tn = _np((x, tokens))
    expected = np.empty_like(xn)
    for i in range(2):
        # The coefficients come from the first token only.
        h = _hard_sigmoid(_dense(np.maximum(_dense(tn[i, 0], p["fc1"]), 0), p["fc2"]))
        for c in range(5):
            slopes = [(h[j * 5 + c] - 0.5) * 2.0 + (1.0 if j == 0 else 0.0) for j in range(num_pieces)]
            expected[i, ..., c] = np.max([s * xn[i, ..., c] for s in slopes], axis=0)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    # Other tokens do not matter.
    np.testing.assert_array_equal(module.apply(variables, x, tokens.at[:, 1:].set(0.0)), out)


def test_dynamic_relu_starts_as_relu():
    """With the coefficient MLP's output at zero, h = 0.5: slopes (1, 0), i.e. max(x, 0)."""
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 6))
    tokens = jax.random.normal(jax.random.key(5), (2, 3, 8))
    module = DynamicReLU()
    variables = nn.meta.unbox(module.init(jax.random.key(0), x, tokens))
    variables["params"]["fc2"]["kernel"] = jnp.zeros_like(variables["params"]["fc2"]["kernel"])
    np.testing.assert_allclose(module.apply(variables, x, tokens), jnp.maximum(x, 0), atol=1e-6)


def test_channel_shuffle_matches_torch_semantics():
    """PyTorch's ChannelShuffle: view(B, g, C/g, H, W) -> transpose(1, 2) -> flatten, here on NHWC."""
    x = np.arange(2 * 12).reshape(2, 1, 1, 12).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2)
    expected = nchw.reshape(2, 3, 4, 1, 1).transpose(0, 2, 1, 3, 4).reshape(2, 12, 1, 1).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), 3), expected)


def _run_tiny(**overrides):
    """Variables, forward features and logits of the tiny variant on a 28 px batch, in one compiled call."""
    model = create_model("mobile_former_tiny_32", **overrides)
    x = jax.random.uniform(jax.random.key(6), (2, 28, 28, 1))

    @jax.jit
    def run(x):
        variables = nn.meta.unbox(model.init(jax.random.key(0), x, train=False))
        features = model.apply(variables, x, train=False, method=model.forward_features)
        return variables, features, model.apply(variables, x, train=False)

    return (model,) + run(x)


def test_forward_features_give_map_and_tokens_per_block():
    model, variables, features, logits = _run_tiny()
    # 28 px Fashion-MNIST: stem /2, then the lite block and two strided Mobile-Former blocks.
    assert features["stem"].shape == (2, 14, 14, 8)
    maps = [features[f"block{i}"].shape for i in range(1, len(model.blocks) + 1)]
    assert maps == [(2, 14, 14, 8), (2, 7, 7, 16), (2, 7, 7, 16), (2, 4, 4, 24), (2, 4, 4, 24)]
    for i in range(1, len(model.blocks) + 1):
        assert features[f"block{i}_tokens"].shape == (2, model.token_num, model.token_dim)
    # The lite block leaves the learned tokens as they are; every Mobile-Former block updates them.
    np.testing.assert_array_equal(features["block1_tokens"], np.broadcast_to(variables["params"]["tokens"],
                                                                             (2, 3, 32)))
    assert not np.allclose(features["block2_tokens"], features["block1_tokens"])
    assert features["pooled"].shape == (2, model.num_features)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, features["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)


def test_grouped_pointwise_convs_as_in_26m():
    model = create_model("mobile_former_tiny_32", groups=2)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x, train=False)), x)
    mobile = variables["params"]["features_2"]["mobile"]
    assert mobile["conv1"]["conv"]["kernel"].shape == (1, 1, 16 // 2, 32)  # grouped 1x1 expand
    assert mobile["conv2"]["conv"]["kernel"].shape == (3, 3, 1, 32)  # depthwise stays depthwise
    assert mobile["conv3"]["conv"]["kernel"].shape == (1, 1, 32 // 2, 16)  # grouped 1x1 project
    assert variables["params"]["classifier"]["conv"]["conv"]["kernel"].shape == (1, 1, 24 // 2, 48)


def test_num_classes_zero_returns_pooled_features():
    model = create_model("mobile_former_tiny_32", num_classes=0)
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
    assert out.shape == (2, model.num_features)
    assert "head" not in variables["params"]


# README figures (params M, MACs M) and the official code's exact parameter counts.
README = {"mobile_former_508m": (14.0, 508, 13_976_976), "mobile_former_294m": (11.4, 294, 11_422_648),
          "mobile_former_214m": (9.4, 214, 9_425_920), "mobile_former_151m": (7.6, 151, 7_595_828),
          "mobile_former_96m": (4.6, 96, 4_585_252), "mobile_former_52m": (3.5, 52, 3_469_092),
          "mobile_former_26m": (3.2, 26, 3_232_788)}


def readme_convention(name):
    """(params, count_macs, BatchNorm elements) of a variant at 224 px, batch 1."""
    model = create_model(name)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    normalised = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            normalised.append(args[0].size)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: nn.meta.unbox(model.init(jax.random.key(0), x, train=False)), x)
    macs = count_macs(lambda v, x: model.apply(v, x, train=False), variables, x)
    return count_params(variables["params"]), macs, sum(normalised)


@pytest.mark.parametrize("name", list(README))
def test_readme_figures_with_batchnorm_counted(name):
    """The README's MACs are matched when BatchNorm counts 2 multiply-adds per element (fvcore's eval rule).

    `count_macs` alone is 1.9% (508M) to 9.4% (26M) below the README; BatchNorm
    accounts for that to within 0.6% on every variant.
    """
    readme_params, readme_macs, official_params = README[name]
    params, macs, normalised = readme_convention(name)
    assert params == official_params
    assert abs(params / 1e6 - readme_params) <= 0.05  # the README rounds to 0.1M
    assert macs / 1e6 < 0.985 * readme_macs
    assert (macs + 2 * normalised) / 1e6 == pytest.approx(readme_macs, rel=0.006)
