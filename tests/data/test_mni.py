"""The mni_tissue source: real MNI152 data from nilearn, cut into slabs with a background/CSF/GM/WM label."""

from __future__ import annotations

import importlib.util
import itertools
import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data import mni
from r2d2_hpc.data.mni import MniTissueSource, slab_bounds, slab_split, tissue_label, tissue_volumes
from r2d2_hpc.data.sources import build_source
from r2d2_hpc.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def source() -> MniTissueSource:
    # Thick slabs pinned here so the expected bounds below do not follow the defaults.
    built = build_source(DataConfig(name="mni_tissue", slab_thickness=24, slab_gap=8))
    assert isinstance(built, MniTissueSource)
    return built


def test_default_slabs_cover_every_level_of_the_brain() -> None:
    refs = build_source(DataConfig(name="mni_tissue")).cases()
    bounds = [(r.extra["start"], r.extra["stop"]) for r in refs]
    assert all(stop - start == 12 for start, stop in bounds)
    assert all(b[0] - a[1] == 4 for a, b in itertools.pairwise(bounds)), "4 slices dropped between slabs"
    splits = [r.split for r in refs]
    assert splits.count("val") == len(refs) // 3 and splits[1] == "val" and splits[0] == "train"


@pytest.fixture(scope="module")
def volumes(source: MniTissueSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tissue_volumes(*(str(source.files[k]) for k in ("t1", "gm", "wm")))


def test_info_and_default_slabs(source: MniTissueSource) -> None:
    assert source.info.name == "mni_tissue"
    assert source.info.class_names == ("background", "csf", "gm", "wm")
    assert source.info.channel_names == ("T1",) and source.info.modality == "MRI"
    refs = source.cases()
    assert [r.case_id for r in refs] == [f"mni_slab{i:02d}" for i in range(5)]
    assert [r.split for r in refs] == ["train", "val", "train", "train", "val"]
    bounds = [(r.extra["start"], r.extra["stop"]) for r in refs]
    assert bounds == [(1, 25), (33, 57), (65, 89), (97, 121), (129, 153)]
    assert all(r.extra["axis"] == 2 for r in refs)
    assert set(refs[0].files) == {"t1", "gm", "wm"}
    assert refs[0].files["t1"].name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def test_slab_keeps_world_coordinates_and_values(source: MniTissueSource, volumes) -> None:
    t1, label, affine = volumes
    assert t1.shape == (1, 197, 233, 189) and label.shape == (197, 233, 189)
    ref = source.cases()[2]
    case = source.load(ref)
    start = ref.extra["start"]
    assert case.image.shape == (1, 197, 233, 24) and case.image.dtype == np.float32
    assert case.label.shape == (197, 233, 24) and case.label.dtype == np.uint8
    assert case.files == ref.files
    np.testing.assert_array_equal(case.image, t1[:, :, :, start : start + 24])
    np.testing.assert_array_equal(case.label, label[:, :, start : start + 24])
    for voxel in ([0, 0, 0], [100, 120, 5], [196, 232, 23]):
        in_slab = case.affine @ np.array([*voxel, 1.0])
        in_volume = affine @ np.array([voxel[0], voxel[1], voxel[2] + start, 1.0])
        np.testing.assert_allclose(in_slab, in_volume)
    case.label[0, 0, 0] = 3  # a loaded case is a copy: the cached volume stays intact
    assert label[0, 0, start] == 0


def test_tissue_label_on_the_real_template(volumes) -> None:
    t1, label, affine = volumes
    counts = np.bincount(label.ravel(), minlength=4)
    np.testing.assert_allclose(counts, [6787398, 161466, 1090888, 635537], rtol=0.01)  # nilearn 0.14 files
    inverse = np.linalg.inv(affine)

    def at(x_mm: float, y_mm: float, z_mm: float) -> int:
        return int(label[tuple(np.round(inverse @ [x_mm, y_mm, z_mm, 1.0])[:3].astype(int))])

    assert at(5, -10, 20) == 1, "lateral ventricle is CSF (inside the filled mask)"
    assert at(25, 10, 30) == 3, "deep white matter"
    assert at(15, 0, 20) == 2, "caudate/putamen grey matter"
    assert at(0, 0, -60) == 0 and at(-60, -100, 70) == 0, "outside the brain"
    assert np.all(t1[0][label == 0].mean() < t1[0][label > 0].mean())


def test_tissue_label_definition_on_a_toy_brain() -> None:
    """A WM ball with a hollow (ventricle) inside a GM shell: the hollow is CSF, the outside background."""
    grid = np.indices((31, 31, 31)) - 15
    radius = np.sqrt((grid**2).sum(axis=0))
    p_gm = ((radius >= 10) & (radius < 13)).astype(np.float32)
    p_wm = ((radius >= 4) & (radius < 10)).astype(np.float32)
    label = tissue_label(p_gm, p_wm)
    assert label[15, 15, 15] == 1 and np.all(label[radius < 3.5] == 1)
    assert np.all(label[(radius >= 4.5) & (radius < 9.5)] == 3)
    assert np.all(label[(radius >= 10.5) & (radius < 12.5)] == 2)
    assert np.all(label[radius > 14] == 0)


def test_slab_helpers() -> None:
    label = np.zeros((2, 2, 40), np.uint8)
    label[:, :, 3:37] = 1
    assert slab_bounds(label, 2, 10, 2) == [(3, 13), (15, 25), (27, 37)]
    assert slab_bounds(label, 2, 35, 0) == []
    assert [slab_split(i, 3) for i in range(8)] == [
        "train",
        "val",
        "train",
        "train",
        "val",
        "train",
        "train",
        "val",
    ]


def test_other_axis_and_pickling(source: MniTissueSource) -> None:
    along_x = build_source(
        DataConfig(name="mni_tissue", slab_axis=0, slab_thickness=30, slab_gap=5, val_every=2)
    )
    refs = along_x.cases()
    assert [(r.extra["start"], r.extra["stop"]) for r in refs] == [(26, 56), (61, 91), (96, 126), (131, 161)]
    assert [r.split for r in refs] == ["train", "val", "train", "val"]
    clone = pickle.loads(pickle.dumps(along_x))
    case = clone.load(refs[1])
    assert case.image.shape == (1, 30, 233, 189)
    np.testing.assert_allclose(case.affine[:3, 3], [-98.0 + 61.0, -134.0, -72.0])


def test_too_thick_slabs_are_a_config_error(source: MniTissueSource) -> None:
    thick = build_source(DataConfig(name="mni_tissue", slab_thickness=150))
    with pytest.raises(ConfigError, match=re.escape("data.slab_thickness=150")):
        thick.cases()


def test_missing_nilearn_or_template_file(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match=re.escape("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")) as exc:
        MniTissueSource.from_config(DataConfig(name="mni_tissue"), data_dir=tmp_path)
    assert "nilearn" in str(exc.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(DataError, match="pip install nilearn"):
        mni.nilearn_data_dir()


def test_export_writes_the_held_out_slabs_as_nifti(tmp_path: Path) -> None:
    from r2d2_hpc.data.mni import main

    assert main(["--out", str(tmp_path), "--split", "val"]) == 0
    source = build_source(DataConfig(name="mni_tissue"))
    val = [r for r in source.cases() if r.split == "val"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [f"{r.case_id}.nii.gz" for r in val]
    case = source.load(val[0])
    label = nib.load(tmp_path / "labels" / f"{val[0].case_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(label.dataobj), case.label)
    np.testing.assert_allclose(label.affine, case.affine)
    image = nib.load(tmp_path / "images" / f"{val[0].case_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(image.dataobj), case.image[0])
