"""Segmentation models (U-Net, FCN-32s/16s/8s), their registry and size/cost helpers."""

from r2d2_hpc.models.fcn import FCN, FCNConfig
from r2d2_hpc.models.profile import count_parameters, flops_per_sample
from r2d2_hpc.models.registry import MODEL_CONFIGS, MODELS, build_model
from r2d2_hpc.models.unet import UNet, UNetConfig

__all__ = [
    "FCN",
    "MODELS",
    "MODEL_CONFIGS",
    "FCNConfig",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "flops_per_sample",
]
