"""Re-ID builders (Market-1501 layout, DukeMTMC-reID, MSMT17, the synthetic set) and the re-ID input streams."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybrid_jax.data import pipeline
from hybrid_jax.data.builders import reid_synthetic
from hybrid_jax.reid import data

# A miniature Market-1501 with the real naming: PERSON_cCAMERAsSEQUENCE_FRAME_BOX.jpg.
MARKET = {
    "bounding_box_train": {"0002_c1s1_000451_03.jpg": (2, 1), "0002_c3s1_000551_01.jpg": (2, 3),
                           "0007_c2s3_070952_01.jpg": (7, 2), "0007_c6s2_019293_02.jpg": (7, 6)},
    "query": {"0011_c1s1_001051_00.jpg": (11, 1), "0012_c5s3_040032_00.jpg": (12, 5)},
    "bounding_box_test": {"-1_c1s1_000401_03.jpg": (-1, 1),  # junk
                          "0000_c2s1_000301_01.jpg": (0, 2),  # distractor
                          "0011_c4s2_011011_02.jpg": (11, 4), "0011_c1s1_001101_01.jpg": (11, 1),
                          "0012_c2s1_009876_04.jpg": (12, 2)},
}
SPLIT_OF_FOLDER = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}


def _jpeg(value: int, size=(128, 64)) -> bytes:
    """A flat grey image whose level identifies the file (JPEG keeps flat areas within a level or two)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _level(name: str) -> int:
    return sum(name.encode()) % 200 + 20


def _write_market(root: Path, tree=MARKET) -> None:
    for folder, files in tree.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(_jpeg(_level(name)))
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")


def _records(builder, split: str) -> dict[str, dict]:
    source = builder.as_data_source(split=split)
    return {source[i]["file_name"].decode(): source[i] for i in range(len(source))}


def test_market_layout_parses_into_ids_cameras_and_splits(tmp_path):
    _write_market(tmp_path / "manual" / "Market-1501-v15.09.15")  # the folder the archive extracts to
    builder = pipeline.get_builder("market1501", str(tmp_path / "tfds"), str(tmp_path / "manual"))
    for folder, files in MARKET.items():
        records = _records(builder, SPLIT_OF_FOLDER[folder])
        assert set(records) == set(files)  # Thumbs.db skipped
        for name, (person, camera) in files.items():
            assert (records[name]["person_id"], records[name]["camera_id"]) == (person, camera)
            pixels = data.decode_image(records[name]["image"], (128, 64, 3), resize=False)
            assert np.abs(pixels.astype(int) - _level(name)).max() <= 2
    spec = data.describe("market1501", "train", str(tmp_path / "tfds"))  # prepared: no manual dir needed now
    assert (spec.num_examples, spec.num_identities, spec.image_shape) == (4, 2, (128, 64, 3))


def test_train_labels_renumber_people_and_drop_junk_and_distractors():
    np.testing.assert_array_equal(data.train_labels(np.array([7, 2, -1, 0, 7, 40])), [1, 0, -1, -1, 1, 2])


def test_missing_manual_dir_says_where_to_put_the_files(tmp_path):
    with pytest.raises(pipeline.DataError, match=r"Market-1501 not found.*nowhere.*--config.manual_dir"):
        pipeline.get_builder("market1501", str(tmp_path / "tfds"), str(tmp_path / "nowhere"))


def test_a_misnamed_image_is_named_in_the_error(tmp_path):
    tree = {folder: dict(files) for folder, files in MARKET.items()}
    tree["query"]["person11_cam1.jpg"] = (11, 1)
    _write_market(tmp_path / "manual", tree)
    with pytest.raises(pipeline.DataError, match="'person11_cam1.jpg' is not a Market-1501-style file name"):
        pipeline.get_builder("market1501", str(tmp_path / "tfds"), str(tmp_path / "manual"))


def test_dukemtmc_reid_names(tmp_path):
    tree = {"bounding_box_train": {"0005_c2_f0046985.jpg": (5, 2)}, "query": {"0010_c8_f0123456.jpg": (10, 8)},
            "bounding_box_test": {"0010_c1_f0001234.jpg": (10, 1)}}
    _write_market(tmp_path / "DukeMTMC-reID", tree)
    builder = pipeline.get_builder("dukemtmc_reid", str(tmp_path / "tfds"), str(tmp_path))
    for folder, files in tree.items():
        records = _records(builder, SPLIT_OF_FOLDER[folder])
        assert {n: (r["person_id"], r["camera_id"]) for n, r in records.items()} == files


