"""Shared layers against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.analysis.flops import count_macs
from hybrid_jax.layers import (
    Conv2d,
    ConvNormAct,
    DropPath,
    InvertedResidual,
    LayerScale,
    Mlp,
    PatchEmbed,
    SqueezeExcite,
    resample_pos_embed,
    torch_padding,
)
from hybrid_jax.layers.broadcast import add_shared, sum_leading_axis
from hybrid_jax.layers.conv import grouped_conv_by_shifts
from hybrid_jax.layers.dense import Dense, flat_dot_general


def init_apply(module, *args, **kwargs):
    variables = nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs))
    return variables, module.apply(variables, *args, **kwargs)


def test_drop_path_is_identity_in_eval():
    x = jax.random.normal(jax.random.key(0), (16, 5, 8))
    out = DropPath(0.5).apply({}, x, train=False)
    np.testing.assert_array_equal(out, x)


def test_drop_path_preserves_expectation_in_train():
    rate, n = 0.3, 20000
    x = jnp.ones((n, 4))
    out = DropPath(rate).apply({}, x, train=True, rngs={"dropout": jax.random.key(1)})
    dropped = np.mean(np.all(np.asarray(out) == 0, axis=1))
    # Bernoulli(0.3) over 20000 rows: standard error 0.0032, so 4 sigma is 0.013.
    assert abs(dropped - rate) < 0.013
    assert abs(float(out.mean()) - 1.0) < 0.02
    kept = np.asarray(out)[np.asarray(out)[:, 0] != 0]
    np.testing.assert_allclose(kept, 1.0 / (1.0 - rate), rtol=1e-6)


def test_layer_scale_starts_at_init_value():
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    _, out = init_apply(LayerScale(0.1), x)
    np.testing.assert_allclose(out, 0.1 * x, rtol=1e-6)


def test_mlp_matches_manual_computation():
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    variables, out = init_apply(Mlp(hidden_features=32), x, train=False)
    p = variables["params"]
    hidden = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    np.testing.assert_allclose(out, hidden @ p["fc2"]["kernel"] + p["fc2"]["bias"], atol=1e-5)


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (7, 2), (1, 2)])
def test_conv_uses_pytorch_symmetric_padding(kernel_size, strides):
    x = jax.random.normal(jax.random.key(4), (1, 15, 15, 3))
    variables, out = init_apply(Conv2d(4, kernel_size, strides), x)
    pad = torch_padding(kernel_size, strides)
    ref = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))),
                                       variables["params"]["kernel"], (strides, strides), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def grouped_conv(x, kernel, strides, padding, dilation=1, groups=None):
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides), padding, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups or x.shape[-1])


@pytest.mark.parametrize("kernel_size,strides,padding,dilation,groups,features", [
    (3, 1, ((1, 1), (1, 1)), 1, 6, 6), (3, 2, ((1, 1), (1, 1)), 1, 6, 6), (7, 1, ((3, 3), (3, 3)), 1, 6, 6),
    (5, 2, "SAME", 1, 6, 6), (3, 2, "SAME", 1, 6, 6), (3, 1, "VALID", 1, 6, 6), (3, 1, ((2, 2), (2, 2)), 2, 6, 6),
    (3, 2, ((0, 1), (1, 0)), 1, 6, 6),
    (3, 2, ((1, 1), (1, 1)), 1, 6, 18),  # depthwise with a channel multiplier (Mobile-Former's expansions)
    (1, 1, ((0, 0), (0, 0)), 1, 3, 9),  # grouped pointwise (Mobile-Former-26M)
    (3, 1, "SAME", 1, 2, 4)])  # any grouping
def test_grouped_conv_by_shifts_equals_the_grouped_convolution(kernel_size, strides, padding, dilation, groups,
                                                                 features):
    """Values and both gradients, on an odd-sized map so strides leave a remainder."""
    x = jax.random.normal(jax.random.key(6), (2, 11, 13, 6))
    kernel = jax.random.normal(jax.random.key(7), (kernel_size, kernel_size, 6 // groups, features))
    conv = lambda conv: lambda x, kernel: conv(x, kernel, strides, padding, dilation, groups)
    np.testing.assert_allclose(conv(grouped_conv_by_shifts)(x, kernel), conv(grouped_conv)(x, kernel), atol=1e-4)
    loss = lambda conv: lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, strides, padding, dilation, groups)))
    ours = jax.grad(loss(grouped_conv_by_shifts), argnums=(0, 1))(x, kernel)
    reference = jax.grad(loss(grouped_conv), argnums=(0, 1))(x, kernel)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("groups,features", [(6, 6), (6, 12), (3, 6)])
def test_grouped_conv2d_on_cpu_takes_the_shifted_sum_and_counts_as_the_convolution(groups, features):
    x = jax.random.normal(jax.random.key(8), (1, 9, 9, 6))
    conv, dense = Conv2d(features, 3, 2, groups=groups), Conv2d(features, 3, 2)
    variables, out = init_apply(conv, x)
    np.testing.assert_allclose(out, grouped_conv(x, variables["params"]["kernel"], 2, [(1, 1), (1, 1)], groups=groups),
                               atol=1e-5)
    primitives = lambda module, variables: str(jax.make_jaxpr(lambda x: module.apply(variables, x))(x))
    assert "conv_general_dilated" not in primitives(conv, variables)
    assert "conv_general_dilated" in primitives(dense, init_apply(dense, x)[0])
    assert count_macs(conv.apply, variables, x) == out.size * 3 * 3 * (6 // groups)  # as the convolution it is


def test_weight_standardized_conv_ignores_kernel_offset_and_scale():
    """A StdConv's output does not change when each filter is shifted and rescaled."""
    x = jax.random.normal(jax.random.key(5), (1, 8, 8, 3))
    conv = Conv2d(4, 3, weight_standardize=True, padding="SAME")
    variables, out = init_apply(conv, x)
    kernel = variables["params"]["kernel"]
    shifted = {"params": {"kernel": kernel * 3.0 + 0.7}}
    np.testing.assert_allclose(conv.apply(shifted, x), out, atol=1e-4)
    standardized = (kernel - kernel.mean((0, 1, 2))) / jnp.sqrt(kernel.var((0, 1, 2)) + 1e-8)
    ref = Conv2d(4, 3, padding="SAME").apply({"params": {"kernel": standardized}}, x)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_conv_norm_act_batch_stats_update_only_in_train():
    x = jax.random.normal(jax.random.key(6), (4, 6, 6, 3)) * 3 + 2
    module = ConvNormAct(5, 3)
    variables = nn.meta.unbox(module.init(jax.random.key(0), x, train=False))
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    assert float(out.min()) >= 0.0  # ReLU
    conv = Conv2d(5, 3).apply({"params": variables["params"]["conv"]}, x)
    np.testing.assert_allclose(updates["batch_stats"]["norm"]["mean"], 0.1 * conv.mean((0, 1, 2)), atol=1e-5)
    eval_out = module.apply(variables, x, train=False)
    np.testing.assert_allclose(eval_out, jax.nn.relu(conv / jnp.sqrt(1 + 1e-5)), atol=1e-4)


