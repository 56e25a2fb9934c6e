"""A trained model, rebuilt from a checkpoint alone: weights, architecture, classes and preprocessing.

The checkpoint's ``model_info`` (written by the training loop) names the architecture and its options, the channel
and class names, the sample layout and the preprocessing settings of the shard set. Nothing else is read: no
shard, manifest or absolute path is needed, so a checkpoint copied to another machine predicts the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r2d2_hpc.config import DataConfig
from r2d2_hpc.errors import ConfigError, problem
from r2d2_hpc.models import build_model
from r2d2_hpc.models.blocks import state_dict_mismatch
from r2d2_hpc.train.checkpoint import RESUME_FIX, CheckpointError, load_checkpoint

REQUIRED_INFO = (
    "name",
    "spatial_dims",
    "options",
    "in_channels",
    "num_classes",
    "class_names",
    "channel_names",
    "layout",
    "preprocessing",
    "modality",
    "required_multiple",
    "sample_shape",
)
_FIX = "point checkpoint= at checkpoints/last.pt of a run trained by this version of r2d2_hpc"


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with what predict needs to know about it."""

    model: nn.Module
    info: dict[str, Any]  # the checkpoint's model_info
    data_cfg: DataConfig  # the preprocessing settings the model was trained with
    device: torch.device
    source: str = ""  # the checkpoint file (named in messages)
    step: int | None = None  # training step of the checkpoint

    @property
    def spatial_dims(self) -> int:
        return int(self.info["spatial_dims"])

    @property
    def in_channels(self) -> int:
        return int(self.info["in_channels"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.info["class_names"]]

    @property
    def channel_names(self) -> list[str]:
        return [str(c) for c in self.info["channel_names"]]

    @property
    def modality(self) -> str:
        return str(self.info.get("modality") or "MRI")

    @property
    def slice_axis(self) -> int:
        return int((self.info.get("layout") or {}).get("slice_axis", 2))

    @property
    def window(self) -> tuple[int, ...]:
        """Spatial size of a training sample: the padded 2D slice, or the 3D patch."""
        return tuple(int(s) for s in self.info["sample_shape"][1:])

    @property
    def required_multiple(self) -> int:
        return int(self.info["required_multiple"])


def data_config_from(preprocessing: dict[str, Any]) -> DataConfig:
    """The DataConfig of recorded preprocessing settings (``DataConfig.preprocessing_settings()`` of training).

    Only the preprocessing fields matter at predict time. The source's folder does not, but DataConfig insists on
    ``root`` for msd and folders sources, so a placeholder is set.
    """
    names = {f.name for f in dataclasses.fields(DataConfig)}
    settings = {k: v for k, v in preprocessing.items() if k in names}
    if settings.get("label_map"):
        settings["label_map"] = {int(k): int(v) for k, v in settings["label_map"].items()}
    settings["root"] = "."
    return DataConfig(**settings)


def resolve_device(device: str, local_device: str) -> torch.device:
    """``auto`` -> the rank's device (``cuda:LOCAL_RANK`` or cpu); ``cuda`` without a GPU is a ConfigError."""
    name = local_device if device == "auto" else device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} needs CUDA, but torch sees no GPU here. Fix: device=cpu or device=auto"
        )
    return torch.device(name)


def _checkpoint_file(path: Path) -> Path:
    """A run folder or its checkpoints/ folder stands for the newest checkpoint in it."""
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuilds the model of a training checkpoint and loads its weights.

    Raises:
        CheckpointError: the file is missing, unreadable, not a checkpoint, lacks ``model_info``, or its weights do
            not fit the model its ``model_info`` describes (another model, channel or class count).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(problem(path, "it does not exist", "a checkpoint file or a run folder", _FIX))
    try:
        found = load_checkpoint(_checkpoint_file(path), expected_config_hash=None, map_location="cpu")
    except CheckpointError as exc:  # its fix is the training one (resume=...): name predict's instead
        raise CheckpointError(str(exc).replace(RESUME_FIX, _FIX)) from exc
    if found is None:
        raise CheckpointError(problem(path, "no checkpoint found", "a checkpoint file (last.pt)", _FIX))
    state, file = found
    info = state.get("model_info") or {}
    missing = [k for k in REQUIRED_INFO if k not in info]
    if missing:
        found_text = f"model_info lacks {', '.join(missing)}"
        raise CheckpointError(problem(file, found_text, "the model_info the training loop records", _FIX))
    options = {k: v for k, v in info["options"].items() if k != "weights_path"}  # loaded below instead
    try:
        model = build_model(
            info["name"],
            int(info["in_channels"]),
            int(info["num_classes"]),
            int(info["spatial_dims"]),
            **options,
        )
    except ConfigError as exc:
        raise CheckpointError(
            problem(file, f"its model_info cannot be built ({exc})", "a known model", _FIX)
        ) from exc
    _load_weights(model, state["model"], info, file)
    device = torch.device(device)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        info=dict(info),
        data_cfg=data_config_from(info["preprocessing"]),
        device=device,
        source=str(file),
        step=state.get("step"),
    )


def _load_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], info: dict[str, Any], file: Path
) -> None:
    """Loads strictly; a mismatch names the first differing tensors and the model model_info describes."""
    mismatch = state_dict_mismatch(model, weights, shown=3)
    if mismatch:
        described = (
            f"a {info['name']} ({info['spatial_dims']}D, {info['in_channels']} channel(s), "
            f"{info['num_classes']} classes, options {info['options']})"
        )
        found = f"its weights do not fit {described}: {mismatch}"
        raise CheckpointError(problem(file, found, "weights of the model that model_info describes", _FIX))
    model.load_state_dict(weights, strict=True)
