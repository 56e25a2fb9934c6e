"""Which of the visible GPUs a rank uses, in every way Slurm (or torchrun) can bind GPUs to tasks.

A rank uses one GPU, index ``i`` of the ones CUDA shows it (``CUDA_VISIBLE_DEVICES``). What the rank sees
depends on the binding mode, so the index is not always the local rank:

- one visible GPU (``--gpus-per-task=1``, ``--gpu-bind=single:1``, ``--gpu-bind=map_gpu:...``, submitit): 0;
- the task owns its GPUs (``--gpus-per-task=N``, so ``SLURM_GPUS_PER_TASK=N`` GPUs visible): 0, the rest idle;
- every rank sees every GPU of the node (torchrun, ``--gpus-per-node`` without binding): the local rank;
- each rank sees a subset shared with some other local ranks (``--gpu-bind=closest``: the GPUs of its socket):
  the subset's place among the node's GPUs (``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS``) says which ranks share it,
  with tasks laid out over the sockets in blocks or cyclically (``SLURM_DISTRIBUTION``'s second part, when
  set); the rank takes its turn among them. When the layout is not given and the two would differ, it fails.

Anything else (more local ranks than GPUs) is a :class:`~r2d2_hpc.errors.ConfigError` that says which binding
to ask for.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as tdist

from r2d2_hpc.errors import ConfigError

_FIX = (
    "request one GPU per rank: `srun --ntasks-per-node=G --gpus-per-task=1` (or --gpus-per-node=G with "
    "--gpu-bind=none, or --gpu-bind=closest with G tasks per node)"
)


def choose_cuda_index(
    local_rank: int, local_world_size: int, visible_count: int, environ: Mapping[str, str]
) -> tuple[int, str]:
    """The index of this rank's GPU among the visible ones, and the binding mode that decided it.

    Args:
        local_rank: this rank on its node.
        local_world_size: ranks on the node.
        visible_count: ``torch.cuda.device_count()`` in this process.
        environ: the process environment (``CUDA_VISIBLE_DEVICES`` and Slurm's GPU variables).

    Raises:
        ConfigError: no GPU is visible, or the node's ranks cannot each get a GPU of their own.
    """
    if visible_count < 1:
        raise ConfigError(
            f"local rank {local_rank} sees no GPU (CUDA_VISIBLE_DEVICES="
            f"{environ.get('CUDA_VISIBLE_DEVICES')!r}); {_FIX}, or set train.backend=gloo for CPU ranks"
        )
    if visible_count == 1:
        return 0, "one GPU visible to this task"
    per_task = _count(environ.get("SLURM_GPUS_PER_TASK"))
    if per_task is not None and visible_count == per_task:
        return 0, f"--gpus-per-task={per_task}: the task's own GPUs, the first one used"
    node_ids = _node_gpus(environ)
    node_count = len(node_ids) if node_ids else _count(environ.get("SLURM_GPUS_ON_NODE"))
    if node_count is None or visible_count >= node_count:
        if local_rank < visible_count and visible_count >= local_world_size:
            return local_rank, "every GPU of the node visible: the local rank"
        raise ConfigError(
            f"local rank {local_rank} of {local_world_size} but only {visible_count} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r}): one GPU per rank is needed; "
            f"{_FIX}"
        )
    return _shared_subset(local_rank, local_world_size, visible_count, node_count, node_ids, environ)


def _shared_subset(
    local_rank: int,
    local_world_size: int,
    visible_count: int,
    node_count: int,
    node_ids: list[str] | None,
    environ: Mapping[str, str],
) -> tuple[int, str]:
    """A rank that sees ``visible_count`` of the node's ``node_count`` GPUs (e.g. ``--gpu-bind=closest``)."""
    visible = _split(environ.get("CUDA_VISIBLE_DEVICES", ""))
    subsets = node_count // visible_count
    sharing = -(-local_world_size // subsets)  # ranks that see the same subset
    described = (
        f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r} of the node's {node_count} GPUs, "
        f"{local_world_size} local ranks"
    )
    if sharing > visible_count:
        raise ConfigError(f"{described}: {sharing} ranks would share {visible_count} GPUs; {_FIX}")
    positions = _positions(visible, node_ids)
    if positions is None or len(positions) != visible_count or node_count % visible_count:
        raise ConfigError(f"{described}: cannot tell which local ranks share these GPUs; {_FIX}")
    subset = min(positions) // visible_count
    turns = {}  # this rank's turn among the ranks of its subset, for each layout of tasks over the sockets
    if local_rank // sharing == subset:
        turns["block"] = local_rank % sharing
    if local_rank % subsets == subset:
        turns["cyclic"] = local_rank // subsets
    layout = _socket_layout(environ)
    if layout in turns:
        return turns[layout], f"GPUs bound per socket ({described}), tasks {layout} over the sockets"
    if layout is None and len(set(turns.values())) == 1:
        return next(iter(turns.values())), f"GPUs bound per socket ({described})"
    raise ConfigError(
        f"{described}, SLURM_DISTRIBUTION={environ.get('SLURM_DISTRIBUTION')!r}: cannot tell which local "
        f"ranks share these GPUs (rank {local_rank}); set `srun --distribution=block:block` or {_FIX}"
    )


def _socket_layout(environ: Mapping[str, str]) -> str | None:
    """How srun laid the tasks over the sockets (the second part of ``SLURM_DISTRIBUTION``), if it says."""
    parts = environ.get("SLURM_DISTRIBUTION", "").split(":")
    if len(parts) < 2:
        return None
    return {"block": "block", "cyclic": "cyclic", "fcyclic": "cyclic"}.get(parts[1].split(",")[0])


def _positions(visible: list[str], node_ids: list[str] | None) -> list[int] | None:
    """Where the visible GPUs sit among the node's: by id when the ids match, else the ids are positions."""
    if node_ids and all(v in node_ids for v in visible):
        return [node_ids.index(v) for v in visible]
    if visible and all(v.isdigit() for v in visible):  # renumbered inside the job's device cgroup
        return [int(v) for v in visible]
    return None


def _node_gpus(environ: Mapping[str, str]) -> list[str] | None:
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        ids = _split(environ.get(name, ""))
        if ids:
            return ids
    return None


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _count(text: str | None) -> int | None:
    """``4``, ``a100:4`` or ``4(x2)`` -> 4; None when absent or not a count."""
    match = re.fullmatch(r"(?:[^:,()]+:)?(\d+)(?:\(x\d+\))?", (text or "").strip())
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def gpu_uuid(device: str) -> str:
    """The UUID of a CUDA device (the same string for a GPU whatever index each process gives it)."""
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def check_distinct_gpus(rank: int, gpu_id: str, group: Any, world_size: int) -> None:
    """Every rank calls this once after the rendezvous; two ranks on one GPU fail all ranks, naming them.

    The mapping above follows the binding from each rank's own variables; this catches a layout it guessed
    wrong (or a launcher that exported the wrong ``LOCAL_RANK``) before NCCL hangs or shares a GPU. One
    ``all_gather_object`` of (host, GPU id) on the gloo ``group``.
    """
    own = (socket.gethostname(), gpu_id)
    seen = [own]
    if world_size > 1:
        seen = [None] * world_size
        tdist.all_gather_object(seen, own, group=group)
    by_gpu: dict[tuple[str, str], list[int]] = {}
    for other, key in enumerate(seen):
        by_gpu.setdefault(tuple(key), []).append(other)
    shared = {key: ranks for key, ranks in by_gpu.items() if len(ranks) > 1}
    if shared:
        listing = "; ".join(
            f"ranks {ranks} on {host} all use GPU {gpu}" for (host, gpu), ranks in shared.items()
        )
        raise ConfigError(f"rank {rank}: {listing}. Each rank needs its own GPU; {_FIX}")
