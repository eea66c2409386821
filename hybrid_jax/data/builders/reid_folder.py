"""Person re-identification datasets built from a local copy: Market-1501, DukeMTMC-reID and MSMT17.

None of them can be downloaded by a script (their owners hand them out on request),
so each builder reads a directory the user provides, its "manual dir"
(`--config.manual_dir=PATH`, by default `{data_dir}/downloads/manual`), holding either
the extracted folder or its contents.

Market-1501 and DukeMTMC-reID share one layout: bounding_box_train/ (train),
query/ and bounding_box_test/ (gallery), with the identity and camera in each file
name, e.g. Market's 0002_c1s1_000451_03.jpg (person 2, camera 1, sequence 1, frame
451, box 3) or Duke's 0005_c2_f0046985.jpg. Market's person id -1 marks junk boxes
(to be ignored in evaluation) and 0 distractors (wrong matches that stay in the
gallery). MSMT17 lists its splits in list_{train,query,gallery}.txt, one
"relative/path.jpg label" per line, and names the camera in the third field of the
file name; its labels start at 0, so they are stored plus one to keep 0 for
distractors. Every re-ID builder (the synthetic one too) stores the same features:
the encoded image bytes as found (decoded by the pipeline, so TensorFlow is not
needed), person id, camera id and file name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

JUNK_ID, DISTRACTOR_ID = -1, 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Identity, then camera, at the start of the name: 0002_c1s1_000451_03.jpg, -1_c3s2_010003_00.jpg, 0005_c2_f0046985.jpg
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)")
MANUAL_DIR_HINT = ("Put the extracted dataset there, or pass its location with --config.manual_dir=PATH "
                   "(config.manual_dir).")


class SourceFileError(ValueError):
    """A file of the local copy is misnamed or a list file line is malformed."""


def reid_features() -> tfds.features.FeaturesDict:
    """The features every re-ID builder stores."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded JPEG / PNG bytes
        "person_id": tfds.features.Scalar(dtype=np.int32, doc="-1 junk, 0 distractor, else the identity"),
        "camera_id": tfds.features.Scalar(dtype=np.int32, doc="from 1"),
        "file_name": tfds.features.Text(),
    })


def parse_market_name(name: str) -> tuple[int, int]:
    """(person id, camera id) from a Market-1501 / DukeMTMC-reID file name."""
    match = MARKET_NAME.match(name)
    if match is None:
        raise SourceFileError(f"{name!r} is not a Market-1501-style file name (PERSON_cCAMERA..., e.g. "
                              f"0002_c1s1_000451_03.jpg); remove the file or rename it.")
    return int(match.group(1)), int(match.group(2))


def find_layout(source_dir: Path, extracted_names: tuple[str, ...], required: tuple[str, ...], dataset: str) -> Path:
    """The directory holding `required`: `source_dir` itself or one of its known extracted folders."""
    candidates = [source_dir] + [source_dir / name for name in extracted_names]
    for candidate in candidates:
        if all((candidate / entry).exists() for entry in required):
            return candidate
    raise FileNotFoundError(
        f"{dataset} not found: none of {[str(c) for c in candidates]} holds {', '.join(required)}. "
        f"{MANUAL_DIR_HINT}")


class _LocalCopyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A re-ID builder that reads a user-provided directory into array_record files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from a local copy of the dataset."}
    DISPLAY_NAME = ""
    HOMEPAGE = ""
    EXTRACTED_NAMES: tuple[str, ...] = ()  # folder names the archive extracts to

    def __init__(self, *, source_dir: str | Path | None = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        default = Path(self.data_dir_root) / "downloads" / "manual"  # tfds's conventional manual dir
        self._source_dir = Path(source_dir).expanduser() if source_dir else default

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"{self.DISPLAY_NAME} person re-identification, read from a local copy.",
            features=reid_features(), homepage=self.HOMEPAGE)

    def _root(self, required: tuple[str, ...]) -> Path:
        return find_layout(self._source_dir, self.EXTRACTED_NAMES, required, self.DISPLAY_NAME)

    @staticmethod
    def _example(path: Path, person_id: int, camera_id: int) -> dict:
        return {"image": path.read_bytes(), "person_id": person_id, "camera_id": camera_id, "file_name": path.name}


class _MarketLayoutBuilder(_LocalCopyBuilder, skip_registration=True):
    """bounding_box_train/, query/, bounding_box_test/ with identity and camera in the file names."""

    FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing is downloaded
        root = self._root(tuple(self.FOLDERS.values()))
        return {split: self._generate_examples(root / folder) for split, folder in self.FOLDERS.items()}

    def _generate_examples(self, folder: Path) -> Iterator[tuple[str, dict]]:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:  # skips Thumbs.db and the like
                yield path.name, self._example(path, *parse_market_name(path.name))


class HybridMarket1501(_MarketLayoutBuilder):
    """Market-1501 (Zheng et al., ICCV 2015): 1,501 identities, 6 cameras, 32,668 boxes."""

    DISPLAY_NAME = "Market-1501"
    HOMEPAGE = "https://zheng-lab-anu.github.io/Project/project_reid.html"
    EXTRACTED_NAMES = ("Market-1501-v15.09.15", "Market-1501")


class HybridDukemtmcReid(_MarketLayoutBuilder):
    """DukeMTMC-reID (Zheng et al., ICCV 2017): 1,404 identities plus 408 distractors, 8 cameras."""

    DISPLAY_NAME = "DukeMTMC-reID"
    HOMEPAGE = "https://github.com/layumi/DukeMTMC-reID_evaluation"
    EXTRACTED_NAMES = ("DukeMTMC-reID",)


class HybridMsmt17(_LocalCopyBuilder):
    """MSMT17 (Wei et al., CVPR 2018): 4,101 identities, 15 cameras, splits given by list files."""

    DISPLAY_NAME = "MSMT17"
    HOMEPAGE = "https://www.pkuvmc.com/dataset.html"
    EXTRACTED_NAMES = ("MSMT17_V1", "MSMT17_V2", "MSMT17")
    LISTS = {"train": "list_train.txt", "query": "list_query.txt", "gallery": "list_gallery.txt"}
    IMAGE_FOLDERS = {"train": ("train", "mask_train_v2"), "query": ("test", "mask_test_v2"),
                     "gallery": ("test", "mask_test_v2")}  # V1 names, then V2 names

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        root = self._root(tuple(self.LISTS.values()))
        splits = {}
        for split, list_name in self.LISTS.items():
            folders = [root / name for name in self.IMAGE_FOLDERS[split] if (root / name).is_dir()]
            if not folders:
                raise FileNotFoundError(f"MSMT17 in {root} has {list_name} but no image folder "
                                        f"{' or '.join(self.IMAGE_FOLDERS[split])}/. {MANUAL_DIR_HINT}")
            splits[split] = self._generate_examples(root / list_name, folders[0])
        return splits

    def _generate_examples(self, list_file: Path, folder: Path) -> Iterator[tuple[str, dict]]:
        for line_number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                relative, label = line.split()
                camera_id = int(Path(relative).name.split("_")[2])  # 0000_000_01_0303morning_0015_0.jpg
                person_id = int(label) + 1  # labels start at 0; 0 means distractor here
            except (ValueError, IndexError) as error:
                raise SourceFileError(f"{list_file}:{line_number}: {line!r} is not 'PATH LABEL' with a file name "
                                      f"like 0000_000_01_0303morning_0015_0.jpg ({error}).") from error
            yield relative, self._example(folder / relative, person_id, camera_id)