def test_squeeze_excite_gates_channels_between_zero_and_one():
    x = jax.random.normal(jax.random.key(7), (2, 4, 4, 8))
    _, out = init_apply(SqueezeExcite(2), x)
    ratio = np.asarray(out / x)
    assert np.all((ratio > 0) & (ratio < 1))
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :].repeat(4, 1).repeat(4, 2), rtol=1e-4)


def test_inverted_residual_adds_shortcut_only_when_shapes_match():
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 16))
    block = InvertedResidual(16, expand_ratio=4, se_ratio=0.25)
    variables = nn.meta.unbox(block.init(jax.random.key(0), x, train=False))
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if "conv_pwl" in jax.tree_util.keystr(path) else p, variables)
    np.testing.assert_allclose(block.apply(zeroed, x, train=False), x, atol=1e-6)
    strided = InvertedResidual(24, strides=2)
    _, out = init_apply(strided, x, train=False)
    assert out.shape == (2, 4, 4, 24)


def test_patch_embed_rejects_sizes_not_divisible_by_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        PatchEmbed(16, 8).init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))


def test_resample_pos_embed_keeps_prefix_and_constants():
    prefix = jnp.full((1, 1, 4), 7.0)
    grid = jnp.full((1, 16, 4), 0.5)
    out = resample_pos_embed(jnp.concatenate([prefix, grid], axis=1), (6, 6))
    assert out.shape == (1, 1 + 36, 4)
    np.testing.assert_allclose(out[:, 0], 7.0)
    np.testing.assert_allclose(out[:, 1:], 0.5, atol=1e-6)
    same = jax.random.normal(jax.random.key(9), (1, 17, 4))
    np.testing.assert_array_equal(resample_pos_embed(same, (4, 4)), same)


