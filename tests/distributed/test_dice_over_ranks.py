"""The batch-Dice loss summed over ranks: a global batch split over 2 gloo ranks gives the loss and the
gradients of the whole batch on 1 rank; summed per rank (the old behaviour) it does not."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from r2d2_hpc.train.losses import DiceCELoss, deep_supervision_loss

pytestmark = pytest.mark.distributed
NUM_CLASSES = 3


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    image = torch.randn(4, 2, 8, 8, generator=g)
    target = torch.randint(0, NUM_CLASSES, (4, 8, 8), generator=g)
    target[3, :, :5] = 0  # an uneven class mix between the two halves of the batch
    target[0, 0, :3] = 255  # some ignored voxels (padding)
    return image, target


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, NUM_CLASSES, 1))


def _loss_and_grads(model: nn.Module, image: torch.Tensor, target: torch.Tensor, over_ranks: bool):
    loss_fn = DiceCELoss(NUM_CLASSES, over_ranks=over_ranks)
    logits = model(image)
    # Two outputs (deep supervision): two all-reduces per step, both with exact gradients.
    loss = deep_supervision_loss(loss_fn, [logits, nn.functional.avg_pool2d(logits, 2)], target)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, over_ranks: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    image, target = _batch()
    half = slice(2 * rank, 2 * rank + 2)
    ddp = DDP(_model())
    loss, grads = _loss_and_grads(ddp, image[half], target[half], over_ranks)
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)  # what the training logs: the loss averaged over ranks
    if rank == 0:
        torch.save({"loss": mean_loss / 2, "grads": grads}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path: Path, over_ranks: bool) -> dict:
    out = tmp_path / f"two-{over_ranks}.pt"
    mp.spawn(_worker, args=(_free_port(), over_ranks, str(out)), nprocs=2, join=True)
    return torch.load(out)


def test_loss_and_gradients_do_not_depend_on_the_batch_split(tmp_path: Path) -> None:
    image, target = _batch()
    one_loss, one_grads = _loss_and_grads(_model(), image, target, over_ranks=True)  # no group: plain
    two = _two_ranks(tmp_path, over_ranks=True)
    torch.testing.assert_close(two["loss"], one_loss, rtol=1e-5, atol=1e-6)
    for g2, g1 in zip(two["grads"], one_grads, strict=True):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    # Per-rank statistics (the old default) give another loss and other gradients: the test can fail.
    per_rank = _two_ranks(tmp_path, over_ranks=False)
    assert abs(float(per_rank["loss"]) - float(one_loss)) > 1e-4
    assert any(
        not torch.allclose(g2, g1, rtol=1e-4, atol=1e-6)
        for g2, g1 in zip(per_rank["grads"], one_grads, strict=True)
    )
