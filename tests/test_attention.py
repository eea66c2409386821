"""The attention entry point against a naive softmax(QK^T)V reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.layers import MultiHeadAttention, attention_path, dot_product_attention
from hybrid_jax.layers.attention import ATTENTION_WEIGHTS, _even_lengths_for_cudnn, attention_weights


def naive_attention(q, k, v, bias=None, mask=None, scale=None):
    """Reference in float64 numpy: softmax(q k^T * scale + bias, masked) v."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) * (scale or q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is not None:
        logits = np.where(np.asarray(mask), logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def random_qkv(key, batch=2, q_len=7, kv_len=7, heads=3, key_dim=16, value_dim=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (batch, q_len, heads, key_dim), dtype),
            jax.random.normal(kk, (batch, kv_len, heads, key_dim), dtype),
            jax.random.normal(kv, (batch, kv_len, heads, value_dim), dtype))


@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (5, 11)], ids=["self", "cross"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_naive_reference(q_len, kv_len, with_bias, with_mask):
    key = jax.random.key(0)
    q, k, v = random_qkv(key, q_len=q_len, kv_len=kv_len)
    bias = jax.random.normal(jax.random.key(1), (1, 3, q_len, kv_len)) if with_bias else None
    mask = None
    if with_mask:
        mask = jax.random.bernoulli(jax.random.key(2), 0.7, (2, 1, q_len, kv_len))
        mask = mask.at[..., 0].set(True)  # every query keeps at least one key
    out = dot_product_attention(q, k, v, bias, mask, implementation="xla")
    np.testing.assert_allclose(out, naive_attention(q, k, v, bias, mask), atol=1e-5, rtol=1e-5)
    auto = dot_product_attention(q, k, v, bias, mask, implementation="auto")
    np.testing.assert_array_equal(auto, out)


def test_two_dimensional_bias_broadcasts_over_batch_and_heads():
    q, k, v = random_qkv(jax.random.key(3), q_len=6, kv_len=6)
    bias = jax.random.normal(jax.random.key(4), (6, 6))
    out = dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(out, naive_attention(q, k, v, bias[None, None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key_dim,value_dim", [(16, 64), (32, 8)])
def test_value_dim_differs_from_key_dim(key_dim, value_dim):
    """LeViT's values are wider than its keys; the entry point pads and slices exactly."""
    q, k, v = random_qkv(jax.random.key(5), key_dim=key_dim, value_dim=value_dim)
    bias = jax.random.normal(jax.random.key(6), (1, 3, 7, 7))
    out = dot_product_attention(q, k, v, bias)
    assert out.shape == (2, 7, 3, value_dim)
    np.testing.assert_allclose(out, naive_attention(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_custom_scale():
    q, k, v = random_qkv(jax.random.key(7))
    out = dot_product_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(out, naive_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_cudnn_on_cpu_is_a_clear_error_and_auto_falls_back():
    q, k, v = random_qkv(jax.random.key(8), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*implementation='auto'"):
        dot_product_attention(q, k, v, implementation="cudnn")
    backend, reason = attention_path(q, k, v, implementation="auto")
    assert backend == "xla" and "fell back" in reason and "NVIDIA GPU" in reason
    with pytest.raises(ValueError, match="unknown attention implementation"):
        dot_product_attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("q_len,kv_len,with_bias,with_mask", [(49, 49, True, False), (197, 197, False, False),
                                                             (7, 12, True, True)], ids=["levit", "vit", "cross"])
def test_odd_lengths_padded_for_cudnn_leave_result_and_gradients_unchanged(q_len, kv_len, with_bias, with_mask):
    """The padding cuDNN gets for odd lengths, run through XLA here: same output and gradients as unpadded."""
    q, k, v = random_qkv(jax.random.key(24), q_len=q_len, kv_len=kv_len, key_dim=8, value_dim=8)
    bias = jax.random.normal(jax.random.key(25), (1, 3, q_len, kv_len)) if with_bias else None
    mask = (jax.random.bernoulli(jax.random.key(26), 0.7, (2, 1, q_len, kv_len)).at[..., 0].set(True)
            if with_mask else None)

    def padded(q, k, v):
        (q, k, v, b, m), lengths = _even_lengths_for_cudnn(q, k, v, bias, mask)
        assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
        return jax.nn.dot_product_attention(q, k, v, bias=b, mask=m, implementation="xla", **lengths)[:, :q_len]

    np.testing.assert_allclose(padded(q, k, v), naive_attention(q, k, v, bias, mask), atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    ours = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, bias, mask)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_within_bf16_tolerance():
    q, k, v = random_qkv(jax.random.key(9), q_len=33, kv_len=33, key_dim=64, value_dim=64)
    out = dot_product_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref = naive_attention(q, k, v)
    rel = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 1e-2


def test_multi_head_attention_module_matches_reference():
    """Self- and cross-attention modules equal projections + naive attention + output projection."""
    x = jax.random.normal(jax.random.key(10), (2, 9, 24))
    context = jax.random.normal(jax.random.key(11), (2, 4, 24))
    module = MultiHeadAttention(num_heads=4)
    proj = lambda params, t: (t @ params["kernel"] + params["bias"]).reshape(*t.shape[:-1], 4, 6)
    for ctx in (None, context):
        params = nn.meta.unbox(module.init(jax.random.key(12), x, ctx))["params"]
        src = x if ctx is None else ctx
        ref = naive_attention(proj(params["query"], x), proj(params["key"], src), proj(params["value"], src))
        ref = ref.reshape(2, 9, 24)
        ref = ref @ np.asarray(params["out"]["kernel"], np.float64) + np.asarray(params["out"]["bias"])
        np.testing.assert_allclose(module.apply({"params": params}, x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_gradients_match_reference():
    q, k, v = random_qkv(jax.random.key(13), q_len=5, kv_len=5, key_dim=8, value_dim=8)
    bias = jax.random.normal(jax.random.key(14), (1, 3, 5, 5))

    def einsum_attention(q, k, v):
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) * 8 ** -0.5 + bias
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    ours = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, bias)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(einsum_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# The interpretability path: probabilities sown only when asked
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("key_dim,value_dim,with_bias,with_mask", [(16, 16, False, False), (16, 64, True, True)])
def test_attention_weights_reproduce_the_entry_point(key_dim, value_dim, with_bias, with_mask):
    """weights @ v is the entry point's output, for plain, biased, masked and LeViT-shaped attention."""
    q, k, v = random_qkv(jax.random.key(15), q_len=5, kv_len=6, key_dim=key_dim, value_dim=value_dim)
    bias = jax.random.normal(jax.random.key(16), (3, 5, 6)) if with_bias else None
    mask = jax.random.bernoulli(jax.random.key(17), 0.6, (2, 1, 5, 6)).at[..., 0].set(True) if with_mask else None
    weights = attention_weights(q, k, bias, mask, scale=0.2)
    assert weights.shape == (2, 3, 5, 6) and weights.dtype == jnp.float32
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    if with_mask:
        assert not np.any(np.asarray(weights)[~np.broadcast_to(np.asarray(mask), weights.shape)])
    out = dot_product_attention(q, k, v, bias, mask, scale=0.2)
    np.testing.assert_allclose(jnp.einsum("bnts,bsnh->btnh", weights, v), out, atol=1e-5, rtol=1e-5)


def test_weights_are_sown_only_when_the_collection_is_mutable():
    x = jax.random.normal(jax.random.key(18), (2, 9, 24))
    module = MultiHeadAttention(num_heads=4)
    variables = module.init(jax.random.key(19), x)
    assert ATTENTION_WEIGHTS not in variables  # init makes every collection mutable, and still sows nothing
    out, state = module.apply(variables, x, mutable=[ATTENTION_WEIGHTS])
    (weights,) = state[ATTENTION_WEIGHTS]["weights"]
    assert weights.shape == (2, 4, 9, 9)
    np.testing.assert_array_equal(out, module.apply(variables, x))
    # The default path traces no second softmax: the sown one adds exactly one more exp.
    count_exp = lambda **kw: str(jax.make_jaxpr(lambda v: module.apply(v, x, **kw))(variables)).count(" exp ")
    assert count_exp(mutable=[ATTENTION_WEIGHTS]) == count_exp() + 1


# --------------------------------------------------------------------------- #
# cuDNN flash attention, on an NVIDIA GPU only: JAX_PLATFORMS=cuda pytest -m gpu tests/test_attention.py
# --------------------------------------------------------------------------- #


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,kv_len,key_dim,value_dim,with_bias,with_mask", [
    (197, 197, 64, 64, False, False),  # ViT-B/16: odd length
    (64, 64, 32, 32, True, False),  # a relative-position bias (CoAtNet, MaxViT)
    (64, 128, 64, 64, False, True),  # cross-attention with a mask
    (49, 49, 16, 64, True, False),  # LeViT: values wider than keys, odd length with a bias
    (63, 127, 32, 32, True, True),  # odd lengths, bias and mask
    (50, 50, 256, 256, False, False),  # Hopper's widest head
], ids=["vit", "bias", "cross-mask", "levit", "odd-bias-mask", "head256"])
def test_cudnn_matches_a_float32_reference_forward_and_backward(q_len, kv_len, key_dim, value_dim, with_bias,
                                                                 with_mask):
    """cuDNN in bf16 against the entry point's XLA path on the same values in float32 at full precision."""
    q, k, v = random_qkv(jax.random.key(20), batch=4, q_len=q_len, kv_len=kv_len, heads=4, key_dim=key_dim,
                         value_dim=value_dim)
    bias = jax.random.normal(jax.random.key(21), (1, 4, q_len, kv_len)) if with_bias else None
    mask = (jax.random.bernoulli(jax.random.key(22), 0.7, (4, 1, q_len, kv_len)).at[..., 0].set(True)
            if with_mask else None)
    q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))  # both paths see the same rounded inputs
    assert attention_path(q, k, v, has_bias_or_mask=with_bias or with_mask)[0] == "cudnn"
    cotangent = jax.random.normal(jax.random.key(23), (4, q_len, 4, value_dim))

    def forward_and_grads(impl, dtype, q, k, v, bias, mask, cotangent):  # arrays as arguments: no constant folding
        attend = lambda q, k, v: dot_product_attention(q, k, v, bias, mask, implementation=impl)
        out, pullback = jax.vjp(attend, *(t.astype(dtype) for t in (q, k, v)))
        return out, pullback(cotangent.astype(dtype))

    step = jax.jit(forward_and_grads, static_argnums=(0, 1))
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = step("xla", jnp.float32, q, k, v, bias, mask, cotangent)
    out, grads = step("cudnn", jnp.bfloat16, q, k, v, bias, mask, cotangent)
    assert out.dtype == jnp.bfloat16 and out.shape == ref_out.shape
    assert _relative_error(out, ref_out) < 1e-2
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert _relative_error(grad, ref) < 2e-2, name
