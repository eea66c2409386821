"""Same weights, same logits: CoAtNet and MaxViT against timm's MaxxVit (needs the parity extra).

The default suite runs one CoAtNet (timm's own `_rw` layout) and one MaxViT (the
TensorFlow port) at reduced depth; `-m slow` runs every registered variant at full size.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the parity extra: pip install -e '.[parity]'")
timm = pytest.importorskip("timm")

from hybrid_jax import create_model, list_models  # noqa: E402
from hybrid_jax.convert import convert_state_dict  # noqa: E402
from hybrid_jax.layers.relpos import from_flat_table, resize_table  # noqa: E402
from parity import check_parity  # noqa: E402


def randomized(reference: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Relative position tables and biases made large enough to matter.

    timm initialises the tables with std 0.02 and the attention biases at zero, so a
    table read transposed or flipped, or q / k / v biases swapped, would hide under
    the tolerance.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return reference


def reference(name: str, **kwargs) -> "torch.nn.Module":
    return randomized(timm.create_model(name, pretrained=False, **kwargs))


def test_coatnet_rw_matches_timm():
    """Every CoAtNet path at reduced depth: pooled MBConv stride, early SE, both T-block kinds, a 14x14 table."""
    depths = (1, 2, 2, 1)
    check_parity("coatnet_0_rw_224", reference("coatnet_0_rw_224", depths=depths), batch=1, depths=depths)


def test_maxvit_tf_matches_timm():
    """MaxViT's TF port at reduced depth: SAME padding, q / k / v apart, key - query tables, pre-logits head."""
    depths = (1, 1, 1, 1)
    check_parity("maxvit_tiny_tf_224", reference("maxvit_tiny_tf_224", depths=depths), batch=1, depths=depths)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models("coatnet_*") + list_models("maxvit_*"))
def test_maxxvit_matches_timm_full_size(name):
    check_parity(name, reference(name), batch=1)


def test_a_checkpoint_converts_to_another_input_size_with_resampled_tables():
    """timm's 224 px CoAtNet (14 x 14 and 7 x 7 maps) into a 256 px one (16 x 16, 8 x 8): tables 27 -> 31, 13 -> 15."""
    depths = (1, 1, 1, 1)
    state = reference("coatnet_0_rw_224", depths=depths).state_dict()
    model = create_model("coatnet_0_rw_224", depths=depths, img_size=256)
    params = convert_state_dict("coatnet_0_rw_224", state, model)["params"]
    for stage, heads, side, new_side in ((2, 6, 14, 16), (3, 12, 7, 8)):
        ours = params[f"stages_{stage}"]["blocks_0"]["rel_pos"]["relative_position_bias_table"]
        flat = state[f"stages.{stage}.blocks.0.attn.rel_pos.relative_position_bias_table"].numpy()
        expected = resize_table(jnp.asarray(from_flat_table(flat, side, side)), new_side, new_side)
        assert ours.shape == (heads, 2 * new_side - 1, 2 * new_side - 1)
        np.testing.assert_allclose(ours, expected, atol=1e-6)
