"""Synthetic phantoms: determinism, realism of the files, the CLI and the synthetic source."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.sources import MsdSource, build_source
from r2d2_hpc.data.synthetic import make_phantom, write_phantom_dataset
from r2d2_hpc.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_same_seed_gives_identical_arrays(tmp_path: Path) -> None:
    a = _arrays(
        write_phantom_dataset(tmp_path / "a", num_cases=2, num_channels=2, shape=(16, 14, 10), seed=7)
    )
    b = _arrays(
        write_phantom_dataset(tmp_path / "b", num_cases=2, num_channels=2, shape=(16, 14, 10), seed=7)
    )
    c = _arrays(
        write_phantom_dataset(tmp_path / "c", num_cases=2, num_channels=2, shape=(16, 14, 10), seed=8)
    )
    assert sorted(a) == sorted(b) == sorted(c)
    assert len(a) == 5, "2 images + 2 labels + 1 test image"
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert any(not np.array_equal(a[n], c[n]) for n in a), "another seed must give other phantoms"
    # A case depends on (seed, index) only: more cases do not change the first ones.
    image, label, _ = make_phantom(1, 2, 3, (16, 14, 10), 7)
    np.testing.assert_array_equal(a["labelsTr/phantom_001.nii.gz"], label)
    np.testing.assert_array_equal(a["imagesTr/phantom_001.nii.gz"], np.moveaxis(image, 0, -1))


def test_phantom_files_look_like_real_msd_data(phantom_msd: Path) -> None:
    meta = json.loads((phantom_msd / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T1", "1": "T2"}
    assert meta["labels"] == {"0": "background", "1": "tissue", "2": "lesion", "3": "core"}
    assert len(meta["training"]) == 3 and meta["test"] == ["./imagesTs/phantom_003.nii.gz"]
    assert (phantom_msd / "imagesTs" / "phantom_003.nii.gz").is_file()
    assert not (phantom_msd / "labelsTr" / "phantom_003.nii.gz").exists()
    axcodes, spacings = set(), []
    for entry in meta["training"]:
        img = nib.load(phantom_msd / entry["image"])
        lab = nib.load(phantom_msd / entry["label"])
        assert img.shape == (20, 18, 12, 2), "4D with channels last, as MSD stores it"
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
        assert not np.allclose(img.affine, np.eye(4))
        axcodes.add(nib.aff2axcodes(img.affine))
        spacings.append(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
        label = np.asarray(lab.dataobj)
        assert set(np.unique(label)) == {0, 1, 2, 3}
    assert axcodes == {("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S")}
    spacings = np.array(spacings)
    assert np.all((spacings > [0.9, 1.1, 2.3]) & (spacings < [1.1, 1.3, 2.7])), spacings
    assert np.ptp(spacings[:, 2]) > 0.01, "spacing varies a little per case"
    rotated = nib.load(phantom_msd / meta["training"][1]["image"]).affine[:3, :3]
    assert np.abs(rotated - np.diag(np.diag(rotated))).max() > 0.01, "odd cases are slightly rotated"


def test_classes_have_distinct_contrast_noise_and_zero_background() -> None:
    image, label, _ = make_phantom(0, 4, 6, (48, 40, 32), 0)
    counts = np.bincount(label.ravel(), minlength=6)
    assert np.all(counts > 50), counts
    inner = label == 1
    means = np.array([[image[c][label == k].mean() for k in range(6)] for c in range(4)])
    assert np.all(np.abs(np.diff(np.sort(means[0]))) > 5.0), "classes differ in T1 alone"
    assert not np.array_equal(np.argsort(means[0]), np.argsort(means[1])), (
        "channels order classes differently"
    )
    assert image[0][inner].std() > 5.0, "noise and bias field vary the tissue intensity"
    far = ~ndimage.binary_dilation(label > 0, iterations=2)
    assert np.all(image[:, far] == 0.0), "background outside the body is zero (skull-stripped look)"


def test_single_channel_is_3d_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = write_phantom_dataset(tmp_path / "p", num_cases=6, num_channels=1, num_classes=3)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 4.0, f"6 default phantoms took {elapsed_s:.2f} s (about 0.7 s expected)"
    assert nib.load(root / "imagesTr" / "phantom_000.nii.gz").shape == (48, 40, 32)
    assert json.loads((root / "dataset.json").read_text())["tensorImageSize"] == "3D"


def test_cli_writes_a_loadable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "r2d2_hpc.data.synthetic",
        "--out",
        str(out),
        "--num-cases",
        "2",
        "--channels",
        "1",
        "--classes",
        "4",
        "--shape",
        "16",
        "14",
        "10",
        "--seed",
        "3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert names == [
        "imagesTr/phantom_000.nii.gz",
        "imagesTr/phantom_001.nii.gz",
        "imagesTs/phantom_002.nii.gz",
        "labelsTr/phantom_000.nii.gz",
        "labelsTr/phantom_001.nii.gz",
    ]
    source = build_source(DataConfig(name="msd", root=str(out)))
    assert source.info.class_names == ("background", "tissue", "lesion", "core")
    case = source.load(source.cases()[1])
    image, label, affine = make_phantom(1, 1, 4, (16, 14, 10), 3)
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.label, label)
    np.testing.assert_allclose(case.affine, affine, atol=1e-5)


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "r2d2_hpc.data.synthetic", "--out", str(tmp_path / "x"), "--channels", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "channels 1-4" in done.stderr


def _synthetic_cfg(root: Path | None, **overrides: object) -> DataConfig:
    settings = {
        "num_cases": 2,
        "num_channels": 1,
        "num_classes": 3,
        "phantom_shape": [16, 14, 10],
    } | overrides
    return DataConfig(name="synthetic", root=None if root is None else str(root), **settings)  # type: ignore[arg-type]


def test_synthetic_source_writes_once_then_reads_like_msd(tmp_path: Path) -> None:
    root = tmp_path / "raw" / "synthetic"
    source = build_source(_synthetic_cfg(root))
    assert isinstance(source, MsdSource)
    assert source.info.class_names == ("background", "tissue", "lesion")
    assert source.info.channel_names == ("T1",) and source.info.modality == "MRI"
    assert [r.case_id for r in source.cases()] == ["phantom_000", "phantom_001"]
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["synthetic"], "no temporary folder is left"
    stamp = (root / "dataset.json").stat().st_mtime_ns
    again = build_source(_synthetic_cfg(root))
    assert (root / "dataset.json").stat().st_mtime_ns == stamp, "an existing phantom set is reused"
    np.testing.assert_array_equal(again.load(again.cases()[0]).label, source.load(source.cases()[0]).label)


def test_synthetic_default_root_is_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = build_source(_synthetic_cfg(None))
    assert source.root == Path.cwd() / "data" / "raw" / "synthetic"
    assert (tmp_path / "data" / "raw" / "synthetic" / "labelsTr" / "phantom_001.nii.gz").is_file()


def test_synthetic_source_refuses_stale_or_foreign_folders(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    build_source(_synthetic_cfg(root))
    with pytest.raises(DataError, match="other settings") as exc:
        build_source(_synthetic_cfg(root, num_cases=3))
    assert str(root / "dataset.json") in str(exc.value)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=re.escape("without dataset.json")) as exc:
        build_source(_synthetic_cfg(foreign))
    assert str(foreign) in str(exc.value)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_synthetic_source_fills_an_empty_folder(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert len(build_source(_synthetic_cfg(root)).cases()) == 2
    assert sorted(os.listdir(tmp_path)) == ["empty"]
