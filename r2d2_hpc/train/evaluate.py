"""Validation Dice that does not depend on the number of ranks.

Each rank evaluates a disjoint share of the validation samples (no padded duplicates), counts true/false positives
and false negatives per class, and the counts — never per-rank Dice — are summed over ranks before dividing. The
forward runs on the unwrapped model, so no collective happens per batch and ranks with fewer samples never wait.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from r2d2_hpc.errors import ShardError
from r2d2_hpc.train.data import shard_error_from_worker
from r2d2_hpc.train.dist import DistEnv
from r2d2_hpc.train.metrics import all_reduce_counts, confusion_counts, dice_from_counts
from r2d2_hpc.train.sampler import ShardedEvalSampler


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    env: DistEnv,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    num_workers: int = 0,
) -> list[float]:
    """Per-class Dice of ``model`` over the whole ``dataset``, identical on every rank."""
    sampler = ShardedEvalSampler(len(dataset), env.world_size, env.rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )  # leaves the global RNG alone (exact resume)
    num_classes = dataset.num_classes
    counts = torch.zeros(num_classes, 3, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for batch in loader:
                logits = model(batch["image"].to(device, non_blocking=True))
                pred = logits.argmax(dim=1).cpu()
                counts += confusion_counts(pred, batch["label"], num_classes)
    except ShardError as exc:  # a corrupt validation shard: its message, not a worker's traceback
        raise shard_error_from_worker(exc) from None
    finally:
        model.train(was_training)
    if env.world_size > 1:
        counts = all_reduce_counts(counts, device=device)
    return dice_from_counts(counts)
