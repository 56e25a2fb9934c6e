"""r2d2_hpc: distributed U-Net and FCN training for medical image segmentation, with scaling reports."""

from r2d2_hpc.errors import ConfigError, DataError, DiskError, LaunchError, R2D2Error, ShardError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "DiskError", "LaunchError", "R2D2Error", "ShardError", "__version__"]
