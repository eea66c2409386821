"""LeViT: offset-indexed attention biases, shrinking attention, BN folding, the two heads, other input sizes."""

import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.layers import attention
from hybrid_jax.models.levit import LevitAttention, LinearNorm, attention_bias_index, fold_linear_norm


def random_variables(module, x, seed=0, scale=0.3):
    """Random params and BatchNorm statistics of the module's shapes; cheaper than compiling `init`."""
    shapes = flax.linen.meta.unbox(jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x))
    rng = np.random.default_rng(seed)
    draw = lambda path, leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32) if path[-1] in (
        "var", "scale") else (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
    flat = flax.traverse_util.flatten_dict(shapes)
    return flax.traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})


def _apply(module, method=None):
    return jax.jit(lambda v, x: module.apply(v, x, train=False, method=method))


def test_bias_index_is_the_absolute_offset_with_subsampled_queries():
    index = attention_bias_index((3, 4), (3, 4), stride=2)
    queries = [(y, x) for y in range(0, 3, 2) for x in range(0, 4, 2)]
    keys = [(y, x) for y in range(3) for x in range(4)]
    expected = [[abs(qy - ky) * 4 + abs(qx - kx) for ky, kx in keys] for qy, qx in queries]
    np.testing.assert_array_equal(index, expected)
    # A grid smaller than the table reuses its entries; a larger one clips offsets to the table's reach.
    np.testing.assert_array_equal(attention_bias_index((2, 2), (4, 4)), [[0, 1, 4, 5], [1, 0, 5, 4], [4, 5, 0, 1],
                                                                          [5, 4, 1, 0]])
    assert attention_bias_index((1, 6), (2, 2))[0].tolist() == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("stride", [1, 2])
def test_attention_matches_a_naive_reference(stride, caplog, monkeypatch):
    """Keys 8 wide, values 16 (attn_ratio 2) or 32 (4, shrinking): the entry point pads, the result is exact."""
    ratio = 2.0 if stride == 1 else 4.0
    module = LevitAttention(key_dim=8, num_heads=2, attn_ratio=ratio, table_grid=(3, 3), stride=stride,
                            out_features=12 if stride == 2 else None, attn_impl="auto")
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 10))
    variables = random_variables(module, x, scale=0.5)
    monkeypatch.setattr(attention, "_logged_paths", set())
    with caplog.at_level(logging.INFO, logger="hybrid_jax.layers.attention"):
        out = _apply(module)(variables, x)
    value_dim = int(8 * ratio)
    # The entry point says which backend ran, for keys narrower than values.
    assert any(f"v(2, 9, 2, {value_dim})" in r.message and "-> xla (auto fell back to XLA" in r.message
               for r in caplog.records), caplog.text
    assert attention.attention_path(jnp.zeros((2, 9, 2, 8)), jnp.zeros((2, 9, 2, 8)),
                                    jnp.zeros((2, 9, 2, value_dim)), has_bias_or_mask=True)[0] == "xla"

    # Naive: project, softmax(q k^T / sqrt(8) + bias) v per head, hardswish, project.
    p, s = variables["params"], variables["batch_stats"]
    linear_norm = lambda name, t: t @ fold_linear_norm(p[name], s[name])["kernel"] + fold_linear_norm(
        p[name], s[name])["bias"]
    tokens = np.asarray(x).reshape(2, 9, 10)
    if stride == 1:
        qkv = linear_norm("qkv", tokens).reshape(2, 9, 2, 2 * 8 + value_dim)
        q, k, v = qkv[..., :8], qkv[..., 8:16], qkv[..., 16:]
    else:
        kv = linear_norm("kv", tokens).reshape(2, 9, 2, 8 + value_dim)
        k, v = kv[..., :8], kv[..., 8:]
        q = linear_norm("q", np.asarray(x)[:, ::2, ::2].reshape(2, 4, 10)).reshape(2, 4, 2, 8)
    positions = [(y, xx) for y in range(3) for xx in range(3)]
    queries = positions if stride == 1 else [(y, xx) for y in (0, 2) for xx in (0, 2)]
    bias = np.asarray(p["attention_biases"])[:, [[abs(a - c) * 3 + abs(b - d) for c, d in positions]
                                                  for a, b in queries]]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, len(queries), -1)
    expected = linear_norm("proj", np.asarray(jax.nn.hard_swish(heads)))
    side = 3 if stride == 1 else 2
    np.testing.assert_allclose(out, expected.reshape(2, side, side, -1), atol=1e-4, rtol=1e-4)


