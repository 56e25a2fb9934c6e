"""Building blocks shared by the segmentation models: N-d layers, normalisation, checks, weight loading.

Every helper takes ``spatial_dims`` (2 or 3) so one model definition serves 2D slices and 3D patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from r2d2_hpc.errors import ConfigError, problem

NORMS = ("batch", "instance", "group", "none")
ACTIVATIONS = ("relu", "leaky_relu")
SPATIAL_DIMS = (2, 3)
# Largest number of groups of GroupNorm (Wu & He 2018 use 32; 8 keeps >= 4 channels per group at width 32).
MAX_NUM_GROUPS = 8
# Slope of LeakyReLU for negative inputs (nnU-Net's value).
LEAKY_RELU_SLOPE = 0.01

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raises ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        valid = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{name}={value!r} is not a valid choice. Valid choices are: {valid}")


def conv(spatial_dims: int, *args: object, **kwargs: object) -> nn.Module:
    """``nn.Conv2d`` or ``nn.Conv3d`` with the given arguments."""
    return _CONV[spatial_dims](*args, **kwargs)


def conv_transpose(spatial_dims: int, *args: object, **kwargs: object) -> nn.Module:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d`` with the given arguments."""
    return _CONV_TRANSPOSE[spatial_dims](*args, **kwargs)


def max_pool(spatial_dims: int) -> nn.Module:
    """A 2x max-pool (kernel 2, stride 2)."""
    return _MAX_POOL[spatial_dims](kernel_size=2, stride=2)


def dropout(p: float) -> nn.Module:
    """Element-wise dropout, or an identity when ``p`` is 0 (keeps the module tree free of no-op layers)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def num_groups(num_channels: int) -> int:
    """Number of GroupNorm groups: ``MAX_NUM_GROUPS``, or fewer so that it divides ``num_channels``."""
    for groups in range(min(MAX_NUM_GROUPS, num_channels), 0, -1):
        if num_channels % groups == 0:
            return groups
    raise AssertionError("unreachable: 1 divides every channel count")


def norm(kind: str, num_channels: int, spatial_dims: int) -> nn.Module:
    """The normalisation layer ``kind`` (batch | instance | group | none) for ``num_channels`` channels."""
    if kind == "batch":
        return _BATCH_NORM[spatial_dims](num_channels)
    if kind == "instance":
        # Affine, as in nnU-Net; PyTorch's default (affine=False) would leave no learned scale per channel.
        return _INSTANCE_NORM[spatial_dims](num_channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(num_groups(num_channels), num_channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm={kind!r} is not a valid choice. Valid choices are: {', '.join(NORMS)}")


def activation(kind: str) -> nn.Module:
    """ReLU or LeakyReLU (slope ``LEAKY_RELU_SLOPE``)."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True)
    raise ConfigError(
        f"activation={kind!r} is not a valid choice. Valid choices are: {', '.join(ACTIVATIONS)}"
    )


class ConvNormAct(nn.Sequential):
    """Conv (kernel 3, 'same' padding) -> norm -> activation. The conv has a bias only without a norm layer,
    since a norm that subtracts the mean cancels a bias."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm_kind: str,
        act_kind: str,
        stride: int = 1,
    ) -> None:
        super().__init__(
            conv(
                spatial_dims, in_channels, out_channels, 3, stride=stride, padding=1, bias=norm_kind == "none"
            ),
            norm(norm_kind, out_channels, spatial_dims),
            activation(act_kind),
        )


def check_io(in_channels: int, num_classes: int, spatial_dims: int) -> None:
    """Raises ConfigError unless the channel and class counts are positive and ``spatial_dims`` is 2 or 3."""
    if int(in_channels) < 1 or int(num_classes) < 1:
        raise ConfigError(
            f"in_channels={in_channels} and num_classes={num_classes} must both be >= 1 "
            "(num_classes counts the background class)"
        )
    check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)


def init_he(model: nn.Module, negative_slope: float) -> None:
    """He (Kaiming) normal init of every conv and transposed conv, zero biases (as nnU-Net does); PyTorch's
    default init is tuned for neither ReLU nets trained from scratch nor LeakyReLU."""
    for module in model.modules():
        if isinstance(module, (*_CONV.values(), *_CONV_TRANSPOSE.values())):
            nn.init.kaiming_normal_(module.weight, a=negative_slope)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def bilinear_kernel(num_channels: int, kernel_size: int, spatial_dims: int) -> torch.Tensor:
    """Weights of a transposed conv that upsamples each channel (bi/tri)linearly, like FCN's ``upsample_filt``.

    Returns a ``(num_channels, num_channels, k, ..., k)`` tensor, zero off the channel diagonal.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    kernel = taps
    for _ in range(spatial_dims - 1):
        kernel = kernel.unsqueeze(-1) * taps
    weight = torch.zeros((num_channels, num_channels, *([kernel_size] * spatial_dims)))
    for c in range(num_channels):
        weight[c, c] = kernel
    return weight


def check_input(x: torch.Tensor, model_name: str, in_channels: int, spatial_dims: int, multiple: int) -> None:
    """Checks that ``x`` is ``(N, in_channels, *spatial)`` with every spatial size a multiple of ``multiple``."""
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        raise ConfigError(
            problem(
                None,
                f"{model_name} received an input of shape {tuple(x.shape)}",
                f"(batch, {in_channels} channels, {spatial_dims} spatial sizes)",
                "match the model's in_channels and spatial_dims to the data (channels of the shard set, 2d/3d layout)",
            )
        )
    spatial = tuple(int(s) for s in x.shape[2:])
    if all(s % multiple == 0 for s in spatial):
        return
    down = tuple(max(multiple, s // multiple * multiple) for s in spatial)
    up = tuple(-(-s // multiple) * multiple for s in spatial)
    raise ConfigError(
        problem(
            None,
            f"{model_name} received spatial size {spatial}",
            f"every spatial size to be a multiple of {multiple} (the model's total downsampling stride)",
            f"pad or crop to a multiple of {multiple}, e.g. set the 2D dataset's pad_multiple={multiple} or "
            f"sample_size, or the 3D patch_size, to {list(down)} (crop) or {list(up)} (pad); "
            "or use a model with fewer downsamplings",
        )
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(
            problem(path, "weights file not found", "a state dict saved with torch.save", "fix weights_path")
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or non-torch files
        raise ConfigError(
            problem(
                path,
                f"cannot be read by torch.load ({exc})",
                "a state dict saved with torch.save",
                "re-save it",
            )
        ) from exc
    # Accept our own checkpoints ({"model": state, ...}) and state dicts of DDP-wrapped models ("module." keys).
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            problem(
                path,
                "does not hold a state dict",
                "a dict of parameter name -> tensor",
                "save model.state_dict()",
            )
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor], shown: int = 5) -> str:
    """What keeps ``state`` from loading strictly into ``model`` ("" when it fits): missing, unexpected, reshaped."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    return "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped))
        if keys
    )


def load_weights(model: nn.Module, weights_path: str | Path) -> None:
    """Loads a local state dict into ``model`` strictly; a mismatch raises ConfigError naming the file."""
    path = Path(weights_path)
    state = _read_state_dict(path)
    found = state_dict_mismatch(model, state)
    if found:
        raise ConfigError(
            problem(
                path,
                f"weights do not match {type(model).__name__}: {found}",
                "a state dict saved from a model with the same options, in_channels, num_classes and spatial_dims",
                "build the model with the options the weights were trained with, or set weights_path to None",
            )
        )
    model.load_state_dict(state, strict=True)
