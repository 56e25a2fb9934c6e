"""One case through a trained model: the training's preprocessing, inference, and back onto the file's grid.

:func:`predict_image` prepares the image exactly as the training cases were prepared (``prepare_image``: RAS
orientation, resampling, normalisation with statistics of this image, crop), runs the model
(:mod:`r2d2_hpc.inference.sliding`), takes the argmax on the prepared grid and maps it back with
``restore_label`` (uncrop, nearest-neighbour un-resampling, un-orientation), so the mask has the source shape and
voxel order and is saved with the source affine: an LPS-stored volume comes back LPS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2d2_hpc.data.preprocess import prepare_image, restore_label
from r2d2_hpc.inference.model import LoadedModel
from r2d2_hpc.inference.sliding import WindowSettings, predict_2d, predict_3d

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CasePrediction:
    """A prediction on the source grid of the case's file."""

    label: np.ndarray  # uint8 (X, Y, Z) class values, file voxel order
    probabilities: np.ndarray | None  # float32 (X, Y, Z, K), file voxel order; None unless asked for
    geometry: dict[str, Any]  # the preprocessing geometry (shapes, orientation, crop)


def infer_logits(loaded: LoadedModel, image: np.ndarray, settings: WindowSettings) -> np.ndarray:
    """Class logits ``(K, X, Y, Z)`` of a prepared image, 2D slice-wise or 3D sliding window."""
    if loaded.spatial_dims == 2:
        return predict_2d(
            loaded.model,
            image,
            loaded.slice_axis,
            loaded.window,
            loaded.required_multiple,
            settings,
            loaded.device,
        )
    return predict_3d(loaded.model, image, loaded.window, loaded.required_multiple, settings, loaded.device)


def restore_probabilities(probabilities: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Maps ``(K, *prepared)`` probabilities onto the source grid as ``(X, Y, Z, K)`` (nearest neighbour).

    Outside a crop box the model saw nothing: there the background has probability 1.
    """
    bbox = geometry.get("crop_bbox")
    full_shape = tuple(geometry["resampled_shape"])
    uncropped = geometry if bbox is None else {**geometry, "crop_bbox": None}
    channels = []
    for k, channel in enumerate(probabilities):
        if bbox is not None:
            full = np.full(full_shape, 1.0 if k == 0 else 0.0, dtype=np.float32)
            full[tuple(slice(lo, hi) for lo, hi in bbox)] = channel
            channel = full
        channels.append(restore_label(channel, uncropped))
    return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def predict_image(
    loaded: LoadedModel,
    image: np.ndarray,
    affine: np.ndarray,
    settings: WindowSettings,
    *,
    case_id: str = "",
    file: str | Path | None = None,
    with_probabilities: bool = False,
) -> CasePrediction:
    """Segments one ``(C, X, Y, Z)`` image given in its file's voxel order with its affine.

    Raises:
        DataError: the image cannot be prepared (named after ``file``), e.g. non-finite values or a bad affine.
    """
    prepared = prepare_image(
        image, affine, loaded.data_cfg, loaded.modality, case_id=case_id, file=file or case_id or None
    )
    logits = infer_logits(loaded, prepared.image, settings)
    label = logits.argmax(axis=0).astype(np.uint8)
    probabilities = None
    if with_probabilities:
        softmax = torch.from_numpy(logits).softmax(dim=0).numpy()
        probabilities = restore_probabilities(softmax, prepared.geometry)
    return CasePrediction(
        label=restore_label(label, prepared.geometry), probabilities=probabilities, geometry=prepared.geometry
    )
