"""The training loop of one rank: a plain function of a config and a ``DistEnv``.

No Slurm, submitit or Hydra here: ``torchrun``, ``srun`` and submitit all end in :func:`train`. Every rank runs the
same code; only rank 0 writes shared files (config, metrics, checkpoints, result). Each rank writes its own
``timing/rank{R}.jsonl``.

Resume is exact: the data position (epoch, offset in the epoch) is a function of the step, per-sample randomness
is seeded by (seed, epoch, rank, index), and the checkpoint holds model, optimizer, scheduler, grad scaler and the
RNG states of every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from r2d2_hpc.config import RunConfig
from r2d2_hpc.data.manifest import read_manifest
from r2d2_hpc.train import checkpoint as ckpt
from r2d2_hpc.train.data import build_datasets
from r2d2_hpc.train.dist import (
    DistEnv,
    Heartbeat,
    describe_failure,
    destroy_process_group,
    init_process_group,
)
from r2d2_hpc.train.evaluate import evaluate
from r2d2_hpc.train.losses import DiceCELoss, deep_supervision_loss
from r2d2_hpc.train.sampler import ResumableDistributedSampler, position, steps_per_epoch
from r2d2_hpc.train.schedule import build_optimizer, build_scheduler, scaled_lr
from r2d2_hpc.train.setup import build_model_for, configure_process, model_info, run_config_hash, seed_rank
from r2d2_hpc.train.timing import StepTimer, TimingLog, run_header

log = logging.getLogger(__name__)


class StopFlag:
    """Set by a signal handler (preemption, timeout): every rank stops at the next step boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def train(cfg: RunConfig, env: DistEnv, stop: StopFlag | None = None) -> dict[str, Any]:
    """Trains one run on this rank; returns the run's result (the same dict on every rank)."""
    configure_process(cfg.train, env)
    init_process_group(env, cfg.train.dist_timeout_s)
    heartbeat = Heartbeat(env) if env.world_size > 1 else None
    try:
        return _Trainer(cfg, env, stop or StopFlag(), heartbeat).run()
    except (RuntimeError, dist.DistBackendError) as exc:
        if env.world_size > 1 and _looks_distributed(exc):
            raise RuntimeError(describe_failure(exc, heartbeat, env)) from exc
        raise
    finally:
        destroy_process_group()


def _looks_distributed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(
        k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "distbackend")
    )


