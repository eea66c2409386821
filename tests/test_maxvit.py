"""MaxViT: window / grid partitions and their locality, the bias tables, the attention entry point, the head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.analysis.flops import count_macs
from hybrid_jax.layers import attention
from hybrid_jax.layers.relpos import RelPosBias, from_key_minus_query_table, lookup_bias
from hybrid_jax.models.maxxvit import (
    BlockConfig,
    PartitionAttention,
    grid_merge,
    grid_partition,
    window_merge,
    window_partition,
)


def random_variables(module, *args, seed=0, **kwargs):
    """Random weights (norm scales near 1, variances in [0.5, 2]) from shapes alone: no initialiser is compiled."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        noise = 0.3 * rng.standard_normal(leaf.shape)
        return jnp.asarray(noise + 1.0 if "scale" in name else noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _positions(h=4, w=6):
    """A [1, h, w, 2] map whose channels are each position's (row, column)."""
    return jnp.asarray(np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)[None], jnp.float32)


def test_window_partition_groups_contiguous_blocks():
    windows = np.asarray(window_partition(_positions(), (2, 3)))  # 2 x 2 windows of 2 x 3
    assert windows.shape == (4, 6, 2)
    np.testing.assert_array_equal(windows[0], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    np.testing.assert_array_equal(windows[3], [[2, 3], [2, 4], [2, 5], [3, 3], [3, 4], [3, 5]])


def test_grid_partition_groups_tokens_spaced_across_the_whole_map():
    groups = np.asarray(grid_partition(_positions(), (2, 3)))  # 2 x 3 tokens, 2 rows and 2 columns apart
    assert groups.shape == (4, 6, 2)
    np.testing.assert_array_equal(groups[0], [[0, 0], [0, 2], [0, 4], [2, 0], [2, 2], [2, 4]])
    np.testing.assert_array_equal(groups[3], [[1, 1], [1, 3], [1, 5], [3, 1], [3, 3], [3, 5]])


@pytest.mark.parametrize("split,merge", [(window_partition, window_merge), (grid_partition, grid_merge)])
def test_merge_inverts_partition(split, merge):
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    np.testing.assert_array_equal(merge(split(x, (3, 2)), (3, 2), x.shape), x)


def test_tf_table_lookup_matches_the_official_one_hot_reindexing():
    """The TensorFlow port indexes its table by key - query through two one-hot einsums (maxvit attention_utils)."""
    heads, h, w = 3, 3, 4
    tf_table = np.random.default_rng(0).standard_normal((heads, 2 * h - 1, 2 * w - 1))
    one_hot = lambda n: np.eye(2 * n - 1)[np.arange(n)[None, :] - np.arange(n)[:, None] + n - 1]  # [q, k, v]
    tf_bias = np.einsum("nhw,ixh,jyw->nijxy", tf_table, one_hot(h), one_hot(w)).reshape(heads, h * w, h * w)
    ours = lookup_bias(jnp.asarray(from_key_minus_query_table(tf_table)), h, w)
    np.testing.assert_allclose(ours, tf_bias, atol=1e-6)


@pytest.mark.parametrize("partition", ["block", "grid"])
def test_a_token_reaches_only_its_window_or_its_grid_group(partition):
    """Block attention mixes a 2 x 2 window; grid attention the tokens 2 apart in both directions."""
    layer = PartitionAttention(partition, (2, 2), BlockConfig(head_dim=4))
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
    variables = random_variables(layer, x, train=False)
    run = jax.jit(lambda x: layer.apply(variables, x, train=False))
    nudge = jnp.arange(8.0) / 8  # not constant over channels, which LayerNorm would remove
    changed = np.any(np.abs(np.asarray(run(x.at[0, 1, 2].add(nudge)) - run(x))) > 1e-4, axis=-1)[0]
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    if partition == "block":
        expected = (rows // 2 == 0) & (cols // 2 == 1)
    else:
        expected = (rows % 2 == 1) & (cols % 2 == 0)
    np.testing.assert_array_equal(changed, expected)


def test_partition_attention_counts_attention_products_of_its_windows():
    """One 4x4 map in 2x2 windows: q/k/v/out and MLP dense layers over 16 tokens, QK^T and AV over 4 x 4 per window."""
    layer = PartitionAttention("block", (2, 2), BlockConfig(head_dim=4))
    x = jnp.zeros((1, 4, 4, 8))
    variables = random_variables(layer, x, train=False)
    macs = count_macs(lambda v, x: layer.apply(v, x, train=False), variables, x)
    dense = 16 * (4 * 8 * 8 + 2 * 8 * 32)
    products = 2 * 4 * (4 * 4 * 8)  # 2 matmuls x 4 windows x (4 queries x 4 keys x 8 channels over 2 heads)
    assert macs == dense + products


def test_every_attention_goes_through_the_entry_point_with_its_relative_bias(monkeypatch):
    """An M block calls dot_product_attention twice (window, grid), each with a [heads, P*P, P*P] bias."""
    model = create_model("test_maxvit")
    x = jnp.zeros((2, 32, 32, 3))
    variables = random_variables(model, x, train=False)
    calls = []
    original = attention.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, **kwargs):
        calls.append((q.shape, None if bias is None else bias.shape))
        return original(q, k, v, bias, mask, **kwargs)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    # An 8 x 8 map in 2 x 2 partitions (16 per image), 24 channels in heads of 8.
    assert calls == [((2 * 16, 4, 3, 8), (3, 4, 4))] * 2


def test_the_bias_table_is_learned_per_head_and_displacement():
    """Parameters: [heads, 2P-1, 2P-1] per partition layer; the bias of a P x P window depends only on q - k."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: RelPosBias((3, 3), 2).init(jax.random.key(0))))
    assert shapes["params"]["relative_position_bias_table"].shape == (2, 5, 5)
    table = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 5)))
    bias = np.asarray(lookup_bias(table, 3, 3))
    # (0, 0) -> (1, 2) and (1, 0) -> (2, 2): same displacement, same bias; both differ from (1, 2) -> (0, 0).
    np.testing.assert_array_equal(bias[:, 0, 5], bias[:, 3, 8])
    np.testing.assert_array_equal(bias[:, 0, 5], table[:, (0 - 1) + 2, (0 - 2) + 2])
    assert not np.allclose(bias[:, 5, 0], bias[:, 0, 5])


def test_maps_that_do_not_divide_into_partitions_are_refused_clearly():
    model = create_model("test_maxvit")
    x = jnp.zeros((1, 36, 36, 3))  # a 9 x 9 map after the stem and the stride-2 stage, windows of 2
    with pytest.raises(ValueError, match="divisible by .2, 2.*img_size"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def test_pooled_features_are_the_tanh_pre_logits():
    """MaxViT's head: pool, LayerNorm, dense + tanh (the pooled features), classifier."""
    model = create_model("test_maxvit", num_classes=0)
    x = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
    variables = random_variables(model, x, train=False)
    features, pooled = jax.jit(lambda v, x: (model.apply(v, x, train=False, method=model.forward_features),
                                             model.apply(v, x, train=False)))(variables, x)
    np.testing.assert_array_equal(pooled, features["pooled"])
    p = variables["params"]
    mean = np.asarray(features["stage1"]).mean(axis=(1, 2))
    normed = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-5)
    normed = normed * p["norm"]["scale"] + p["norm"]["bias"]
    np.testing.assert_allclose(pooled, np.tanh(normed @ p["pre_logits"]["kernel"] + p["pre_logits"]["bias"]),
                               atol=1e-5)
    assert "head" not in p and pooled.shape == (2, 32)
