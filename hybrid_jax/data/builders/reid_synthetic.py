"""SYNTHETIC person re-identification data, rendered offline from a seed: no download, no real people.

The offline stand-in for Market-1501, with the same splits and conventions
(train / query / gallery, person id 0 for distractors and -1 for junk, cameras
numbered from 1), so the whole re-ID pipeline runs and can be tested anywhere.
Every image is a drawn figure, never a photograph; the dataset, its builder and
its file names all say "synthetic".

What makes it a re-ID problem rather than a colour lookup:
- identities: clothing colours (drawn from a shared palette, so identities collide
  on any one attribute), garment patterns, sleeve and leg styles, hair, build, and a
  bag, backpack or chest logo that only some viewpoints show;
- cameras: each has its own colour cast (per-channel gain and offset), background,
  preferred viewpoints (front / back / side, and a back view mirrors the figure),
  framing (scale and position jitter), chance and kind of occluder, blur and noise.
An untrained network ranks by raw colour and layout, which the casts, viewpoints and
occluders scramble across cameras; one trained across cameras learns the invariances.

Images are rendered at twice the stored size and averaged down (anti-aliasing).
Everything is a pure function of (seed, identity, camera, image index), so any one
image can be re-rendered alone, and the dataset is the same on every machine.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from hybrid_jax.data.builders.reid_folder import DISTRACTOR_ID, JUNK_ID, reid_features

SPLITS = ("train", "query", "gallery")
# Clothing palette (RGB in [0, 1]); identities draw from it, so attributes repeat across people.
PALETTE = np.array([
    (0.08, 0.08, 0.09), (0.92, 0.92, 0.90), (0.50, 0.50, 0.52), (0.10, 0.14, 0.40), (0.20, 0.40, 0.85),
    (0.80, 0.12, 0.12), (0.45, 0.07, 0.12), (0.12, 0.50, 0.20), (0.45, 0.45, 0.15), (0.95, 0.85, 0.20),
    (0.95, 0.50, 0.10), (0.45, 0.20, 0.60), (0.95, 0.55, 0.70), (0.40, 0.25, 0.12), (0.85, 0.75, 0.55),
    (0.10, 0.50, 0.50),
])
SKIN = np.array([(0.96, 0.80, 0.69), (0.87, 0.67, 0.52), (0.66, 0.46, 0.32), (0.42, 0.28, 0.18)])
HAIR = np.array([(0.05, 0.04, 0.03), (0.30, 0.18, 0.08), (0.65, 0.50, 0.25), (0.55, 0.55, 0.55)])
PATTERNS = ("solid", "horizontal_stripes", "vertical_stripes", "checks", "open_jacket")
LOWER_STYLES = ("trousers", "shorts", "skirt")
CARRIED = ("none", "backpack", "handbag", "logo")
VIEWS = ("front", "back", "side")
SUPERSAMPLE = 2


@dataclasses.dataclass(frozen=True)
class Appearance:
    """What one synthetic person looks like, independent of any camera."""

    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: np.ndarray
    upper_second: np.ndarray  # stripes, checks, or the shirt under an open jacket
    pattern: str  # one of PATTERNS
    stripe_period: float  # in body heights
    long_sleeves: bool
    lower: np.ndarray
    lower_style: str  # one of LOWER_STYLES
    shoes: np.ndarray
    carried: str  # one of CARRIED: a backpack shows from behind, a logo from the front
    carried_colour: np.ndarray
    shoulders: float  # torso half-width, body heights


@dataclasses.dataclass(frozen=True)
class Camera:
    """How one synthetic camera sees every person: cast, scene, viewpoint, framing, occluders, optics."""

    gain: np.ndarray  # per-channel multiplier (colour cast)
    offset: np.ndarray  # per-channel additive cast
    wall: np.ndarray
    floor: np.ndarray
    view_probs: np.ndarray  # over VIEWS
    scale_range: tuple[float, float]  # person height as a fraction of image height
    occlusion_prob: float
    occluder: np.ndarray
    blur: bool  # renders at half resolution and upsamples, like a low-resolution camera
    noise: float  # pixel noise standard deviation


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float = 0.05) -> np.ndarray:
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Draws one identity's clothing, build and belongings."""
    upper, second, lower = rng.choice(len(PALETTE), 3, replace=False)
    return Appearance(
        skin=_jitter(rng, SKIN[rng.integers(len(SKIN))], 0.03), hair=_jitter(rng, HAIR[rng.integers(len(HAIR))]),
        long_hair=bool(rng.random() < 0.35), upper=_jitter(rng, PALETTE[upper]),
        upper_second=_jitter(rng, PALETTE[second]), pattern=str(rng.choice(PATTERNS, p=[0.4, 0.15, 0.15, 0.1, 0.2])),
        stripe_period=float(rng.uniform(0.03, 0.07)), long_sleeves=bool(rng.random() < 0.6),
        lower=_jitter(rng, PALETTE[lower]), lower_style=str(rng.choice(LOWER_STYLES, p=[0.65, 0.2, 0.15])),
        shoes=_jitter(rng, PALETTE[rng.choice([0, 1, 2, 13])]), carried=str(rng.choice(CARRIED)),
        carried_colour=_jitter(rng, PALETTE[rng.integers(len(PALETTE))]), shoulders=float(rng.uniform(0.09, 0.13)))


