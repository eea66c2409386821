"""BoTNet: 2-D relative logits against their definition (and timm's rel_to_abs), the bias path, the layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hybrid_jax.models.botnet as botnet
from hybrid_jax import create_model
from hybrid_jax.models.botnet import BottleneckAttention, relative_logits


def naive_relative_logits(q, height_rel, width_rel):
    """q . r_h[y' - y] + q . r_w[x' - x] for every query (y, x) and key (y', x'), by loops (the paper's definition)."""
    b, h, w, heads, _ = q.shape
    out = np.zeros((b, heads, h * w, h * w))
    for y in range(h):
        for x in range(w):
            for yk in range(h):
                for xk in range(w):
                    r = height_rel[yk - y + h - 1] + width_rel[xk - x + w - 1]
                    out[:, :, y * w + x, yk * w + xk] = np.einsum("bnd,d->bn", q[:, y, x], r)
    return out


def test_relative_logits_match_their_definition():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4, 2, 5))
    height_rel, width_rel = rng.standard_normal((5, 5)), rng.standard_normal((7, 5))
    np.testing.assert_allclose(relative_logits(jnp.asarray(q), jnp.asarray(height_rel), jnp.asarray(width_rel)),
                               naive_relative_logits(q, height_rel, width_rel), atol=1e-5)


def test_relative_logits_match_timms_rel_to_abs():
    """timm (after the paper's gist) pads and reshapes q . r over all offsets; gathering first gives the same."""
    torch = pytest.importorskip("torch")
    bottleneck_attn = pytest.importorskip("timm.layers.bottleneck_attn")
    h, w, d = 4, 3, 6
    pos = bottleneck_attn.PosEmbedRel((h, w), d, scale=1.0)
    q = np.random.default_rng(1).standard_normal((2, h * w, d)).astype(np.float32)
    with torch.no_grad():
        theirs = pos(torch.from_numpy(q)).numpy()
    ours = relative_logits(jnp.asarray(q.reshape(2, h, w, 1, d)), jnp.asarray(pos.height_rel.detach().numpy()),
                           jnp.asarray(pos.width_rel.detach().numpy()))
    np.testing.assert_allclose(ours[:, 0], theirs, atol=1e-5)


def test_position_logits_enter_the_entry_point_as_bias(monkeypatch):
    """Each attention block passes its [B, heads, N, N] relative logits as `bias`, at the block's input size."""
    calls = []
    original = botnet.dot_product_attention

    def spy(q, k, v, bias=None, *args, **kwargs):
        calls.append((q.shape, None if bias is None else bias.shape))
        return original(q, k, v, bias, *args, **kwargs)

    monkeypatch.setattr(botnet, "dot_product_attention", spy)
    model = create_model("test_botnet")
    x = jnp.zeros((2, 32, 32, 3))
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)))
    # The strided block attends over the 8x8 map, then pools; the next one attends over 4x4.
    assert calls == [((2, 64, 2, 4), (2, 2, 64, 64)), ((2, 16, 2, 4), (2, 2, 16, 16))]
    blocks = shapes["params"]["stages_1"]
    assert [blocks[f"blocks_{i}"]["attn"]["height_rel"].shape for i in (0, 1)] == [(15, 4), (7, 4)]
    features = jax.eval_shape(lambda v: model.apply(v, x, train=False, method=model.forward_features), shapes)
    assert [features[k].shape for k in ("stem", "stage1", "stage2", "pooled")] == [
        (2, 8, 8, 16), (2, 8, 8, 16), (2, 4, 4, 32), (2, 32)]


def test_scaled_position_logits_equal_scaled_tables():
    """`scale_pos_embed` (the paper) multiplies the position logits by 1/sqrt(d): the same as scaling the tables."""
    x = jax.random.normal(jax.random.key(0), (1, 3, 3, 8))
    scaled, plain = (BottleneckAttention((3, 3), num_heads=2, scale_pos_embed=s, implementation="xla")
                     for s in (True, False))
    variables = nn.meta.unbox(scaled.init(jax.random.key(1), x))
    tables = {"height_rel", "width_rel"}
    shrunk = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 4 ** -0.5 if jax.tree_util.keystr(path[-1:])[2:-2] in tables else a, variables)
    run = jax.jit(lambda v: (scaled.apply(v, x), plain.apply(v, x)))
    (scaled_out, plain_out), (_, plain_shrunk) = run(variables), run(shrunk)
    np.testing.assert_allclose(scaled_out, plain_shrunk, atol=1e-6)
    assert not np.allclose(scaled_out, plain_out, atol=1e-3)


def test_other_input_sizes_resample_the_tables():
    """The tables follow the map: a model built at 32 runs at 48 (tables of 2n - 1 offsets resampled)."""
    model = create_model("test_botnet")
    x = jax.random.uniform(jax.random.key(2), (1, 48, 48, 3))
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x[:, :32, :32], train=False)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(0.5 + 0.1 * rng.standard_normal(a.shape), a.dtype), shapes)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))
    table = variables["params"]["stages_1"]["blocks_1"]["attn"]["width_rel"]
    np.testing.assert_array_equal(botnet._resize_offsets(table, 4), table)
    assert botnet._resize_offsets(table, 6).shape == (11, 4)
