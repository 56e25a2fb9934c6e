"""PyTorch datasets over a prepared shard set: 2D slices (``SliceDataset``) and 3D patches (``PatchDataset``).

Both read through ``ShardReader``, which opens its HDF5 files lazily in the process that first reads, so a
dataset can be pickled to DataLoader workers (fork or spawn) and each worker gets its own file handles. The list
of samples is built from the manifest's shapes alone: building a dataset touches no HDF5 file.

Randomness (crop/patch location, foreground choice, augmentation) is drawn per sample from
``np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))``. Hence:

- a sample depends only on ``(seed, epoch, index)``, never on how many DataLoader workers there are or
  which one loads it, so results are reproducible and a resumed run sees the same data;
- it does not depend on the rank or the number of ranks either: a global batch split over N ranks holds exactly
  the samples, augmented exactly the same way, that one rank would see (the sampler deals each step's indices
  out over the ranks), so strong scaling changes nothing but how the work is shared;
- different epochs (call ``set_epoch`` before each epoch, like ``DistributedSampler.set_epoch``) draw different
  augmentations of the same index.

The epoch lives in a shared-memory tensor, so ``set_epoch`` also reaches persistent DataLoader workers.
Every sample is ``dict(image=float32 (C, *spatial), label=int64 (*spatial), case_id=str, index=int,
corrupt_skipped=int)``; padded voxels have image 0 and label ``IGNORE_INDEX`` (255), which losses and metrics
skip. A sample whose read fails its checksum raises ``ShardError`` naming the shard and the case
(``on_corrupt="fail"``), or (``"skip"``) is replaced, with a warning, by the next readable index;
``corrupt_skipped`` counts the samples so replaced, so a training loop can add them up.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from r2d2_hpc.data.augment import IGNORE_INDEX, AugmentConfig, augment
from r2d2_hpc.data.manifest import DEFAULT_CHUNK_CACHE_MIB
from r2d2_hpc.data.shards import ShardReader
from r2d2_hpc.data.types import MANIFEST_NAME
from r2d2_hpc.errors import ConfigError, ShardError, problem

_FG_CACHE_CASES = 8  # foreground location tables kept per worker (one per case, most recently used)
_MAX_SKIPS = 32  # corrupt samples in a row that on_corrupt="skip" replaces before it gives up
ON_CORRUPT = ("fail", "skip")


class _ShardDataset(Dataset):
    """What both datasets share: the reader, the split, the per-sample generator and windowed reads."""

    spatial_dims: int = 0

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        augment_cfg: AugmentConfig | None,
        seed: int,
        cache_mib: float | None,
        chunk_cache_mib: float = DEFAULT_CHUNK_CACHE_MIB,
        locking: bool = False,
        on_corrupt: str = "fail",
    ) -> None:
        self.shard_dir = Path(shard_dir)
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(
                f"on_corrupt={on_corrupt!r} must be one of {ON_CORRUPT} (data.on_corrupt_sample)"
            )
        self.on_corrupt = on_corrupt
        self.reader = ShardReader(
            self.shard_dir, cache_mib=cache_mib, chunk_cache_mib=chunk_cache_mib, locking=locking
        )
        splits = self.reader.manifest.get("split", {})
        if split not in splits:
            raise ConfigError(
                problem(
                    self.shard_dir / MANIFEST_NAME,
                    f"no split named {split!r}",
                    f"one of {sorted(splits)}",
                    "pass split='train' or split='val'",
                )
            )
        if seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
        self.split = split
        self.case_ids: list[str] = list(self.reader.case_ids(split))
        self.augment_cfg = augment_cfg
        # Training draws (random crops, augmentation) need an enabled augmentation; otherwise samples are fixed.
        self.randomised = augment_cfg is not None and augment_cfg.enabled
        self.seed = int(seed)
        # Shared memory: a persistent DataLoader worker holds its own copy of the dataset, yet must see the
        # epoch that the main process sets between epochs.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_channels(self) -> int:
        return len(self.reader.channel_names)

    @property
    def num_classes(self) -> int:
        return len(self.reader.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.reader.class_names)

    @property
    def channel_names(self) -> list[str]:
        return list(self.reader.channel_names)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose random draws the next samples use (call it before every epoch)."""
        if epoch < 0:
            raise ConfigError(f"epoch={epoch} must be >= 0")
        self._epoch[0] = int(epoch)

    def sample_rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch (the same on every rank)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index)]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        skipped = 0
        while True:
            try:
                sample = self._sample(index)
            except ShardError as exc:
                if self.on_corrupt != "skip" or skipped >= _MAX_SKIPS:
                    if skipped:
                        raise ShardError(
                            f"{exc} ({skipped} corrupt samples in a row were skipped before)"
                        ) from exc
                    raise
                warnings.warn(f"skipping a corrupt sample (data.on_corrupt_sample=skip): {exc}", stacklevel=2)
                skipped += 1
                index = (index + 1) % len(self)
                continue
            sample["corrupt_skipped"] = skipped
            return sample

    def _sample(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} samples")
        return index

    def _read_window(
        self, case_id: str, starts: Sequence[int], sizes: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reads the box ``[start, start + size)`` per axis of (X, Y, Z); the part outside the volume is padded."""
        shape = self.reader.shape(case_id)
        src, dst = [], []
        for lo, size, extent in zip(starts, sizes, shape[1:], strict=True):
            first, last = max(int(lo), 0), min(int(lo) + int(size), extent)
            src.append(slice(first, max(first, last)))
            dst.append(slice(first - lo, max(first, last) - lo))
        inside = all(s.start == 0 and s.stop == n for s, n in zip(dst, sizes, strict=True))
        empty = any(s.stop <= s.start for s in src)
        if inside:
            image = self.reader.read_image(case_id, (slice(None), *src))
            label = self.reader.read_label(case_id, tuple(src))
            return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.uint8)
        image = np.zeros((shape[0], *sizes), dtype=np.float32)
        label = np.full(tuple(sizes), IGNORE_INDEX, dtype=np.uint8)
        if not empty:
            image[(slice(None), *dst)] = self.reader.read_image(case_id, (slice(None), *src))
            label[tuple(dst)] = self.reader.read_label(case_id, tuple(src))
        return image, label

    def _finish(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, case_id: str, index: int
    ) -> dict[str, Any]:
        if self.randomised and self.augment_cfg is not None:
            image, label = augment(image, label, rng, self.augment_cfg, tuple(range(self.spatial_dims)))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "case_id": case_id,
            "index": index,
        }


class SliceDataset(_ShardDataset):
    """Every 2D slice, along the manifest's ``slice_axis``, of every case of one split.

    Args:
        shard_dir: folder holding ``manifest.json`` and the shards (prepared with ``data.layout=2d``).
        split: ``"train"`` or ``"val"`` (any split named in the manifest).
        augment: augmentation to apply; ``None`` (or ``enabled=False``) for none, which also makes crops
            centred instead of random.
        seed: base seed of every per-sample generator.
        sample_size: in-plane size of every sample. ``None`` pads every slice (image 0, label
            ``IGNORE_INDEX``, data at the origin) to the largest in-plane size over all cases of the shard set
            (train and val alike), rounded up to ``pad_multiple``.
        pad_multiple: padded sizes are multiples of this (a U-Net with 4 poolings needs 16).
        cache_mib: HDF5 chunk cache per open shard, passed to ``ShardReader``.
        chunk_cache_mib: decoded chunks kept per process (``ShardReader``; 0 decodes every read).
        locking: HDF5 file locking of the shard opens (``ShardReader``).
        on_corrupt: ``"fail"`` or ``"skip"`` a sample whose read fails (see the module docstring).
    """

    spatial_dims = 2

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        augment: AugmentConfig | None = None,
        seed: int = 0,
        sample_size: tuple[int, int] | None = None,
        pad_multiple: int = 16,
        cache_mib: float | None = None,
        chunk_cache_mib: float = DEFAULT_CHUNK_CACHE_MIB,
        locking: bool = False,
        on_corrupt: str = "fail",
    ) -> None:
        super().__init__(shard_dir, split, augment, seed, cache_mib, chunk_cache_mib, locking, on_corrupt)
        layout = self.reader.layout
        if layout.get("kind") != "2d":
            raise ShardError(
                problem(
                    self.shard_dir / MANIFEST_NAME,
                    f"layout {layout!r}",
                    "a 2d layout for 2D slices",
                    "prepare the data with data.layout=2d, or train with PatchDataset on this shard set",
                )
            )
        if pad_multiple < 1:
            raise ConfigError(f"pad_multiple={pad_multiple} must be >= 1")
        self.slice_axis = int(layout["slice_axis"])
        self.plane_axes = tuple(a for a in range(3) if a != self.slice_axis)
        counts = [self.reader.shape(c)[1 + self.slice_axis] for c in self.case_ids]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        if sample_size is None:
            largest = [0, 0]
            for case_id in self.reader.case_ids(None):
                shape = self.reader.shape(case_id)
                largest = [max(m, shape[1 + a]) for m, a in zip(largest, self.plane_axes, strict=True)]
            self.sample_size = tuple(-(-m // pad_multiple) * pad_multiple for m in largest)
            self._fixed_origin = True
        else:
            if len(sample_size) != 2 or any(int(s) < 1 for s in sample_size):
                raise ConfigError(
                    f"sample_size={sample_size!r} must be two positive integers (in-plane voxels)"
                )
            self.sample_size = tuple(int(s) for s in sample_size)
            self._fixed_origin = False

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[str, int]:
        """The case id and slice number of sample ``index``."""
        index = self._check_index(index)
        case_idx = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.case_ids[case_idx], index - int(self._offsets[case_idx])

    def _sample(self, index: int) -> dict[str, Any]:
        case_id, slice_idx = self.locate(index)
        index = int(index)
        rng = self.sample_rng(index)
        shape = self.reader.shape(case_id)
        starts, sizes = [0, 0, 0], [1, 1, 1]
        starts[self.slice_axis] = slice_idx
        for axis, want in zip(self.plane_axes, self.sample_size, strict=True):
            sizes[axis] = want
            if not self._fixed_origin:
                starts[axis] = _window_start(shape[1 + axis], want, rng if self.randomised else None)
        image, label = self._read_window(case_id, starts, sizes)
        image = np.squeeze(image, axis=1 + self.slice_axis)
        label = np.squeeze(label, axis=self.slice_axis)
        return self._finish(image, label, rng, case_id, index)


class PatchDataset(_ShardDataset):
    """3D patches of every case of one split: random (training) or a fixed covering grid (validation).

    Args:
        shard_dir: folder holding ``manifest.json`` and the shards (a 3d layout reads fastest).
        split: ``"train"`` or ``"val"`` (any split named in the manifest).
        patch_size: patch edge lengths in voxels (X, Y, Z).
        samples_per_epoch: length of a random epoch; ``None`` takes the split's voxels / patch voxels.
        foreground_fraction: share of random patches centred (with jitter) on a foreground voxel of a class
            drawn uniformly among the classes present in the case; the rest are placed uniformly.
        augment: augmentation to apply; ``None`` for none.
        seed: base seed of every per-sample generator.
        cache_mib: HDF5 chunk cache per open shard, passed to ``ShardReader``.
        deterministic: ``True`` gives the grid of non-overlapping patches that covers every voxel of every case
            exactly once (edge patches padded with ``IGNORE_INDEX``); ``None`` picks it for every split but
            ``"train"``.
        chunk_cache_mib, locking, on_corrupt: as for ``SliceDataset``.
    """

    spatial_dims = 3

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        patch_size: Sequence[int] = (64, 64, 64),
        samples_per_epoch: int | None = None,
        foreground_fraction: float = 0.33,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        cache_mib: float | None = None,
        deterministic: bool | None = None,
        chunk_cache_mib: float = DEFAULT_CHUNK_CACHE_MIB,
        locking: bool = False,
        on_corrupt: str = "fail",
    ) -> None:
        super().__init__(shard_dir, split, augment, seed, cache_mib, chunk_cache_mib, locking, on_corrupt)
        if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
            raise ConfigError(
                f"patch_size={list(patch_size)!r} must be three positive integers (X, Y, Z voxels)"
            )
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ConfigError(f"foreground_fraction={foreground_fraction} must be in [0, 1]")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.deterministic = split != "train" if deterministic is None else bool(deterministic)
        self._fg_cache: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        if self.deterministic:
            self._grid = self._build_grid()
            self._length = len(self._grid)
            return
        if not self.case_ids:
            raise ConfigError(
                problem(
                    self.shard_dir / MANIFEST_NAME,
                    f"split {split!r} has no cases",
                    "at least one",
                    "prepare with more cases or a smaller data.val_fraction",
                )
            )
        if samples_per_epoch is None:
            total_voxels = sum(int(np.prod(self.reader.shape(c)[1:])) for c in self.case_ids)
            samples_per_epoch = max(1, total_voxels // int(np.prod(self.patch_size)))
        if samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch={samples_per_epoch} must be >= 1")
        self._length = int(samples_per_epoch)

    def _build_grid(self) -> np.ndarray:
        rows = []
        for case_idx, case_id in enumerate(self.case_ids):
            extent = self.reader.shape(case_id)[1:]
            ranges = [np.arange(0, n, p) for n, p in zip(extent, self.patch_size, strict=True)]
            starts = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
            rows.append(np.concatenate([np.full((len(starts), 1), case_idx), starts], axis=1))
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 4), dtype=np.int64)

    def __len__(self) -> int:
        return self._length

    def _sample(self, index: int) -> dict[str, Any]:
        rng = self.sample_rng(index)
        if self.deterministic:
            case_idx, *starts = (int(v) for v in self._grid[index])
            case_id = self.case_ids[case_idx]
        else:
            case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
            starts = self._random_starts(case_id, rng)
        image, label = self._read_window(case_id, starts, self.patch_size)
        return self._finish(image, label, rng, case_id, index)

    def _random_starts(self, case_id: str, rng: np.random.Generator) -> list[int]:
        extent = self.reader.shape(case_id)[1:]
        voxel = self._foreground_voxel(case_id, rng) if rng.random() < self.foreground_fraction else None
        if voxel is None:
            return [_window_start(n, p, rng) for n, p in zip(extent, self.patch_size, strict=True)]
        starts = []
        for v, n, p in zip(voxel, extent, self.patch_size, strict=True):
            # Jitter of at most a quarter patch keeps the voxel inside; clamping to the volume keeps it inside
            # too while avoiding padding that the volume could fill.
            start = int(v) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
            starts.append(int(np.clip(start, min(0, n - p), max(0, n - p))))
        return starts

    def _foreground_voxel(self, case_id: str, rng: np.random.Generator) -> np.ndarray | None:
        by_class = self._fg_cache.get(case_id)
        if by_class is None:
            locations = np.asarray(self.reader.read_fg_locations(case_id))
            locations = locations[locations[:, 0] > 0] if len(locations) else locations.reshape(0, 4)
            order = np.argsort(locations[:, 0], kind="stable")
            locations = locations[order]
            classes, firsts = np.unique(locations[:, 0], return_index=True)
            by_class = np.split(locations[:, 1:], firsts[1:]) if len(classes) else []
            self._fg_cache[case_id] = by_class
            while len(self._fg_cache) > _FG_CACHE_CASES:
                self._fg_cache.popitem(last=False)
        else:
            self._fg_cache.move_to_end(case_id)
        if not by_class:
            return None
        rows = by_class[int(rng.integers(len(by_class)))]
        return rows[int(rng.integers(len(rows)))]


def _window_start(extent: int, size: int, rng: np.random.Generator | None) -> int:
    """Start of a window of ``size`` over an axis of ``extent``: random (uniform) or centred when rng is None.

    A window larger than the axis gets a negative start, i.e. the data lands inside it with padding around.
    """
    low, high = min(0, extent - size), max(0, extent - size)
    if rng is None:
        return (extent - size) // 2
    return int(rng.integers(low, high + 1))