def sample_camera(rng: np.random.Generator) -> Camera:
    """Draws one camera's colour cast, scene, favoured viewpoints, framing and optics."""
    return Camera(
        gain=rng.uniform(0.65, 1.35, 3), offset=rng.uniform(-0.08, 0.08, 3), wall=rng.uniform(0.2, 0.8, 3),
        floor=rng.uniform(0.1, 0.6, 3), view_probs=rng.dirichlet(np.full(len(VIEWS), 0.7)),
        scale_range=tuple(sorted(rng.uniform(0.7, 1.0, 2))), occlusion_prob=float(rng.uniform(0.1, 0.5)),
        occluder=rng.uniform(0.0, 1.0, 3), blur=bool(rng.random() < 0.4), noise=float(rng.uniform(0.01, 0.05)))


def _box(u, v, top, bottom, half_width, centre=0.0):
    return (u >= top) & (u < bottom) & (np.abs(v - centre) < half_width)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def _upper_colours(person: Appearance, u: np.ndarray, v: np.ndarray, view: str, half: float) -> np.ndarray:
    """Per-pixel garment colour for the torso: its pattern, and an open jacket's shirt only from the front."""
    rows, columns = np.floor(u / person.stripe_period), np.floor(v / person.stripe_period)
    if person.pattern == "horizontal_stripes":
        second = rows % 2 == 1
    elif person.pattern == "vertical_stripes":
        second = columns % 2 == 1
    elif person.pattern == "checks":
        second = (rows + columns) % 2 == 1
    elif person.pattern == "open_jacket" and view == "front":
        second = np.abs(v) < 0.45 * half
    else:  # solid, or a jacket seen from behind or the side
        second = np.zeros_like(u, bool)
    return np.where(second[..., None], person.upper_second, person.upper)


