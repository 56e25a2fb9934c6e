"""Fixtures for the data tests: tiny real NIfTI datasets written to tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from r2d2_hpc.data.synthetic import write_phantom_dataset

TINY_SHAPE = (6, 5, 4)
TINY_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 10.0], [0.0, 1.2, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]]
)  # LAS, anisotropic: nothing in the sources may assume an identity affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = TINY_AFFINE) -> Path:
    """Writes ``data`` as a real NIfTI file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


@pytest.fixture(scope="session")
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, data, affine=TINY_AFFINE) -> path``."""
    return save_nifti


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The grid of the tiny datasets: ``shape``, ``affine`` (LAS, anisotropic) and ``save`` (= write_nifti)."""
    return SimpleNamespace(shape=TINY_SHAPE, affine=TINY_AFFINE.copy(), save=save_nifti)


@pytest.fixture
def make_msd(tmp_path: Path) -> Callable[..., Path]:
    """Factory of tiny MSD task folders; images are (X, Y, Z) or (X, Y, Z, C) on disk, values from a seed.

    ``make_msd(num_cases=2, channels=1, modality=None, labels=None, name="Task00_Tiny") -> root``; the arrays
    written are kept as ``make_msd.written[case_id] = (image as on disk, label)``.
    """
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def make(
        num_cases: int = 2,
        channels: int = 1,
        modality: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        name: str = "Task00_Tiny",
    ) -> Path:
        root = tmp_path / name
        rng = np.random.default_rng(len(written))
        training = []
        for i in range(num_cases):
            case = f"tiny_{i:03d}"
            shape = TINY_SHAPE if channels == 1 else (*TINY_SHAPE, channels)
            image = rng.normal(100.0, 20.0, shape).astype(np.float32)
            label = rng.integers(0, 3, TINY_SHAPE).astype(np.uint8)
            save_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
            save_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
            written[case] = (image, label)
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        save_nifti(root / "imagesTs" / "tiny_test.nii.gz", np.zeros(TINY_SHAPE, np.float32))
        meta = {
            "name": "Tiny",
            "modality": modality or {str(c): f"mod{c}" for c in range(channels)},
            "labels": labels or {"0": "background", "1": "a", "2": "b"},
            "training": training,
            "test": ["./imagesTs/tiny_test.nii.gz"],
        }
        (root / "dataset.json").write_text(json.dumps(meta))
        return root

    make.written = written  # type: ignore[attr-defined]
    return make


@pytest.fixture(scope="session")
def phantom_msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom MSD dataset (3 cases, 2 channels, 4 classes); read-only for the tests that share it."""
    root = tmp_path_factory.mktemp("phantom") / "Task98_Phantom"
    return write_phantom_dataset(root, num_cases=3, num_channels=2, num_classes=4, shape=(20, 18, 12), seed=5)
