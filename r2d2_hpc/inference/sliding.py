"""Inference on one prepared image: 2D slice by slice, or a 3D sliding window with Gaussian weights.

Both return class logits ``(K, X, Y, Z)`` on the prepared grid (float32); the caller takes their argmax, and their
softmax where probabilities are wanted. Logits, not probabilities, are blended and averaged (as nnU-Net does): the
argmax of float32 softmax outputs can tie where the logits do not, and then a 2D prediction without flips would
no longer be bit-identical to the training's validation, which takes the argmax of the logits.

- **2D** models see every slice along the training ``slice_axis``, padded at the far end with zeros (as the
  training's ``SliceDataset`` pads) to the training sample size, or to the next multiple of the model's stride when
  a slice is larger. With instance normalisation the padding takes part in the statistics, so matching the
  training padding reproduces the training's validation exactly.
- **3D** models see windows of the training patch size that overlap by ``overlap`` of their edge (window starts
  spread evenly from the first to the last voxel, as in nnU-Net). Each window's logits are weighted by a
  Gaussian (sigma ``gaussian_sigma`` x edge, centre 1) so the border of a window, which saw less context, counts
  less; the weighted sum is divided by the summed weights. Volumes smaller than a window are padded at the far end.
- **Test-time augmentation** (``tta``) averages the logits over every flip of the spatial axes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WindowSettings:
    """How the model is run over an image (see the module docstring)."""

    batch_size: int = 8  # slices or windows per forward pass
    overlap: float = 0.5  # 3D: share of a window edge that neighbouring windows overlap
    gaussian_sigma: float = 0.125  # 3D: Gaussian sigma as a share of the window edge
    tta: bool = False  # average over every flip of the spatial axes
    amp_dtype: torch.dtype | None = None  # autocast dtype of the forward pass (CUDA), None for float32


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-int(value) // int(multiple)) * int(multiple)


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial dims of an ``(N, C, *spatial)`` tensor, the empty one first."""
    dims = range(2, 2 + spatial_dims)
    return [combo for n in range(spatial_dims + 1) for combo in itertools.combinations(dims, n)]


def forward_logits(model: nn.Module, x: torch.Tensor, settings: WindowSettings) -> torch.Tensor:
    """Logits ``(N, K, *spatial)`` in float32, averaged over flips when ``settings.tta``."""
    flips = flip_sets(x.ndim - 2) if settings.tta else [()]
    total: torch.Tensor | None = None
    use_amp = settings.amp_dtype is not None and x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(x.device.type, dtype=settings.amp_dtype, enabled=use_amp):
        for dims in flips:
            logits = model(x.flip(dims) if dims else x).float()
            logits = logits.flip(dims) if dims else logits
            total = logits if total is None else total + logits
    assert total is not None
    return total / len(flips) if len(flips) > 1 else total


def _pad_far_end(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Zero-pads the trailing spatial dims of ``x`` at their far end up to ``sizes``."""
    pad: list[int] = []
    for extent, size in zip(reversed(x.shape[-len(sizes) :]), reversed(sizes), strict=True):
        pad += [0, int(size) - int(extent)]
    return F.pad(x, pad) if any(pad) else x


def predict_2d(
    model: nn.Module,
    image: np.ndarray,
    slice_axis: int,
    window: Sequence[int],
    multiple: int,
    settings: WindowSettings,
    device: torch.device,
) -> np.ndarray:
    """Logits ``(K, X, Y, Z)`` of a prepared ``(C, X, Y, Z)`` image, one slice along ``slice_axis`` at a time."""
    slices = torch.from_numpy(np.ascontiguousarray(image)).movedim(1 + slice_axis, 0)  # (S, C, A, B)
    plane = tuple(int(n) for n in slices.shape[2:])
    window = tuple(window) if len(window) == 2 else plane
    size = [round_up(max(n, w), multiple) for n, w in zip(plane, window, strict=True)]
    out: torch.Tensor | None = None
    for start in range(0, slices.shape[0], settings.batch_size):
        batch = _pad_far_end(slices[start : start + settings.batch_size], size).to(device)
        logits = forward_logits(model, batch, settings)[..., : plane[0], : plane[1]].cpu()
        if out is None:
            out = torch.empty((slices.shape[0], logits.shape[1], *plane), dtype=torch.float32)
        out[start : start + logits.shape[0]] = logits
    assert out is not None
    return out.movedim(1, 0).movedim(1, 1 + slice_axis).contiguous().numpy()  # (K, X, Y, Z)


def window_starts(extent: int, window: int, overlap: float) -> list[int]:
    """Start indices of windows covering ``[0, extent)``: evenly spread, neighbours overlapping >= ``overlap``."""
    if extent <= window:
        return [0]
    step = max(1.0, window * (1.0 - overlap))
    num = math.ceil((extent - window) / step) + 1
    return sorted({round(v) for v in np.linspace(0, extent - window, num)})


def gaussian_weights(window: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """Separable Gaussian importance map of ``window``, 1 at the centre and strictly positive everywhere."""
    weights = np.ones((), dtype=np.float64)
    for edge in window:
        coords = np.arange(edge, dtype=np.float64) - (edge - 1) / 2.0
        axis = np.exp(-0.5 * (coords / (sigma_scale * edge)) ** 2)
        weights = np.multiply.outer(weights, axis)
    weights /= weights.max()
    positive = weights[weights > 0]
    # A voxel of weight 0 would divide by 0 where only window borders cover it.
    weights = np.maximum(weights, positive.min() if positive.size else 1.0)
    return torch.from_numpy(weights.astype(np.float32))


def _chunks(items: Iterator[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def predict_3d(
    model: nn.Module,
    image: np.ndarray,
    window: Sequence[int],
    multiple: int,
    settings: WindowSettings,
    device: torch.device,
) -> np.ndarray:
    """Logits ``(K, X, Y, Z)`` of a prepared ``(C, X, Y, Z)`` image by a Gaussian-weighted sliding window."""
    extent = tuple(int(n) for n in image.shape[1:])
    window = tuple(round_up(w, multiple) for w in window)
    padded = tuple(max(n, w) for n, w in zip(extent, window, strict=True))
    volume = _pad_far_end(torch.from_numpy(np.ascontiguousarray(image)), padded)  # (C, *padded) on the CPU
    weights = gaussian_weights(window, settings.gaussian_sigma).to(device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    total: torch.Tensor | None = None
    starts = itertools.product(
        *(window_starts(n, w, settings.overlap) for n, w in zip(padded, window, strict=True))
    )
    for chunk in _chunks(starts, settings.batch_size):
        boxes = [tuple(slice(s, s + w) for s, w in zip(start, window, strict=True)) for start in chunk]
        batch = torch.stack([volume[(slice(None), *box)] for box in boxes]).to(device)
        logits = forward_logits(model, batch, settings) * weights
        if total is None:
            total = torch.zeros((logits.shape[1], *padded), dtype=torch.float32, device=device)
        for i, box in enumerate(boxes):
            total[(slice(None), *box)] += logits[i]
            norm[box] += weights
    assert total is not None
    total /= norm
    return total[(slice(None), *(slice(0, n) for n in extent))].cpu().contiguous().numpy()