class _Trainer:
    """State of one rank's run; split from :func:`train` so each step of the loop stays short."""

    def __init__(self, cfg: RunConfig, env: DistEnv, stop: StopFlag, heartbeat: Heartbeat | None) -> None:
        self.cfg, self.env, self.stop, self.heartbeat = cfg, env, stop, heartbeat
        self.tc = cfg.train
        self.device = torch.device(env.device)
        self.run_dir = Path(cfg.run_dir)
        self.micro = self.tc.micro_batch(env.world_size)
        self.global_batch = self.tc.effective_global_batch(env.world_size)
        manifest = read_manifest(Path(cfg.data.shard_dir()))
        model = build_model_for(cfg, manifest)
        self.train_ds, self.val_ds = build_datasets(cfg, env, model.required_multiple)
        self.model_info = model_info(cfg, manifest, model, tuple(self.train_ds[0]["image"].shape))
        seed_rank(self.tc.seed, env.rank)
        self.model = model.to(self.device)
        if self.tc.channels_last:
            fmt = torch.channels_last if self.model_info["spatial_dims"] == 2 else torch.channels_last_3d
            self.model = self.model.to(memory_format=fmt)
        self.ddp = DDP(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.tc.ddp_bucket_mib,
            static_graph=self.tc.static_graph,
        )
        self.forward = torch.compile(self.ddp) if self.tc.compile else self.ddp
        self.lr_peak = scaled_lr(
            self.tc.lr, self.tc.lr_scaling, self.global_batch, self.tc.lr_reference_batch
        )
        self.optimizer = build_optimizer(self.model.parameters(), self.tc, self.lr_peak)
        self.scheduler = build_scheduler(
            self.optimizer,
            self.tc.schedule,
            self.tc.max_steps,
            self.tc.warmup_steps,
            self.tc.poly_power,
            self.tc.min_lr_ratio,
        )
        self.amp_dtype = _amp_dtype(self.tc.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.loss_fn = DiceCELoss(self.train_ds.num_classes, self.tc.dice_weight, self.tc.ce_weight)
        self.sampler = ResumableDistributedSampler(len(self.train_ds), env.world_size, env.rank, self.tc.seed)
        self.steps_per_epoch = steps_per_epoch(
            len(self.train_ds), env.world_size, self.micro * self.tc.grad_accum
        )
        self.loader = DataLoader(
            self.train_ds,
            batch_size=self.micro,
            sampler=self.sampler,
            num_workers=self.tc.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            # its own generator: creating an iterator must not draw from the global RNG,
            # or a resumed run's dropout stream would differ from the uninterrupted one
            generator=torch.Generator().manual_seed(self.tc.seed),
        )
        self.config_hash = run_config_hash(cfg)
        self.step = 0
        self.t_start = time.monotonic()
        self.last_dice: list[float] = []
        self.evaluated_at = -1

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        resumed_from = self._resume()
        if self.env.is_main:
            self._write_config()
        self.timing = TimingLog(
            self.run_dir / "timing" / f"rank{self.env.rank}.jsonl",
            self._header(resumed_from),
            append=resumed_from is not None,
        )
        status = "completed"
        try:
            status = self._loop()
            if status == "completed" and self.evaluated_at != self.step:
                self._evaluate()
            self._checkpoint()
            self.timing.end(self.step, status=status, weights_sha256=_weights_digest(self.model))
        finally:
            self.timing.close()
        return self._finish(status)

    def _loop(self) -> str:
        bar = _progress(self.tc.max_steps, self.step, self.env.is_main)
        timer = StepTimer(self.device)
        while self.step < self.tc.max_steps:
            epoch, offset = position(self.step, self.steps_per_epoch, self.micro * self.tc.grad_accum)
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(offset)
            self.train_ds.set_epoch(epoch)
            batches = iter(self.loader)
            steps_left = min(
                self.steps_per_epoch - offset // (self.micro * self.tc.grad_accum),
                self.tc.max_steps - self.step,
            )
            for _ in range(steps_left):
                loss, lr = self._train_step(batches, timer)
                self.step += 1
                data_wait_s, compute_s, step_s = timer.lap()
                self.timing.step(
                    self.step, epoch, data_wait_s, compute_s, step_s, self.global_batch, loss, lr
                )
                bar.update(self.step, loss, lr)
                if self.heartbeat is not None:
                    self.heartbeat.beat(self.step)
                self._periodic()
                timer.reset()  # evaluation and checkpoint time is not the next step's data wait
                if self._stop_requested():
                    bar.close()
                    return "preempted"
            del batches
        bar.close()
        return "completed"

    def _train_step(self, batches: Iterator[dict[str, Any]], timer: StepTimer) -> tuple[float, float]:
        """One optimizer step: grad_accum micro-batches, clipping, optimizer and scheduler."""
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(self.tc.grad_accum):
            batch = next(batches)
            timer.data_ready()
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            if self.tc.channels_last:
                image = image.contiguous(memory_format=_channels_last(image))
            last = micro == self.tc.grad_accum - 1
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with (
                sync,
                torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
            ):
                out = self.forward(image)
                loss = (
                    deep_supervision_loss(self.loss_fn, out, label)
                    if isinstance(out, list | tuple)
                    else self.loss_fn(out, label)
                ) / self.tc.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
            if not last:
                timer.compute_done()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        timer.compute_done()
        return total, lr

    def _periodic(self) -> None:
        if self.tc.eval_every_steps and self.step % self.tc.eval_every_steps == 0:
            self._evaluate()
        if (
            self.tc.checkpoint_every_steps
            and self.step % self.tc.checkpoint_every_steps == 0
            and self.step < self.tc.max_steps
        ):
            self._checkpoint()

    def _stop_requested(self) -> bool:
        """Every rank agrees to stop at the same step boundary (MAX of the local flags)."""
        flag = torch.tensor([1.0 if self.stop.is_set() else 0.0], device=self.device)
        if self.env.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> None:
        dice = evaluate(
            self.model,
            self.val_ds,
            self.env,
            self.device,
            self.tc.eval_batch,
            self.amp_dtype,
            self.tc.num_workers,
        )
        self.last_dice = dice
        self.evaluated_at = self.step
        wall_s = time.monotonic() - self.t_start
        epoch, _ = position(self.step, self.steps_per_epoch, self.micro * self.tc.grad_accum)
        self.timing.evaluation(self.step, epoch, dice, wall_s)
        if self.env.is_main:
            line = {
                "step": self.step,
                "epoch": epoch,
                "dice_per_class": dice,
                "wall_s": round(wall_s, 3),
                "mean_foreground_dice": _mean_fg(dice),
            }
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
            log.info(
                "step %d: validation Dice %s (mean foreground %.4f)",
                self.step,
                [round(d, 4) for d in dice],
                _mean_fg(dice),
            )

    # ------------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        # Every line up to the checkpoint is on disk before it exists: a resumed log then has no hole.
        self.timing.flush()
        rng = ckpt.gather_rng_states(self.env)
        if not self.env.is_main:
            return
        epoch, offset = position(self.step, self.steps_per_epoch, self.micro * self.tc.grad_accum)
        state = {
            "format": ckpt.FORMAT,
            "format_version": ckpt.VERSION,
            "step": self.step,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "sampler": {"epoch": epoch, "offset": offset, "seed": self.tc.seed},
            "rng": rng,
            "config_hash": self.config_hash,
            "model_info": self.model_info,
            "world_size": self.env.world_size,
            "extra": {"last_dice": self.last_dice, "config": _plain_config(self.cfg)},
        }
        ckpt.save_checkpoint(self.run_dir / "checkpoints", state)

    def _resume(self) -> Path | None:
        mode = self.cfg.resume
        if mode == "never":
            return None
        target = self.run_dir / "checkpoints" if mode == "auto" else Path(mode)
        found = ckpt.load_checkpoint(target, self.config_hash, map_location=self.device)
        if found is None:
            return None
        state, path = found
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.last_dice = state.get("extra", {}).get("last_dice", [])
        if state.get("world_size") == self.env.world_size and state.get("rng"):
            ckpt.restore_rng_state(state["rng"][self.env.rank])
        else:
            log.warning(
                "%s was written with %s ranks, this run has %d: data order and RNG streams restart",
                path,
                state.get("world_size"),
                self.env.world_size,
            )
        log.info("rank %d resumed from %s at step %d", self.env.rank, path, self.step)
        return path

    # ----------------------------------------------------------------------------------------- output
    def _header(self, resumed_from: Path | None) -> dict[str, Any]:
        extra = {
            "resumed_at_step": self.step if resumed_from else None,
            "max_steps": self.tc.max_steps,
            "micro_batch": self.micro,
            "grad_accum": self.tc.grad_accum,
            "lr_peak": self.lr_peak,
            "spatial_dims": self.model_info["spatial_dims"],
            "num_params": self.model_info["num_params"],
            "flops_per_sample": self.model_info["flops_per_sample"],
            "grad_bytes": self.model_info["num_params"] * 4,
            "dataset": self.model_info["dataset"],
            "train_samples": len(self.train_ds),
            "val_samples": len(self.val_ds),
        }
        return run_header(
            self.env,
            self.run_dir.name,
            self.model_info["name"],
            self.micro * self.tc.grad_accum,
            self.global_batch,
            self.tc.scaling,
            self.tc.lr_scaling,
            self.tc.amp,
            extra,
        )

    def _write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_plain_config(self.cfg), indent=2, default=str))
        os.replace(tmp, path)

    def _finish(self, status: str) -> dict[str, Any]:
        timings = [ln for ln in _read_steps(self.timing.path) if ln["step"] > self.tc.timing_warmup_steps]
        step_s = sum(ln["step_s"] for ln in timings)
        samples = sum(ln["samples"] for ln in timings)
        result = {
            "status": status,
            "run_id": self.run_dir.name,
            "model": self.model_info["name"],
            "world_size": self.env.world_size,
            "num_nodes": self.env.num_nodes,
            "scaling": self.tc.scaling,
            "global_batch": self.global_batch,
            "steps": self.step,
            "max_steps": self.tc.max_steps,
            "throughput_samples_per_s": samples / step_s if step_s > 0 else None,
            "timing_warmup_steps": self.tc.timing_warmup_steps,
            "data_wait_share": (sum(ln["data_wait_s"] for ln in timings) / step_s) if step_s > 0 else None,
            "dice_per_class": self.last_dice,
            "mean_foreground_dice": _mean_fg(self.last_dice),
            "class_names": self.train_ds.class_names,
            "peak_memory_gib": _peak_memory_gib(self.device),
            "wall_s": time.monotonic() - self.t_start,
            "num_params": self.model_info["num_params"],
            "flops_per_sample": self.model_info["flops_per_sample"],
            "device": self.env.device,
            "backend": self.env.backend,
        }
        if self.env.is_main:
            path = self.run_dir / "result.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, path)
        return result


def _weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests on all ranks prove they hold the same model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_steps(path: Path) -> list[dict[str, Any]]:
    from r2d2_hpc.train.timing import read_jsonl

    return [ln for ln in read_jsonl(path) if ln.get("type") == "step"]


def _mean_fg(dice: list[float]) -> float | None:
    values = [d for d in dice[1:] if d == d]  # NaN: class absent from prediction and reference
    return float(np.mean(values)) if values else None


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if device.type != "cuda":
        log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, device)
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _channels_last(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def _plain_config(cfg: RunConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


class _Progress:
    """A tqdm bar on rank 0 at a terminal, else a log line every ~log_every steps."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        self.total = total
        self.last_log_s = time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step")

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.enabled and (time.monotonic() - self.last_log_s > 15 or step == self.total):
            log.info("step %d/%d loss %.4f lr %.3e", step, self.total, loss, lr)
            self.last_log_s = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(total: int, start: int, enabled: bool) -> _Progress:
    return _Progress(total, start, enabled)


def new_run_id() -> str:
    """A short unique run id (used when a run directory is not named by the launcher)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
