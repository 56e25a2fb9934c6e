"""Samplers that split a dataset over ranks: a resumable one for training, an unpadded one for evaluation.

Training: ``ResumableDistributedSampler`` gives exactly the index lists of ``torch.utils.data.DistributedSampler``
(same padding, same permutation for the same seed and epoch) and can start an epoch part-way through, so a job
resumed from a checkpoint sees the same data order as one that was never stopped. ``steps_per_epoch`` and
``position`` turn a global optimizer step into that (epoch, offset) pair.

Evaluation: ``ShardedEvalSampler`` never pads, so every validation sample is counted exactly once over all
ranks; ranks may get different numbers of samples, which is why the evaluation loop must not run a collective
per batch (only one all-reduce of the counts at the end).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from r2d2_hpc.errors import ConfigError


def _check_ranks(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(
            f"rank {rank} of {num_replicas} ranks; expected num_replicas >= 1 and "
            f"0 <= rank < num_replicas. Fix: check the distributed environment (WORLD_SIZE, RANK)"
        )


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler`` with a mid-epoch start (``set_start``) and a ``state_dict``.

    Args:
        dataset_len: samples in the dataset.
        num_replicas: ranks that share it.
        rank: this rank.
        seed: base seed; the permutation of epoch ``e`` comes from a generator seeded with ``seed + e``.
        shuffle: permute the indices each epoch (else 0, 1, 2, ...).
        drop_last: drop the tail so every rank gets the same count, instead of padding with repeated indices.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        _check_ranks(num_replicas, rank)
        if dataset_len < 1 or (drop_last and dataset_len < num_replicas):
            raise ConfigError(
                f"a training set of {dataset_len} samples cannot be split over {num_replicas} ranks; "
                "expected at least one sample per rank. Fix: use fewer ranks or more training data"
            )
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.offset = 0
        # The same arithmetic as torch's DistributedSampler.
        if drop_last and dataset_len % num_replicas:
            self.num_samples = math.ceil((dataset_len - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of ``epoch`` and starts it from its first sample (offset 0)."""
        if epoch < 0:
            raise ConfigError(f"epoch {epoch} must be >= 0")
        self.epoch = epoch
        self.offset = 0

    def set_start(self, offset: int) -> None:
        """Skips the first ``offset`` samples of this rank's list in the current epoch (call after ``set_epoch``)."""
        if not 0 <= offset <= self.num_samples:
            raise ConfigError(
                f"start offset {offset} is outside this rank's epoch of {self.num_samples} samples; "
                "expected 0..num_samples. Fix: resume with the same dataset, ranks and batch size"
            )
        self.offset = offset

    def rank_indices(self) -> list[int]:
        """This rank's full index list for the current epoch, ignoring the start offset."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.offset :])

    def __len__(self) -> int:
        return self.num_samples - self.offset

    def state_dict(self) -> dict[str, Any]:
        """Where this sampler stands, plus the settings that must match on resume (the same on every rank)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "num_replicas": self.num_replicas,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores epoch and offset; refuses a state saved with another dataset size, seed or rank count."""
        for key in ("seed", "dataset_len", "num_replicas", "shuffle", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"the checkpoint's sampler has {key}={state.get(key)!r} but this run has "
                    f"{key}={getattr(self, key)!r}; expected the same, or the data order would change. Fix: "
                    "resume with the same dataset, seed and number of ranks, or start a new run directory"
                )
        self.set_epoch(int(state["epoch"]))
        self.set_start(int(state["offset"]))


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + R, rank + 2R, ...``: each sample on exactly one rank, no padding."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int) -> None:
        _check_ranks(num_replicas, rank)
        if dataset_len < 0:
            raise ConfigError(f"dataset length {dataset_len} must be >= 0")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


def steps_per_epoch(
    dataset_len: int, num_replicas: int, samples_per_rank_per_step: int, drop_last: bool = False
) -> int:
    """Optimizer steps in one epoch of ``ResumableDistributedSampler``; the incomplete last step is dropped.

    Args:
        dataset_len: training samples.
        num_replicas: ranks.
        samples_per_rank_per_step: micro-batch times gradient-accumulation steps.
        drop_last: the sampler's ``drop_last``.
    """
    if samples_per_rank_per_step < 1:
        raise ConfigError(f"{samples_per_rank_per_step} samples per rank per step; expected at least 1")
    sampler = ResumableDistributedSampler(dataset_len, num_replicas, 0, shuffle=False, drop_last=drop_last)
    num_steps = sampler.num_samples // samples_per_rank_per_step
    if num_steps < 1:
        raise ConfigError(
            f"a training set of {dataset_len} samples gives {sampler.num_samples} samples per rank over "
            f"{num_replicas} ranks, fewer than one step of {samples_per_rank_per_step} samples per rank; expected "
            f"at least {samples_per_rank_per_step * num_replicas} samples. Fix: lower train.global_batch "
            "(strong scaling) or train.batch_per_rank (weak scaling), use fewer ranks, or use more training data"
        )
    return num_steps


def position(step: int, steps_per_epoch: int, samples_per_rank_per_step: int) -> tuple[int, int]:
    """``(epoch, offset)`` at which global optimizer step ``step`` (from 0) starts reading this rank's samples."""
    if step < 0 or steps_per_epoch < 1 or samples_per_rank_per_step < 1:
        raise ConfigError(
            f"step={step}, steps_per_epoch={steps_per_epoch}, samples_per_rank_per_step="
            f"{samples_per_rank_per_step}: expected step >= 0 and the other two >= 1"
        )
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    return epoch, step_in_epoch * samples_per_rank_per_step