def draw_person(canvas: np.ndarray, u: np.ndarray, v: np.ndarray, person: Appearance, view: str,
                phase: float) -> None:
    """Paints a figure onto `canvas` given each pixel's body coordinates.

    u runs from 0 at the top of the head to 1 at the soles; v is the horizontal offset
    from the body's axis, in body heights. `phase` in [-1, 1] is the walking phase.
    """
    side = view == "side"
    half = person.shoulders * (0.6 if side else 1.0)
    if view == "back":
        v = -v  # seen from behind, left and right swap
    skin, upper = person.skin, person.upper
    # Legs (drawn first: the torso and a skirt overlap their tops).
    for direction in (-1, 1):
        centre = direction * (0.04 + 0.05 * phase * (u - 0.5) * (2.0 if side else 0.5))
        leg = _box(u, v, 0.5, 0.95, 0.037, centre)
        covered_to = {"trousers": 0.95, "shorts": 0.66, "skirt": 0.5}[person.lower_style]
        _paint(canvas, leg & (u < covered_to), person.lower)
        _paint(canvas, leg & (u >= covered_to), skin)
        _paint(canvas, _box(u, v, 0.95, 1.0, 0.045, centre + (0.015 if side else 0.0)), person.shoes)
    if person.lower_style == "skirt":
        _paint(canvas, (u >= 0.48) & (u < 0.72) & (np.abs(v) < half * 0.8 + 0.15 * (u - 0.48)), person.lower)
    # Arms, then the torso over their inner edge.
    arm_offsets = (0.0,) if side else (-(half + 0.02), half + 0.02)
    for offset in arm_offsets:
        swing = 0.04 * phase * (u - 0.15) if side else 0.0
        arm = _box(u, v, 0.15, 0.47, 0.025, offset + swing)
        sleeve_to = 0.44 if person.long_sleeves else 0.24
        _paint(canvas, arm & (u < sleeve_to), upper)
        _paint(canvas, arm & (u >= sleeve_to), skin)
    torso = (u >= 0.14) & (u < 0.52) & (np.abs(v) < half * (1.0 - 0.25 * (u - 0.14)))
    canvas[torso] = _upper_colours(person, u, v, view, half)[torso]
    # Head and hair; from behind the hair covers the head, long hair falls to the shoulders.
    head = ((u - 0.075) / 0.068) ** 2 + (v / 0.048) ** 2 < 1.0
    _paint(canvas, head, skin)
    hair_to = 0.15 if view == "back" else 0.04
    _paint(canvas, head & (u < hair_to), person.hair)
    if person.long_hair and view != "front":
        _paint(canvas, _box(u, v, 0.05, 0.24, 0.05, 0.03 if side else 0.0), person.hair)
    # Belongings, each visible from some viewpoints only.
    colour = person.carried_colour
    if person.carried == "backpack":
        if view == "back":
            _paint(canvas, _box(u, v, 0.17, 0.42, half * 0.75), colour)
        elif view == "side":
            _paint(canvas, _box(u, v, 0.17, 0.40, 0.035, -half - 0.03), colour)
        else:  # only the straps show from the front
            for strap in (-0.6 * half, 0.6 * half):
                _paint(canvas, _box(u, v, 0.14, 0.33, 0.012, strap), colour)
    elif person.carried == "handbag":
        _paint(canvas, _box(u, v, 0.40, 0.54, 0.035, half + 0.055), colour)
    elif person.carried == "logo" and view == "front":
        _paint(canvas, _box(u, v, 0.22, 0.30, 0.035, -0.35 * half), colour)


