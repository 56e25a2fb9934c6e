"""MSD and plain-folder sources: listing, loading, overrides and every bad input they must refuse."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.nifti import load_nifti
from r2d2_hpc.data.sources import FolderSource, MsdSource, Source, build_source
from r2d2_hpc.errors import ConfigError, DataError


def _msd(root: Path, **overrides: object) -> Source:
    return build_source(DataConfig(name="msd", root=str(root), **overrides))  # type: ignore[arg-type]


def _folders(root: Path, **overrides: object) -> Source:
    overrides.setdefault("class_names", ["background", "fg"])
    return build_source(DataConfig(name="folders", root=str(root), **overrides))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- MSD
def test_msd_3d_single_channel_loads_file_values(make_msd, tiny) -> None:
    root = make_msd(num_cases=3, channels=1)
    source = _msd(root)
    assert isinstance(source, MsdSource) and isinstance(source, Source)
    assert source.info.name == "Tiny"
    assert source.info.class_names == ("background", "a", "b")
    assert source.info.channel_names == ("mod0",)
    assert source.info.modality == "MRI"
    refs = source.cases()
    assert [r.case_id for r in refs] == ["tiny_000", "tiny_001", "tiny_002"], "imagesTs is not training data"
    case = source.load(refs[1])
    image, label = make_msd.written["tiny_001"]
    assert case.image.shape == (1, *tiny.shape) and case.image.dtype == np.float32
    np.testing.assert_array_equal(case.image[0], image)
    np.testing.assert_array_equal(case.label, label)
    assert np.issubdtype(case.label.dtype, np.integer)
    np.testing.assert_allclose(case.affine, tiny.affine)
    assert case.files == refs[1].files
    assert case.files["image"] == (root / "imagesTr" / "tiny_001.nii.gz")


def test_msd_4d_channels_last_become_channels_first(make_msd, tiny) -> None:
    root = make_msd(num_cases=1, channels=3, modality={"0": "FLAIR", "1": "T1w", "2": "T2w"})
    source = _msd(root)
    assert source.info.channel_names == ("FLAIR", "T1w", "T2w")
    case = source.load(source.cases()[0])
    on_disk, _ = make_msd.written["tiny_000"]
    assert case.image.shape == (3, *tiny.shape)
    for c in range(3):
        np.testing.assert_array_equal(case.image[c], on_disk[..., c])


def test_msd_overrides_and_ct_detection(make_msd) -> None:
    root = make_msd(modality={"0": "CT"})
    assert _msd(root).info.modality == "CT"
    source = _msd(
        root, class_names=["bg", "x", "y"], channel_names=["HU"], modality="mri", dataset_name="mine"
    )
    assert source.info.class_names == ("bg", "x", "y")
    assert source.info.channel_names == ("HU",)
    assert source.info.modality == "MRI"
    assert source.info.name == "mine"


def test_msd_class_names_follow_label_map(make_msd) -> None:
    root = make_msd(labels={"0": "background", "1": "edema", "2": "necrosis", "4": "enhancing"})
    assert _msd(root, label_map={4: 3}).info.class_names == ("background", "edema", "necrosis", "enhancing")
    assert _msd(root, label_map={4: 2}).info.class_names == ("background", "edema", "necrosis+enhancing")
    with pytest.raises(DataError, match=re.escape("dataset.json")) as exc:
        _msd(root)
    assert "data.label_map" in str(exc.value)


def test_msd_nnunet_v2_style_mappings(make_msd) -> None:
    root = make_msd(labels={"background": 0, "tumour": 1, "cyst": 2})
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = meta.pop("modality")
    (root / "dataset.json").write_text(json.dumps(meta))
    assert _msd(root).info.class_names == ("background", "tumour", "cyst")
    assert _msd(root).info.channel_names == ("mod0",)


def test_source_survives_pickling(make_msd) -> None:
    source = _msd(make_msd())
    clone = pickle.loads(pickle.dumps(source))
    ref = clone.cases()[0]
    np.testing.assert_array_equal(clone.load(ref).image, source.load(ref).image)


def test_float_label_with_integral_values_is_cast(write_nifti, tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "lab.nii.gz", np.array([[[0.0, 1.0], [2.0, 1.0]]], np.float32))
    label, _ = load_nifti(path, "label")
    assert np.issubdtype(label.dtype, np.integer)
    assert label.tolist() == [[[0, 1], [2, 1]]]


def test_trailing_singleton_axis_is_dropped(write_nifti, tmp_path: Path, tiny) -> None:
    path = write_nifti(tmp_path / "lab.nii.gz", np.ones((*tiny.shape, 1), np.uint8))
    label, _ = load_nifti(path, "label")
    assert label.shape == tiny.shape


# ----------------------------------------------------------------------------------------------- MSD bad inputs
def test_missing_root_and_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        _msd(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape("dataset.json")) as exc:
        _msd(tmp_path / "empty")
    assert "data.root" in str(exc.value)


def test_missing_listed_file(make_msd) -> None:
    root = make_msd(num_cases=2)
    (root / "labelsTr" / "tiny_001.nii.gz").unlink()
    source = _msd(root)
    with pytest.raises(DataError, match=re.escape("tiny_001.nii.gz")) as exc:
        source.cases()
    assert "dataset.json" in str(exc.value) and "1 listed file(s) missing" in str(exc.value)


def test_duplicate_entry_in_dataset_json(make_msd) -> None:
    root = make_msd(num_cases=2)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append(meta["training"][0])
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="duplicate case id") as exc:
        _msd(root).cases()
    assert "tiny_000.nii.gz" in str(exc.value)


def test_image_label_shape_mismatch(make_msd, tiny) -> None:
    root = make_msd(num_cases=1)
    bad = tiny.save(root / "labelsTr" / "tiny_000.nii.gz", np.zeros((6, 5, 3), np.uint8))
    source = _msd(root)
    with pytest.raises(DataError, match=re.escape("tiny_000.nii.gz")) as exc:
        source.load(source.cases()[0])
    assert str(bad) in str(exc.value) and "(6, 5, 3)" in str(exc.value)


def test_affine_mismatch_beyond_tolerance(make_msd, tiny) -> None:
    root = make_msd(num_cases=1)
    shifted = tiny.affine.copy()
    shifted[0, 3] += 0.5
    label_path = tiny.save(root / "labelsTr" / "tiny_000.nii.gz", np.zeros(tiny.shape, np.uint8), shifted)
    source = _msd(root)
    with pytest.raises(DataError, match="affine") as exc:
        source.load(source.cases()[0])
    assert str(label_path) in str(exc.value) and "0.5 mm" in str(exc.value)
    relaxed = _msd(root, affine_tolerance=0.6)
    assert relaxed.load(relaxed.cases()[0]).label.shape == tiny.shape


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image_voxels(make_msd, bad_value: float, tiny) -> None:
    root = make_msd(num_cases=1)
    image = np.ones(tiny.shape, np.float32)
    image[1, 2, 3] = bad_value
    tiny.save(root / "imagesTr" / "tiny_000.nii.gz", image)
    source = _msd(root)
    with pytest.raises(DataError, match=re.escape("tiny_000.nii.gz")) as exc:
        source.load(source.cases()[0])
    assert "1 NaN or Inf voxel(s)" in str(exc.value)


@pytest.mark.parametrize(
    "content", ["truncated", "text", "gzipped_text"], ids=["truncated", "not_gzip", "gzip_not_nifti"]
)
def test_unreadable_files(make_msd, content: str) -> None:
    root = make_msd(num_cases=1)
    path = root / "imagesTr" / "tiny_000.nii.gz"
    good = path.read_bytes()
    data = {
        "truncated": good[: len(good) // 2],
        "text": b"this is not a NIfTI file\n" * 20,
        "gzipped_text": gzip.compress(b"this is not a NIfTI file\n" * 20),
    }[content]
    path.write_bytes(data)
    source = _msd(root)
    with pytest.raises(DataError, match="unreadable") as exc:
        source.load(source.cases()[0])
    assert str(path) in str(exc.value)


def test_non_integral_label(make_msd, tiny) -> None:
    root = make_msd(num_cases=1)
    tiny.save(root / "labelsTr" / "tiny_000.nii.gz", np.full(tiny.shape, 0.5, np.float32))
    source = _msd(root)
    with pytest.raises(DataError, match="non-integral") as exc:
        source.load(source.cases()[0])
    assert "tiny_000.nii.gz" in str(exc.value) and "nearest neighbour" in str(exc.value)


@pytest.mark.parametrize(
    ("role", "shape", "found"),
    [("image", (6, 5), "2D"), ("image", (6, 5, 4, 2, 3), "5D"), ("label", (6, 5, 4, 2), "4D")],
    ids=["2d_image", "5d_image", "label_with_channels"],
)
def test_wrong_dimensionality(make_msd, role: str, shape: tuple[int, ...], found: str, tiny) -> None:
    root = make_msd(num_cases=1)
    folder = "imagesTr" if role == "image" else "labelsTr"
    path = tiny.save(root / folder / "tiny_000.nii.gz", np.zeros(shape, np.float32))
    source = _msd(root)
    with pytest.raises(DataError, match=found) as exc:
        source.load(source.cases()[0])
    assert str(path) in str(exc.value)


def test_channel_count_must_match_modality(make_msd) -> None:
    root = make_msd(num_cases=1, channels=2)
    source = _msd(root, channel_names=["only_one"])
    with pytest.raises(DataError, match="2 channel") as exc:
        source.load(source.cases()[0])
    assert "tiny_000.nii.gz" in str(exc.value)


# ----------------------------------------------------------------------------------------------- folders
def _per_channel_folder(tiny, root: Path, cases: list[str], num_channels: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    images = {}
    for case in cases:
        images[case] = rng.normal(size=(num_channels, *tiny.shape)).astype(np.float32)
        for c in range(num_channels):
            tiny.save(root / "images" / f"{case}_{c:04d}.nii.gz", images[case][c])
        tiny.save(root / "labels" / f"{case}.nii.gz", np.full(tiny.shape, len(case) % 2, np.uint8))
    return images


def test_folders_per_channel_files(tmp_path: Path, tiny) -> None:
    images = _per_channel_folder(tiny, tmp_path, ["BraTS_0002", "BraTS_0001"], num_channels=3)
    (tmp_path / "images" / "._BraTS_0001_0000.nii.gz").write_bytes(b"macOS resource fork")  # skipped
    source = _folders(tmp_path)
    assert isinstance(source, FolderSource)
    assert source.info.channel_names == ("ch0", "ch1", "ch2")
    assert source.info.class_names == ("background", "fg")
    assert source.info.name == tmp_path.name
    refs = source.cases()
    # The default case regex strips a 4-digit suffix; the label "BraTS_0001" still pairs with its images.
    assert [r.case_id for r in refs] == ["BraTS_0001", "BraTS_0002"]
    assert set(refs[0].files) == {"image", "image_0001", "image_0002", "label"}
    assert refs[0].files["image_0002"].name == "BraTS_0001_0002.nii.gz"
    case = source.load(refs[0])
    np.testing.assert_array_equal(case.image, images["BraTS_0001"])
    assert case.label.shape == tiny.shape


def test_folders_single_4d_file_per_case(tmp_path: Path, tiny) -> None:
    image = np.arange(np.prod(tiny.shape) * 2, dtype=np.float32).reshape(*tiny.shape, 2)
    tiny.save(tmp_path / "img" / "liver7.nii", image)
    tiny.save(tmp_path / "seg" / "liver7.nii", np.zeros(tiny.shape, np.int16))
    source = _folders(tmp_path, image_glob="img/*.nii", label_glob="seg/*.nii", channel_names=["a", "b"])
    assert source.info.channel_names == ("a", "b")
    case = source.load(source.cases()[0])
    assert case.case_id == "liver7"
    np.testing.assert_array_equal(case.image[1], image[..., 1])
    assert _folders(tmp_path, image_glob="img/*.nii", label_glob="seg/*.nii").info.channel_names == (
        "ch0",
        "ch1",
    )


def test_folders_need_class_names(tmp_path: Path, tiny) -> None:
    _per_channel_folder(tiny, tmp_path, ["c1"])
    with pytest.raises(ConfigError, match=re.escape("data.class_names")):
        build_source(DataConfig(name="folders", root=str(tmp_path)))


def test_folders_empty_glob(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=re.escape("images/*.nii.gz")) as exc:
        _folders(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_folders_unpaired_cases(tmp_path: Path, tiny) -> None:
    _per_channel_folder(tiny, tmp_path, ["c1", "c2", "c3"])
    (tmp_path / "labels" / "c2.nii.gz").unlink()
    tiny.save(tmp_path / "labels" / "orphan.nii.gz", np.zeros(tiny.shape, np.uint8))
    with pytest.raises(DataError, match="images without a label: c2") as exc:
        _folders(tmp_path)
    assert "labels without an image: orphan" in str(exc.value)


def test_folders_duplicate_case_ids(tmp_path: Path, tiny) -> None:
    for sub in ("site_a", "site_b"):
        tiny.save(tmp_path / sub / "images" / "case1.nii.gz", np.zeros(tiny.shape, np.float32))
        tiny.save(tmp_path / sub / "labels" / "case1.nii.gz", np.zeros(tiny.shape, np.uint8))
    with pytest.raises(DataError, match="duplicate case id") as exc:
        _folders(tmp_path, image_glob="*/images/*.nii.gz", label_glob="*/labels/*.nii.gz")
    assert "site_a/images/case1.nii.gz" in str(exc.value) and "site_b/images/case1.nii.gz" in str(exc.value)


def test_folders_missing_channel_file(tmp_path: Path, tiny) -> None:
    _per_channel_folder(tiny, tmp_path, ["c1"], num_channels=3)
    (tmp_path / "images" / "c1_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=re.escape("c1_0000.nii.gz, c1_0002.nii.gz")) as exc:
        _folders(tmp_path)
    assert "data.channel_regex" in str(exc.value)


def test_folders_channel_grids_must_agree(tmp_path: Path, tiny) -> None:
    _per_channel_folder(tiny, tmp_path, ["c1"], num_channels=2)
    shifted = tiny.affine.copy()
    shifted[2, 2] = 3.0
    bad = tiny.save(tmp_path / "images" / "c1_0001.nii.gz", np.zeros(tiny.shape, np.float32), shifted)
    source = _folders(tmp_path)
    with pytest.raises(DataError, match="affine") as exc:
        source.load(source.cases()[0])
    assert str(bad) in str(exc.value)
