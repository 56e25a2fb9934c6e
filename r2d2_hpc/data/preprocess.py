"""Preprocessing of one case: labels checked, RAS orientation, resampling, normalisation, cropping.

The steps run in this order; :func:`restore_label` undoes the geometric ones (exactly, unless resampled):

1. **Labels** are remapped with ``data.label_map`` (all values at once, so ``{1: 2, 2: 1}`` swaps) and must lie in
   ``[0, num_classes)``; 255 is reserved to mark padding in samples and is never a class.
2. **Orientation**: the arrays are reordered to RAS voxel order (nibabel ``as_closest_canonical`` semantics) and the
   affine is updated so that every voxel keeps its world coordinate. Orientation only flips and transposes, so the
   arrays stay views of the input until the final copy.
3. **Resampling** to ``data.target_spacing`` (mm, x y z of the RAS grid). The new grid has exactly the target
   spacing, ``round(n * spacing / target)`` voxels per axis, and the *centre of the field of view* is kept: the
   outer voxel corners of both grids coincide whenever ``n * spacing / target`` is a whole number, otherwise the
   field of view differs by at most half a new voxel in all, split evenly between both ends. Axes whose spacing already
   equals the target are left untouched. Images use *linear* interpolation (order 1), not cubic: cubic B-splines
   ring, so the exact zeros of a skull-stripped background would become tiny non-zero values and
   ``zscore_nonzero`` and ``crop_nonzero`` would lose their mask; linear also never leaves the source range and
   needs no float64 spline-coefficient copy of each channel. Labels use nearest neighbour (order 0). Points
   outside the source grid take the nearest edge value.
4. **Normalisation**, per channel, statistics in float64 (the ``normalisation`` list of the result records them):
   ``zscore_nonzero`` (``auto`` for MRI) z-scores over the voxels where *any* channel is non-zero (as nnU-Net
   does: a voxel that is 0 in one channel inside the brain is dark tissue, not background) and sets voxels
   outside that union mask to 0; ``zscore`` uses the whole volume; ``ct_window`` clips to ``data.ct_window`` and
   z-scores the whole clipped volume; ``ct_percentile`` (``auto`` for CT) clips to the ``data.ct_percentiles``
   percentiles of the volume's own non-background voxels (those above the volume's minimum, i.e. not the
   padding value scanners write outside the reconstruction circle; nnU-Net uses label foreground instead, which
   is not available at predict time) and z-scores with the clipped mean/std of those voxels; ``none`` leaves
   values bit-identical.
   A constant channel gets std 1.
5. **Crop** (``data.crop_nonzero``) to the bounding box of the voxels that are non-zero in any channel of the
   un-normalised image, widened to keep every non-zero label voxel. Statistics are computed on the uncropped
   volume, so cropping never changes the values.

At predict time :func:`prepare_image` runs the very same code path on an image without a label, and
:func:`restore_label` maps a prediction on the prepared grid back onto the source grid of the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.types import IGNORE_INDEX, DatasetInfo, PreparedCase, RawCase
from r2d2_hpc.errors import ConfigError, DataError, problem

_CHUNK_VOXELS = 1 << 20  # voxels per slab when statistics or label look-ups are streamed
_SPACING_RTOL = 1e-5  # spacings closer than this (relative) to the target are not resampled

Path_ = str | Path | None


def _data_error(file: Path_, found: str, expected: str, fix: str) -> DataError:
    return DataError(problem(file, found, expected, fix))


def preprocess(raw: RawCase, cfg: DataConfig, info: DatasetInfo) -> PreparedCase:
    """Turns one source case into a prepared case (RAS, resampled, normalised, optionally cropped).

    A case without a label gets an all-background label.
    """
    image_file = raw.files.get("image") or next(
        (f for r, f in raw.files.items() if r != "label"), raw.case_id
    )
    label = None
    if raw.label is not None:
        label_file = raw.files.get("label", raw.case_id)
        if raw.label.shape != raw.image.shape[1:]:
            found = (
                f"label shape {tuple(raw.label.shape)} differs from the image's {tuple(raw.image.shape[1:])}"
            )
            fix = "pair the right label file with this image, or resample the label onto the image grid"
            raise _data_error(label_file, found, "a label on the voxel grid of the image", fix)
        label = remap_labels(raw.label, cfg.label_map, len(info.class_names), label_file)
    return _prepare(raw.case_id, raw.image, label, raw.affine, cfg, info.modality, image_file)


def prepare_image(
    image: np.ndarray,
    affine: np.ndarray,
    cfg: DataConfig,
    modality: str,
    *,
    case_id: str = "",
    file: Path_ = None,
    stats: list[dict[str, Any]] | None = None,
) -> PreparedCase:
    """Prepares a new image exactly as :func:`preprocess` prepared the training cases (predict time).

    Args:
        image: (C, X, Y, Z) intensities in the file's voxel order.
        affine: 4x4 voxel -> world affine of the file.
        cfg: the data settings the model was trained with (orientation, spacing, normalisation, crop).
        modality: "MRI" or "CT" (resolves ``normalisation=auto``).
        case_id: name carried into the result.
        file: the image file, named in errors.
        stats: per-channel statistics to re-apply; None computes them from this image, as training did.

    Returns:
        A PreparedCase with an all-background label; pass a prediction on its grid and its ``geometry`` to
        :func:`restore_label` to get a mask on the source grid (save it with the source affine).
    """
    return _prepare(case_id, image, None, affine, cfg, modality, file or case_id or None, stats)


def _prepare(
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    cfg: DataConfig,
    modality: str,
    file: Path_,
    stats: list[dict[str, Any]] | None = None,
) -> PreparedCase:
    _check_image(image, affine, file)
    source_shape, source_affine = image.shape[1:], np.asarray(affine, dtype=np.float64)
    image, label, affine, ornt = canonical_orientation(image, label, affine)
    canonical_shape, oriented = image.shape[1:], image
    image, label, affine = resample(image, label, affine, cfg.target_spacing)
    resampled_shape = image.shape[1:]
    if stats is None:
        stats = compute_normalisation(image, modality, cfg)
    bbox = None
    if cfg.crop_nonzero:
        image, label, bbox = crop_to_nonzero(image, label)
        affine = affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([lo for lo, _ in bbox], dtype=np.float64)
    # A resampled, uncropped array is ours and C-contiguous: normalise it in place rather than copy it again.
    image = apply_normalisation(image, stats, out=image if image is not oriented and bbox is None else None)
    if label is None:
        label = np.zeros(image.shape[1:], dtype=np.uint8)
    geometry = {
        "source_shape": [int(n) for n in source_shape],
        "source_affine": source_affine.tolist(),
        "ornt": [[int(axis), int(flip)] for axis, flip in ornt],
        "canonical_shape": [int(n) for n in canonical_shape],
        "resampled_shape": [int(n) for n in resampled_shape],
        "crop_bbox": bbox,
        "target_spacing": None if cfg.target_spacing is None else [float(s) for s in cfg.target_spacing],
    }
    return PreparedCase(
        case_id=case_id,
        image=image,
        label=np.ascontiguousarray(label, dtype=np.uint8),
        affine=affine,
        spacing=tuple(float(s) for s in _spacing(affine)),
        geometry=geometry,
        normalisation=stats,
    )


def _check_image(image: np.ndarray, affine: np.ndarray, file: Path_) -> None:
    """Refuses arrays that cannot be prepared, naming the file they came from."""
    if image.ndim != 4 or min(image.shape) < 1:
        fix = "give 3D volumes (one per channel); 4D NIfTI files hold channels last and must be moved"
        raise _data_error(file, f"image of shape {tuple(image.shape)}", "channels first (C, X, Y, Z)", fix)
    affine = np.asarray(affine, dtype=np.float64)
    linear = affine[:3, :3] if affine.shape == (4, 4) else None
    if (
        linear is None
        or not np.isfinite(affine).all()
        or abs(np.linalg.det(linear)) < 1e-12 * max(1.0, float(np.prod(_spacing(affine))))
    ):
        found = f"voxel-to-world affine {affine.tolist()} is not an invertible 4x4 matrix"
        fix = "repair the header (e.g. with nibabel: img.set_sform(...)) or re-export the file"
        raise _data_error(file, found, "a NIfTI qform/sform with non-zero spacing on every axis", fix)
    for c in range(image.shape[0]):
        if not np.isfinite(image[c]).all():
            fix = "replace them in the source (e.g. with numpy.nan_to_num) before preparing"
            raise _data_error(file, f"channel {c} holds NaN or infinite intensities", "finite values", fix)


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the norms of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def canonical_orientation(
    image: np.ndarray, label: np.ndarray | None, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Reorders (C, X, Y, Z) image and label to the closest RAS voxel order (views, no copy).

    Returns:
        image, label, the affine of the reordered grid (every voxel keeps its world coordinate), and the nibabel
        orientation transform ``ornt`` (file axes -> RAS) that :func:`restore_label` inverts.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    spatial_shape = image.shape[1:]
    # nibabel reorders the first three axes and carries trailing ones along, so channels go last and back.
    image = np.moveaxis(nib.orientations.apply_orientation(np.moveaxis(image, 0, -1), ornt), -1, 0)
    if label is not None:
        label = nib.orientations.apply_orientation(label, ornt)
    affine_ras = affine @ nib.orientations.inv_ornt_aff(ornt, spatial_shape)
    return image, label, affine_ras, ornt


def _zoom_params(
    spacing: np.ndarray, target_spacing: Sequence[float] | None, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None:
    """The map new index -> old index (``old = ratio * new + offset``) and the new shape; None when unchanged.

    Shared by :func:`resample` and :func:`restore_label`, so both always take the same decision.
    """
    if target_spacing is None:
        return None
    target = np.asarray([float(s) for s in target_spacing], dtype=np.float64)
    same = np.isclose(spacing, target, rtol=_SPACING_RTOL, atol=0.0)
    if same.all():
        return None
    shape_arr = np.asarray(shape, dtype=np.float64)
    ratio = np.where(same, 1.0, target / spacing)
    new_shape = np.where(same, shape_arr, np.maximum(1.0, np.round(shape_arr / ratio)))
    # Keep the centre of the field of view: index (n-1)/2 of both grids is the same world point.
    offset = (shape_arr - 1.0) / 2.0 - ratio * (new_shape - 1.0) / 2.0
    return ratio, offset, tuple(int(n) for n in new_shape)


def resample(
    image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, target_spacing: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resamples to ``target_spacing`` (mm per array axis); images linearly, labels by nearest neighbour.

    The inputs come back unchanged when the spacing already matches (or the target is None). See the module
    docstring for the grid alignment (field-of-view centre kept, exact target spacing).
    """
    params = _zoom_params(_spacing(affine), target_spacing, image.shape[1:])
    if params is None:
        return image, label, affine
    ratio, offset, new_shape = params
    out = np.empty((image.shape[0], *new_shape), dtype=np.float32)
    for c in range(image.shape[0]):
        ndimage.affine_transform(
            image[c], ratio, offset, output_shape=new_shape, output=out[c], order=1, mode="nearest"
        )
    if label is not None:
        label = ndimage.affine_transform(
            label, ratio, offset, output_shape=new_shape, output=label.dtype, order=0, mode="nearest"
        )
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:3, 3] += new_affine[:3, :3] @ offset
    new_affine[:3, :3] *= ratio  # scales column j: voxel size along axis j becomes the target
    return out, label, new_affine


