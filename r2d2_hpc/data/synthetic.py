"""Synthetic MRI-like phantoms written as a real Medical Segmentation Decathlon dataset (.nii.gz + dataset.json).

Each case is a body ellipsoid ("tissue") holding irregular, partly nested and overlapping blobs (lesion with a
core inside it, cyst, nodule), defined in world millimetres so that every case shows the same anatomy once
reoriented to RAS. The files exercise what real data throws at a pipeline: anisotropic spacing (about
1.0 x 1.2 x 2.5 mm, a little different per case), RAS, LPS and LAS voxel orders, small rotations, 1-4 channels
with a different contrast per class (4D files with channels last, as MSD stores them), partial volume,
a smooth multiplicative bias field, Gaussian noise and a zero background outside the body (skull-stripped look).
The arrays depend only on the seed and the case index.

CLI: ``python -m r2d2_hpc.data.synthetic --out DIR [--num-cases N --channels C --classes K --shape X Y Z --seed S]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from r2d2_hpc.errors import DataError, problem

GENERATOR_VERSION = 1
CLASS_NAMES = ("background", "tissue", "lesion", "core", "cyst", "nodule")
CHANNEL_NAMES = ("T1", "T2", "FLAIR", "PD")
# Mean intensity of class k (columns) in channel c (rows): all classes differ in T1 alone, and every channel
# orders them differently, so more channels make the task easier but one is enough.
CONTRAST = np.array(
    [
        [0.0, 100.0, 70.0, 140.0, 40.0, 180.0],
        [0.0, 80.0, 150.0, 110.0, 220.0, 60.0],
        [0.0, 90.0, 170.0, 60.0, 30.0, 130.0],
        [0.0, 120.0, 135.0, 90.0, 160.0, 100.0],
    ]
)
BASE_SPACING_MM = np.array([1.0, 1.2, 2.5])
# Voxel-axis flips of RAS, LPS and LAS voxel orders.
ORIENTATION_FLIPS = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1)}
PHANTOM_KEY = "r2d2_phantom"


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _case_affine(rng: np.random.Generator, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Anisotropic spacing, an orientation that cycles RAS/LPS/LAS, a small rotation in every other case."""
    spacing = BASE_SPACING_MM * rng.uniform(0.92, 1.08, 3)
    flips = np.array(list(ORIENTATION_FLIPS.values())[index % len(ORIENTATION_FLIPS)])
    angles = rng.uniform(-6.0, 6.0, 3) if index % 2 == 1 else np.zeros(3)
    linear = _rotation(angles) @ np.diag(flips * spacing)
    centre_vox = (np.array(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ centre_vox + rng.normal(0.0, 2.0, 3)
    return affine


def _world_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """World x, y, z (mm) of every voxel, built by broadcasting (cheap for small volumes)."""
    idx = [
        np.arange(n, dtype=np.float64).reshape([-1 if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    ]
    return [sum(affine[d, a] * idx[a] for a in range(3)) + affine[d, 3] for d in range(3)]


def _blob(world: list[np.ndarray], centre, semi_axes, rotation, wobble: np.ndarray) -> np.ndarray:
    """Ellipsoid whose surface is pushed in and out by a smooth field: irregular but always holds its centre."""
    rel = [world[d] - centre[d] for d in range(3)]
    local = [sum(rotation[d, a] * rel[d] for d in range(3)) for a in range(3)]  # rotation.T @ rel
    radius_sq = sum((local[a] / semi_axes[a]) ** 2 for a in range(3))
    return radius_sq < (1.0 + wobble) ** 2


def _phantom_label(rng: np.random.Generator, world: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Paints the classes in order; later ones overwrite earlier ones (core inside lesion, overlaps)."""
    shape = np.broadcast_shapes(*(w.shape for w in world))
    extent = np.array([np.ptp(w) for w in world])
    body_axes = 0.42 * extent * rng.uniform(0.9, 1.05, 3)
    body_c = rng.normal(0.0, 1.5, 3)
    coarse = rng.standard_normal((2, 5, 5, 5))
    fields = [
        ndimage.zoom(c, np.array(shape) / 5.0, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
        for c in coarse
    ]

    def wobble(amp: float) -> np.ndarray:
        w = rng.uniform(-1.0, 1.0, 2)
        return np.clip(amp * (w[0] * fields[0] + w[1] * fields[1]), -0.3, 0.3)

    def turn() -> np.ndarray:
        return _rotation(rng.uniform(-30.0, 30.0, 3))

    label = np.zeros(shape, dtype=np.uint8)
    label[_blob(world, body_c, body_axes, np.eye(3), wobble(0.05))] = 1
    lesion_c = body_c + body_axes * np.array([0.3, rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)])
    lesion_axes = body_axes * 0.45 * rng.uniform(0.85, 1.15, 3)
    # (offset from the body centre as a fraction of its semi-axes, size as a fraction of the body)
    structures = [
        (lesion_c, lesion_axes),
        (lesion_c + lesion_axes * rng.uniform(-0.2, 0.2, 3), lesion_axes * 0.5),
        (body_c + body_axes * np.array([-0.45, 0.1, 0.2]), body_axes * 0.3 * rng.uniform(0.85, 1.15, 3)),
        (body_c + body_axes * np.array([0.1, 0.5, -0.25]), body_axes * 0.25 * rng.uniform(0.85, 1.15, 3)),
    ]
    for k, (centre, axes) in enumerate(structures[: num_classes - 2], start=2):
        label[_blob(world, centre, axes, turn(), wobble(0.15))] = k
    return label


def _phantom_image(
    rng: np.random.Generator, world: list[np.ndarray], label: np.ndarray, num_channels: int
) -> np.ndarray:
    """Per-class contrast, partial volume, a smooth bias field, noise; zero outside the (dilated) body."""
    gain = 1.0 + rng.normal(0.0, 0.05, (num_channels, CONTRAST.shape[1]))
    means = (CONTRAST[:num_channels] * gain).astype(np.float32)
    extent = np.array([np.ptp(w) for w in world])
    unit = [(world[d] - world[d].mean()) / extent[d] for d in range(3)]  # about -0.5..0.5
    head = ndimage.binary_dilation(label > 0, iterations=1)
    image = np.empty((num_channels, *label.shape), dtype=np.float32)
    for c in range(num_channels):
        linear, quadratic = rng.normal(0.0, 0.25, 3), rng.normal(0.0, 0.3, 3)
        bias = np.exp(sum(linear[d] * unit[d] + quadratic[d] * unit[d] ** 2 for d in range(3)))
        smooth = ndimage.gaussian_filter(means[c][label], sigma=(0.7, 0.6, 0.35))
        noisy = smooth * bias + rng.normal(0.0, 0.04 * float(means[c].max()), label.shape)
        image[c] = np.where(head, noisy, 0.0)
    return image


def make_phantom(
    index: int, num_channels: int, num_classes: int, shape: Sequence[int], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: ``(image float32 (C, X, Y, Z), label uint8 (X, Y, Z), affine float64 4x4)``."""
    shape3 = tuple(int(n) for n in shape)
    rng = np.random.default_rng([int(seed), int(index)])
    affine = _case_affine(rng, index, shape3)
    world = _world_grid(affine, shape3)
    label = _phantom_label(rng, world, num_classes)
    image = _phantom_image(rng, world, label, num_channels)
    return image, label, affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _check_args(num_cases: int, num_channels: int, num_classes: int, shape: Sequence[int]) -> None:
    if num_cases < 1 or not 1 <= num_channels <= 4 or not 2 <= num_classes <= 6:
        raise DataError(
            problem(
                None,
                f"num_cases={num_cases}, num_channels={num_channels}, num_classes={num_classes}",
                "num_cases >= 1, channels 1-4, classes 2-6",
                "pick values in range",
            )
        )
    if len(shape) != 3 or min(int(n) for n in shape) < 8:
        raise DataError(
            problem(
                None,
                f"phantom shape {list(shape)}",
                "three sizes of at least 8 voxels",
                "e.g. --shape 48 40 32",
            )
        )


def write_phantom_dataset(
    out: Path,
    num_cases: int = 6,
    num_channels: int = 2,
    num_classes: int = 3,
    shape: Sequence[int] = (48, 40, 32),
    seed: int = 0,
) -> Path:
    """Writes ``num_cases`` training phantoms and one test phantom in MSD layout under ``out``.

    Files: ``imagesTr/phantom_NNN.nii.gz``, ``labelsTr/phantom_NNN.nii.gz``, ``imagesTs/phantom_NNN.nii.gz`` and
    ``dataset.json`` (written last). Returns ``out``.
    """
    _check_args(num_cases, num_channels, num_classes, shape)
    out = Path(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for index in range(num_cases + 1):
        image, label, affine = make_phantom(index, num_channels, num_classes, shape, seed)
        name = f"phantom_{index:03d}.nii.gz"
        file_image = image[0] if num_channels == 1 else np.moveaxis(image, 0, -1)  # MSD: channels last
        if index == num_cases:
            _save(file_image, affine, out / "imagesTs" / name)
            break
        _save(file_image, affine, out / "imagesTr" / name)
        _save(label, affine, out / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Phantom",
        "description": "Synthetic MRI-like phantoms made by r2d2_hpc.data.synthetic",
        "tensorImageSize": "4D" if num_channels > 1 else "3D",
        "modality": {str(c): CHANNEL_NAMES[c] for c in range(num_channels)},
        "labels": {str(k): CLASS_NAMES[k] for k in range(num_classes)},
        "numTraining": num_cases,
        "numTest": 1,
        "training": training,
        "test": [f"./imagesTs/phantom_{num_cases:03d}.nii.gz"],
        PHANTOM_KEY: phantom_params(num_cases, num_channels, num_classes, shape, seed),
    }
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "dataset.json")
    return out


def phantom_params(
    num_cases: int, num_channels: int, num_classes: int, shape: Sequence[int], seed: int
) -> dict:
    """The generator settings recorded in dataset.json (to tell a stale phantom folder apart)."""
    return {
        "version": GENERATOR_VERSION,
        "num_cases": int(num_cases),
        "num_channels": int(num_channels),
        "num_classes": int(num_classes),
        "shape": [int(n) for n in shape],
        "seed": int(seed),
    }


def ensure_phantom_dataset(
    root: Path, num_cases: int, num_channels: int, num_classes: int, shape: Sequence[int], seed: int
) -> Path:
    """Makes sure ``root`` holds the phantom dataset of these settings, writing it when absent.

    It is written into a hidden sibling folder and renamed into place, so a killed run never leaves a half
    dataset that looks complete.

    Raises:
        DataError: ``root`` holds something else (another dataset, or phantoms made with other settings).
    """
    root = Path(root)
    wanted = phantom_params(num_cases, num_channels, num_classes, shape, seed)
    if (root / "dataset.json").is_file():
        _check_existing(root, wanted)
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(
            problem(
                root,
                "a non-empty folder without dataset.json",
                "an empty or absent folder for the synthetic phantoms",
                "delete the folder or point data.root elsewhere",
            )
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_phantom_dataset(tmp, num_cases, num_channels, num_classes, shape, seed)
        try:
            os.rename(tmp, root)  # replaces an absent or empty folder, atomically
        except OSError:
            if not (root / "dataset.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_existing(root, wanted)
    return root


def _check_existing(root: Path, wanted: dict) -> None:
    try:
        found = json.loads((root / "dataset.json").read_text()).get(PHANTOM_KEY)
    except (OSError, ValueError, AttributeError):
        found = None
    if found != wanted:
        raise DataError(
            problem(
                root / "dataset.json",
                f"a dataset made with other settings ({found})",
                f"phantoms made with {wanted}",
                "delete the folder so it is written again, or set data.root to another folder",
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the dataset folder."""
    parser = argparse.ArgumentParser(
        prog="python -m r2d2_hpc.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (MSD layout)")
    parser.add_argument("--num-cases", type=int, default=6, help="training cases (one test case is added)")
    parser.add_argument("--channels", type=int, default=2, help="image channels, 1-4")
    parser.add_argument("--classes", type=int, default=3, help="classes including background, 2-6")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 40, 32], metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out = write_phantom_dataset(
            args.out, args.num_cases, args.channels, args.classes, args.shape, args.seed
        )
    except DataError as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