def test_fold_linear_norm_gives_one_dense_layer():
    module = LinearNorm(6)
    x = jax.random.normal(jax.random.key(3), (4, 5))
    variables = random_variables(module, x)
    folded = fold_linear_norm(variables["params"], variables["batch_stats"])
    np.testing.assert_allclose(_apply(module)(variables, x), x @ folded["kernel"] + folded["bias"],
                               atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    """test_levit (64 px) with random variables, and two images."""
    model = create_model("test_levit")
    x = jax.random.uniform(jax.random.key(5), (2, 64, 64, 3))
    return model, random_variables(model, x, seed=7), x


def test_stem_and_stages_shrink_the_map(tiny):
    model, variables, x = tiny
    features = _apply(model, model.forward_features)(variables, x)
    assert [features[k].shape for k in ("stem", "stage1", "stage2")] == [(2, 4, 4, 16), (2, 4, 4, 16), (2, 2, 2, 24)]
    assert "stage3" not in features
    np.testing.assert_allclose(features["pooled"], features["stage2"].mean((1, 2)), rtol=1e-6, atol=1e-6)


def test_heads_average_and_separate_for_distillation(tiny):
    model, variables, x = tiny
    logits, (cls, dist) = jax.jit(lambda v, x: (model.apply(v, x, train=False), model.apply(
        v, x, train=False, method=model.forward_heads)))(variables, x)
    assert not np.allclose(cls, dist)
    # Untrained logits reach hundreds; float32 rounding in two separately fused programs scales with them.
    atol = 1e-6 * float(np.abs(cls).max())
    np.testing.assert_allclose(logits, (cls + dist) / 2, rtol=1e-5, atol=atol)
    # Without the distillation head: the same tree less `head_dist`, and the class head's logits alone.
    single = create_model("test_levit", distilled=False)
    drop_dist = lambda tree: {k: v for k, v in tree.items() if k != "head_dist"}
    single_vars = {name: drop_dist(tree) for name, tree in variables.items()}
    assert jax.tree.map(np.shape, single_vars) == jax.tree.map(np.shape, random_variables(single, x))
    pooled = _apply(model, model.forward_features)(variables, x)["pooled"]
    head_only = single.apply(single_vars, pooled, method=lambda m, p: m.head(p, train=False))
    np.testing.assert_allclose(head_only, cls, rtol=1e-5, atol=atol)


def test_smaller_inputs_use_the_matching_part_of_each_bias_table(tiny):
    """Built at 64 px, run at 32: equal to a model built at 32 px with the sub-tables of the 64 px biases."""
    big, variables, _ = tiny
    small = create_model("test_levit", img_size=32)
    x = jax.random.uniform(jax.random.key(8), (1, 32, 32, 3))
    small_shapes = flax.traverse_util.flatten_dict(random_variables(small, x)["params"])

    def sub_table(path, table):
        if path[-1] != "attention_biases":
            return table
        big_side, small_side = int(round(table.shape[1] ** 0.5)), int(round(small_shapes[path].shape[1] ** 0.5))
        return table.reshape(-1, big_side, big_side)[:, :small_side, :small_side].reshape(table.shape[0], -1)

    flat = flax.traverse_util.flatten_dict(variables["params"])
    small_params = flax.traverse_util.unflatten_dict({p: sub_table(p, t) for p, t in flat.items()})
    np.testing.assert_allclose(_apply(big)(variables, x), _apply(small)({**variables, "params": small_params}, x),
                               rtol=1e-5, atol=1e-5)
