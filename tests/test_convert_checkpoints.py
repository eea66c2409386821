"""Checkpoint containers, the ViT .npz layout, other heads and other resolutions through `create_model(pretrained=)`."""

import argparse
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="converter tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")

import flax  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models.vision_transformer import _load_weights  # noqa: E402
from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid, _resnetv2  # noqa: E402

from hybrid_jax import create_model  # noqa: E402
from hybrid_jax.convert import ConversionError, convert_state_dict  # noqa: E402
from hybrid_jax.layers.patch import resample_pos_embed  # noqa: E402
from parity import randomize_norms_, tolerance, torch_logits  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # our test_vit


def tiny_vit(num_classes: int = 10, seed: int = 0) -> "torch.nn.Module":
    """timm's ViT in the shape of our `test_vit`, random weights and norms."""
    torch.manual_seed(seed)
    return randomize_norms_(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                                              **TINY_VIT), image_size=32)


def tiny_r50_vit(num_classes: int = 10) -> "torch.nn.Module":
    """timm's R50+ViT hybrid in the shape of our `test_vit_r50` (two one-block ResNet stages, one ViT block)."""
    torch.manual_seed(0)
    model = _create_vision_transformer_hybrid("vit_base_r50_s16_224", backbone=_resnetv2((1, 1)), img_size=64,
                                              embed_dim=32, depth=1, num_heads=2, num_classes=num_classes)
    return randomize_norms_(model, image_size=64)


def images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def flat_params(model) -> dict:
    return flax.traverse_util.flatten_dict(model.variables["params"], sep="/")


def assert_logits_match(ours, theirs):
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=tolerance(theirs), rtol=0)


def _wrapped(state):
    return {"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)}  # as Conformer's main.py saves


CONTAINERS = {
    "model.safetensors": lambda s, p: save_file({k: v.contiguous() for k, v in s.items()}, str(p)),
    "bare.pth": lambda s, p: torch.save(s, p),
    "wrapped_model.pth": lambda s, p: torch.save(_wrapped(s), p),
    "wrapped_state_dict.pth.tar": lambda s, p: torch.save({"state_dict": s, "optimizer": {}}, p),
    "wrapped_state_dict.pt": lambda s, p: torch.save({"state_dict": s}, p),
    "wrapped_ema.pth": lambda s, p: torch.save({"model_ema": s}, p),
    "data_parallel.bin": lambda s, p: torch.save({f"module.{k}": v for k, v in s.items()}, p),
}


@pytest.mark.parametrize("filename", CONTAINERS)
def test_every_container_loads(tmp_path, filename):
    reference = tiny_vit()
    path = tmp_path / filename
    CONTAINERS[filename](reference.state_dict(), path)
    model = create_model("test_vit", pretrained=path)
    assert_logits_match(model(images(32), train=False), torch_logits(reference, images(32)))


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(ConversionError, match="no checkpoint file at .*; pass the path"):
        create_model("test_vit", pretrained=tmp_path / "missing.pth")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        create_model("test_vit", pretrained=tmp_path / "weights.txt")
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint") as error:
        create_model("test_vit", pretrained=tmp_path / "broken.pth")
    assert "\n" not in str(error.value)
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ConversionError, match="holds no tensors"):
        create_model("test_vit", pretrained=tmp_path / "empty.pth")
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ConversionError, match="no tensor 'patch_embed.proj.weight'"):
        create_model("test_vit", pretrained=tmp_path / "resnet18.pth")


# --- google-research/vision_transformer .npz (vit_jax/models_vit.py, models_resnet.py) ---

