"""CvT: the convolutional projection against numpy, the official logits scale, any input size, the class-token path."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import hybrid_jax.models.cvt as cvt
from hybrid_jax import create_model
from hybrid_jax.models.cvt import ConvAttention, CvtStage


def random_variables(init, seed=0):
    """Random weights around the init scale (norm scales near 1) and random BatchNorm statistics.

    `init` is a no-argument function returning the module's variables; only its shapes are used.
    """
    shapes = nn.meta.unbox(jax.eval_shape(init))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        noise = 0.3 * rng.standard_normal(leaf.shape)
        return jnp.asarray(noise + 1.0 if "scale" in name else noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def naive_depthwise_bn(grid, conv, norm, stats, stride):
    """Depthwise 3x3 conv (padding 1, no bias) then eval-mode BatchNorm (eps 1e-5), in numpy."""
    b, h, w, c = grid.shape
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = np.zeros((b, oh, ow, c))
    for i in range(3):
        for j in range(3):
            out += padded[:, i:i + stride * oh:stride, j:j + stride * ow:stride] * conv["kernel"][i, j, 0]
    return (out - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * norm["scale"] + norm["bias"]


def naive_conv_attention(x, size, variables, num_heads, with_cls):
    """CvT attention as the paper and official code define it, with the official 1/sqrt(C) scale."""
    p, s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)["params"], None
    s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    x = np.asarray(x, np.float64)
    b, n, c = x.shape
    cls, grid = (x[:, :1], x[:, 1:]) if with_cls else (None, x)
    grid = grid.reshape(b, *size, c)

    def project(name, stride):
        y = naive_depthwise_bn(grid, p[f"conv_proj_{name}"]["conv"], p[f"conv_proj_{name}"]["norm"],
                               s[f"conv_proj_{name}"]["norm"], stride).reshape(b, -1, c)
        y = np.concatenate([cls, y], axis=1) if with_cls else y
        y = y @ p[f"proj_{name}"]["kernel"] + p[f"proj_{name}"]["bias"]
        return y.reshape(b, -1, num_heads, c // num_heads).transpose(0, 2, 1, 3)

    q, k, v = project("q", 1), project("k", 2), project("v", 2)
    logits = q @ k.transpose(0, 1, 3, 2) * c ** -0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(b, n, c) @ p["proj"]["kernel"] + p["proj"]["bias"]


def test_conv_attention_matches_numpy(with_cls=True):
    """Depthwise conv + BN projections (keys / values strided), the class token beside them, scale 1/sqrt(C)."""
    size, c = (5, 6), 12
    x = jax.random.normal(jax.random.key(1), (2, with_cls + size[0] * size[1], c))
    module = ConvAttention(num_heads=3)
    variables = random_variables(lambda: module.init(jax.random.key(0), x, size, with_cls=with_cls, train=False))
    ours = jax.jit(lambda v, x: module.apply(v, x, size, with_cls=with_cls, train=False))(variables, x)
    np.testing.assert_allclose(ours, naive_conv_attention(x, size, variables, 3, with_cls), atol=1e-4)


def test_attention_runs_through_the_entry_point_with_the_width_scale(monkeypatch):
    """Every block calls dot_product_attention; keys and values are the map strided by 2, plus the class token."""
    calls = []
    original = cvt.dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape, k.shape, kwargs["scale"]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(cvt, "dot_product_attention", spy)
    model = create_model("test_cvt", cls_token=True)
    x = jnp.zeros((1, 32, 32, 3))
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert calls == [((1, 64, 1, 16), (1, 16, 1, 16), 16 ** -0.5), ((1, 17, 2, 12), (1, 5, 2, 12), 24 ** -0.5)]


def test_any_input_size_runs_and_the_head_reads_the_class_token(size=48):
    """No position embedding: maps follow the input (strides 4, 8); pooled = LayerNorm(class token)."""
    model = create_model("test_cvt", cls_token=True)
    x = jax.random.uniform(jax.random.key(2), (2, size, size, 3), minval=-1, maxval=1)
    variables = random_variables(lambda: model.init(jax.random.key(0), x, train=False))
    logits, features = jax.jit(lambda v, x: (model.apply(v, x, train=False), model.apply(
        v, x, train=False, method=model.forward_features)))(variables, x)
    assert [features[f"stage{i}"].shape for i in (1, 2)] == [(2, size // 4, size // 4, 16),
                                                              (2, size // 8, size // 8, 24)]
    cls = np.asarray(features["cls_token"], np.float64)
    norm = variables["params"]["norm"]
    expected = (cls - cls.mean(-1, keepdims=True)) / np.sqrt(cls.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(features["pooled"], expected * norm["scale"] + norm["bias"], atol=1e-5)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, features["pooled"] @ head["kernel"] + head["bias"], atol=1e-5)


def test_the_last_query_projection_feeds_only_the_final_map():
    """With a class token the head reads that token alone, and the token takes no conv projection, so the last
    block's query projection reaches the stage's map (forward_features) but not the logits: CvT's one dead path."""
    stage = CvtStage(16, depth=1, num_heads=2, patch_size=3, patch_stride=2, patch_padding=1, with_cls=True)
    x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 8), minval=-1, maxval=1)
    variables = random_variables(lambda: stage.init(jax.random.key(0), x, train=False))

    @jax.jit
    def grads(params):
        def loss(params, output):
            return jnp.sum(stage.apply({**variables, "params": params}, x, train=False)[output] ** 2)
        return jax.grad(loss)(params, 0), jax.grad(loss)(params, 1)

    dead = [{path for path, g in flax.traverse_util.flatten_dict(tree, sep="/").items() if not np.any(g != 0)}
            for tree in jax.tree_util.tree_map(np.asarray, grads(variables["params"]))]
    query = "blocks_0/attn/conv_proj_q"
    assert dead == [set(), {f"{query}/conv/kernel", f"{query}/norm/scale", f"{query}/norm/bias"}]
