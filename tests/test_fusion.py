"""Every registered fusion through the shared interface; concat, add, gating and cross-attention by hand."""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.fusion import FUSIONS, get_fusion, get_fusion_class

MAP_FUSIONS = ("concat", "add", "gating")  # written here; fcu is map-shaped too


def fusion_or_skip(name: str, **fields) -> nn.Module:
    """The fusion `name`; skipped while its module is not written yet (fcu, bridge arrive separately)."""
    module = FUSIONS[name].split(":")[0]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        pytest.skip(f"{module} does not exist yet")
    return get_fusion(name, num_prefix_tokens=1, **fields)


def streams(key=0, dtype=jnp.float32, height=8, channels=16, grid=4, dim=32):
    """A map [2, height, height, channels] and 1 class token + a grid x grid token grid of width dim."""
    k1, k2 = jax.random.split(jax.random.key(key))
    local = jax.random.normal(k1, (2, height, height, channels), dtype)
    tokens = jax.random.normal(k2, (2, 1 + grid * grid, dim), dtype)
    return local, tokens


def randomized(variables, key=1, scale=0.2):
    """Parameters moved off their init (zero-initialised projections included), so every path carries signal."""
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    keys = jax.random.split(jax.random.key(key), len(leaves))
    params = treedef.unflatten([p + scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
    return {**variables, "params": params}


def init(fusion, local, tokens, randomize=True):
    variables = nn.meta.unbox(fusion.init(jax.random.key(0), local, tokens, train=False))
    return randomized(variables) if randomize else variables


@pytest.mark.parametrize("name", list(FUSIONS))
def test_interface_shapes_and_both_directions(name):
    fusion = fusion_or_skip(name)
    local, tokens = streams()
    variables = init(fusion, local, tokens)
    apply = lambda method, *args: fusion.apply(variables, *args, train=False, method=method)
    new_local, new_tokens = fusion.apply(variables, local, tokens, train=False)
    assert new_local.shape == local.shape and new_tokens.shape == tokens.shape
    assert not np.allclose(new_local, local, atol=1e-3) and not np.allclose(new_tokens, tokens, atol=1e-3)
    # Each direction returns only its own stream; __call__ runs tokens first, then the map from the new tokens.
    only_tokens = apply(fusion.to_tokens, local, tokens)
    np.testing.assert_allclose(only_tokens, new_tokens, atol=1e-6)
    np.testing.assert_allclose(apply(fusion.to_local, local, only_tokens), new_local, atol=1e-6)
    assert not np.allclose(apply(fusion.to_local, local, tokens), new_local, atol=1e-4)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_gradients_reach_both_inputs_in_each_direction(name):
    fusion = fusion_or_skip(name)
    local, tokens = streams()
    variables = init(fusion, local, tokens)

    def loss(local, tokens, weights, method):
        return jnp.sum(weights * fusion.apply(variables, local, tokens, train=False, method=method))

    for method, out in ((fusion.to_tokens, tokens), (fusion.to_local, local)):
        weights = jax.random.normal(jax.random.key(5), out.shape)
        weighted = functools.partial(loss, weights=weights, method=method)
        for grad in jax.jit(jax.grad(weighted, argnums=(0, 1)))(local, tokens):
            assert np.all(np.isfinite(grad)) and np.any(np.abs(grad) > 1e-6), method.__name__


@pytest.mark.parametrize("name", list(FUSIONS))
def test_bfloat16_compute_follows_float32(name):
    local, tokens = streams()
    fusion32 = fusion_or_skip(name)
    variables = init(fusion32, local, tokens)
    fusion16 = fusion_or_skip(name, dtype=jnp.bfloat16)
    out16 = fusion16.apply(variables, local.astype(jnp.bfloat16), tokens.astype(jnp.bfloat16), train=False)
    out32 = fusion32.apply(variables, local, tokens, train=False)
    for a, b in zip(out16, out32):
        assert a.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(a, np.float32)))
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.1 + 0.05 * float(np.abs(b).max()))


@pytest.mark.parametrize("name", MAP_FUSIONS + ("fcu",))
def test_map_fusions_pass_prefix_tokens_through(name):
    fusion = fusion_or_skip(name)
    local, tokens = streams()
    variables = init(fusion, local, tokens)
    new_tokens = fusion.apply(variables, local, tokens, train=False, method=fusion.to_tokens)
    np.testing.assert_array_equal(new_tokens[:, :1], tokens[:, :1])
    other_cls = tokens.at[:, 0].set(100.0)
    np.testing.assert_array_equal(fusion.apply(variables, local, other_cls, train=False, method=fusion.to_local),
                                  fusion.apply(variables, local, tokens, train=False, method=fusion.to_local))


@pytest.mark.parametrize("name", MAP_FUSIONS)
def test_map_fusions_start_without_cross_talk(name):
    """At init no information crosses: concat and add are the identity, gating halves each stream."""
    fusion = fusion_or_skip(name)
    local, tokens = streams()
    new_local, new_tokens = fusion.apply(init(fusion, local, tokens, randomize=False), local, tokens, train=False)
    scale = 0.5 if name == "gating" else 1.0
    np.testing.assert_allclose(new_local, scale * local, atol=1e-6)
    np.testing.assert_allclose(new_tokens[:, 1:], scale * tokens[:, 1:], atol=1e-6)


# Hand computations at the full resolution of the map (pool, repeat, then project); the module projects at the
# grid's. Same shapes as above: a 8x8 map of 16 channels, one class token and a 4x4 grid of width 32.

