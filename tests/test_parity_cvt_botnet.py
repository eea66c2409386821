"""Same weights, same logits: CvT against Hugging Face, BoTNet against timm (needs the parity extra).

The default suite runs CvT-13 at reduced depth and 128 px (CvT has no position
embedding, so any size is the same code) and timm's botnet26t at 128 px (its
relative tables are sized by timm's `img_size`, ours by the same field). `-m slow`
runs every variant at full depth and its own resolution, and the paper's BoT50
against timm's ByobNet built with the paper's layout. CMT has no PyTorch package
to compare with (its official code is a repository, not a package), so no parity.
"""

import pytest

torch = pytest.importorskip("torch", reason="parity tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from parity import check_parity  # noqa: E402

# Hugging Face's CvtStage indexes its per-stage drop-path list by the stage number, so stage i needs depth > i.
CVT_DEPTHS = {"cvt_13": (1, 2, 10), "cvt_21": (1, 4, 16)}


def randomized(reference: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Biases, class tokens and relative position tables large enough that a mix-up would show.

    Both references initialise biases at zero and the tables / tokens with small std, which the
    tolerance could hide.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("cls_token"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith(("height_rel", "width_rel")):
                param.copy_(3 * param.shape[-1] ** -0.5 * torch.randn(param.shape, generator=generator))
    return reference


def hf_cvt(depths):
    config = transformers.CvtConfig(depth=depths, num_labels=1000)
    return randomized(transformers.CvtForImageClassification(config))


def test_cvt_matches_hugging_face():
    """Every CvT path at reduced depth: conv embeddings, q / k / v conv projections, class token, head."""
    depths = (1, 2, 3)
    check_parity("cvt_13", hf_cvt(depths), size=128, batch=2, depths=depths)


def test_botnet26t_matches_timm():
    """timm's botnet26t at 128 px: tiered stem, conv and attention bottlenecks, a strided attention block."""
    reference = randomized(timm.create_model("botnet26t_256", pretrained=False, img_size=128))
    check_parity("botnet26t_256", reference, size=128, batch=2, img_size=128)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CVT_DEPTHS))
def test_cvt_matches_hugging_face_full_size(name):
    check_parity(name, hf_cvt(CVT_DEPTHS[name]), batch=1)


@pytest.mark.slow
def test_botnet26t_matches_timm_full_size():
    check_parity("botnet26t_256", randomized(timm.create_model("botnet26t_256", pretrained=False)), batch=1)


@pytest.mark.slow
def test_botnet50_matches_timm_byobnet_with_the_paper_layout():
    """BoT50 (ResNet-50 with MHSA in all of c5, position logits scaled like content logits, as the paper's gist)
    against timm's ByobNet given the same layout, at 224 px with all three c5 blocks.

    The conv stages are cut to one block each: at full depth float32 rounding alone grows past the tolerance
    (4e-4 on logits up to 7 after 13 conv blocks, the same in float64 is 6e-7, the float32 softmax inside attention).
    """
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    blocks = tuple(ByoBlockCfg(type=kind, d=depth, c=width, s=stride, gs=0, br=0.25) for kind, depth, width, stride in (
        ("bottle", 1, 256, 1), ("bottle", 1, 512, 2), ("bottle", 1, 1024, 2), ("self_attn", 3, 2048, 2)))
    config = ByoModelCfg(blocks=blocks, stem_chs=64, stem_type="7x7", stem_pool="maxpool", fixed_input_size=True,
                         self_attn_layer="bottleneck", self_attn_kwargs=dict(scale_pos_embed=True))
    check_parity("botnet50", randomized(ByobNet(config, img_size=224)), batch=1, layout=("C", "C", "C", "AAA"))