def render(person: Appearance | None, camera: Camera, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """One uint8 [H, W, 3] picture of `person` taken by `camera`; `rng` draws the per-image variation.

    `person=None` renders a frame with nobody in it, a detector's false alarm (junk).
    """
    height, width = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    canvas = np.empty((height, width, 3), np.float32)
    horizon = rng.uniform(0.6, 0.85) * height
    canvas[:] = np.where((y > horizon)[..., None], camera.floor, camera.wall)
    canvas *= 1.0 + 0.15 * (y / height - 0.5)[..., None]  # lighting falls off down the frame
    for _ in range(rng.integers(0, 3)):  # background clutter
        top, left = rng.uniform(0, height * 0.7), rng.uniform(-width * 0.2, width)
        bottom, right = top + rng.uniform(0.1, 0.4) * height, left + rng.uniform(0.1, 0.5) * width
        box = (y > top) & (y < bottom) & (x > left) & (x < right)
        canvas[box] = _jitter(rng, camera.wall, 0.25)

    if person is not None:
        view = VIEWS[rng.choice(len(VIEWS), p=camera.view_probs)]
        body = rng.uniform(*camera.scale_range) * height
        feet = height - rng.uniform(0.0, 0.06) * height
        axis = width / 2 + rng.uniform(-0.12, 0.12) * width
        u, v = (y - (feet - body)) / body, (x - axis) / body
        draw_person(canvas, u, v, person, view, phase=float(rng.uniform(-1, 1)))

    if rng.random() < camera.occlusion_prob:  # a bench or car in front of the legs, or a pole at one side
        if rng.random() < 0.6:
            mask = y > height * rng.uniform(0.55, 0.8)
        else:
            left = rng.uniform(0, width * 0.8)
            mask = (x > left) & (x < left + rng.uniform(0.15, 0.35) * width)
        canvas[mask] = _jitter(rng, camera.occluder, 0.1)

    canvas = canvas * camera.gain * rng.uniform(0.85, 1.15) + camera.offset  # the camera's cast, the light's level
    canvas = canvas.reshape(size[0], SUPERSAMPLE, size[1], SUPERSAMPLE, 3).mean(axis=(1, 3))
    if camera.blur:
        canvas = canvas.reshape(size[0] // 2, 2, size[1] // 2, 2, 3).mean(axis=(1, 3)).repeat(2, 0).repeat(2, 1)
    canvas = canvas + rng.normal(0.0, camera.noise, canvas.shape)
    return (np.clip(canvas, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- #
# The dataset
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class SyntheticReidConfig(tfds.core.BuilderConfig):
    """Size of a synthetic re-ID set; train and test identities are disjoint, as in Market-1501."""

    image_size: tuple[int, int] = (64, 32)  # (H, W), even
    train_identities: int = 300
    test_identities: int = 300
    cameras: int = 6
    cameras_per_identity: tuple[int, int] = (2, 5)  # inclusive range; at least 2 so every query has a match
    images_per_camera: tuple[int, int] = (2, 4)  # inclusive range; one per camera goes to the query set
    distractors: int = 200  # gallery images of people outside both sets (person id 0)
    junk: int = 100  # gallery frames with nobody in them (person id -1)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Shot:
    """One image to render: who (a key into the appearance stream), which camera, which take, stored how."""

    split: str
    person_id: int  # as stored: 0 distractor, -1 junk
    key: int  # the appearance and image streams' index; distinct for every person, distractors included
    camera: int  # from 1
    take: int


def plan_shots(config: SyntheticReidConfig) -> list[Shot]:
    """Every image of the dataset, split as Market-1501 is: one query per test identity and camera."""
    shots = []
    first_distractor = config.train_identities + config.test_identities + 1
    for person_id in range(1, first_distractor):
        rng = np.random.default_rng([config.seed, 2, person_id])
        count = rng.integers(config.cameras_per_identity[0], config.cameras_per_identity[1] + 1)
        cameras = np.sort(rng.choice(config.cameras, size=min(count, config.cameras), replace=False)) + 1
        for camera in cameras:
            for take in range(rng.integers(config.images_per_camera[0], config.images_per_camera[1] + 1)):
                if person_id <= config.train_identities:
                    split = "train"
                else:
                    split = "query" if take == 0 else "gallery"
                shots.append(Shot(split, person_id, person_id, int(camera), take))
    rng = np.random.default_rng([config.seed, 2, 0])
    for i in range(config.distractors):
        shots.append(Shot("gallery", DISTRACTOR_ID, first_distractor + i, int(rng.integers(config.cameras)) + 1, 0))
    for i in range(config.junk):
        shots.append(Shot("gallery", JUNK_ID, 0, int(rng.integers(config.cameras)) + 1, i))
    return shots


def render_shot(shot: Shot, config: SyntheticReidConfig) -> np.ndarray:
    """The uint8 image of one planned shot; a pure function of the shot and the config."""
    camera = sample_camera(np.random.default_rng([config.seed, 0, shot.camera]))
    person = None if shot.person_id == JUNK_ID else sample_appearance(np.random.default_rng([config.seed, 1, shot.key]))
    rng = np.random.default_rng([config.seed, 3, shot.key, shot.camera, shot.take])
    return render(person, camera, rng, config.image_size)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class HybridReidSynthetic(tfds.core.GeneratorBasedBuilder):
    """SYNTHETIC re-ID benchmark (drawn figures, several cameras), built offline in seconds."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Synthetic figures: per-identity clothing, per-camera cast, view, framing, occluders."}
    BUILDER_CONFIGS = [
        SyntheticReidConfig(name="default", description="SYNTHETIC, 64x32, 300 + 300 identities, 6 cameras."),
        SyntheticReidConfig(name="tiny", description="SYNTHETIC, 64x32, 100 + 80 identities, 4 cameras (tests).",
                            train_identities=100, test_identities=80, cameras=4,
                            cameras_per_identity=(2, 3), images_per_camera=(2, 3), distractors=20, junk=10),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # readable by tfds.data_source without TensorFlow
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=("SYNTHETIC person re-identification data rendered by hybrid_jax: drawn figures, not "
                         "photographs of people. Market-1501 conventions (person id 0 distractor, -1 junk)."),
            features=reid_features())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is rendered here
        shots = plan_shots(self.builder_config)
        return {split: self._generate_examples([s for s in shots if s.split == split]) for split in SPLITS}

    def _generate_examples(self, shots: list[Shot]) -> Iterator[tuple[str, dict]]:
        for shot in shots:
            name = f"synthetic_{shot.person_id}_c{shot.camera}_{shot.key:05d}_{shot.take:02d}.png"
            yield name, {"image": _png(render_shot(shot, self.builder_config)), "person_id": shot.person_id,
                         "camera_id": shot.camera, "file_name": name}
