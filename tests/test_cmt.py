"""CMT: IRFFN against numpy, LMHSA's shrunk keys and shared per-stage bias through the entry point, bias resampling.

There is no timm / Hugging Face CMT, so no parity test: the official code (huawei-noah/Efficient-AI-Backbones,
cmt_pytorch/cmt.py) is not a package. Parameter counts equal it (tests/test_models.py checks them).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf

import hybrid_jax.layers.attention as attention
from hybrid_jax import create_model
from hybrid_jax.models.cmt import IRFFN, CMTStage, resize_attention_bias, stage_grids


def random_variables(init, seed=0):
    """Random weights (norm scales near 1) and BatchNorm statistics for the shapes `init()` would return."""
    shapes = nn.meta.unbox(jax.eval_shape(init))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        noise = 0.3 * rng.standard_normal(leaf.shape)
        return jnp.asarray(noise + 1.0 if "scale" in name else noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def naive_irffn(x, variables):
    """The official IRFFN in numpy: 1x1 -> GELU -> BN, depthwise 3x3 + shortcut -> GELU -> BN, 1x1 -> BN."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])
    gelu = lambda y: 0.5 * y * (1 + erf(y / np.sqrt(2)))
    bn = lambda y, name: (y - s[name]["mean"]) / np.sqrt(s[name]["var"] + 1e-5) * p[name]["scale"] + p[name]["bias"]
    conv1x1 = lambda y, name: y @ p[name]["kernel"][0, 0] + p[name]["bias"]
    y = bn(gelu(conv1x1(np.asarray(x, np.float64), "conv1")), "norm1")
    b, h, w, c = y.shape
    padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dw = sum(padded[:, i:i + h, j:j + w] * p["dwconv"]["kernel"][i, j, 0] for i in range(3) for j in range(3))
    y = bn(gelu(dw + p["dwconv"]["bias"] + y), "norm2")
    return bn(conv1x1(y, "conv2"), "norm3")


def test_irffn_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    module = IRFFN(10)
    variables = random_variables(lambda: module.init(jax.random.key(0), x, train=False))
    ours = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(ours, naive_irffn(x, variables), atol=1e-4)


def test_lightweight_attention_shrinks_keys_and_shares_the_stage_bias(monkeypatch):
    """Keys / values shrink by 8, 4, 2, 1 over the stages; each call gets its stage's [heads, N, N / sr^2] bias."""
    calls = []
    original = attention.dot_product_attention

    def spy(q, k, v, bias=None, *args, **kwargs):
        calls.append((q.shape[1:], k.shape[1:], None if bias is None else bias.shape))
        return original(q, k, v, bias, *args, **kwargs)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    model = create_model("test_cmt", img_size=64, embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1),
                         num_heads=(1, 2, 2, 4), sr_ratios=(8, 4, 2, 1))
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert calls == [((256, 1, 16), (4, 1, 16), (1, 256, 4)), ((64, 2, 12), (4, 2, 12), (2, 64, 4)),
                     ((16, 2, 16), (4, 2, 16), (2, 16, 4)), ((4, 4, 10), (4, 4, 10), (4, 4, 4))]
    stages = nn.meta.unbox(shapes)["params"]
    assert [stages[f"stages_{i}"]["relative_pos"].shape for i in range(4)] == [(1, 256, 4), (2, 64, 4), (2, 16, 4),
                                                                               (4, 4, 4)]
    assert stage_grids(160, (8, 4, 2, 1)) == [(40, 5), (20, 5), (10, 5), (5, 5)]


def test_bias_is_resampled_for_other_input_sizes():
    """A stage built for a 4x4 map runs on 6x6 exactly as one built for 6x6 with the resampled bias."""
    stage = CMTStage(8, depth=1, num_heads=2, sr_ratio=2, bias_grid=(4, 2))
    small, large = (jax.random.normal(jax.random.key(i), (1, s, s, 6)) for i, s in ((1, 8), (2, 12)))
    variables = random_variables(lambda: stage.init(jax.random.key(0), small, train=False))
    bias = variables["params"]["relative_pos"]
    np.testing.assert_array_equal(resize_attention_bias(bias, (4, 4), (2, 2)), bias)
    resized = resize_attention_bias(bias, (6, 6), (3, 3))
    assert resized.shape == (2, 36, 9)
    native = CMTStage(8, depth=1, num_heads=2, sr_ratio=2, bias_grid=(6, 3))
    native_vars = {**variables, "params": {**variables["params"], "relative_pos": resized}}
    apply = lambda module: jax.jit(lambda v, x: module.apply(v, x, train=False))
    np.testing.assert_allclose(apply(stage)(variables, large), apply(native)(native_vars, large), atol=1e-5)
    # A bias constant over key positions stays constant: resampling interpolates, it does not extrapolate.
    flat = jnp.broadcast_to(jnp.arange(16.0)[None, :, None], (2, 16, 4))
    np.testing.assert_allclose(np.ptp(resize_attention_bias(flat, (6, 6), (3, 3)), axis=-1), 0, atol=1e-6)
