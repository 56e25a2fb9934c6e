"""Tests of the training and evaluation samplers and of the step <-> (epoch, offset) arithmetic."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.sampler import (
    ResumableDistributedSampler,
    ShardedEvalSampler,
    position,
    steps_per_epoch,
)


class _Sized:
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


@pytest.mark.parametrize("dataset_len", [1, 5, 10, 13])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 7])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_equals_torch_distributed_sampler(
    dataset_len: int, num_replicas: int, shuffle: bool, drop_last: bool
) -> None:
    if drop_last and dataset_len < num_replicas:
        with pytest.raises(ConfigError, match="fewer ranks"):
            ResumableDistributedSampler(dataset_len, num_replicas, 0, drop_last=True)
        return
    for rank in range(num_replicas):
        ours = ResumableDistributedSampler(
            dataset_len, num_replicas, rank, seed=42, shuffle=shuffle, drop_last=drop_last
        )
        theirs = DistributedSampler(
            _Sized(dataset_len),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=42,
            drop_last=drop_last,
        )
        for epoch in (0, 1, 5):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_epochs_differ_and_pad_with_repeats() -> None:
    sampler = ResumableDistributedSampler(5, 3, 2, seed=0)
    assert len(sampler) == 2
    lists = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        lists.append(list(sampler))
    assert len({tuple(x) for x in lists}) > 1
    union = []
    for rank in range(3):
        union += list(ResumableDistributedSampler(5, 3, rank, seed=0))
    assert sorted(set(union)) == [0, 1, 2, 3, 4] and len(union) == 6  # one index repeated as padding


def test_set_start_skips_exactly_and_set_epoch_resets() -> None:
    sampler = ResumableDistributedSampler(23, 2, 1, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == 12
    sampler.set_start(5)
    assert list(sampler) == full[5:]
    assert len(sampler) == 7
    assert list(sampler) == full[5:]  # the skip lasts for the whole epoch, not one iteration
    sampler.set_start(12)
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_epoch(4)
    assert len(sampler) == 12 and sampler.offset == 0
    with pytest.raises(ConfigError, match="outside this rank's epoch"):
        sampler.set_start(13)


def test_state_dict_round_trip_and_mismatch() -> None:
    sampler = ResumableDistributedSampler(30, 3, 0, seed=1)
    sampler.set_epoch(2)
    sampler.set_start(4)
    state = sampler.state_dict()
    fresh = ResumableDistributedSampler(30, 3, 0, seed=1)
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.offset) == (2, 4)
    assert list(fresh) == list(sampler)
    other_rank = ResumableDistributedSampler(30, 3, 2, seed=1)
    other_rank.load_state_dict(state)  # rank 0 saves it, every rank loads it
    assert (other_rank.epoch, other_rank.offset) == (2, 4)
    with pytest.raises(ConfigError, match="dataset_len=30"):
        ResumableDistributedSampler(31, 3, 0, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="num_replicas=3"):
        ResumableDistributedSampler(30, 2, 0, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("dataset_len", [0, 1, 7, 11])
def test_eval_shards_cover_every_index_exactly_once(world_size: int, dataset_len: int) -> None:
    shards = [list(ShardedEvalSampler(dataset_len, world_size, rank)) for rank in range(world_size)]
    union = [index for shard in shards for index in shard]
    assert sorted(union) == list(range(dataset_len))
    for rank, shard in enumerate(shards):
        assert len(ShardedEvalSampler(dataset_len, world_size, rank)) == len(shard)
        assert shard == list(range(rank, dataset_len, world_size))
    if dataset_len == 7 and world_size == 3:
        assert [len(s) for s in shards] == [3, 2, 2]  # unequal counts, no padding


def test_bad_ranks_raise() -> None:
    with pytest.raises(ConfigError, match="0 <= rank < num_replicas"):
        ShardedEvalSampler(5, 2, 2)
    with pytest.raises(ConfigError, match="0 <= rank < num_replicas"):
        ResumableDistributedSampler(5, 0, 0)


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(100, 4, 8) == 3  # 25 samples per rank -> 3 full steps of 8
    assert steps_per_epoch(101, 4, 8) == 3  # 26 (padded) per rank
    assert steps_per_epoch(96, 4, 8) == 3
    assert steps_per_epoch(97, 4, 8, drop_last=True) == 3
    assert steps_per_epoch(15, 2, 8) == 1  # 8 per rank once padded
    with pytest.raises(ConfigError, match=r"lower train\.global_batch"):
        steps_per_epoch(13, 2, 8)  # 7 per rank


def test_position_inverts_a_straight_count() -> None:
    num_steps, samples_per_step = steps_per_epoch(50, 3, 4), 4  # 17 per rank -> 4 steps per epoch
    assert num_steps == 4
    step = 0
    for epoch in range(3):
        for step_in_epoch in range(num_steps):
            assert position(step, num_steps, samples_per_step) == (epoch, step_in_epoch * samples_per_step)
            step += 1
    with pytest.raises(ConfigError):
        position(-1, 4, 4)


def test_resumed_sampler_sees_the_same_batches_as_an_uninterrupted_one() -> None:
    dataset_len, world, rank, micro = 29, 2, 1, 3
    num_steps = steps_per_epoch(dataset_len, world, micro)
    sampler = ResumableDistributedSampler(dataset_len, world, rank, seed=3)
    straight = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        straight += [indices[s * micro : (s + 1) * micro] for s in range(num_steps)]
    for resume_step in (0, 2, num_steps, 2 * num_steps + 1):
        resumed = ResumableDistributedSampler(dataset_len, world, rank, seed=3)
        epoch, offset = position(resume_step, num_steps, micro)
        resumed.set_epoch(epoch)
        resumed.set_start(offset)
        indices = list(resumed)
        first_batch = indices[:micro]
        assert first_batch == straight[resume_step]
