"""Helpers of the inference tests: real NIfTI files, real checkpoints of tiny models, and an oracle model.

A plain module (not conftest.py) so that test files can import it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from r2d2_hpc.config import DataConfig
from r2d2_hpc.inference.model import LoadedModel, data_config_from
from r2d2_hpc.models import build_model
from r2d2_hpc.train.checkpoint import save_checkpoint

# Stored LPS (voxel axes run to left, posterior, superior), anisotropic, odd shape: nothing may assume RAS.
LPS_AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 40.0], [0.0, -1.7, 0.0, 25.0], [0.0, 0.0, 2.5, -30.0], [0.0, 0.0, 0.0, 1.0]]
)
ODD_SHAPE = (13, 11, 7)


def save_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE, codes: tuple[int, int] = (1, 2)
) -> Path:
    """Writes ``data`` as a real NIfTI file with the given (qform, sform) codes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    nib.save(image, path)
    return path


def model_info(
    model: nn.Module,
    *,
    name: str,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    options: dict[str, Any],
    preprocessing: dict[str, Any],
    sample_shape: list[int],
    slice_axis: int = 2,
) -> dict[str, Any]:
    """The model_info the training loop records, for a model built by hand."""
    data = DataConfig(name="synthetic", **preprocessing)
    return {
        "name": name,
        "spatial_dims": spatial_dims,
        "options": options,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "class_names": ["background", *(f"c{k}" for k in range(1, num_classes))],
        "channel_names": [f"ch{c}" for c in range(in_channels)],
        "dataset": "tiny",
        "layout": {"kind": f"{spatial_dims}d", "slice_axis": slice_axis},
        "preprocessing": data.preprocessing_settings(),
        "modality": "MRI",
        "required_multiple": int(getattr(model, "required_multiple", 1)),
        "sample_shape": sample_shape,
    }


def make_checkpoint(
    directory: Path,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 3,
    preprocessing: dict[str, Any] | None = None,
    sample_shape: list[int] | None = None,
) -> Path:
    """A real ``last.pt`` of a tiny U-Net (depth 1, width 4) with the model_info of a training run."""
    options = {"depth": 1, "base_width": 4}
    torch.manual_seed(0)
    model = build_model("unet", in_channels, num_classes, spatial_dims, **options)
    window = [16, 16] if spatial_dims == 2 else [8, 8, 8]
    info = model_info(
        model,
        name="unet",
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        options=options,
        preprocessing=preprocessing or {},
        sample_shape=sample_shape or [in_channels, *window],
    )
    state = {
        "step": 3,
        "epoch": 0,
        "model": model.state_dict(),
        "optimizer": {},
        "config_hash": "0" * 16,
        "world_size": 1,
        "model_info": info,
    }
    return save_checkpoint(directory, state)


class Oracle(nn.Module):
    """Pointwise "model": channel 0 holds class values, the logits are sharply peaked at them.

    Works on 2D and 3D inputs of any size and is flip-equivariant, so every geometric step of predict must be
    undone exactly for the mask to come back equal to the image.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        classes = torch.arange(self.num_classes, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
        return -10.0 * (x[:, :1] - classes) ** 2


def oracle_model(
    num_classes: int,
    spatial_dims: int,
    window: list[int],
    preprocessing: dict[str, Any] | None = None,
    slice_axis: int = 2,
) -> LoadedModel:
    """A LoadedModel around :class:`Oracle` with the given preprocessing (identity by default)."""
    model = Oracle(num_classes)
    info = model_info(
        model,
        name="oracle",
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=num_classes,
        options={},
        preprocessing={"normalisation": "none", **(preprocessing or {})},
        sample_shape=[1, *window],
        slice_axis=slice_axis,
    )
    return LoadedModel(model, info, data_config_from(info["preprocessing"]), torch.device("cpu"), "oracle")