def test_msmt17_reads_its_list_files(tmp_path):
    root = tmp_path / "MSMT17_V1"
    lists = {"train": ("train", ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                                 "0001/0001_004_15_0303noon_0100_2.jpg 1"]),
             "query": ("test", ["0000/0000_000_06_0303noon_0001_1.jpg 0"]),
             "gallery": ("test", ["0000/0000_001_12_0304morning_0020_0.jpg 0"])}
    for split, (folder, lines) in lists.items():
        (root / f"list_{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"list_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in lines:
            path = root / folder / line.split()[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(100))
    builder = pipeline.get_builder("msmt17", str(tmp_path / "tfds"), str(tmp_path))
    ids = {split: sorted((int(r["person_id"]), int(r["camera_id"])) for r in _records(builder, split).values())
           for split in lists}
    # Labels start at 0 in the list files and are stored plus one (0 means distractor).
    assert ids == {"train": [(1, 1), (2, 15)], "query": [(1, 6)], "gallery": [(1, 12)]}


# --------------------------------------------------------------------------- #
# The synthetic set
# --------------------------------------------------------------------------- #

TINY = next(c for c in reid_synthetic.HybridReidSynthetic.BUILDER_CONFIGS if c.name == "tiny")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.get_builder("reid_synthetic/tiny", data_dir)
    return data_dir


def test_synthetic_plan_follows_the_market_protocol():
    shots = reid_synthetic.plan_shots(TINY)
    people = {split: {s.person_id for s in shots if s.split == split} for split in ("train", "query", "gallery")}
    assert people["train"] == set(range(1, 101)) and not people["train"] & people["gallery"]
    assert people["query"] == set(range(101, 181))
    assert sum(s.person_id == 0 for s in shots) == TINY.distractors
    assert sum(s.person_id == -1 for s in shots) == TINY.junk
    for shot in (s for s in shots if s.split == "query"):  # every query can be found in another camera
        assert any(g.person_id == shot.person_id and g.camera != shot.camera for g in shots if g.split == "gallery")


def test_synthetic_images_are_deterministic_and_cameras_differ():
    shot = reid_synthetic.Shot("train", 5, 5, 1, 0)
    image = reid_synthetic.render_shot(shot, TINY)
    assert image.shape == (64, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, reid_synthetic.render_shot(shot, TINY))
    other_camera = reid_synthetic.render_shot(reid_synthetic.Shot("train", 5, 5, 2, 0), TINY)
    assert np.abs(image.astype(int) - other_camera).mean() > 10


def test_synthetic_dataset_is_labelled_synthetic(tiny_dir):
    builder = pipeline.get_builder("reid_synthetic/tiny", tiny_dir)
    assert "SYNTHETIC" in builder.info.description and "SYNTHETIC" in builder.builder_config.description
    shots = reid_synthetic.plan_shots(TINY)
    for split in ("train", "query", "gallery"):
        records = _records(builder, split)
        assert len(records) == sum(s.split == split for s in shots)
        assert all(name.startswith("synthetic_") for name in records)


def test_eval_stream_pads_with_junk(tiny_dir):
    batches = list(data.make_eval_dataset("reid_synthetic/tiny", split="query", global_batch_size=50,
                                          data_dir=tiny_dir, process_count=1, process_index=0))
    ids = np.concatenate([b["person_id"] for b in batches])
    num_queries = sum(s.split == "query" for s in reid_synthetic.plan_shots(TINY))
    assert len(ids) == 50 * -(-num_queries // 50)
    assert (ids[:num_queries] > 0).all() and (ids[num_queries:] == data.PADDING_ID).all()
    assert batches[0]["image"].shape == (50, 64, 32, 3)


def test_train_stream_is_pk_and_splits_across_processes(tiny_dir):
    def batches(**kwargs):
        stream = iter(data.make_train_dataset("reid_synthetic/tiny", global_batch_size=24, images_per_identity=4,
                                              data_dir=tiny_dir, seed=3, resize=(16, 16), **kwargs))
        return [next(stream) for _ in range(3)]

    whole = batches(process_count=1, process_index=0)
    halves = [batches(process_count=2, process_index=i) for i in range(2)]
    for k, batch in enumerate(whole):
        assert batch["image"].shape == (24, 16, 16, 3)
        _, counts = np.unique(batch["label"], return_counts=True)
        assert len(counts) == 6 and (counts == 4).all()
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), batch[key])


def test_batch_must_be_whole_identities(tiny_dir):
    with pytest.raises(pipeline.DataError, match="not a multiple of images_per_identity"):
        data.make_train_dataset("reid_synthetic/tiny", global_batch_size=30, images_per_identity=4, data_dir=tiny_dir)


def test_an_unknown_builder_config_lists_the_known_ones(tmp_path):
    with pytest.raises(pipeline.DataError, match="no config 'huge'"):
        pipeline.get_builder("reid_synthetic/huge", str(tmp_path))
