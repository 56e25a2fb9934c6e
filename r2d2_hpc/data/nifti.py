"""Reading NIfTI files with validation: every bad file becomes a ``DataError`` that names it and says the fix.

``load_nifti`` reads one file in one of two roles: ``"label"`` gives an integer ``(X, Y, Z)`` array, any other role
(``"image"``, ``"image_0001"``, ``"t1"``, ...) a float32 channels-first ``(C, X, Y, Z)`` array. 4D images keep their
channels on the last axis in the file, as the Medical Segmentation Decathlon stores them; they are moved first here.
``load_case_files`` reads all files of one case and checks that they share one voxel grid.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from r2d2_hpc.data.types import RawCase
from r2d2_hpc.errors import DataError, problem

LABEL_ROLE = "label"
NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$")
# Errors that nibabel, gzip and zlib raise on truncated, corrupt or non-NIfTI files.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


def strip_nifti_suffix(name: str) -> str:
    """``"case_001.nii.gz"`` -> ``"case_001"`` (also ``.nii``)."""
    return NIFTI_SUFFIX.sub("", name)


def _read(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """Opens a file and reads its voxels (scaled by the header's slope/intercept), as stored."""
    if not path.is_file():
        raise DataError(
            problem(
                path,
                "file not found",
                "an existing NIfTI file",
                "check the path, or the listing that names it",
            )
        )
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise DataError(
            problem(
                path,
                f"unreadable ({type(exc).__name__}: {exc})",
                "a complete NIfTI file (.nii or .nii.gz)",
                "the file is truncated, corrupt or not NIfTI; copy or convert it again",
            )
        ) from exc
    return img, data


def _check_affine(path: Path, affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(
            problem(
                path,
                f"a voxel-to-world affine that is not finite or is singular:\n{affine}",
                "an invertible 4x4 affine (sform or qform) in mm",
                "repair the header (e.g. re-save with nibabel using the scanner's affine)",
            )
        )
    return affine


def _squeeze_trailing(data: np.ndarray) -> np.ndarray:
    """Drops singleton axes after the third: NIfTI tools often write (X, Y, Z, 1)."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _as_label(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim != 3:
        raise DataError(
            problem(
                path,
                f"a label of shape {data.shape} ({data.ndim}D)",
                "a 3D integer label (X, Y, Z) with one value per voxel",
                "store one-hot or multi-channel labels as a single 3D map of class values (e.g. argmax)",
            )
        )
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return np.asarray(data)
    finite = np.isfinite(data)
    if not finite.all() or not np.array_equal(data, np.round(data)):
        bad = data[~finite] if not finite.all() else data[data != np.round(data)]
        raise DataError(
            problem(
                path,
                f"non-integral label values (e.g. {bad.flat[0]!r}, dtype {data.dtype})",
                "integer class values",
                "the label was probably resampled with interpolation; resample labels with nearest neighbour",
            )
        )
    return data.astype(np.int32)


def _as_image(path: Path, data: np.ndarray) -> np.ndarray:
    if data.ndim not in (3, 4):
        raise DataError(
            problem(
                path,
                f"an image of shape {data.shape} ({data.ndim}D)",
                "a 3D volume (X, Y, Z) or a 4D one with channels last (X, Y, Z, C)",
                "2D slices must be stacked into a volume; 5D files must be split or reshaped to (X, Y, Z, C)",
            )
        )
    image = data[..., None] if data.ndim == 3 else data
    image = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
    if not np.isfinite(image).all():
        num_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataError(
            problem(
                path,
                f"{num_bad} NaN or Inf voxel(s)",
                "finite intensities everywhere",
                "replace them before preparing (e.g. numpy.nan_to_num) or exclude the case",
            )
        )
    return image


def load_nifti(path: Path, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates one NIfTI file.

    Args:
        path: the ``.nii`` or ``.nii.gz`` file.
        role: ``"label"`` for a label map; anything else reads an image.

    Returns:
        ``(data, affine)``: data is int ``(X, Y, Z)`` for a label, float32 ``(C, X, Y, Z)`` for an image;
        affine is the float64 4x4 voxel-to-world matrix.

    Raises:
        DataError: missing, unreadable, wrongly shaped file, non-finite image or non-integral label.
    """
    path = Path(path)
    img, data = _read(path)
    affine = _check_affine(path, img.affine)
    data = _squeeze_trailing(data)
    if role == LABEL_ROLE:
        return _as_label(path, data), affine
    return _as_image(path, data), affine


def read_num_channels(path: Path) -> int:
    """Channels of an image file from its header alone (4D: the last axis), without reading the voxels."""
    path = Path(path)
    try:
        shape = tuple(nib.load(path).shape)
    except _READ_ERRORS:
        return load_nifti(path, "image")[0].shape[0]  # raises the DataError that names the file
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape[3] if len(shape) == 4 else 1


def channel_of_role(role: str) -> int:
    """``"image"`` -> 0, ``"image_0002"`` -> 2: the channel a per-channel image file holds."""
    return 0 if role == "image" else int(role.rsplit("_", 1)[1])


def check_same_grid(
    reference: tuple[Path, tuple[int, ...], np.ndarray],
    other: tuple[Path, tuple[int, ...], np.ndarray],
    tolerance_mm: float,
) -> None:
    """Raises a DataError naming ``other``'s file when its (path, shape, affine) grid differs from ``reference``."""
    ref_path, ref_shape, ref_affine = reference
    path, shape, affine = other
    if shape != ref_shape:
        raise DataError(
            problem(
                path,
                f"voxel grid {shape} differs from {ref_shape} of {ref_path}",
                "the same (X, Y, Z) shape for every file of a case",
                "resample this file onto the image grid (nearest neighbour for labels) or fix the pairing",
            )
        )
    diff = float(np.max(np.abs(affine - ref_affine)))
    if diff > tolerance_mm:
        raise DataError(
            problem(
                path,
                f"affine differs from that of {ref_path} by up to {diff:.4g} mm",
                f"the same voxel-to-world affine within data.affine_tolerance={tolerance_mm} mm",
                "re-save the file with the image's header (nib.Nifti1Image(data, image.affine)) if they really "
                "share a grid, or raise data.affine_tolerance",
            )
        )


def stack_channel_files(
    files: list[tuple[Path, str]], affine_tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reads (file, role) pairs in channel order into one float32 ``(C, X, Y, Z)`` image on one shared grid.

    Returns the image and the first file's affine. Raises DataError when a file is bad or the grids differ.
    """
    parts, reference = [], None
    for path, role in files:
        image, affine = load_nifti(path, role)
        grid = (path, image.shape[1:], affine)
        if reference is None:
            reference = grid
        else:
            check_same_grid(reference, grid, affine_tolerance)
        parts.append(image)
    assert reference is not None, "at least one file"
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)), reference[2]


def load_case_files(
    case_id: str, files: Mapping[str, Path], num_channels: int, affine_tolerance: float
) -> RawCase:
    """Reads every file of one case: image roles ``image``/``image_NNNN`` (channel order) and ``label``.

    Raises:
        DataError: a file is bad, the files do not share one grid, or the channel count is not ``num_channels``.
    """
    image_roles = sorted((r for r in files if r.startswith("image")), key=channel_of_role)
    if not image_roles:
        raise DataError(
            problem(None, f"case {case_id!r} lists no image file", "at least one", "fix the listing")
        )
    image, affine = stack_channel_files([(Path(files[r]), r) for r in image_roles], affine_tolerance)
    if image.shape[0] != num_channels:
        raise DataError(
            problem(
                files[image_roles[0]],
                f"{image.shape[0]} channel(s) in case {case_id!r}",
                f"{num_channels} channel(s), one per declared channel name",
                "check the dataset's modality/channel_names (or data.channel_names) against the image files",
            )
        )
    label = None
    if LABEL_ROLE in files:
        label, label_affine = load_nifti(files[LABEL_ROLE], LABEL_ROLE)
        reference = (Path(files[image_roles[0]]), image.shape[1:], affine)
        check_same_grid(reference, (Path(files[LABEL_ROLE]), label.shape, label_affine), affine_tolerance)
    return RawCase(case_id=case_id, image=image, label=label, affine=affine, files=dict(files))
