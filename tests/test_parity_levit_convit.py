"""Same weights, same logits: LeViT against timm and Hugging Face, ConViT against timm (needs the parity extra).

LeViT references are prepared by `levit_reference` rather than `check_parity`'s defaults: LeViT has no norm on
its residual stream, so with every BatchNorm scale drawn from [0.5, 1.5] each branch adds as much as the stream
already holds and float32 rounding grows about 3x per block (for some seeds the reference's own float32 and
float64 logits differ by a whole logit, at 224 px). A trained LeViT's branch-ending BatchNorms are small (they
start at 0: timm's bn_weight_init=0), so here they are drawn 10x smaller, and the norm statistics are measured on
the very images compared, so every BatchNorm sees inputs of the scale it normalises. The attention bias tables
(zeros at init) are randomised, so the offset indexing is compared too.
"""

import copy
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")

from hybrid_jax import create_model  # noqa: E402
from hybrid_jax.convert import ConversionError, convert_state_dict  # noqa: E402
from parity import check_parity, randomize_norms_, tolerance, torch_logits  # noqa: E402

LEVIT_HF_SIZES = {  # LevitConfig fields of each variant (the HF defaults are LeViT-128)
    "levit_128s": dict(hidden_sizes=[128, 256, 384], num_attention_heads=[4, 6, 8], depths=[2, 3, 4], key_dim=[16] * 3),
    "levit_128": dict(hidden_sizes=[128, 256, 384], num_attention_heads=[4, 8, 12], depths=[4, 4, 4], key_dim=[16] * 3),
    "levit_192": dict(hidden_sizes=[192, 288, 384], num_attention_heads=[3, 5, 6], depths=[4, 4, 4], key_dim=[32] * 3),
    "levit_256": dict(hidden_sizes=[256, 384, 512], num_attention_heads=[4, 6, 8], depths=[4, 4, 4], key_dim=[32] * 3),
    "levit_384": dict(hidden_sizes=[384, 512, 768], num_attention_heads=[6, 9, 12], depths=[4, 4, 4], key_dim=[32] * 3),
}
# BatchNorms that end a residual branch: timm (linear and conv mode) and Hugging Face names (HF wraps residual
# layers in `.module`; its shrinking attention, which ends no residual branch, is not wrapped).
BRANCH_END = re.compile(r"(blocks\.\d+\.attn\.proj\.ln\.bn|mlp\.ln2\.bn|linear_down\.batch_norm"
                        r"|layers\.\d+\.module\.projection\.batch_norm)$")


def levit_reference(build, size: int, seed: int = 0) -> tuple["torch.nn.Module", np.ndarray]:
    """A random-weight LeViT reference that float32 can reproduce, and the images to compare it on."""
    torch.manual_seed(seed)
    reference = build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("attention_biases"):
                param.copy_(2 * torch.rand(param.shape, generator=generator) - 1)
    randomize_norms_(reference, seed=seed, image_size=size)
    images = np.random.default_rng(seed).uniform(-1, 1, (8, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                if BRANCH_END.search(name):
                    module.weight.mul_(0.1)
                    module.bias.mul_(0.1)
                module.reset_running_stats()
                module.momentum = None
        reference.train()
        reference(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return reference.eval(), images[:2]


def compare(name: str, reference, images: np.ndarray, **overrides) -> float:
    """Max |logit difference| between `reference` and our converted `name`, asserted <= tolerance(reference logits)."""
    model = create_model(name, **overrides)
    variables = convert_state_dict(name, reference.state_dict(), model)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    theirs = torch_logits(reference, images)
    difference = np.max(np.abs(ours - theirs))
    if difference > tolerance(theirs):
        # How much float32 rounding alone moves the reference's logits, to tell a bug from ill-conditioning.
        rounding = np.max(np.abs(torch_logits(copy.deepcopy(reference).double(), images.astype(np.float64)) - theirs))
        pytest.fail(f"{name}: max |logit difference| {difference:.2e} (logits up to {np.abs(theirs).max():.1f}; "
                    f"the reference's own float32 vs float64: {rounding:.2e})")
    print(f"{name}: max |logit difference| {difference:.2e}")
    return difference


def _timm_levit(name: str, size: int, conv: bool = False):
    timm_name = name.replace("levit_", "levit_conv_") if conv else name
    return lambda: timm.create_model(timm_name, pretrained=False, img_size=size)


def _hf_levit(name: str, size: int):
    pytest.importorskip("transformers")
    from transformers import LevitConfig, LevitForImageClassificationWithTeacher

    config = LevitConfig(image_size=size, num_labels=1000, **LEVIT_HF_SIZES[name])
    return lambda: LevitForImageClassificationWithTeacher(config)


# The default tests run at 96 px: maps of 6x6, 3x3 and 2x2, so the shrinking attention meets both an even and an
# odd grid (224 px: 14, 7, 4) at a fifth of the work; the slow tests run every variant at 224.
def test_levit_128s_matches_timm():
    compare("levit_128s", *levit_reference(_timm_levit("levit_128s", 96), 96), img_size=96)


def test_levit_128s_matches_hugging_face():
    compare("levit_128s", *levit_reference(_hf_levit("levit_128s", 96), 96), img_size=96)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"])
def test_levit_matches_timm_all_sizes(name):
    compare(name, *levit_reference(_timm_levit(name, 224), 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"])
def test_levit_matches_hugging_face_all_sizes(name):
    compare(name, *levit_reference(_hf_levit(name, 224), 224))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_128s", "levit_256"])
def test_levit_conv_mode_matches_timm(name):
    """timm's `levit_conv_*` store the same weights as 1x1 convolutions on NCHW maps."""
    compare(name, *levit_reference(_timm_levit(name, 224, conv=True), 224))


def test_levit_conversion_fits_heads_and_refuses_other_variants():
    """HF's single-head LevitForImageClassification fills distilled=False; a 128S checkpoint is no LeViT-128."""
    pytest.importorskip("transformers")
    from transformers import LevitConfig, LevitForImageClassification

    single = LevitForImageClassification(LevitConfig(image_size=64, num_labels=10, **LEVIT_HF_SIZES["levit_128s"]))
    model = create_model("levit_128s", img_size=64, num_classes=10, distilled=False)
    variables = convert_state_dict("levit_128s", single.state_dict(), model)
    np.testing.assert_array_equal(variables["params"]["head"]["linear"]["kernel"],
                                  single.classifier.linear.weight.detach().numpy().T)
    assert "head_dist" not in variables["params"]
    with pytest.raises(ConversionError, match="no tensor 'stages.0.blocks.2"):
        convert_state_dict("levit_128", timm.create_model("levit_128s", pretrained=False).state_dict())


def _convit(name: str, **kwargs):
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # gates start at 1 in every head: draw them apart so per-head gating is compared
        for key, param in reference.named_parameters():
            if key.endswith("gating_param"):
                param.uniform_(-2, 2)
    return reference


def test_convit_tiny_matches_timm():
    """Reduced depth (2 GPSA blocks, then the class token and 1 global block): every code path, a quarter the work."""
    reduced = dict(depth=3, local_up_to_layer=2)
    check_parity("convit_tiny", _convit("convit_tiny", **reduced), **reduced)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convit_tiny", "convit_small", "convit_base"])
def test_convit_matches_timm_all_sizes(name):
    print(f"{name}: max |logit difference| {check_parity(name, _convit(name), batch=1):.2e}")
