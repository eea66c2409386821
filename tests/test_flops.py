"""The multiply-add counter against counts worked out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from hybrid_jax.analysis.flops import count_macs, count_params, measure, xla_flops
from hybrid_jax.layers import Conv2d, dot_product_attention


def test_dense_and_batched_matmul_macs():
    a, b = jnp.ones((4, 5, 6)), jnp.ones((4, 6, 7))
    assert count_macs(lambda a, b: a @ b, a, b) == 4 * 5 * 6 * 7
    assert xla_flops(lambda a, b: a @ b, a, b) == pytest.approx(2 * 4 * 5 * 6 * 7, rel=0.01)


def test_conv_macs_count_the_full_kernel_including_padding_taps():
    conv = Conv2d(8, 3, strides=2, groups=2)
    x = jnp.ones((1, 10, 10, 4))
    params = conv.init(jax.random.key(0), x)
    # 5x5 outputs x 8 channels, each a 3x3 kernel over 4 / 2 input channels.
    assert count_macs(lambda p, x: conv.apply(p, x), params, x) == 5 * 5 * 8 * 3 * 3 * 2


def test_attention_and_nested_jit_are_counted():
    q = jnp.ones((2, 10, 3, 8))
    attention = jax.jit(lambda q: dot_product_attention(q, q, q, implementation="xla"))
    # QK^T and AV: 2 products of 2 x 3 heads x 10 x 10 x 8.
    assert count_macs(attention, q) == 2 * (2 * 3 * 10 * 10 * 8)


def test_scan_bodies_count_once_per_iteration():
    w = jnp.ones((16, 16))
    def loop(x):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]
    assert count_macs(loop, jnp.ones((2, 16))) == 5 * 2 * 16 * 16


class TinyMlp(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.relu(nn.Dense(10)(x.reshape(x.shape[0], -1)))
        return nn.Dense(3)(x)


def test_measure_counts_a_small_mlp_exactly():
    result = measure(TinyMlp(), input_size=4, channels=2)
    assert result.params == (32 * 10 + 10) + (10 * 3 + 3)
    assert result.gmacs * 1e9 == pytest.approx(32 * 10 + 10 * 3)
    assert count_params({"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}}) == 10
