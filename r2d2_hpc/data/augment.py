"""Cheap, label-preserving augmentation of one training sample (numpy, in the DataLoader worker).

Geometry (flips, 90-degree rotations) moves image and label together, so they stay aligned voxel for voxel;
intensity (scale and shift per channel) touches the image only. Padding (label ``IGNORE_INDEX``) keeps an image
value of 0 whatever the intensity draw, so padded areas look the same in every sample.

Every draw comes from the ``rng`` passed in: the datasets build it from ``(seed, epoch, rank, index)``, which
makes a sample's augmentation independent of the DataLoader worker that happens to load it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from r2d2_hpc.data.types import IGNORE_INDEX
from r2d2_hpc.errors import ConfigError


@dataclass
class AugmentConfig:
    """Which augmentations the training datasets apply, and how strong they are."""

    flip: bool = True  # mirror each spatial axis with probability 1/2
    rot90: bool = True  # rotate by k*90 degrees in a plane whose two sides are equal
    intensity_scale: float = 0.1  # per-channel factor drawn from U(1 - s, 1 + s)
    intensity_shift: float = 0.1  # per-channel offset drawn from U(-s, s), in normalised units
    enabled: bool = True  # False returns the sample unchanged (still as contiguous copies)

    def __post_init__(self) -> None:
        if not 0.0 <= self.intensity_scale < 1.0:
            raise ConfigError(
                f"augment.intensity_scale={self.intensity_scale} must be in [0, 1) so the factor stays positive"
            )
        if self.intensity_shift < 0.0:
            raise ConfigError(f"augment.intensity_shift={self.intensity_shift} must be >= 0")


def augment(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    spatial_axes: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Applies random flips, 90-degree rotations and intensity changes to one sample.

    Args:
        image: ``(C, *spatial)`` float array.
        label: ``(*spatial)`` integer array, same spatial shape as ``image``.
        rng: the sample's generator; the same generator state gives the same result.
        cfg: what to apply.
        spatial_axes: axes of ``label`` that may be flipped and rotated (``(0, 1)`` for a 2D slice,
            ``(0, 1, 2)`` for a 3D patch); the matching image axis is one higher (channel axis first).

    Returns:
        ``(image, label)`` as new C-contiguous arrays. A rotation by an odd multiple of 90 degrees is only
        drawn in a plane whose two sides are equal, so the sample's shape never changes.
    """
    if image.shape[1:] != label.shape:
        raise ValueError(f"image spatial shape {image.shape[1:]} differs from label shape {label.shape}")
    axes = [int(a) for a in spatial_axes]
    if not cfg.enabled:
        return np.array(image, order="C"), np.array(label, order="C")
    if cfg.flip:
        flipped = [a for a in axes if rng.random() < 0.5]
        if flipped:
            image = np.flip(image, axis=tuple(a + 1 for a in flipped))
            label = np.flip(label, axis=tuple(flipped))
    if cfg.rot90:
        image, label = _rotate(image, label, rng, axes)
    image = np.array(image, dtype=np.float32, order="C")
    label = np.array(label, order="C")
    if cfg.intensity_scale > 0 or cfg.intensity_shift > 0:
        _intensity(image, label, rng, cfg)
    return image, label


def _rotate(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, axes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    # Only square planes: an odd quarter turn elsewhere would change the shape and break batching, and a half
    # turn in any plane equals flipping both of its axes, which the flips already cover.
    planes = [(a, b) for a, b in itertools.combinations(axes, 2) if label.shape[a] == label.shape[b]]
    if not planes:
        return image, label
    a, b = planes[int(rng.integers(len(planes)))]
    k = int(rng.integers(4))
    if k == 0:
        return image, label
    return np.rot90(image, k, axes=(a + 1, b + 1)), np.rot90(label, k, axes=(a, b))


def _intensity(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> None:
    num_channels = image.shape[0]
    scale = rng.uniform(1.0 - cfg.intensity_scale, 1.0 + cfg.intensity_scale, size=num_channels)
    shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, size=num_channels)
    expand = (slice(None),) + (None,) * (image.ndim - 1)
    image *= scale.astype(np.float32)[expand]
    image += shift.astype(np.float32)[expand]
    padded = label == IGNORE_INDEX
    if padded.any():
        image[:, padded] = 0.0
