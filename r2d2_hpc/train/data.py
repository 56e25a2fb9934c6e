"""The training and validation datasets of a run, from the data config and the model's stride."""

from __future__ import annotations

from torch.utils.data import Dataset

from r2d2_hpc.config import RunConfig
from r2d2_hpc.data.augment import AugmentConfig
from r2d2_hpc.data.dataset import PatchDataset, SliceDataset
from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.dist import DistEnv


def build_datasets(cfg: RunConfig, env: DistEnv, required_multiple: int) -> tuple[Dataset, Dataset]:
    """2D slices padded to the model's multiple, or 3D patches whose size the model's stride divides."""
    shard_dir = cfg.data.shard_dir()
    augment = AugmentConfig() if cfg.train.augment else None
    seed = cfg.train.seed
    if int(cfg.model.get("spatial_dims", 2)) == 2:
        train = SliceDataset(shard_dir, "train", augment, seed, env.rank, pad_multiple=required_multiple)
        val = SliceDataset(shard_dir, "val", None, seed, 0, pad_multiple=required_multiple)
        return train, val
    patch = [int(p) for p in cfg.data.patch_size]
    if any(p % required_multiple for p in patch):
        raise ConfigError(
            f"data.patch_size={patch} is not divisible by the model's stride {required_multiple}; "
            f"set every edge to a multiple of {required_multiple}"
        )
    train = PatchDataset(
        shard_dir,
        "train",
        patch,
        foreground_fraction=cfg.data.foreground_fraction,
        augment=augment,
        seed=seed,
        rank=env.rank,
    )
    val = PatchDataset(shard_dir, "val", patch, augment=None, seed=seed, rank=0, deterministic=True)
    return train, val
