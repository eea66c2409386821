"""MobileViT: unfold / fold against an explicit index map, the resize for odd maps, the entry point, any input size."""

import jax
import jax.numpy as jnp
import numpy as np

import hybrid_jax.layers.attention as attention
from hybrid_jax import create_model
from hybrid_jax.models.mobilevit import fold, unfold


def test_unfold_groups_the_same_pixel_of_every_patch_and_fold_inverts_it():
    """Sequence (b, i, j) holds pixel (i, j) of each patch, patches in row-major order; fold puts them back."""
    b, h, w, c, p = 2, 4, 6, 3, 2
    x = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c)
    tokens, grid = unfold(jnp.asarray(x), p)
    assert grid == (2, 3) and tokens.shape == (b * p * p, 6, c)
    tokens = np.asarray(tokens).reshape(b, p, p, 2, 3, c)
    for i in range(p):
        for j in range(p):
            np.testing.assert_array_equal(tokens[:, i, j], x[:, i::p, j::p])
    np.testing.assert_array_equal(fold(jnp.asarray(tokens.reshape(b * p * p, 6, c)), grid, p, (h, w)), x)


def bilinear_half_pixel(x, size):
    """PyTorch's bilinear interpolate(align_corners=False) along H and W of an NHWC array, in numpy."""
    def along(x, axis, n_out):
        n_in = x.shape[axis]
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).reshape([-1 if d == axis else 1 for d in range(x.ndim)])
        return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
    return along(along(x, 1, size[0]), 2, size[1])


def test_odd_maps_are_resized_to_the_patch_grid_and_back():
    """A 3 x 5 map is unfolded from its bilinear 4 x 6 resize, and folded back with the inverse resize."""
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 2)).astype(np.float32)
    tokens, grid = unfold(jnp.asarray(x), 2)
    assert grid == (2, 3)
    up = bilinear_half_pixel(x, (4, 6))
    np.testing.assert_allclose(np.asarray(tokens).reshape(1, 2, 2, 2, 3, 2)[:, 1, 0], up[:, 1::2, 0::2], atol=1e-6)
    np.testing.assert_allclose(fold(tokens, grid, 2, (3, 5)), bilinear_half_pixel(up, (3, 5)), atol=1e-6)


def test_transformers_attend_across_patches_through_the_entry_point(monkeypatch):
    """Each MobileViT block runs batch * 4 sequences of (H / 2) * (W / 2) patches through dot_product_attention."""
    calls = []
    original = attention.dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    model = create_model("test_mobilevit", transformer_dims=(0, 0, 16, 24, 0), transformer_depths=(0, 0, 1, 2, 0))
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((3, 64, 64, 3)), train=False))
    # Stage 3 (stride 8): 8 x 8 map -> 16 patches, one layer; stage 4 (stride 16): 4 x 4 -> 4 patches, two layers.
    assert calls == [(12, 16, 2, 8), (12, 4, 2, 12), (12, 4, 2, 12)]


def test_any_input_size_runs():
    """No position embedding ties the model to one size; odd maps (5 x 5 at 40 px, 13 x 13 at 100) are resized."""
    model = create_model("test_mobilevit", num_classes=0)
    for size, last in ((40, 2), (100, 4)):
        out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False,
                                                                method=model.forward_features)[0],
                             jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        assert out["final_conv"].shape == (1, last, last, 32) and out["pooled"].shape == (1, 32)