def vit_npz_manifest(dim: int, depth: int, heads: int, patch: int, grid: int, classes: int, in_channels: int = 3,
                     hybrid_layers: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an official ViT / R50+ViT .npz, as the Flax modules of vit_jax name them."""
    shapes = {}
    if hybrid_layers:
        shapes |= {"conv_root/kernel": (7, 7, 3, 64), "gn_root/scale": (64,), "gn_root/bias": (64,)}
        width_in = 64
        for s, depth_s in enumerate(hybrid_layers):
            width = 64 * 2 ** s
            for u in range(depth_s):
                unit = f"block{s + 1}/unit{u + 1}"
                convs = ((1, width_in, width), (3, width, width), (1, width, 4 * width))
                for k, (kh, cin, cout) in enumerate(convs, 1):
                    shapes |= {f"{unit}/conv{k}/kernel": (kh, kh, cin, cout), f"{unit}/gn{k}/scale": (cout,),
                               f"{unit}/gn{k}/bias": (cout,)}
                if u == 0:  # width or stride changes: a projection shortcut
                    shapes |= {f"{unit}/conv_proj/kernel": (1, 1, width_in, 4 * width),
                               f"{unit}/gn_proj/scale": (4 * width,), f"{unit}/gn_proj/bias": (4 * width,)}
                width_in = 4 * width
        in_channels = width_in
    shapes |= {"embedding/kernel": (patch, patch, in_channels, dim), "embedding/bias": (dim,), "cls": (1, 1, dim),
               "Transformer/posembed_input/pos_embedding": (1, 1 + grid * grid, dim),
               "Transformer/encoder_norm/scale": (dim,), "Transformer/encoder_norm/bias": (dim,),
               "head/kernel": (dim, classes), "head/bias": (classes,)}
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            shapes |= {f"{block}/{norm}/scale": (dim,), f"{block}/{norm}/bias": (dim,)}
        attn = f"{block}/MultiHeadDotProductAttention_1"
        for name in ("query", "key", "value"):
            shapes |= {f"{attn}/{name}/kernel": (dim, heads, dim // heads),
                       f"{attn}/{name}/bias": (heads, dim // heads)}
        shapes |= {f"{attn}/out/kernel": (heads, dim // heads, dim), f"{attn}/out/bias": (dim,)}
        shapes |= {f"{block}/MlpBlock_3/Dense_0/kernel": (dim, 4 * dim), f"{block}/MlpBlock_3/Dense_0/bias": (4 * dim,),
                   f"{block}/MlpBlock_3/Dense_1/kernel": (4 * dim, dim), f"{block}/MlpBlock_3/Dense_1/bias": (dim,)}
    return shapes


def random_npz(path, shapes: dict) -> None:
    """Random arrays: norm scales near 1, everything else small."""
    rng = np.random.default_rng(0)
    arrays = {name: (1 + 0.2 * rng.standard_normal(shape) if name.endswith("scale") else
                     rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]) if len(shape) > 1 else 50))
              for name, shape in shapes.items()}
    np.savez(path, **{name: a.astype(np.float32) for name, a in arrays.items()})


@pytest.mark.parametrize("name, reference, size, manifest", [
    ("test_vit", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY_VIT), 32,
     dict(dim=32, depth=2, heads=2, patch=4, grid=8, classes=10)),
    ("test_vit_r50", tiny_r50_vit, 64,
     dict(dim=32, depth=1, heads=2, patch=1, grid=8, classes=10, hybrid_layers=(1, 1))),
])
def test_vit_npz_loads_as_timm_loads_it(tmp_path, name, reference, size, manifest):
    path = tmp_path / "ViT.npz"
    random_npz(path, vit_npz_manifest(**manifest))
    reference = reference().eval()
    _load_weights(reference, str(path))
    model = create_model(name, pretrained=path)
    assert_logits_match(model(images(size), train=False), torch_logits(reference, images(size)))


def test_npz_split_of_attention_heads_by_hand(tmp_path):
    """query kernel [D, heads, d] flattens to Dense [D, heads * d]; out [heads, d, D] to [heads * d, D]."""
    shapes = vit_npz_manifest(dim=32, depth=2, heads=2, patch=4, grid=8, classes=10)
    path = tmp_path / "ViT.npz"
    random_npz(path, shapes)
    arrays = dict(np.load(path))
    params = flat_params(create_model("test_vit", pretrained=path))
    attn = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    query, out = arrays[f"{attn}/query/kernel"], arrays[f"{attn}/out/kernel"]
    np.testing.assert_array_equal(params["blocks_1/attn/query/kernel"][:, 16:], query[:, 1, :])
    np.testing.assert_array_equal(params["blocks_1/attn/out/kernel"][16:], out[1])
    np.testing.assert_array_equal(params["pos_embed"], arrays["Transformer/posembed_input/pos_embedding"])


# --- another classifier, no classifier, another resolution ---

def test_another_num_classes_reinitialises_only_the_head(tmp_path, caplog):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    full = flat_params(create_model("test_vit", pretrained=path))
    with caplog.at_level(logging.WARNING, logger="hybrid_jax"):
        five = create_model("test_vit", pretrained=path, num_classes=5)
    assert "params/head/bias, params/head/kernel" in caplog.text
    params = flat_params(five)
    assert params["head/kernel"].shape == (32, 5) and not np.any(params["head/kernel"])
    assert set(params) == set(full)
    for key in set(full) - {"head/kernel", "head/bias"}:
        np.testing.assert_array_equal(params[key], full[key], err_msg=key)
    assert five(images(32), train=False).shape == (2, 5)
    features = create_model("test_vit", pretrained=path, num_classes=0)
    assert "head/kernel" not in flat_params(features)
    reference = tiny_vit()
    with torch.no_grad():
        pooled = reference.forward_head(reference.forward_features(torch.from_numpy(
            images(32).transpose(0, 3, 1, 2).copy())), pre_logits=True).numpy()
    assert_logits_match(features(images(32), train=False), pooled)


def test_a_headless_checkpoint_gives_a_features_model(tmp_path):
    """timm creates vit_base_r50_s16_224 without a head: loading such a file needs no num_classes."""
    reference = tiny_r50_vit(num_classes=0)
    assert "head.weight" not in reference.state_dict()
    path = tmp_path / "r50_vit.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("test_vit_r50", pretrained=path)
    assert model.num_classes == 0
    assert_logits_match(model(images(64), train=False), torch_logits(reference, images(64)))
    assert create_model("test_vit_r50", pretrained=path, num_classes=3)(images(64), train=False).shape == (2, 3)


def test_another_resolution_resamples_the_position_embedding(tmp_path):
    path = tmp_path / "vit.pth"
    reference = tiny_vit()
    torch.save(reference.state_dict(), path)
    model = create_model("test_vit", pretrained=path, img_size=48)
    pos_embed = reference.pos_embed.detach().numpy()
    np.testing.assert_array_equal(flat_params(model)["pos_embed"], resample_pos_embed(pos_embed, (12, 12)))
    logits = np.asarray(model(images(48), train=False))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    # The model built at 32 px resamples the same way when run at 48 px.
    assert_logits_match(logits, np.asarray(create_model("test_vit", pretrained=path)(images(48), train=False)))


def test_levit_at_another_resolution_pads_its_bias_tables(tmp_path):
    """LeViT clips offsets beyond its table, so a larger table repeats the farthest offsets: the same function."""
    torch.manual_seed(0)
    reference = timm.create_model("levit_128s", pretrained=False)
    path = tmp_path / "levit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    params = flat_params(create_model("levit_128s", pretrained=path, img_size=256))
    table = reference.state_dict()["stages.0.blocks.0.attn.attention_biases"].numpy().reshape(4, 14, 14)
    padded = params["stages_0/blocks_0/attn/attention_biases"].reshape(4, 16, 16)
    np.testing.assert_array_equal(padded[:, :14, :14], table)
    np.testing.assert_array_equal(padded[:, 15, :14], table[:, 13])
    np.testing.assert_array_equal(padded[:, 14:, 14:], np.broadcast_to(table[:, 13:, 13:], (4, 2, 2)))


def test_convert_state_dict_stays_strict_without_fit():
    state = tiny_vit().state_dict()
    with pytest.raises(ConversionError, match="shape mismatches: .*head/kernel"):
        convert_state_dict("test_vit", state, create_model("test_vit", num_classes=5))