def resolve_normalisation(method: str, modality: str) -> str:
    """The concrete method: ``auto`` is ``ct_percentile`` for CT and ``zscore_nonzero`` otherwise."""
    if method == "auto":
        return "ct_percentile" if str(modality).upper() == "CT" else "zscore_nonzero"
    return method


def _nonzero_any(image: np.ndarray) -> np.ndarray:
    """Voxels that are non-zero in at least one channel."""
    mask = image[0] != 0
    for c in range(1, image.shape[0]):
        mask |= image[c] != 0
    return mask


def _slabs(channel: np.ndarray, mask: np.ndarray | None, clip: list[float] | None) -> Iterator[np.ndarray]:
    """The (masked, clipped) values of a channel in slabs along x, so no full float64 copy is ever made."""
    step = max(1, _CHUNK_VOXELS // max(1, channel[0].size))
    for start in range(0, channel.shape[0], step):
        values = channel[start : start + step]
        if mask is not None:
            values = values[mask[start : start + step]]
        if clip is not None:
            values = np.clip(values, clip[0], clip[1])
        yield values


def _mean_std(channel: np.ndarray, mask: np.ndarray | None, clip: list[float] | None) -> tuple[float, float]:
    """Two-pass float64 mean and std; an empty or constant selection gets std 1."""
    count, total = 0, 0.0
    for values in _slabs(channel, mask, clip):
        count += values.size
        total += float(values.sum(dtype=np.float64))
    if count == 0:
        return 0.0, 1.0
    mean = total / count
    squares = 0.0
    for values in _slabs(channel, mask, clip):
        deviation = values.astype(np.float64).ravel()
        deviation -= mean
        squares += float(deviation @ deviation)
    std = float(np.sqrt(squares / count))
    if not std > 1e-8 * max(1.0, abs(mean)):  # constant channel: rounding noise, not signal
        std = 1.0
    return mean, std


def compute_normalisation(image: np.ndarray, modality: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """Per-channel statistics ``{"method", "mean", "std", "clip"}`` of ``cfg.normalisation`` on this image."""
    method = resolve_normalisation(cfg.normalisation, modality)
    if method == "ct_window" and (cfg.ct_window is None or len(cfg.ct_window) != 2):
        raise ConfigError("data.normalisation=ct_window needs data.ct_window=[low,high] (HU)")
    mask = _nonzero_any(image) if method == "zscore_nonzero" else None
    stats = []
    for c in range(image.shape[0]):
        channel, clip = image[c], None
        if method == "none":
            mean, std = 0.0, 1.0
        elif method == "ct_percentile":
            foreground = channel > channel.min()
            if not foreground.any():  # constant channel: every voxel counts
                foreground = None
            values = channel.flatten() if foreground is None else channel[foreground]  # own copy to partition
            low, high = np.percentile(values, [float(q) for q in cfg.ct_percentiles], overwrite_input=True)
            clip = [float(low), float(high)]
            mean, std = _mean_std(channel, foreground, clip)
        else:
            if method == "ct_window":
                clip = [float(v) for v in cfg.ct_window]  # type: ignore[union-attr]
            mean, std = _mean_std(channel, mask, clip)
        stats.append({"method": method, "mean": mean, "std": std, "clip": clip})
    return stats


def normalise(image: np.ndarray, modality: str, cfg: DataConfig) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Normalises each channel with ``cfg.normalisation``; returns a new float32 array and the stats applied."""
    stats = compute_normalisation(image, modality, cfg)
    return apply_normalisation(image, stats), stats


def apply_normalisation(
    image: np.ndarray, stats: list[dict[str, Any]], out: np.ndarray | None = None
) -> np.ndarray:
    """Applies recorded per-channel statistics; returns a C-contiguous float32 (C, X, Y, Z) array.

    The result is a new array unless ``out`` is given (``out=image`` works in place on a float32 array).
    ``zscore_nonzero`` zeroes the voxels where every channel of ``image`` is 0.
    """
    if len(stats) != image.shape[0]:
        found = f"{len(stats)} normalisation records for an image of {image.shape[0]} channels"
        raise _data_error(None, found, "one per channel", "re-apply the statistics of an image like this one")
    out = np.empty(image.shape, dtype=np.float32) if out is None else out
    outside = None
    if any(s["method"] == "zscore_nonzero" for s in stats):
        outside = ~_nonzero_any(image)
    for c, record in enumerate(stats):
        if record.get("clip") is not None:
            np.clip(image[c], float(record["clip"][0]), float(record["clip"][1]), out=out[c])
        elif out is not image:
            out[c] = image[c]
        if record["method"] != "none":
            out[c] -= np.float32(record["mean"])
            out[c] /= np.float32(record["std"])
        if record["method"] == "zscore_nonzero":
            np.copyto(out[c], 0.0, where=outside)
    return out


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crops (views) to the box of voxels non-zero in any channel, widened to keep non-zero label voxels.

    Returns:
        image, label and the box ``[[lo, hi]] * 3`` (hi exclusive); an all-zero case keeps its full extent.
    """
    mask = _nonzero_any(image)
    if label is not None:
        mask |= label != 0
    bbox = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    return image[(slice(None), *box)], (None if label is None else label[box]), bbox


def remap_labels(
    label: np.ndarray, label_map: dict[int, int] | None, num_classes: int, file: Path_
) -> np.ndarray:
    """Maps source label values with ``label_map`` (all at once) and checks them; returns a new uint8 array.

    Raises:
        DataError: naming ``file``, when a value is not an integer in ``[0, num_classes)`` after mapping (255 is
            reserved for padding and never a class).
    """
    if not 1 <= num_classes < IGNORE_INDEX:
        raise ConfigError(
            f"{num_classes} classes given; 1 to {IGNORE_INDEX - 1} classes (with background) are supported"
        )
    mapping = {int(k): int(v) for k, v in (label_map or {}).items()}
    if label.dtype == bool:
        label = label.view(np.uint8)
    if not np.issubdtype(label.dtype, np.integer) and not np.array_equal(label, np.round(label)):
        fix = "store labels with an integer data type; resample labels by nearest neighbour only"
        raise _data_error(file, "label holds non-integer values", "integer class values", fix)
    # A look-up table over [bottom, top] covers every value that can be valid; others fail right away.
    bottom, top = min([0, *mapping]), max([num_classes - 1, *mapping])
    if label.min() < bottom or label.max() > top:
        _raise_bad_labels(label[(label < bottom) | (label > top)], mapping, num_classes, file)
    lut = np.arange(bottom, top + 1, dtype=np.int64)
    for source, target in mapping.items():
        lut[source - bottom] = target
    lut = np.where((lut >= 0) & (lut < num_classes), lut, IGNORE_INDEX).astype(np.uint8)
    out = np.empty(label.shape, dtype=np.uint8)
    step = max(
        1, _CHUNK_VOXELS // max(1, label[0].size)
    )  # slabs: an intp index copy of the whole label is big
    for start in range(0, label.shape[0], step):
        out[start : start + step] = lut[label[start : start + step].astype(np.intp) - bottom]
    bad = out == IGNORE_INDEX
    if bad.any():
        _raise_bad_labels(label[bad], mapping, num_classes, file)
    return out


def _raise_bad_labels(values: np.ndarray, mapping: dict[int, int], num_classes: int, file: Path_) -> None:
    found = ", ".join(str(v) for v in np.unique(values)[:10].tolist())
    mapped = f" (after data.label_map={mapping})" if mapping else ""
    raise _data_error(
        file,
        f"label value(s) {found} outside the {num_classes} classes 0..{num_classes - 1}{mapped}",
        f"integers in [0, {num_classes}); {IGNORE_INDEX} is reserved to mark padding and is never a class",
        "map the values with data.label_map (e.g. data.label_map={4: 3}) or name every class in "
        "data.class_names / dataset.json 'labels'",
    )


def restore_label(label_prepared: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Maps a label on the prepared grid back onto the source grid (uncrop, nearest un-resample, un-orient).

    The result has the source shape and voxel order; save it with ``geometry["source_affine"]``. Without
    resampling the round trip is exact; with it, each source voxel takes the nearest prepared voxel.
    """
    resampled_shape = tuple(geometry["resampled_shape"])
    label = np.asarray(label_prepared)
    bbox = geometry.get("crop_bbox")
    expected = resampled_shape if bbox is None else tuple(hi - lo for lo, hi in bbox)
    if label.shape != expected:
        fix = "pass the prediction made on the prepared image that carries this geometry"
        raise _data_error(None, f"label of shape {label.shape}", f"the prepared grid {expected}", fix)
    if bbox is not None:
        full = np.zeros(resampled_shape, dtype=label.dtype)
        full[tuple(slice(lo, hi) for lo, hi in bbox)] = label
        label = full
    ornt = np.asarray(geometry["ornt"], dtype=np.float64)
    source_shape = tuple(geometry["source_shape"])
    canonical_shape = tuple(geometry["canonical_shape"])
    canonical_affine = np.asarray(
        geometry["source_affine"], dtype=np.float64
    ) @ nib.orientations.inv_ornt_aff(ornt, source_shape)
    params = _zoom_params(_spacing(canonical_affine), geometry.get("target_spacing"), canonical_shape)
    if params is not None:
        ratio, offset, new_shape = params
        if new_shape != resampled_shape:
            fix = "use the geometry written by the same preprocessing run"
            raise _data_error(None, f"resampled_shape {resampled_shape}", f"{new_shape} for its spacing", fix)
        inverse_ratio = 1.0 / ratio  # inverts old = ratio * new + offset
        label = ndimage.affine_transform(
            label,
            inverse_ratio,
            -offset * inverse_ratio,
            output_shape=canonical_shape,
            output=label.dtype,
            order=0,
            mode="nearest",
        )
    inverse = np.empty_like(ornt)
    for axis, (ras_axis, flip) in enumerate(ornt):
        inverse[int(ras_axis)] = [axis, flip]
    return np.ascontiguousarray(nib.orientations.apply_orientation(label, inverse))
