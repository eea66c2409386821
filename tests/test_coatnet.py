"""CoAtNet: relative attention over the whole map, its tables at other resolutions, the stage layout and the head."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.analysis.flops import count_macs
from hybrid_jax.layers import attention
from hybrid_jax.layers.relpos import from_flat_table, lookup_bias, resize_table
from hybrid_jax.models.maxxvit import BlockConfig, TransformerBlock, make_divisible, stage_sizes
from test_maxvit import random_variables


def test_flat_table_lookup_matches_the_swin_index():
    """timm's RelPosBias: flat index (dy + h - 1) * (2w - 1) + (dx + w - 1) of query - key, on a 3 x 4 window."""
    heads, h, w = 2, 3, 4
    flat = np.random.default_rng(0).standard_normal(((2 * h - 1) * (2 * w - 1), heads))
    ys, xs = np.divmod(np.arange(h * w), w)
    index = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
    np.testing.assert_allclose(lookup_bias(jnp.asarray(from_flat_table(flat, h, w)), h, w),
                               flat[index].transpose(2, 0, 1), atol=1e-6)


def test_tables_resample_to_other_windows_and_stay_put_at_their_own():
    table = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7, 7)))
    assert resize_table(table, 4, 4) is table
    constant = jnp.broadcast_to(jnp.asarray([1.0, -2.0, 0.5])[:, None, None], (3, 7, 7))
    np.testing.assert_allclose(lookup_bias(constant, 8, 8), np.broadcast_to([[[1.0]], [[-2.0]], [[0.5]]],
                                                                            (3, 64, 64)), atol=1e-5)


def _with_tables(variables, fill):
    flat = flax.traverse_util.flatten_dict(variables)
    return flax.traverse_util.unflatten_dict(
        {path: fill(value) if path[-1] == "relative_position_bias_table" else value for path, value in flat.items()})


def test_a_model_runs_at_another_resolution_through_resampled_tables():
    """Built for 32 px (a 4 x 4 transformer stage), run at 64 px (8 x 8). A per-head constant table, resampled,
    is still a constant per head, which softmax ignores: the logits equal those with no bias at all."""
    model = create_model("test_coatnet")
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    variables = random_variables(model, x[:, :32, :32], train=False)
    run = jax.jit(lambda v, x: model.apply(v, x, train=False))
    heads = jnp.arange(1.0, 5.0)[:, None, None]
    zero = run(_with_tables(variables, jnp.zeros_like), x)
    constant = run(_with_tables(variables, lambda t: jnp.broadcast_to(heads, t.shape)), x)
    random = run(variables, x)
    assert zero.shape == (2, 10) and np.all(np.isfinite(random))
    np.testing.assert_allclose(constant, zero, atol=1e-5)
    assert not np.allclose(random, zero, atol=1e-3)


def test_transformer_block_attends_over_the_whole_map_and_counts_its_products():
    """A stride-1 T block on a 4 x 4 map: every token reaches every other; MACs = dense layers + 16 x 16 products."""
    block = TransformerBlock(8, 1, (4, 4), BlockConfig(head_dim=4))
    x = jax.random.normal(jax.random.key(2), (1, 4, 4, 8))
    variables = random_variables(block, x, train=False)
    run = jax.jit(lambda x: block.apply(variables, x, train=False))
    nudge = jnp.arange(8.0) / 8  # not constant over channels, which LayerNorm would remove
    assert np.all(np.abs(np.asarray(run(x.at[0, 3, 3].add(nudge)) - run(x))).max(-1) > 1e-4)
    macs = count_macs(lambda v, x: block.apply(v, x, train=False), variables, x)
    assert macs == 16 * (4 * 8 * 8 + 2 * 8 * 32) + 2 * (16 * 16 * 8)


