"""The training DataLoader: persistent workers across epochs, and random-patch epochs under weak scaling."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from r2d2_hpc.config import DataConfig, RunConfig, TrainConfig
from r2d2_hpc.data.augment import AugmentConfig
from r2d2_hpc.data.dataset import SliceDataset
from r2d2_hpc.data.manifest import open_shard, read_manifest
from r2d2_hpc.errors import ShardError
from r2d2_hpc.train.data import build_datasets, build_train_loader
from r2d2_hpc.train.dist import DistEnv
from r2d2_hpc.train.evaluate import evaluate
from r2d2_hpc.train.sampler import ResumableDistributedSampler, steps_per_epoch


def _env(world_size: int, rank: int = 0) -> DistEnv:
    return DistEnv(rank, world_size, rank, world_size, "127.0.0.1", 0, 1, "gloo", "cpu", "single", None)


def _cfg(shards: Path, spatial_dims: int, **train: Any) -> RunConfig:
    data = DataConfig(shards=str(shards), patch_size=[16, 16, 16], layout="3d" if spatial_dims == 3 else "2d")
    return RunConfig(
        data=data, model={"name": "unet", "spatial_dims": spatial_dims}, train=TrainConfig(**train)
    )


class _PidSlices(SliceDataset):
    """Slices that also say which process loaded them."""

    def _sample(self, index: int) -> dict[str, Any]:
        sample = super()._sample(index)
        sample["pid"] = os.getpid()
        return sample


@pytest.fixture(scope="module")
def shards_2d(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )


@pytest.fixture(scope="module")
def shards_3d(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4,
        num_channels=1,
        num_classes=3,
        shape=(24, 20, 16),
        seed=2,
        val_case="phantom_003",
        layout="3d",
    )


def test_workers_persist_across_epochs_and_see_each_epoch(shards_2d: Path) -> None:
    cfg = _cfg(shards_2d, 2, num_workers=2, prefetch_factor=3)
    dataset = _PidSlices(shards_2d, "train", AugmentConfig(), seed=0)
    sampler = ResumableDistributedSampler(len(dataset), 1, 0, seed=0)
    loader = build_train_loader(cfg, dataset, sampler, 4, torch.device("cpu"))
    assert loader.persistent_workers and loader.prefetch_factor == 3 and not loader.pin_memory
    pids, first_batches = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = list(loader)
        pids.append({int(p) for b in batches for p in b["pid"]})
        first_batches.append(batches[0])
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]  # the same two workers every epoch
    assert os.getpid() not in pids[0]
    # the workers saw the epoch set in this process: batch 0 of epoch 2 is what this process draws for it
    indices = [int(i) for i in first_batches[2]["index"]]
    expected = np.stack([dataset[i]["image"].numpy() for i in indices])
    assert np.array_equal(first_batches[2]["image"].numpy(), expected)
    assert not torch.equal(first_batches[1]["image"], first_batches[2]["image"])
    assert first_batches[2]["corrupt_skipped"].tolist() == [0, 0, 0, 0]


def test_persistent_workers_can_be_turned_off(shards_2d: Path) -> None:
    cfg = _cfg(shards_2d, 2, num_workers=0, persistent_workers=True, pin_memory=True)
    dataset = SliceDataset(shards_2d, "train")
    loader = build_train_loader(cfg, dataset, None, 2, torch.device("cpu"))
    assert not loader.persistent_workers and not loader.pin_memory  # no workers; pinning is for CUDA
    assert not build_train_loader(
        _cfg(shards_2d, 2, num_workers=1, persistent_workers=False), dataset, None, 2, torch.device("cpu")
    ).persistent_workers


def _samples_per_epoch(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(samples over all ranks in one epoch, steps per epoch) as the training loop computes them."""
    train, _ = build_datasets(cfg, _env(world_size), required_multiple=4)
    per_rank_step = cfg.train.micro_batch(world_size) * cfg.train.grad_accum
    steps = steps_per_epoch(len(train), world_size, per_rank_step)
    return steps * per_rank_step * world_size, steps


def test_random_patch_epochs_do_not_shrink_with_the_world_size(shards_3d: Path) -> None:
    weak = {"scaling": "weak", "batch_per_rank": 2}
    default = [_samples_per_epoch(_cfg(shards_3d, 3, **weak), n)[0] for n in (1, 2, 4, 8)]
    assert default == [3 * 16] * 4  # 3 training cases x data.patches_per_case
    cfg = _cfg(shards_3d, 3, **weak)
    cfg.data.samples_per_epoch = 40
    assert [_samples_per_epoch(cfg, n)[0] for n in (1, 2, 4)] == [40, 40, 40]
    # 80 ranks x 2 patches outnumber the 48 patches: one whole step, not "fewer than one step"
    assert _samples_per_epoch(_cfg(shards_3d, 3, **weak), 80) == (160, 1)
    # strong scaling: the global batch is fixed, and so are the steps per epoch
    strong = {"scaling": "strong", "global_batch": 8}
    assert {_samples_per_epoch(_cfg(shards_3d, 3, **strong), n)[1] for n in (1, 2, 4, 8)} == {6}


def test_a_corrupt_validation_shard_read_by_a_worker_names_shard_and_case(
    shards_2d: Path, tmp_path: Path
) -> None:
    shards = Path(shutil.copytree(shards_2d, tmp_path / "shards"))
    manifest = read_manifest(shards)
    case_id = manifest["split"]["val"][0]
    shard = shards / manifest["cases"][case_id]["shard"]
    with open_shard(shard) as f:
        info = f[f"cases/{case_id}/label"].id.get_chunk_info(2)
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    val = SliceDataset(shards, "val", pad_multiple=4)
    model = torch.nn.Conv2d(val.num_channels, val.num_classes, 1)  # any model: the read fails first
    with pytest.raises(ShardError) as raised:
        evaluate(model, val, _env(1), torch.device("cpu"), 4, None, num_workers=1)
    message = str(raised.value)
    assert (
        message.startswith(f"{shard}: reading label of case '{case_id}' failed") and "fletcher32" in message
    )
    assert "Traceback" not in message and "DataLoader worker" not in message
