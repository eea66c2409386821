"""Interpretability against cases with known answers: identity and uniform attention, a hand-built detector."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.analysis import interpret
from hybrid_jax.layers.attention import dot_product_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class MaskedToIdentity(nn.Module):
    """Self-attention layers whose mask lets each token see only itself: identity attention."""

    depth: int = 3
    heads: int = 2

    @nn.compact
    def __call__(self, x, *, train=False):
        n = x.shape[1]
        for i in range(self.depth):
            qkv = nn.Dense(3 * x.shape[-1], name=f"qkv_{i}")(x).reshape(*x.shape[:2], 3, self.heads, -1)
            out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=jnp.eye(n, dtype=bool))
            x = x + out.reshape(x.shape)
        return x


def test_rollout_of_identity_attention_is_the_identity():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    model = MaskedToIdentity()
    variables = model.init(jax.random.key(1), x)
    maps = interpret.attention_maps(model, variables, x)
    assert list(maps) == ["", "#1", "#2"]  # one module attending three times: in call order
    for weights in maps.values():
        np.testing.assert_allclose(weights, np.broadcast_to(np.eye(5), (2, 2, 5, 5)), atol=1e-6)
    np.testing.assert_allclose(interpret.attention_rollout(list(maps.values())), np.broadcast_to(np.eye(5), (2, 5, 5)),
                               atol=1e-6)


def test_rollout_of_uniform_attention_on_a_vit_has_the_closed_form():
    """Zero query kernels make every ViT attention uniform (U); ((U + I) / 2)^L = 2^-L I + (1 - 2^-L) U."""
    model = create_model("test_vit")  # depth 2, 1 + 8 x 8 tokens at 32 px
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    variables = nn.meta.unbox(jax.jit(lambda x: model.init(jax.random.key(3), x, train=False))(x))
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if "query" in jax.tree_util.keystr(path) else p, variables["params"])
    maps = interpret.attention_maps(model, {"params": params}, x)
    assert list(maps) == ["blocks_0/attn", "blocks_1/attn"]
    n = 65
    uniform = np.full((n, n), 1 / n)
    expected = np.eye(n) / 4 + uniform * 3 / 4
    np.testing.assert_allclose(interpret.attention_rollout(list(maps.values())),
                               np.broadcast_to(expected, (2, n, n)), atol=1e-6)
    rollout = interpret.attention_rollout(list(maps.values()))
    heat = interpret.normalize_maps(interpret.to_image_grid(rollout[:, 0], (32, 32), num_prefix_tokens=1))
    assert heat.shape == (2, 32, 32)
    np.testing.assert_allclose(heat, 0.0, atol=1e-6)  # every patch token reached equally: a flat map


def test_rollout_refuses_token_sets_of_different_sizes():
    maps = {"a/attn": jnp.ones((1, 2, 5, 5)) / 5, "b/attn": jnp.ones((1, 2, 9, 9)) / 9, "x": jnp.ones((1, 2, 5, 9))}
    with pytest.raises(ValueError, match="different sizes; pass include="):
        interpret.select_self_attention(maps)
    assert list(interpret.select_self_attention(maps, include="^b/")) == ["b/attn"]
    with pytest.raises(ValueError, match="no self-attention map matches"):
        interpret.select_self_attention(maps, include="nothing")


class ConvReLU(nn.Module):
    """3x3 conv + ReLU: the detector stage."""

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(1, (3, 3), padding="SAME", name="conv")(x))


class BrightPatchDetector(nn.Module):
    """Class 0: "a bright 3x3 patch is somewhere"; class 1: its opposite."""

    def setup(self):
        self.detector = ConvReLU()
        self.head = nn.Dense(2)

    def forward_features(self, x, *, train=False):
        response = self.detector(x)
        return {"response": response, "pooled": jnp.mean(response, axis=(1, 2))}

    def __call__(self, x, *, train=False):
        return self.head(self.forward_features(x)["pooled"])


def test_grad_cam_highlights_the_patch_a_handmade_detector_responds_to():
    model = BrightPatchDetector()
    # Weights by hand: the mean of a 3x3 window minus 0.5 fires only on the bright patch (1.0 on a 0.1 ground).
    params = {"detector": {"conv": {"kernel": jnp.full((3, 3, 1, 1), 1 / 9), "bias": jnp.array([-0.5])}},
              "head": {"kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.zeros(2)}}
    images = np.full((2, 16, 16, 1), 0.1, np.float32)
    patches = [(2, 3), (10, 9)]  # top-left corners, a different place per image
    for image, (row, col) in zip(images, patches):
        image[row:row + 3, col:col + 3] = 1.0
    cam = np.asarray(interpret.grad_cam(model, {"params": params}, jnp.asarray(images), "response", target=0))
    assert cam.shape == (2, 16, 16) and cam.max() == pytest.approx(1.0)
    for heat, (row, col) in zip(cam, patches):
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        assert row <= peak[0] < row + 3 and col <= peak[1] < col + 3
        inside = np.zeros_like(heat, bool)
        inside[row:row + 3, col:col + 3] = True
        assert heat[inside].mean() > 5 * heat[~inside].mean()
    # By default the predicted class (0, the patch is there) is explained.
    np.testing.assert_allclose(interpret.grad_cam(model, {"params": params}, jnp.asarray(images), "response"), cam)
    # For the opposite class the detector's evidence counts against: Grad-CAM's ReLU leaves nothing.
    against = interpret.grad_cam(model, {"params": params}, jnp.asarray(images), "response", target=1)
    np.testing.assert_allclose(against, 0.0)
    with pytest.raises(ValueError, match="not the output of a module call"):
        interpret.grad_cam(model, {"params": params}, jnp.asarray(images), "pooled")
    with pytest.raises(KeyError, match="has no 'stage9'"):
        interpret.grad_cam(model, {"params": params}, jnp.asarray(images), "stage9")


TARGET = np.array([3, 7])


@pytest.fixture(scope="module")
def hybrid():
    """parallel_hybrid_tiny at 16 px with random (not zero) heads, two images, and their branch attribution."""
    model = create_model("parallel_hybrid_tiny")
    images = jax.random.uniform(jax.random.key(4), (2, 16, 16, 1))
    # An RngBitGenerator key: its init compiles in half the time of threefry's.
    init = jax.jit(lambda x: model.init(jax.random.key(5, impl="rbg"), x, train=False))
    variables = nn.meta.unbox(init(images))
    keys = iter(jax.random.split(jax.random.key(6), 4))
    for head in ("conv_cls_head", "trans_cls_head"):
        variables["params"][head] = {name: jax.random.normal(next(keys), p.shape) * 0.5
                                     for name, p in variables["params"][head].items()}
    return model, variables, images, interpret.branch_attribution(model, variables, images, target=TARGET)


def test_branch_attribution_is_consistent_with_the_two_heads(hybrid):
    model, variables, images, result = hybrid
    # Independent references, one compiled program: the heads, the model's output, features, the mean's gradient.
    mean_logit = lambda x: jnp.sum(model.apply(variables, x, train=False)[jnp.arange(2), TARGET])
    heads, output, features, mean_grad = jax.jit(lambda x: (
        model.apply(variables, x, train=False, method="branch_logits"), model.apply(variables, x, train=False),
        model.apply(variables, x, train=False, method="forward_features"), jax.grad(mean_logit)(x)))(images)
    np.testing.assert_allclose(result.logits["cnn"], heads["cnn"], atol=1e-5)
    np.testing.assert_allclose(result.logits["transformer"], heads["transformer"], atol=1e-5)
    np.testing.assert_allclose(result.logits["mean"], output, atol=1e-5)
    picked = result.target_logits()
    np.testing.assert_allclose(picked["mean"], (picked["cnn"] + picked["transformer"]) / 2, atol=1e-5)
    # The contributions add up to the mean's logit; for linear heads each is W_b f_b / 2, the rest the biases.
    np.testing.assert_allclose(sum(result.contribution.values()), picked["mean"], atol=1e-5)
    params = variables["params"]
    for branch, head in (("cnn", "conv_cls_head"), ("transformer", "trans_cls_head")):
        linear = np.asarray(features[f"{branch}_pooled"] @ params[head]["kernel"])[np.arange(2), TARGET] / 2
        np.testing.assert_allclose(result.contribution[branch], linear, atol=1e-5)
    biases = (params["conv_cls_head"]["bias"] + params["trans_cls_head"]["bias"])[TARGET] / 2
    np.testing.assert_allclose(result.contribution["bias"], biases, atol=1e-5)
    np.testing.assert_allclose(sum(result.share().values()), 1.0, atol=1e-6)
    # Pixel attributions: the gradient is linear, so the heads' maps average to the mean's.
    mean_pixels = np.sum(np.asarray(mean_grad * images), axis=-1)
    assert result.pixels["cnn"].shape == (2, 16, 16)
    np.testing.assert_allclose((result.pixels["cnn"] + result.pixels["transformer"]) / 2, mean_pixels, atol=1e-5)


def test_maps_of_a_parallel_hybrid_and_their_overlays_render_to_png(hybrid, tmp_path):
    model, variables, images, attribution = hybrid
    rollout = interpret.rollout_map(model, variables, images)
    cnn = interpret.grad_cam(model, variables, images, "cnn4", head="cnn")
    tokens = interpret.grad_cam(model, variables, images, "transformer3", head="transformer")
    for heat in (rollout, cnn, tokens):
        assert heat.shape == (2, 16, 16) and float(heat.min()) >= 0 and float(heat.max()) <= 1
    paths = [interpret.save_overlays(tmp_path / "maps.png", images, {"rollout": rollout, "Grad-CAM": cnn,
                                                                     "token Grad-CAM": tokens}, titles=["a", "b"]),
             interpret.save_branch_attribution(tmp_path / "sub" / "branches.png", attribution, images,
                                               class_names=[f"class {i}" for i in range(10)])]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