def test_the_first_transformer_block_of_a_stage_pools_and_widens():
    """Stride 2: a 2x2 average pool after the norm and on the shortcut, which a biased 1x1 conv widens 8 -> 16;
    attention is as wide as the output (paper) or the input (timm's rw variants)."""
    x = jnp.zeros((1, 8, 8, 8))
    for expand_first, heads in ((True, 4), (False, 2)):
        block = TransformerBlock(16, 2, (4, 4), BlockConfig(head_dim=4, expand_first=expand_first))
        out, variables = jax.eval_shape(functools.partial(block.init_with_output, jax.random.key(0), train=False), x)
        params = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(variables["params"]), sep="/")
        assert out.shape == (1, 4, 4, 16)
        assert params["shortcut/expand/kernel"].shape == (1, 1, 8, 16)
        assert params["rel_pos/relative_position_bias_table"].shape == (heads, 7, 7)
        assert params["attn/query/kernel"].shape == (8, 4 * heads)


def test_stage_layout_of_coatnet_0():
    """Stem to 112 px, then 56 / 28 / 14 / 7 with widths 96 / 192 / 384 / 768, tables over the 14 and 7 px maps."""
    model = create_model("coatnet_0_224")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    features, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, method=model.forward_features), x)
    assert {k: v.shape for k, v in features.items()} == {
        "stem": (1, 112, 112, 64), "stage1": (1, 56, 56, 96), "stage2": (1, 28, 28, 192),
        "stage3": (1, 14, 14, 384), "stage4": (1, 7, 7, 768), "pooled": (1, 768)}
    params = flax.linen.meta.unbox(variables["params"])
    assert params["stages_2"]["blocks_0"]["rel_pos"]["relative_position_bias_table"].shape == (12, 27, 27)
    assert params["stages_3"]["blocks_1"]["rel_pos"]["relative_position_bias_table"].shape == (24, 13, 13)
    assert stage_sizes(224) == [56, 28, 14, 7] and stage_sizes(225) == [57, 29, 15, 8]
    assert [make_divisible(v) for v in (384, 100, 12)] == [384, 104, 16]


def test_transformer_attention_goes_through_the_entry_point_with_the_whole_map_bias(monkeypatch):
    model = create_model("test_coatnet")
    x = jnp.zeros((2, 32, 32, 3))
    variables = random_variables(model, x, train=False)
    calls = []
    original = attention.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, **kwargs):
        calls.append((q.shape, None if bias is None else bias.shape))
        return original(q, k, v, bias, mask, **kwargs)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert calls == [((2, 16, 4, 8), (4, 16, 16))]  # one T block on a 4 x 4 map, 32 channels in heads of 8


def test_pooled_features_are_the_mean_of_the_normed_map():
    """The plain head (timm's rw variants) norms every position, then pools."""
    model = create_model("test_coatnet", num_classes=0)
    x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = random_variables(model, x, train=False)
    features, pooled = jax.jit(lambda v, x: (model.apply(v, x, train=False, method=model.forward_features),
                                             model.apply(v, x, train=False)))(variables, x)
    np.testing.assert_array_equal(pooled, features["pooled"])
    last = np.asarray(features["stage2"], np.float64)
    normed = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6)
    p = variables["params"]["norm"]
    np.testing.assert_allclose(pooled, (normed * p["scale"] + p["bias"]).mean(axis=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("stride_mode", ["dw", "pool"])
def test_train_mode_updates_every_batch_norm_of_both_stride_modes(stride_mode):
    model = create_model("test_coatnet", stride_mode=stride_mode, pre_norm_act=stride_mode == "pool")
    x = jax.random.uniform(jax.random.key(4), (4, 32, 32, 3))
    variables = random_variables(model, x, train=False)
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    old = flax.traverse_util.flatten_dict(variables["batch_stats"])
    new = flax.traverse_util.flatten_dict(updates["batch_stats"])
    assert len(old) == 2 * (1 + 3)  # stem + the MBConv's pre-norm, norm1, norm2: a mean and a variance each
    assert all(not np.allclose(old[k], new[k]) for k in old) and np.all(np.isfinite(logits))
