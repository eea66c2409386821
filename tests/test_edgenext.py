"""EdgeNeXt: transposed attention against numpy and through the entry point, the Fourier encoding, channel splits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import hybrid_jax.models.edgenext as edgenext
from hybrid_jax import create_model
from hybrid_jax.models.edgenext import SDTAEncoder, fourier_position_encoding


def random_variables(init, seed=0):
    """Random weights at a variance-preserving scale, norm scales near 1, temperatures in [0.5, 4]."""
    shapes = nn.meta.unbox(jax.eval_shape(init))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "temperature" in name:
            return jnp.asarray(rng.uniform(0.5, 4.0, leaf.shape), leaf.dtype)
        if "gamma" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        noise = rng.standard_normal(leaf.shape) * (fan_in ** -0.5 if leaf.ndim > 1 else 0.2)
        return jnp.asarray(noise + 1.0 if "scale" in name else noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def naive_xca(x, params, num_heads):
    """XCiT's cross-covariance attention in numpy: per head a channel-by-channel softmax map applied to v."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, n, c = x.shape
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, n, 3, num_heads, c // num_heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 3, 1) for i in range(3))  # [B, heads, C/h, N]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    logits = q @ k.transpose(0, 1, 3, 2) * p["temperature"][:, None, None]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v  # [B, heads, C/h, N]
    return out.transpose(0, 3, 1, 2).reshape(b, n, c) @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_transposed_attention_runs_through_the_entry_point_over_channels(monkeypatch):
    """Channels are the sequence (C / heads per head), pixels the feature axis; the temperature is folded into q."""
    calls = []
    original = edgenext.dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape, k.shape, v.shape, kwargs["scale"]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(edgenext, "dot_product_attention", spy)
    model = create_model("test_edgenext")
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    # Stages 2-4 at strides 8, 16, 32 (8x8, 4x4, 2x2 maps), 22 channels in two heads of 11.
    assert calls == [((1, 11, 2, 64),) * 3 + (1.0,), ((1, 11, 2, 16),) * 3 + (1.0,), ((1, 11, 2, 4),) * 3 + (1.0,)]


def test_fourier_position_encoding_values():
    """(sin, cos) of (row + 1) / H * 2 pi over a geometric ladder of wavelengths; then the same for columns."""
    pos = fourier_position_encoding(3, 4, hidden_dim=4, temperature=100.0)
    assert pos.shape == (3, 4, 8)
    y = 2 * np.pi * (np.arange(3) + 1) / (3 + 1e-6)
    x = 2 * np.pi * (np.arange(4) + 1) / (4 + 1e-6)
    # Channel pairs (0, 1) and (2, 3) use wavelengths 100^0 and 100^(2/4) = 10.
    expected_y = np.stack([np.sin(y), np.cos(y), np.sin(y / 10), np.cos(y / 10)], -1)
    expected_x = np.stack([np.sin(x), np.cos(x), np.sin(x / 10), np.cos(x / 10)], -1)
    np.testing.assert_allclose(pos[:, 0, :4], expected_y, atol=1e-6)
    np.testing.assert_allclose(pos[0, :, 4:], expected_x, atol=1e-6)
    np.testing.assert_array_equal(pos[:, 1, :4], pos[:, 2, :4])  # y features are constant along a row


def depthwise3x3(x, conv):
    """Depthwise 3x3 conv with padding 1 and bias, NHWC, in numpy."""
    b, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(padded[:, i:i + h, j:j + w] * conv["kernel"][i, j, 0] for i in range(3) for j in range(3))
    return out + conv["bias"]


def naive_sdta(x, params, num_heads, points):
    """The SDTA encoder in numpy: Res2Net-style depthwise convs over channel groups, position features, XCA, MLP."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    norm = lambda t, n: (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6) * n["scale"] + n[
        "bias"]
    groups = np.split(x, points, axis=-1)
    outputs, y = [], groups[0]
    for i in range(len(groups) - 1):
        y = depthwise3x3(y if i == 0 else y + groups[i], p[f"convs_{i}"])
        outputs.append(y)
    y = np.concatenate(outputs + [groups[-1]], axis=-1)
    y = y + fourier_position_encoding(h, w) @ p["pos_embd"]["kernel"][0, 0] + p["pos_embd"]["bias"]
    tokens = y.reshape(b, h * w, c)
    tokens = tokens + p["gamma_xca"] * naive_xca(norm(tokens, p["norm_xca"]), p["xca"], num_heads)
    hidden = norm(tokens, p["norm"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))
    out = hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    return x + (p["gamma"] * out).reshape(b, h, w, c)


def test_channel_groups_chunk_like_torch():
    """torch.chunk's rule: groups of ceil(C / s) channels, the last one smaller; impossible splits are refused."""
    assert edgenext._chunks(88, 3) == [30, 60] and edgenext._chunks(168, 4) == [42, 84, 126]
    with pytest.raises(ValueError, match="cannot be chunked"):
        edgenext._chunks(6, 4)


def test_sdta_encoder_matches_numpy():
    """22 channels in groups of 8, 8, 6 (the last skips the convs), position features, XCA, MLP, both residuals."""
    block = SDTAEncoder(num_heads=2, scales=3, use_pos_emb=True)
    x = jax.random.normal(jax.random.key(2), (2, 4, 5, 22))
    variables = random_variables(lambda: block.init(jax.random.key(0), x, train=False))
    params = variables["params"]
    assert [params[f"convs_{i}"]["kernel"].shape for i in (0, 1)] == [(3, 3, 1, 8)] * 2
    ours = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(ours, naive_sdta(x, params, 2, [8, 16]), atol=1e-4)
