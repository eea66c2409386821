"""ConViT: GPSA's gated mix of content and positional attention, its local initialisation, the class token's
late entry, and other input sizes."""

import logging

import flax
import jax
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.layers import attention, resample_pos_embed
from hybrid_jax.models.convit import GPSA, relative_offsets


def random_variables(module, *args, seed=0, scale=0.3, **kwargs):
    """Random params of the module's shapes; cheaper than compiling `init`."""
    shapes = flax.linen.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: (scale * rng.standard_normal(leaf.shape)).astype(np.float32), shapes)


def _softmax(logits):
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def test_offsets_are_key_minus_query():
    offsets = relative_offsets(2, 3)  # patch n = (n // 3, n % 3)
    for n in range(6):
        for m in range(6):
            dx, dy = m % 3 - n % 3, m // 3 - n // 3
            assert offsets[n, m].tolist() == [dx, dy, dx * dx + dy * dy]


def test_gpsa_output_mix_equals_the_mixed_attention_map(caplog, monkeypatch):
    """Mixing the two outputs equals timm's mixed (and renormalised) map applied to V."""
    module = GPSA(num_heads=4)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    variables = random_variables(module, x, (2, 3), train=False, scale=0.5)
    params = variables["params"]
    params["gating_param"] = np.array([-3.0, -0.5, 0.5, 3.0], np.float32)  # each head its own mix
    monkeypatch.setattr(attention, "_logged_paths", set())
    with caplog.at_level(logging.INFO, logger="hybrid_jax.layers.attention"):
        out = jax.jit(lambda v, x: module.apply(v, x, (2, 3), train=False))(variables, x)
    assert any("q(2, 6, 4, 4)" in r.message and "-> xla" in r.message for r in caplog.records), caplog.text

    x = np.asarray(x)
    qk = (x @ params["qk"]["kernel"]).reshape(2, 6, 2, 4, 4)
    v = (x @ params["v"]["kernel"]).reshape(2, 6, 4, 4)
    content = _softmax(np.einsum("bnhd,bmhd->bhnm", qk[:, :, 0], qk[:, :, 1]) / 2.0)
    pos = relative_offsets(2, 3) @ params["pos_proj"]["kernel"] + params["pos_proj"]["bias"]
    positional = _softmax(pos.transpose(2, 0, 1))[None]
    gate = 1 / (1 + np.exp(-params["gating_param"]))[None, :, None, None]
    mixed = (1 - gate) * content + gate * positional
    mixed /= mixed.sum(-1, keepdims=True)
    heads = np.einsum("bhnm,bmhd->bnhd", mixed, v).reshape(2, 6, 16)
    expected = heads @ params["proj"]["kernel"] + params["proj"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gpsa_starts_local_like_a_convolution():
    """At init each of the 9 heads of a 3x3 kernel attends most to its own neighbour, and V is the identity."""
    module = GPSA(num_heads=9, locality_strength=1.0)
    x = np.zeros((1, 25, 18), np.float32)
    params = jax.jit(lambda x: flax.linen.meta.unbox(module.init(jax.random.key(0), x, (5, 5), train=False)))(x)
    params = params["params"]
    np.testing.assert_array_equal(params["v"]["kernel"], np.eye(18))
    np.testing.assert_array_equal(params["gating_param"], np.ones(9))
    logits = relative_offsets(5, 5) @ np.asarray(params["pos_proj"]["kernel"]) + np.asarray(params["pos_proj"]["bias"])
    center = 12  # query patch (2, 2)
    for h1 in range(3):
        for h2 in range(3):
            key = int(np.argmax(logits[center, :, h1 + 3 * h2]))
            assert (key % 5 - 2, key // 5 - 2) == (h2 - 1, h1 - 1)


def test_class_token_joins_after_the_local_blocks():
    model = create_model("test_convit")
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = random_variables(model, x, train=False)
    features = jax.jit(lambda v, x: model.apply(v, x, train=False, method=model.forward_features))(variables, x)
    assert [features[f"block{i}"].shape for i in range(3)] == [(2, 16, 32), (2, 16, 32), (2, 17, 32)]
    np.testing.assert_array_equal(features["pooled"], features["tokens"][:, 0])
    with pytest.raises(ValueError, match="local_up_to_layer must lie in 1..depth-1"):
        jax.eval_shape(lambda: create_model("test_convit", local_up_to_layer=3).init(jax.random.key(0), x,
                                                                                     train=False))


def test_other_input_sizes_resample_positions_and_recompute_offsets():
    """Built at 32 px, run at 48: equal to a model built at 48 px with the position embedding resampled."""
    model, native = create_model("test_convit"), create_model("test_convit", img_size=48)
    x = jax.random.uniform(jax.random.key(2), (1, 48, 48, 3))
    variables = random_variables(model, x[:, :32, :32], train=False)
    resized = dict(variables["params"], pos_embed=resample_pos_embed(variables["params"]["pos_embed"], (6, 6),
                                                                     num_prefix_tokens=0))
    apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))
    np.testing.assert_allclose(apply(model)(variables, x), apply(native)({"params": resized}, x), atol=1e-5)
