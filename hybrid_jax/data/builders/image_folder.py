"""A folder of class subfolders, `root/<class>/<image>.jpg` (torchvision's ImageFolder layout), as a tfds dataset.

Researchers train on their own photos through the same pipeline as ImageNet: `--config.dataset=image_folder:PATH`
(`hybrid_jax.data.pipeline.get_builder`). The folder is read once into array_record files under
`{data_dir}/hybrid_image_folder/<folder name>_<hash of its path>/`; delete that directory to read a changed folder
again. Classes are the subfolder names, sorted, labelled from 0; images below a class folder at any depth belong to
it. When every subfolder of the root is a split name (train/, validation/, val/, test/), each is a split with its
own class subfolders; otherwise the root is the single split "train" (tfds stores it shuffled, so slicing
"train[:90%]" / "train[90%:]" holds out a random tenth).

RGB and greyscale JPEGs are stored byte for byte, so the pipeline decodes and crops the original. Any other image
PIL reads (PNG, CMYK JPEG, WebP, ...) is converted once to an RGB PNG, as tfds's imagenet2012 converts its few
CMYK and PNG files, so every stored image decodes to RGB or grey whoever decodes it. EXIF orientation is ignored,
as torchvision's loader ignores it. Every image is decoded once while building, so a truncated file or one that is
not an image stops the build with its path instead of a training run hours later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image

# What torchvision's ImageFolder reads; other files (Thumbs.db, README, .DS_Store) are skipped.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = ("train", "validation", "val", "test")
LAYOUT_HINT = "Lay it out as ROOT/<class>/<image>.jpg, one subfolder per class (or ROOT/train/<class>/... per split)."
# PIL's ways of saying a file is not a readable image.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFolderError(ValueError):
    """The image folder is empty, lacks class subfolders, or holds a file that is not a readable image."""


def config_name(source_dir: str | os.PathLike) -> str:
    """The prepared copy's name: the folder's name (for people) and a hash of its absolute path (for uniqueness)."""
    path = os.path.abspath(os.path.expanduser(source_dir))
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_")[:40] or "root"
    return f"{stem}_{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders, sorted by name as torchvision's find_classes sorts them."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    """Image files at any depth below `folder`, in a fixed order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def scan(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Returns the sorted class names and, per split, each class's image files; bad layouts raise with the fix."""
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist. {LAYOUT_HINT}")
    folders = _subfolders(root)
    if not folders:
        found = "holds images but no class subfolders" if _images(root) else "is empty"
        raise ImageFolderError(f"Image folder {root} {found}. {LAYOUT_HINT}")
    if all(f.name in SPLIT_FOLDERS for f in folders):
        layout = {f.name: f for f in folders}
    else:
        layout = {"train": root}
    splits: dict[str, dict[str, list[Path]]] = {}
    for split, folder in layout.items():
        classes = _subfolders(folder)
        if not classes:
            raise ImageFolderError(f"Split folder {folder} has no class subfolders. {LAYOUT_HINT}")
        splits[split] = {c.name: _images(c) for c in classes}
        empty = [name for name, files in splits[split].items() if not files]
        if empty:
            raise ImageFolderError(
                f"Class folder(s) {empty} in {folder} hold no images ({', '.join(IMAGE_SUFFIXES)}); "
                f"add images or remove the folder(s).")
    names = sorted({name for classes in splits.values() for name in classes})
    if "train" in splits:
        unknown = sorted(set(names) - set(splits["train"]))
        if unknown:
            raise ImageFolderError(f"Class folder(s) {unknown} appear in another split of {root} but not in its "
                                   f"train split; training could never learn them. Fix the folder names.")
    return names, splits


def stored_bytes(path: Path) -> bytes:
    """The bytes to store: an RGB or grey JPEG as it is, anything else PIL reads as an RGB PNG."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes fully: a truncated file fails here, not in training
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except _UNREADABLE as e:
        raise ImageFolderError(f"{path} is not a readable image ({type(e).__name__}: {e}); "
                               f"replace or delete it, then build again.") from e


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Which folder a prepared copy was read from."""

    source_dir: str = ""


class HybridImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images in class subfolders of a local folder, JPEG bytes kept as they are, for `image_folder:PATH`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Read from root/<class>/<image> (or root/<split>/<class>/<image>)."}

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # readable by tfds.data_source without TensorFlow
        if source_dir is not None:
            path = os.path.abspath(os.path.expanduser(source_dir))
            kwargs.setdefault("config", ImageFolderConfig(name=config_name(path), source_dir=path))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="A local folder of images in class subfolders.",
            features=tfds.features.FeaturesDict({
                # The original file's bytes (RGB/grey JPEG) or a lossless RGB PNG of it; any size.
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(),  # names are set from the folders while building
                "file_name": tfds.features.Text(),  # path below the root: [<split>/]<class>/<image>
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # everything is local
        source_dir = getattr(self.builder_config, "source_dir", "")
        if not source_dir:
            raise ImageFolderError(f"No image folder given; name the dataset image_folder:PATH. {LAYOUT_HINT}")
        root = Path(source_dir)
        names, splits = scan(root)
        self.info.features["label"].names = names
        return {split: self._generate_examples(root, classes) for split, classes in splits.items()}

    def _generate_examples(self, root: Path, classes: dict[str, list[Path]]) -> Iterator[tuple[str, dict]]:
        for name, files in classes.items():
            for path in files:
                relative = path.relative_to(root).as_posix()
                yield relative, {"image": stored_bytes(path), "label": name, "file_name": relative}
