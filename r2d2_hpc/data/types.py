"""The records that flow between the data stages: source -> preprocess -> shards -> datasets.

Arrays are always channels first for images, ``(C, X, Y, Z)``, and ``(X, Y, Z)`` for labels, in the voxel order
named by the record (file order for raw cases, RAS for prepared ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "r2d2-manifest"
MANIFEST_VERSION = 1
SHARD_FORMAT = "r2d2-shard"
SHARD_VERSION = 1
IGNORE_INDEX = 255  # label of padded voxels in samples: never a class, skipped by losses and metrics


@dataclass(frozen=True)
class DatasetInfo:
    """What a source says about the whole dataset."""

    name: str  # dataset name written to the manifest
    class_names: tuple[str, ...]  # label value i -> name, background first (after label_map)
    channel_names: tuple[str, ...]  # one name per image channel
    modality: str  # "MRI" or "CT": picks the default normalisation


@dataclass(frozen=True)
class CaseRef:
    """One case as a source lists it: cheap to build, picklable, sent to worker processes.

    ``files`` maps a role ("image", "image_0001", "label", "t1", ...) to the file the case is read from; their
    sha256 decides whether a rerun of prepare redoes the case. ``split`` is the source's own train/val choice
    ("train" | "val") or None to let prepare split by ``val_fraction``. ``extra`` holds source-specific,
    JSON-able details (e.g. the slab bounds of mni_tissue).
    """

    case_id: str
    files: dict[str, Path]
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawCase:
    """A case as read from its files, before any preprocessing (voxel order of the file)."""

    case_id: str
    image: np.ndarray  # float32 (C, X, Y, Z)
    label: np.ndarray | None  # integer (X, Y, Z), None when the case has no label
    affine: np.ndarray  # float64 4x4, voxel index -> world (mm, RAS+ world as NIfTI defines it)
    files: dict[str, Path] = field(default_factory=dict)  # role -> file it came from (named in errors)


@dataclass
class PreparedCase:
    """A case after preprocessing: RAS voxel order, normalised, ready to be stored in a shard.

    ``geometry`` holds everything needed to map a prediction on this grid back onto the source grid:
    ``source_shape`` (X, Y, Z of the file), ``source_affine``, ``ornt`` (nibabel orientation transform from file to
    RAS), ``resampled_shape`` (before cropping), ``crop_bbox`` ([[lo, hi] per axis] in the resampled grid).
    ``normalisation`` holds the per-channel statistics that were applied (to apply them again at predict time).
    """

    case_id: str
    image: np.ndarray  # float32 (C, X, Y, Z), RAS
    label: np.ndarray  # uint8 (X, Y, Z), RAS
    affine: np.ndarray  # float64 4x4, voxel -> world of the prepared grid
    spacing: tuple[float, float, float]  # mm per voxel of the prepared grid
    geometry: dict[str, Any]
    normalisation: list[dict[str, Any]]