def test_resample_pos_embed_follows_a_smooth_ramp():
    """Away from the border (where bicubic stencils are cut), an upsampled linear ramp stays a ramp."""
    side, new = 8, 16
    centers = lambda n: (np.arange(n) + 0.5) / n
    ramp = np.add.outer(centers(side), centers(side)).reshape(1, side * side, 1)
    out = resample_pos_embed(jnp.concatenate([jnp.zeros((1, 1, 1)), jnp.asarray(ramp)], 1), (new, new))
    out = np.asarray(out)[0, 1:, 0].reshape(new, new)
    expected = np.add.outer(centers(new), centers(new))
    np.testing.assert_allclose(out[4:-4, 4:-4], expected[4:-4, 4:-4], atol=1e-3)


@pytest.mark.parametrize("strides,padding,size", [(1, None, 9), (2, None, 9), (2, "SAME", 10), (1, "VALID", 7)])
def test_pointwise_conv2d_is_the_convolution_as_a_matrix_product(strides, padding, size):
    """A 1x1 Conv2d takes the matrix product (no convolution traced), with the convolution's values and gradients."""
    x = jax.random.normal(jax.random.key(9), (2, size, size, 5))
    conv = Conv2d(7, 1, strides, padding=padding, use_bias=True)
    variables, out = init_apply(conv, x)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x: conv.apply(variables, x))(x))
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    reference = lambda x, kernel: bias + jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), padding or "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(out, reference(x, kernel), atol=1e-5)
    loss = lambda f: lambda x, kernel: jnp.sum(jnp.sin(f(x, kernel)))
    ours = jax.grad(loss(lambda x, k: conv.apply({"params": {"kernel": k, "bias": bias}}, x)), argnums=(0, 1))
    for got, want in zip(ours(x, kernel), jax.grad(loss(reference), argnums=(0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_dense_flattens_leading_axes_with_the_results_and_names_of_nn_dense():
    x = jax.random.normal(jax.random.key(10), (2, 3, 4, 5))
    variables, out = init_apply(Dense(6, name="fc"), x)
    np.testing.assert_allclose(out, nn.Dense(6, name="fc").apply(variables, x), atol=1e-6)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (5, 6), "bias": (6,)}}
    loss = lambda module: lambda params: jnp.sum(jnp.sin(module.apply({"params": params}, x)))
    ours, reference = (jax.grad(loss(module))(variables["params"]) for module in (Dense(6), nn.Dense(6)))
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    product = flat_dot_general(x, jnp.ones((5, 2, 3)), (((3,), (0,)), ((), ())))  # not a dense layer's: as given
    np.testing.assert_allclose(product, jnp.einsum("abcd,def->abcef", x, jnp.ones((5, 2, 3))), atol=1e-5)


@pytest.mark.parametrize("batch,shared_shape", [(8, (1, 3, 4)), (7, (1, 1, 4)), (5, (3, 4)), (1, (1, 3, 4))])
def test_add_shared_is_the_broadcast_add_in_value_and_gradients(batch, shared_shape):
    """Odd batches take the halving sum's leftover row; axes of length 1 other than the batch are summed too."""
    x = jax.random.normal(jax.random.key(11), (batch, 3, 4))
    shared = jax.random.normal(jax.random.key(12), shared_shape)
    np.testing.assert_allclose(add_shared(x, shared), x + shared, atol=1e-6)
    loss = lambda add: lambda x, shared: jnp.sum(jnp.sin(add(x, shared)) * jnp.arange(x.size).reshape(x.shape))
    ours = jax.grad(loss(add_shared), argnums=(0, 1))(x, shared)
    reference = jax.grad(loss(jnp.add), argnums=(0, 1))(x, shared)
    for got, want in zip(ours, reference):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_sum_leading_axis_of_every_length():
    for rows in range(1, 10):
        x = jax.random.normal(jax.random.key(rows), (rows, 2, 3))
        np.testing.assert_allclose(sum_leading_axis(x), x.sum(0, keepdims=True), atol=1e-5)
