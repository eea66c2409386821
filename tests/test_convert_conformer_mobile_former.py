"""The authors' Conformer and Mobile-Former checkpoints: official names and shapes, each value in its place.

CI cannot install the authors' code, so the state dicts are built from manifests
written from it (pengzhiliang/Conformer `conformer.py` + `models.py`;
AAboys/MobileFormer `mobile_former.py` + `dna_blocks.py`): every tensor name and
shape their modules register, filled with random numbers. A manifest that missed or
invented a tensor fails the conversion (every tensor must be used, every variable
filled); the spot checks then follow single values through each kind of layout change.
"""

import numpy as np
import pytest

from hybrid_jax import create_model
from hybrid_jax.convert import ConversionError, convert_state_dict
from hybrid_jax.models.mobile_former import _BLOCKS

Shapes = dict[str, tuple[int, ...]]


def batch_norm(prefix: str, width: int) -> Shapes:
    return {f"{prefix}.{n}": (width,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def linear(prefix: str, out: int, inp: int) -> Shapes:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def layer_norm(prefix: str, width: int) -> Shapes:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


# --- Conformer (conformer.py: ConvBlock, FCUDown, FCUUp, Block, ConvTransBlock, Conformer) ---

def conformer_block(prefix: str, inp: int, out: int, res_conv: bool) -> Shapes:
    med = out // 4
    shapes = {f"{prefix}.conv1.weight": (med, inp, 1, 1), f"{prefix}.conv2.weight": (med, med, 3, 3),
              f"{prefix}.conv3.weight": (out, med, 1, 1)}
    shapes |= batch_norm(f"{prefix}.bn1", med) | batch_norm(f"{prefix}.bn2", med) | batch_norm(f"{prefix}.bn3", out)
    if res_conv:
        shapes |= {f"{prefix}.residual_conv.weight": (out, inp, 1, 1)} | batch_norm(f"{prefix}.residual_bn", out)
    return shapes


def transformer_block(prefix: str, dim: int, mlp_ratio: int = 4) -> Shapes:
    return (layer_norm(f"{prefix}.norm1", dim) | linear(f"{prefix}.attn.qkv", 3 * dim, dim)
            | linear(f"{prefix}.attn.proj", dim, dim) | layer_norm(f"{prefix}.norm2", dim)
            | linear(f"{prefix}.mlp.fc1", mlp_ratio * dim, dim) | linear(f"{prefix}.mlp.fc2", dim, mlp_ratio * dim))


def conformer_manifest(patch_size: int, channel_ratio: int, embed_dim: int, depth: int = 12, num_classes: int = 1000,
                       base_channel: int = 64, stem: tuple[int, int] = (64, 7)) -> Shapes:
    """Conformer(...).state_dict() shapes (num_med_block=0, as every release); `stem` = (width, kernel)."""
    stem_width, kernel = stem
    width, dim, third = base_channel * channel_ratio, embed_dim, depth // 3
    shapes = {"cls_token": (1, 1, dim), "conv1.weight": (stem_width, 3, kernel, kernel)} | batch_norm("bn1", stem_width)
    shapes |= conformer_block("conv_1", stem_width, width, True)
    shapes |= {"trans_patch_conv.weight": (dim, stem_width, patch_size // 4, patch_size // 4),
               "trans_patch_conv.bias": (dim,)} | transformer_block("trans_1", dim)
    inp = width
    for i in range(2, depth + 1):
        out = width * 2 ** ((i - 1) // third)
        first = i in (third + 1, 2 * third + 1)
        prefix = f"conv_trans_{i}"
        shapes |= conformer_block(f"{prefix}.cnn_block", inp, out, first)
        shapes |= {f"{prefix}.squeeze_block.conv_project.weight": (dim, out // 4, 1, 1),
                   f"{prefix}.squeeze_block.conv_project.bias": (dim,)} | layer_norm(f"{prefix}.squeeze_block.ln", dim)
        shapes |= {f"{prefix}.expand_block.conv_project.weight": (out // 4, dim, 1, 1),
                   f"{prefix}.expand_block.conv_project.bias": (out // 4,)} | batch_norm(f"{prefix}.expand_block.bn",
                                                                                     out // 4)
        shapes |= transformer_block(f"{prefix}.trans_block", dim)
        shapes |= conformer_block(f"{prefix}.fusion_block", out, out, i == depth)
        inp = out
    shapes |= layer_norm("trans_norm", dim) | linear("conv_cls_head", num_classes, 4 * width)
    if num_classes:  # trans_cls_head is nn.Identity at num_classes=0; conv_cls_head stays, with no outputs
        shapes |= linear("trans_cls_head", num_classes, dim)
    return shapes


# --- Mobile-Former (dna_blocks.py: DnaBlock3, DnaBlock, Local2Global, GlobalBlock, Global2Local, MergeClassifier) ---

def mobile_former_manifest(blocks, stem_features: int, token_num: int = 6, token_dim: int = 192,
                           num_features: int = 1920, head_expand: int = 6, groups: int = 1,
                           num_classes: int = 1000) -> Shapes:
    """MobileFormer(...).state_dict() shapes for our block table (gbr_type attn, gbr_dynamic [1, 0, 0], ffn)."""
    conv = lambda p, out, inp, k, g=1: {f"{p}.0.weight": (out, inp // g, k, k)} | batch_norm(f"{p}.1", out)
    squeeze = token_dim // 4
    hyper = lambda p, out: linear(f"{p}.hyper.0", squeeze, token_dim) | linear(f"{p}.hyper.2", out, squeeze)
    d = token_dim
    shapes = {"tokens.weight": (token_num, d)} | conv("stem", stem_features, 3, 3)
    inp = stem_features
    for i, (kind, e1, c, _, e2) in enumerate(blocks):
        p = f"features.{i}"
        if kind == "lite":  # nn.Sequential(dw conv, BN, ReLU6, shuffle, pw conv, BN)
            shapes |= {f"{p}.conv.0.weight": (inp * e1, 1, 3, 3), f"{p}.conv.4.weight": (c, inp * e1 // groups, 1, 1)}
            shapes |= batch_norm(f"{p}.conv.1", inp * e1) | batch_norm(f"{p}.conv.5", c)
        else:
            if kind == "down":  # DnaBlock3: dw (stride) -> pw -> dw -> pw
                h1, h2 = inp * e1, c * e2
                shapes |= conv(f"{p}.conv1", h1, inp, 3, inp) | hyper(f"{p}.hyper1", 2 * h1)
                shapes |= conv(f"{p}.conv2", c, h1, 1, groups) | conv(f"{p}.conv3", h2, c, 3, c)
                shapes |= hyper(f"{p}.hyper3", 2 * h2) | conv(f"{p}.conv4", c, h2, 1, groups)
            else:  # DnaBlock: pw -> dw -> pw
                h = inp * e1
                shapes |= conv(f"{p}.conv1", h, inp, 1, groups) | hyper(f"{p}.hyper1", 2 * h)
                shapes |= conv(f"{p}.conv2", h, h, 3, h) | hyper(f"{p}.hyper2", 2 * h)
                shapes |= conv(f"{p}.conv3", c, h, 1, groups)
            shapes |= linear(f"{p}.local_global.alpha.0", inp, d) | linear(f"{p}.local_global.q", inp, d)
            shapes |= linear(f"{p}.local_global.proj", d, inp) | layer_norm(f"{p}.local_global.layer_norm", d)
            g = f"{p}.global_block"
            shapes |= linear(f"{g}.ffn.0", 2 * d, d) | linear(f"{g}.ffn.2", d, 2 * d) | layer_norm(f"{g}.ffn_norm", d)
            shapes |= linear(f"{g}.q", d, d) | linear(f"{g}.channel_mlp", d, d) | layer_norm(f"{g}.layer_norm", d)
            shapes |= linear(f"{p}.global_local.k", c, d) | linear(f"{p}.global_local.proj", c, d)
        inp = c
    shapes |= linear("local_global.alpha.0", inp, d) | linear("local_global.q", inp, d)
    shapes |= linear("local_global.proj", d, inp) | layer_norm("local_global.layer_norm", d)
    shapes |= {"classifier.conv.1.weight": (inp * head_expand, inp // groups, 1, 1)}
    shapes |= batch_norm("classifier.conv.2", inp * head_expand)
    shapes |= linear("classifier.fc.0", num_features, inp * head_expand + d)
    shapes |= batch_norm("classifier.fc.1", num_features)
    return shapes | linear("classifier.classifier.1", num_classes, num_features)


def random_state_dict(shapes: Shapes, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values of the manifest's shapes; running variances positive, counters zero."""
    rng = np.random.default_rng(seed)
    value = lambda name, shape: (np.zeros(shape) if name.endswith("num_batches_tracked") else
                                 rng.uniform(0.5, 1.5, shape) if name.endswith("running_var") else
                                 rng.standard_normal(shape) * 0.05)
    return {name: value(name, shape).astype(np.float32) for name, shape in shapes.items()}


def flat(variables: dict) -> dict:
    from flax.traverse_util import flatten_dict

    return flatten_dict(variables, sep="/")


@pytest.fixture(scope="module")
def conformer():
    """conformer_tiny_patch16 (the smallest release) converted from a random official state dict."""
    sd = random_state_dict(conformer_manifest(patch_size=16, channel_ratio=1, embed_dim=384))
    return sd, flat(convert_state_dict("conformer_tiny_patch16", sd))


def test_conformer_values_land_in_place(conformer):
    sd, v = conformer
    conv = lambda key: sd[key].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    np.testing.assert_array_equal(v["params/conv1/kernel"], conv("conv1.weight"))
    np.testing.assert_array_equal(v["batch_stats/bn1/var"], sd["bn1.running_var"])
    np.testing.assert_array_equal(v["params/conv_trans_5/cnn_block/residual_conv/kernel"],
                                  conv("conv_trans_5.cnn_block.residual_conv.weight"))
    np.testing.assert_array_equal(v["batch_stats/conv_trans_12/fusion_block/residual_bn/mean"],
                                  sd["conv_trans_12.fusion_block.residual_bn.running_mean"])
    np.testing.assert_array_equal(v["params/conv_trans_7/fcu/squeeze_block/conv_project/kernel"],
                                  conv("conv_trans_7.squeeze_block.conv_project.weight"))
    np.testing.assert_array_equal(v["params/conv_trans_7/fcu/expand_block/bn/scale"],
                                  sd["conv_trans_7.expand_block.bn.weight"])
    np.testing.assert_array_equal(v["params/conv_trans_3/trans_block/attn/value/kernel"],
                                  sd["conv_trans_3.trans_block.attn.qkv.weight"][768:].T)
    np.testing.assert_array_equal(v["params/trans_1/mlp/fc2/kernel"], sd["trans_1.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(v["params/trans_cls_head/kernel"], sd["trans_cls_head.weight"].T)
    np.testing.assert_array_equal(v["params/conv_cls_head/bias"], sd["conv_cls_head.bias"])
    np.testing.assert_array_equal(v["params/cls_token"], sd["cls_token"])


def test_conformer_qkv_split_by_hand():
    """Row r of the fused [q | k | v] weight is output r: q takes rows 0..D-1, k D..2D-1, v 2D..3D-1."""
    shapes = conformer_manifest(patch_size=16, channel_ratio=1, embed_dim=64, depth=6, num_classes=10,
                                base_channel=32, stem=(32, 3))
    sd = random_state_dict(shapes)
    dim = 64
    sd["trans_1.attn.qkv.weight"] = np.repeat(np.arange(3 * dim, dtype=np.float32)[:, None], dim, axis=1)
    sd["trans_1.attn.qkv.bias"] = -np.arange(3 * dim, dtype=np.float32)
    v = flat(convert_state_dict("conformer_tiny_32", sd))
    for i, name in enumerate(("query", "key", "value")):
        rows = np.arange(i * dim, (i + 1) * dim, dtype=np.float32)
        np.testing.assert_array_equal(v[f"params/trans_1/attn/{name}/kernel"], np.broadcast_to(rows, (dim, dim)))
        np.testing.assert_array_equal(v[f"params/trans_1/attn/{name}/bias"], -rows)


def test_conformer_checkpoint_files_load(tmp_path):
    """{'model': ...} as main.py saves it (with its args), at the tiny test size; and a headless state dict."""
    torch = pytest.importorskip("torch")
    import argparse

    shapes = conformer_manifest(patch_size=16, channel_ratio=1, embed_dim=64, depth=6, num_classes=10,
                                base_channel=32, stem=(32, 3))
    tensors = {k: torch.from_numpy(a) for k, a in random_state_dict(shapes).items()}
    torch.save({"model": tensors, "epoch": 1, "args": argparse.Namespace(model="Conformer")}, tmp_path / "c.pth")
    model = create_model("conformer_tiny_32", pretrained=tmp_path / "c.pth")
    np.testing.assert_array_equal(model.variables["params"]["conv_trans_6"]["fusion_block"]["conv2"]["kernel"],
                                  tensors["conv_trans_6.fusion_block.conv2.weight"].numpy().transpose(2, 3, 1, 0))
    headless = conformer_manifest(patch_size=16, channel_ratio=1, embed_dim=64, depth=6, num_classes=0,
                                  base_channel=32, stem=(32, 3))
    torch.save({k: torch.from_numpy(a) for k, a in random_state_dict(headless).items()}, tmp_path / "f.pth")
    features = create_model("conformer_tiny_32", pretrained=tmp_path / "f.pth")
    assert features.num_classes == 0 and "conv_cls_head" not in features.variables["params"]


def test_a_conformer_checkpoint_of_another_variant_is_refused():
    sd = random_state_dict(conformer_manifest(patch_size=32, channel_ratio=1, embed_dim=384))
    with pytest.raises(ConversionError, match="trans_patch_conv/kernel"):
        convert_state_dict("conformer_tiny_patch16", sd)


@pytest.fixture(scope="module")
def mobile_former():
    """mobile_former_26m (the smallest release: grouped pointwise convs) from a random official state dict."""
    blocks, fields = _BLOCKS["26m"]
    sd = random_state_dict(mobile_former_manifest(blocks, **{k: fields[k] for k in (
        "stem_features", "token_num", "token_dim", "num_features", "groups")}))
    return sd, flat(convert_state_dict("mobile_former_26m", sd))


def test_mobile_former_values_land_in_place(mobile_former):
    sd, v = mobile_former
    conv = lambda key: sd[key].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(v["params/tokens"], sd["tokens.weight"])
    np.testing.assert_array_equal(v["params/stem/conv/kernel"], conv("stem.0.weight"))
    np.testing.assert_array_equal(v["batch_stats/stem/norm/mean"], sd["stem.1.running_mean"])
    np.testing.assert_array_equal(v["params/features_0/conv2/conv/kernel"], conv("features.0.conv.4.weight"))
    assert v["params/features_0/conv2/conv/kernel"].shape == (1, 1, 24 // 4, 12)  # grouped: in / groups
    np.testing.assert_array_equal(v["params/features_2/mobile/conv3/conv/kernel"], conv("features.2.conv3.0.weight"))
    np.testing.assert_array_equal(v["params/features_2/mobile/hyper3/fc2/kernel"],
                                  sd["features.2.hyper3.hyper.2.weight"].T)
    np.testing.assert_array_equal(v["params/features_1/mobile/hyper2/fc1/bias"], sd["features.1.hyper2.hyper.0.bias"])
    np.testing.assert_array_equal(v["params/features_4/bridge/local_global/alpha/kernel"],
                                  sd["features.4.local_global.alpha.0.weight"].T)
    np.testing.assert_array_equal(v["params/features_4/bridge/global_local/proj/kernel"],
                                  sd["features.4.global_local.proj.weight"].T)
    np.testing.assert_array_equal(v["params/features_8/global_block/ffn_fc2/kernel"],
                                  sd["features.8.global_block.ffn.2.weight"].T)
    np.testing.assert_array_equal(v["params/local_global/q/kernel"], sd["local_global.q.weight"].T)
    np.testing.assert_array_equal(v["batch_stats/classifier/fc_norm/var"], sd["classifier.fc.1.running_var"])
    np.testing.assert_array_equal(v["params/head/kernel"], sd["classifier.classifier.1.weight"].T)


def test_mobile_former_checkpoint_file_loads_with_another_head(tmp_path, caplog):
    """{'state_dict': ...} as timm's train.py saves it, at the tiny test size, fine-tuned to 3 classes."""
    torch = pytest.importorskip("torch")
    import logging

    from hybrid_jax import model_info

    fields = model_info("mobile_former_tiny_32").fields
    shapes = mobile_former_manifest(fields["blocks"], **{k: fields[k] for k in (
        "stem_features", "token_num", "token_dim", "num_features", "head_expand", "num_classes")})
    sd = random_state_dict(shapes)
    torch.save({"state_dict": {k: torch.from_numpy(a) for k, a in sd.items()}, "epoch": 1}, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="hybrid_jax"):
        model = create_model("mobile_former_tiny_32", pretrained=tmp_path / "m.pth", num_classes=3)
    assert "params/head/kernel" in caplog.text
    assert model.num_classes == 3 and model.variables["params"]["head"]["kernel"].shape == (64, 3)
    np.testing.assert_array_equal(model.variables["params"]["classifier"]["fc"]["kernel"],
                                  sd["classifier.fc.0.weight"].T)