def pool(local):
    return local.reshape(2, 4, 2, 4, 2, 16).mean(axis=(2, 4))  # 2x2 average pool onto the 4x4 grid


def upsample(tokens):
    return np.asarray(tokens)[:, 1:].reshape(2, 4, 4, 32).repeat(2, axis=1).repeat(2, axis=2)


def hand_case(name):
    fusion = fusion_or_skip(name)
    local, tokens = streams(key=7)
    variables = init(fusion, local, tokens)
    new_local, new_tokens = fusion.apply(variables, local, tokens, train=False)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    return fusion, variables, p, np.asarray(local), np.asarray(tokens), new_local, new_tokens


def check_tokens(new_tokens, tokens, expected_grid):
    np.testing.assert_allclose(new_tokens[:, 0], tokens[:, 0], atol=1e-6)
    np.testing.assert_allclose(new_tokens[:, 1:], expected_grid.reshape(2, 16, 32), atol=1e-5)


def test_concat_is_a_projection_of_the_concatenation():
    _, _, p, local, tokens, new_local, new_tokens = hand_case("concat")
    g, m = p["local_global"], p["global_local"]
    grid = tokens[:, 1:].reshape(2, 4, 4, 32)
    kernel = np.concatenate([g["proj_own"]["kernel"], g["proj_other"]["kernel"]])  # [D + C, D]
    check_tokens(new_tokens, tokens, grid + np.concatenate([grid, pool(local)], -1) @ kernel + g["proj_other"]["bias"])
    # The map is updated from the new tokens (__call__ runs to_tokens first).
    kernel = np.concatenate([m["proj_own"]["kernel"], m["proj_other"]["kernel"]])  # [C + D, C]
    expected = local + np.concatenate([local, upsample(new_tokens)], -1) @ kernel + m["proj_other"]["bias"]
    np.testing.assert_allclose(new_local, expected, atol=1e-5)


def test_add_adds_the_projected_other_stream():
    _, _, p, local, tokens, new_local, new_tokens = hand_case("add")
    g, m = p["local_global"]["proj"], p["global_local"]["proj"]
    check_tokens(new_tokens, tokens, tokens[:, 1:].reshape(2, 4, 4, 32) + pool(local) @ g["kernel"] + g["bias"])
    np.testing.assert_allclose(new_local, local + upsample(new_tokens) @ m["kernel"] + m["bias"], atol=1e-5)


def gated(own, other, p):
    """z * own + (1 - z) * W other with z = sigmoid(V [own, other]), by hand."""
    logits = np.concatenate([own, other], -1) @ np.concatenate([p["gate_own"]["kernel"], p["gate_other"]["kernel"]])
    gate = 1 / (1 + np.exp(-(logits + p["gate_other"]["bias"])))
    return gate * own + (1 - gate) * (other @ p["proj"]["kernel"] + p["proj"]["bias"])


def test_gating_mixes_by_a_gate_from_both_streams():
    _, _, p, local, tokens, new_local, new_tokens = hand_case("gating")
    check_tokens(new_tokens, tokens, gated(tokens[:, 1:].reshape(2, 4, 4, 32), pool(local), p["local_global"]))
    np.testing.assert_allclose(new_local, gated(local, upsample(new_tokens), p["global_local"]), atol=1e-5)


def test_gating_with_zero_gate_logits_mixes_half_and_half():
    fusion, variables, p, local, tokens, _, _ = hand_case("gating")
    zero_gate = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "gate" in jax.tree_util.keystr(path) else x, variables["params"])
    variables = {**variables, "params": zero_gate}
    apply = lambda method: fusion.apply(variables, jnp.asarray(local), jnp.asarray(tokens), train=False, method=method)
    g, m = p["local_global"]["proj"], p["global_local"]["proj"]
    grid = tokens[:, 1:].reshape(2, 4, 4, 32)
    check_tokens(apply(fusion.to_tokens), tokens, 0.5 * grid + 0.5 * (pool(local) @ g["kernel"] + g["bias"]))
    expected = 0.5 * local + 0.5 * (upsample(tokens) @ m["kernel"] + m["bias"])
    np.testing.assert_allclose(apply(fusion.to_local), expected, atol=1e-5)


def naive_cross_attend(x, context, p, num_heads):
    """x + gamma * MHA(LN(x), LN(context)) with softmax written out, as an independent reference."""
    def norm(y, q):
        mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mean) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    a = p["attn"]
    xq, kv = norm(x, p["norm_q"]), norm(context, p["norm_kv"])
    heads = lambda y, name: (y @ a[name]["kernel"] + a[name]["bias"]).reshape(*y.shape[:2], num_heads, -1)
    q, k, v = heads(xq, "query"), heads(kv, "key"), heads(kv, "value")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], -1)
    return x + p["ls"]["gamma"] * (out @ a["out"]["kernel"] + a["out"]["bias"])


def test_cross_attention_matches_naive_attention():
    fusion, _, p, local, tokens, new_local, new_tokens = hand_case("cross_attention")
    flat = local.reshape(2, 64, 16)
    expected_tokens = naive_cross_attend(tokens, flat, p["local_global"], fusion.num_heads)
    np.testing.assert_allclose(new_tokens, expected_tokens, atol=1e-4)
    expected_local = naive_cross_attend(flat, expected_tokens, p["global_local"], fusion.num_heads)
    np.testing.assert_allclose(new_local, expected_local.reshape(local.shape), atol=1e-4)


def test_unknown_fusion_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown fusion 'gatting'.*Did you mean gating"):
        get_fusion_class("gatting")
    with pytest.raises(ValueError, match="cross_attention"):
        get_fusion("cross-attention")
