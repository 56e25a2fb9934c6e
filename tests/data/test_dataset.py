"""SliceDataset / PatchDataset over real HDF5 shard sets, and the augmentation they apply."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from r2d2_hpc.config import ShardConfig
from r2d2_hpc.data.augment import IGNORE_INDEX, AugmentConfig, augment
from r2d2_hpc.data.dataset import PatchDataset, SliceDataset
from r2d2_hpc.data.manifest import write_manifest
from r2d2_hpc.data.shards import ShardWriter
from r2d2_hpc.data.types import MANIFEST_FORMAT, MANIFEST_VERSION, PreparedCase
from r2d2_hpc.errors import ConfigError, ShardError

CLASSES = ["background", "a", "b"]


def _case(case_id: str, image: np.ndarray, label: np.ndarray) -> PreparedCase:
    shape = label.shape
    geometry = {
        "source_shape": list(shape),
        "source_affine": np.eye(4).tolist(),
        "ornt": [[0, 1], [1, 1], [2, 1]],
        "resampled_shape": list(shape),
        "crop_bbox": [[0, n] for n in shape],
    }
    norm = [{"kind": "none"} for _ in range(image.shape[0])]
    return PreparedCase(
        case_id, image.astype(np.float32), label.astype(np.uint8), np.eye(4), (1.0, 1.0, 1.0), geometry, norm
    )


def write_shards(out: Path, cases: dict[str, tuple[np.ndarray, np.ndarray, str]], layout: dict) -> Path:
    """Writes a real shard set (ShardWriter + manifest) from ``{id: (image, label, split)}``."""
    num_channels = next(iter(cases.values()))[0].shape[0]
    entries = {}
    with ShardWriter(out, "shard-0", ShardConfig(compression="none"), layout, len(CLASSES)) as writer:
        for case_id, (image, label, split) in cases.items():
            entry = writer.add(_case(case_id, image, label))
            entries[case_id] = {**entry, "split": split, "source_files": {}, "source_sha256": "x"}
        shards = writer.close()
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "dataset": "test",
        "created": "2024-01-01T00:00:00+00:00",
        "r2d2_version": "0.1.0",
        "classes": CLASSES,
        "channels": [f"ch{i}" for i in range(num_channels)],
        "modality": "MRI",
        "layout": layout,
        "preprocessing": {"settings_hash": "x"},
        "storage": {"compression": "none", "image_dtype": "float32"},
        "split": {s: [c for c, v in cases.items() if v[2] == s] for s in ("train", "val")},
        "shards": shards,
        "cases": entries,
    }
    write_manifest(out, manifest)
    return out


def _random_case(rng: np.random.Generator, shape: tuple[int, ...], split: str, channels: int = 1):
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    label = rng.integers(0, len(CLASSES), size=shape).astype(np.uint8)
    return image, label, split


@pytest.fixture
def slices(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    cases = {
        "c0": _random_case(rng, (5, 7, 3), "train", 2),
        "c1": _random_case(rng, (6, 4, 2), "train", 2),
        "v0": _random_case(rng, (9, 3, 2), "val", 2),
    }
    return write_shards(tmp_path / "s2d", cases, {"kind": "2d", "slice_axis": 2}), cases


def test_slice_is_the_stored_slice_padded_with_ignore(slices):
    shard_dir, cases = slices
    train = SliceDataset(shard_dir, "train", pad_multiple=4)
    val = SliceDataset(shard_dir, "val", pad_multiple=4)
    # Largest plane over train AND val is 9 x 7 -> rounded up to multiples of 4.
    assert train.sample_size == val.sample_size == (12, 8)
    assert len(train) == 3 + 2 and len(val) == 2
    assert (train.num_channels, train.num_classes, train.spatial_dims) == (2, 3, 2)
    assert train.class_names == CLASSES and train.channel_names == ["ch0", "ch1"]
    sample = train[4]  # second slice of c1
    image, label, _ = cases["c1"]
    assert sample["case_id"] == "c1" and sample["index"] == 4
    assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.int64
    assert sample["image"].shape == (2, 12, 8) and sample["label"].shape == (12, 8)
    np.testing.assert_array_equal(sample["image"][:, :6, :4].numpy(), image[:, :, :, 1])
    np.testing.assert_array_equal(sample["label"][:6, :4].numpy(), label[:, :, 1])
    pad = np.ones((12, 8), bool)
    pad[:6, :4] = False
    assert (sample["label"].numpy()[pad] == IGNORE_INDEX).all()
    assert (sample["image"].numpy()[:, pad] == 0).all()
    with pytest.raises(IndexError):
        train[5]


def test_slice_axis_and_centre_crop(tmp_path: Path):
    rng = np.random.default_rng(2)
    cases = {"c0": _random_case(rng, (4, 6, 5), "train")}
    shard_dir = write_shards(tmp_path / "ax0", cases, {"kind": "2d", "slice_axis": 0})
    ds = SliceDataset(shard_dir, "train", sample_size=(4, 7))
    assert len(ds) == 4
    sample = ds[2]
    image, label, _ = cases["c0"]
    # Y is cropped to its centre 4 of 6 (start 1), Z is padded from 5 to 7 (one voxel before, one after).
    np.testing.assert_array_equal(sample["label"][:, 1:6].numpy(), label[2, 1:5, :])
    np.testing.assert_array_equal(sample["image"][0, :, 1:6].numpy(), image[0, 2, 1:5, :])
    assert (sample["label"][:, [0, 6]] == IGNORE_INDEX).all()


def test_workers_do_not_change_samples(slices):
    ds = SliceDataset(slices[0], "train", augment=AugmentConfig(), seed=7, pad_multiple=4)
    ds.set_epoch(3)

    def collect(num_workers: int) -> dict[int, torch.Tensor]:
        loader = DataLoader(ds, batch_size=2, num_workers=num_workers, shuffle=False)
        out = {}
        for batch in loader:
            for i, image in zip(batch["index"].tolist(), batch["image"], strict=True):
                out[i] = image
        return out

    inline, workers = collect(0), collect(2)
    assert sorted(inline) == sorted(workers) == list(range(len(ds)))
    for i in inline:
        torch.testing.assert_close(inline[i], workers[i], rtol=0, atol=0)
    # The augmentation is really on: the unaugmented slice differs.
    plain = SliceDataset(slices[0], "train", pad_multiple=4)[0]["image"]
    assert not torch.equal(plain, inline[0])


def test_epoch_and_seed_change_draws_and_seed_reproduces(slices):
    def sample(epoch: int, seed: int = 0, index: int = 1) -> torch.Tensor:
        ds = SliceDataset(slices[0], "train", augment=AugmentConfig(), seed=seed, pad_multiple=4)
        ds.set_epoch(epoch)
        return ds[index]["image"]

    base = sample(0)
    assert torch.equal(base, sample(0))
    for other in (sample(1), sample(0, seed=1)):
        assert not torch.equal(base, other)


def test_set_epoch_reaches_persistent_workers_and_pickling_keeps_samples(slices):
    ds = SliceDataset(slices[0], "train", augment=AugmentConfig(), pad_multiple=4)
    loader = DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = [s["image"] for s in loader]
        assert all(torch.equal(g, ds[i]["image"]) for i, g in enumerate(got))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["image"], ds[2]["image"]) and clone.epoch == 1


@pytest.mark.parametrize("shape", [(6, 6, 6), (6, 6, 4), (5, 7)])
def test_geometric_augmentation_keeps_image_and_label_aligned(shape):
    label = np.random.default_rng(3).integers(0, 4, size=shape).astype(np.uint8)
    image = label[None].astype(np.float32)
    cfg = AugmentConfig(intensity_scale=0.0, intensity_shift=0.0)
    outcomes = set()
    for seed in range(40):
        out_image, out_label = augment(image, label, np.random.default_rng(seed), cfg, range(len(shape)))
        assert out_label.shape == shape and out_image.shape == (1, *shape)
        assert out_image.flags.c_contiguous and out_label.flags.c_contiguous
        np.testing.assert_array_equal(out_image[0], out_label.astype(np.float32))
        outcomes.add(out_label.tobytes())
    # Flips alone give 2^d variants; rotations in a square plane add more.
    assert len(outcomes) > 2 ** len(shape) if shape[0] == shape[1] else len(outcomes) == 2 ** len(shape)


def test_intensity_augmentation_is_per_channel_and_leaves_padding_zero():
    label = np.zeros((4, 4), np.uint8)
    label[:, 3] = IGNORE_INDEX
    image = np.ones((2, 4, 4), np.float32)
    cfg = AugmentConfig(flip=False, rot90=False, intensity_scale=0.5, intensity_shift=0.5)
    out, _ = augment(image, label, np.random.default_rng(0), cfg, (0, 1))
    assert (out[:, :, 3] == 0).all()
    values = out[:, :, :3].reshape(2, -1)
    assert np.ptp(values, axis=1).max() == 0 and values[0, 0] != values[1, 0]
    assert (np.abs(values[:, 0] - 1) <= 1.0).all()
    with pytest.raises(ConfigError):
        AugmentConfig(intensity_scale=1.0)


def test_distributed_sampler_splits_indices_across_ranks(slices):
    ds = SliceDataset(slices[0], "train", augment=AugmentConfig(), pad_multiple=4)  # 5 samples
    parts = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=4)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 3
    assert set(parts[0]) | set(parts[1]) == set(range(5))
    assert len(set(parts[0]) & set(parts[1])) == 1  # the one padded duplicate


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    label = np.zeros((32, 32, 32), np.uint8)
    label[12:20, 12:20, 12:20] = 1
    label[28, 2, 30] = 2  # a single voxel of a rare class
    image = label[None].astype(np.float32)
    val_label = (np.arange(10 * 7 * 5).reshape(10, 7, 5) % 3).astype(np.uint8)
    cases = {"c0": (image, label, "train"), "v0": (val_label[None].astype(np.float32), val_label, "val")}
    return write_shards(tmp_path / "s3d", cases, {"kind": "3d", "patch_size": [8, 8, 8]})


def test_foreground_fraction_one_always_hits_foreground(volume):
    ds = PatchDataset(volume, "train", patch_size=(8, 8, 8), samples_per_epoch=120, foreground_fraction=1.0)
    labels = [ds[i]["label"].numpy() for i in range(len(ds))]
    assert all(lab.shape == (8, 8, 8) and (lab[lab != IGNORE_INDEX] > 0).any() for lab in labels)
    rare = np.mean([(lab == 2).any() for lab in labels])
    assert 0.3 <= rare <= 0.7  # the class is drawn uniformly among the two present, not by voxel count


def test_foreground_fraction_zero_matches_chance(volume):
    ds = PatchDataset(volume, "train", patch_size=(8, 8, 8), samples_per_epoch=400, foreground_fraction=0.0)
    assert len(ds) == 400 and PatchDataset(volume, "train", patch_size=(8, 8, 8)).__len__() == 64
    hits = np.mean([(ds[i]["label"] == 1).any().item() for i in range(len(ds))])
    # Uniform starts 0..24 per axis; a patch meets the cube [12, 20) when its start is in 5..19.
    chance = (15 / 25) ** 3
    assert abs(hits - chance) < 4 * np.sqrt(chance * (1 - chance) / len(ds))


def test_patches_larger_than_the_case_are_padded(slices):
    shard_dir, cases = slices
    ds = PatchDataset(shard_dir, "train", patch_size=(8, 8, 8), samples_per_epoch=12, foreground_fraction=0.5)
    assert not ds.deterministic and ds.spatial_dims == 3
    for i in range(len(ds)):
        sample = ds[i]
        image, label, _ = cases[sample["case_id"]]
        lab, img = sample["label"].numpy(), sample["image"].numpy()
        inside = lab != IGNORE_INDEX
        assert inside.sum() == label.size and (img[:, ~inside] == 0).all()
        box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(inside))
        np.testing.assert_array_equal(lab[box], label)
        np.testing.assert_array_equal(img[(slice(None), *box)], image)


def test_validation_grid_covers_every_voxel_once(volume):
    ds = PatchDataset(volume, "val", patch_size=(4, 4, 4), augment=None)
    assert ds.deterministic and len(ds) == 3 * 2 * 2
    rebuilt = np.full((12, 8, 8), 99, np.int64)
    counted = 0
    for i, start in zip(
        range(len(ds)), itertools.product(range(0, 12, 4), range(0, 8, 4), range(0, 8, 4)), strict=True
    ):
        sample = ds[i]
        assert sample["case_id"] == "v0" and sample["image"].shape == (1, 4, 4, 4)
        lab = sample["label"].numpy()
        counted += int((lab != IGNORE_INDEX).sum())
        rebuilt[tuple(slice(s, s + 4) for s in start)] = lab
    assert counted == 10 * 7 * 5
    assert (rebuilt[10:] == IGNORE_INDEX).all() and (rebuilt[:, 7:] == IGNORE_INDEX).all()
    assert (rebuilt[:, :, 5:] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(rebuilt[:10, :7, :5], np.arange(10 * 7 * 5).reshape(10, 7, 5) % 3)


def test_bad_requests_raise_project_errors(volume):
    with pytest.raises(ShardError, match="layout=2d"):
        SliceDataset(volume, "train")
    with pytest.raises(ConfigError, match="no split named 'test'"):
        PatchDataset(volume, "test")
    with pytest.raises(ConfigError, match="patch_size"):
        PatchDataset(volume, "train", patch_size=(8, 8))
