"""Model registry: a name -> builder table and ``build_model``, the one way the trainer makes a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.models import blocks
from r2d2_hpc.models.fcn import FCN, FCNConfig
from r2d2_hpc.models.unet import UNet, UNetConfig

Builder = Callable[..., nn.Module]


def _options(config_cls: type, model_name: str, options: dict[str, Any]) -> Any:
    """Builds ``config_cls(**options)``; an unknown option raises ConfigError listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unavailable option(s) for model {model_name!r}: {', '.join(unknown)}. "
            f"Valid options are: {', '.join(valid)}"
        )
    return config_cls(**options)


def build_unet(in_channels: int, num_classes: int, spatial_dims: int, **options: Any) -> UNet:
    """A U-Net; ``options`` are the fields of ``UNetConfig``."""
    return UNet(in_channels, num_classes, spatial_dims, _options(UNetConfig, "unet", options))


def build_fcn(in_channels: int, num_classes: int, spatial_dims: int, **options: Any) -> FCN:
    """An FCN-32s/16s/8s; ``options`` are the fields of ``FCNConfig``."""
    return FCN(in_channels, num_classes, spatial_dims, _options(FCNConfig, "fcn", options))


MODELS: dict[str, Builder] = {"unet": build_unet, "fcn": build_fcn}
# The options dataclass of each model, e.g. for Hydra's ConfigStore or to list the valid options.
MODEL_CONFIGS: dict[str, type] = {"unet": UNetConfig, "fcn": FCNConfig}


def build_model(
    name: str, in_channels: int, num_classes: int, spatial_dims: int, **options: Any
) -> nn.Module:
    """Builds model ``name`` for ``in_channels`` input channels, ``num_classes`` classes (background included)
    and ``spatial_dims`` (2 or 3); ``options`` are the fields of the model's config dataclass.

    Raises:
        ConfigError: on an unknown name or option, or an option value out of range.
    """
    if name not in MODELS:
        raise ConfigError(f"Unknown model {name!r}. Valid models are: {', '.join(sorted(MODELS))}")
    blocks.check_io(in_channels, num_classes, spatial_dims)
    return MODELS[name](int(in_channels), int(num_classes), int(spatial_dims), **options)
