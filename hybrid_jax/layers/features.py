"""The features API: a model's stage maps instead of its logits, with their widths and strides (timm's features_only).

  model = create_model("resnet50", features_only=True, out_indices=(2, 3, 4))
  [(info.name, info.channels, info.reduction) for info in model.feature_info]
  # [('stage2', 512, 8), ('stage3', 1024, 16), ('stage4', 2048, 32)]
  variables = model.init(rng, images, train=False)
  maps = model.apply(variables, images, train=False)   # a list of [B, H / reduction, W / reduction, C] maps

Every zoo model declares `feature_info`: one `FeatureInfo` per map it can give, in
the order `out_indices` counts them, each naming its entry of the model's
`forward_stages` dict. Token entries (a ViT's blocks, a parallel hybrid's
transformer branch) become maps here: their class or global tokens are dropped and
the patch tokens laid out on their grid. `FeatureExtractor` shares its model's
variable scope, so a classifier's variables (checkpoints too) load into it as they
are; the head and the pooling layers are never called, so it has none of their own.
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax

from hybrid_jax.layers.inputs import check_images
from hybrid_jax.layers.patch import tokens_to_grid


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One feature map a model gives: timm's feature_info entry (module, num_chs, reduction)."""

    name: str  # its key in the model's forward_stages / forward_features dict, e.g. "stage3", "transformer12"
    channels: int
    reduction: int  # input pixels per map pixel along each side (the stride); a side is ceil(image side / reduction)
    branch: str | None = None  # "cnn" | "transformer" for the two branches of a parallel hybrid
    num_prefix_tokens: int | None = None  # None: the entry is a map; n: tokens [B, n + h*w, C], the first n dropped


def resolve_out_indices(infos: Sequence[FeatureInfo], out_indices: Sequence[int | str] | None) -> tuple[int, ...]:
    """Positions in `infos` of `out_indices` (positions, negative ones from the end, or names); None: all."""
    if out_indices is None:
        return tuple(range(len(infos)))
    if isinstance(out_indices, (int, str)):
        out_indices = (out_indices,)
    names = [info.name for info in infos]
    listing = f"0..{len(infos) - 1} (or -{len(infos)}..-1), or names: {', '.join(names)}"
    resolved = []
    for index in out_indices:
        if isinstance(index, str):
            if index not in names:
                raise ValueError(f"out_indices: the model has no feature map {index!r}; choose from {listing}")
            position = names.index(index)
        elif isinstance(index, int) and -len(infos) <= index < len(infos):
            position = index % len(infos)
        else:
            raise ValueError(f"out_indices: {index!r} is out of range; this model gives {len(infos)} feature maps: "
                             f"{listing}")
        resolved.append(position)
    if not resolved or len(set(resolved)) != len(resolved):
        raise ValueError(f"out_indices {tuple(out_indices)} must name distinct feature maps, at least one")
    return tuple(resolved)


def feature_map(value: jax.Array, info: FeatureInfo, image_size: tuple[int, int]) -> jax.Array:
    """The [B, h, w, C] map of one `forward_stages` entry for an image of `image_size` (tokens laid on their grid)."""
    if info.num_prefix_tokens is None:
        return value
    grid = tuple(-(-side // info.reduction) for side in image_size)
    return tokens_to_grid(value, grid, info.num_prefix_tokens)[1]


class FeatureExtractor(nn.Module):
    """A zoo model giving its stage maps instead of logits; `create_model(name, features_only=True)` builds one.

    Its variables are the model's own (the scope is shared), without the classifier
    and the pooling layers, which it never calls.
    """

    model: nn.Module  # any zoo model: it has forward_stages and feature_info
    out_indices: tuple[int | str, ...] | None = None  # positions in model.feature_info or names; None: every map

    def __post_init__(self):
        resolve_out_indices(self.model.feature_info, self.out_indices)  # a bad choice fails when the model is built
        super().__post_init__()

    def setup(self):
        nn.share_scope(self, self.model)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """One entry per map `__call__` returns, in that order."""
        infos = self.model.feature_info
        return tuple(infos[i] for i in resolve_out_indices(infos, self.out_indices))

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        """The chosen maps [B, H / reduction, W / reduction, C], in `out_indices` order."""
        check_images(x)
        features = self.model.forward_stages(x, train=train)
        return [feature_map(features[info.name], info, x.shape[1:3]) for info in self.feature_info]

