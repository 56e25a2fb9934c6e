"""Process set-up and the pieces of a run that are built from its config: threads, seeds, model, config hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from r2d2_hpc.atomic import write_json
from r2d2_hpc.config import RunConfig, TrainConfig
from r2d2_hpc.models import build_model, count_parameters, flops_per_sample
from r2d2_hpc.train.cpus import ThreadPlan, cpus_available, plan_threads
from r2d2_hpc.train.dist import DistEnv

log = logging.getLogger(__name__)

# Settings that make a checkpoint belong to a run. max_steps is left out on purpose: extending a finished run
# with a larger train.max_steps is a legitimate resume. So are the LR settings (lr, lr_scaling,
# lr_reference_batch, warmup_steps): resuming a diverged run from its last good checkpoint with a lower LR is the
# documented way on; the loop logs the change.
_HASHED_TRAIN_KEYS = (
    "scaling",
    "global_batch",
    "batch_per_rank",
    "grad_accum",
    "optimizer",
    "schedule",
    "dice_over_ranks",
    "seed",
    "amp",
)
LR_KEYS = ("lr", "lr_scaling", "lr_reference_batch", "warmup_steps")


def configure_process(tc: TrainConfig, env: DistEnv) -> ThreadPlan:
    """Threads per rank, determinism and the common seed (the model is initialised identically on every rank).

    Threads come from the CPUs this process may run on (see :mod:`r2d2_hpc.train.cpus`); the choice is logged,
    and a warning says when the node's ranks ask for more threads than there are CPUs.
    """
    plan = plan_threads(tc.threads_per_rank, env.local_world_size, os.environ, *cpus_available())
    torch.set_num_threads(plan.threads)
    log.info("rank %d: %s", env.rank, plan.describe())
    if plan.warning and env.local_rank == 0:
        log.warning("%s", plan.warning)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(tc.seed)
    return plan


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank streams (dropout) once the model exists: distinct across ranks, reproducible per run."""
    seed_everything(seed * 100_003 + rank + 1)


def build_model_for(cfg: RunConfig, manifest: dict[str, Any]) -> torch.nn.Module:
    """Builds the configured model for the channels and classes of the shard set."""
    options = {k: v for k, v in cfg.model.items() if k not in ("name", "spatial_dims")}
    return build_model(
        cfg.model["name"],
        in_channels=len(manifest["channels"]),
        num_classes=len(manifest["classes"]),
        spatial_dims=int(cfg.model.get("spatial_dims", 2)),
        **options,
    )


def model_flops_on_rank0(
    model: torch.nn.Module, sample_shape: tuple[int, ...], env: DistEnv, group: Any
) -> int:
    """Forward FLOPs per sample, counted by rank 0 alone (on the meta device) and broadcast on the gloo group."""
    box = [flops_per_sample(model, sample_shape) if env.is_main else None]
    if env.world_size > 1:
        tdist.broadcast_object_list(box, src=0, group=group)
    return int(box[0])


def model_info(
    cfg: RunConfig,
    manifest: dict[str, Any],
    model: torch.nn.Module,
    sample_shape: tuple[int, ...],
    flops: int | None = None,
) -> dict[str, Any]:
    """What a checkpoint must carry to rebuild the model and its preprocessing elsewhere (predict).

    ``flops``: the forward FLOPs per sample when already known (:func:`model_flops_on_rank0`), else counted.
    """
    return {
        "name": cfg.model["name"],
        "spatial_dims": int(cfg.model.get("spatial_dims", 2)),
        "options": {k: v for k, v in cfg.model.items() if k not in ("name", "spatial_dims")},
        "in_channels": len(manifest["channels"]),
        "num_classes": len(manifest["classes"]),
        "class_names": list(manifest["classes"]),
        "channel_names": list(manifest["channels"]),
        "dataset": manifest.get("dataset"),
        "layout": manifest.get("layout"),
        "preprocessing": manifest.get("preprocessing"),
        "modality": manifest.get("modality"),
        "required_multiple": int(model.required_multiple),
        "sample_shape": list(sample_shape),
        "num_params": count_parameters(model),
        "flops_per_sample": flops_per_sample(model, sample_shape) if flops is None else int(flops),
    }


def run_config_hash(cfg: RunConfig) -> str:
    """Hash of the settings a checkpoint must share with the run that resumes it."""
    train = asdict(cfg.train)
    parts = {
        "model": cfg.model,
        "shards": cfg.data.shard_dir(),
        "train": {k: train[k] for k in _HASHED_TRAIN_KEYS},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain JSON values (what ``config.json`` and a checkpoint's ``extra`` hold)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def write_run_config(cfg: RunConfig) -> Path:
    """Writes ``run_dir/config.json`` atomically (a temporary name, then a rename)."""
    path = Path(cfg.run_dir) / "config.json"
    fix = "run again with resume=auto"
    return write_json(path, plain_config(cfg), "the run's config (config.json)", fix, indent=2, default=str)
