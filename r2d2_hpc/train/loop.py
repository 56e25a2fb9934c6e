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
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from r2d2_hpc.atomic import check_writable, disk_guard
from r2d2_hpc.config import RunConfig
from r2d2_hpc.data.manifest import read_manifest
from r2d2_hpc.train import checkpoint as ckpt
from r2d2_hpc.train.comm import ddp_logging_fields, install_comm_timer
from r2d2_hpc.train.data import BatchStats, build_datasets, build_train_loader, next_batch
from r2d2_hpc.train.devices import check_distinct_gpus, gpu_uuid
from r2d2_hpc.train.dist import (
    DistEnv,
    Heartbeat,
    describe_failure,
    destroy_process_group,
    init_process_group,
)
from r2d2_hpc.train.divergence import (
    DivergedError,
    DivergenceReport,
    NonFiniteGuard,
    diverged_message,
    diverged_reason,
)
from r2d2_hpc.train.evaluate import evaluate
from r2d2_hpc.train.losses import DiceCELoss, deep_supervision_loss
from r2d2_hpc.train.metrics import mean_foreground_dice
from r2d2_hpc.train.progress import Progress
from r2d2_hpc.train.resume import check_world_size, load_agreed_checkpoint, rescale_lr
from r2d2_hpc.train.sampler import ResumableDistributedSampler, position, steps_per_epoch
from r2d2_hpc.train.schedule import build_optimizer, build_scheduler_from_config, scaled_lr
from r2d2_hpc.train.setup import (
    LR_KEYS,
    build_model_for,
    configure_process,
    model_flops_on_rank0,
    model_info,
    plain_config,
    run_config_hash,
    seed_rank,
    write_run_config,
)
from r2d2_hpc.train.steptimer import StepTimer, StepTimes, clock_for
from r2d2_hpc.train.stop import StopAgreement, StopFlag
from r2d2_hpc.train.tensorboard import TensorBoardLog
from r2d2_hpc.train.timing import (
    TRAIN_DISK_FIX,
    Throughput,
    TimingLog,
    read_jsonl,
    run_result,
    training_header,
    write_result,
)

log = logging.getLogger(__name__)


def train(cfg: RunConfig, env: DistEnv, stop: StopFlag | None = None) -> dict[str, Any]:
    """Trains one run on this rank; returns the run's result (the same dict on every rank)."""
    configure_process(cfg.train, env)
    # Before any compute: an unwritable or read-only run folder is one message, not a traceback at step 50.
    check_writable(Path(cfg.run_dir) / "timing", "the run folder (run_dir)", TRAIN_DISK_FIX)
    cpu_group = init_process_group(env, cfg.train.dist_timeout_s)
    heartbeat = Heartbeat(env) if env.world_size > 1 else None
    try:
        if env.backend == "nccl":
            check_distinct_gpus(env.rank, gpu_uuid(env.device), cpu_group, env.world_size)
        return _Trainer(cfg, env, stop or StopFlag(), heartbeat, cpu_group).run()
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
    """One rank's run: built from the config in ``__init__``, then ``run()``; its parts are owned by their modules."""

    def __init__(
        self, cfg: RunConfig, env: DistEnv, stop: StopFlag, heartbeat: Heartbeat | None, cpu_group: Any
    ) -> None:
        self.cfg, self.env, self.stop, self.heartbeat = cfg, env, stop, heartbeat
        self.cpu_group = cpu_group  # gloo: RNG states and other small objects never travel through NCCL
        self.tc = tc = cfg.train
        self.device = torch.device(env.device)
        self.run_dir = Path(cfg.run_dir)
        self.micro = tc.micro_batch(env.world_size)
        self.global_batch = tc.effective_global_batch(env.world_size)
        manifest = read_manifest(Path(cfg.data.shard_dir()))
        model = build_model_for(cfg, manifest)
        self.train_ds, self.val_ds = build_datasets(cfg, env, model.required_multiple)
        shape = tuple(self.train_ds[0]["image"].shape)
        flops = model_flops_on_rank0(model, shape, env, cpu_group)
        self.model_info = model_info(cfg, manifest, model, shape, flops)
        seed_rank(tc.seed, env.rank)
        self.model = model.to(self.device)
        if tc.channels_last:
            fmt = torch.channels_last if self.model_info["spatial_dims"] == 2 else torch.channels_last_3d
            self.model = self.model.to(memory_format=fmt)
        self.ddp = DDP(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=tc.ddp_bucket_mib,
            static_graph=tc.static_graph,
        )
        self.forward = torch.compile(self.ddp) if tc.compile else self.ddp
        comm = install_comm_timer(self.ddp, clock_for(self.device)) if env.world_size > 1 else None
        self.timer = StepTimer(self.device, tc.timing_sync_every_steps, comm)
        self.stopper = StopAgreement(
            stop, env, tc.stop_check_every_steps, cpu_group, diverged=lambda: self.guard.exhausted
        )
        self.lr_peak = scaled_lr(tc.lr, tc.lr_scaling, self.global_batch, tc.lr_reference_batch)
        optimizer = build_optimizer(self.model.parameters(), tc, self.lr_peak)
        scheduler = build_scheduler_from_config(optimizer, tc, self.global_batch)
        self.amp_dtype = _amp_dtype(tc.amp, self.device)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.parts = ckpt.TrainingParts(self.model, optimizer, scheduler, scaler)
        self.guard = NonFiniteGuard(tc.max_nonfinite_steps, check_grads=scaler is None)
        self.last_checkpoint: tuple[Path, int] | None = None
        self.loss_fn = DiceCELoss(
            self.train_ds.num_classes, tc.dice_weight, tc.ce_weight, over_ranks=tc.dice_over_ranks
        )
        self.sampler = ResumableDistributedSampler(len(self.train_ds), env.world_size, env.rank, tc.seed)
        self.samples_per_step = self.micro * tc.grad_accum
        self.steps_per_epoch = steps_per_epoch(len(self.train_ds), env.world_size, self.samples_per_step)
        self.loader = build_train_loader(cfg, self.train_ds, self.sampler, self.micro, self.device)
        self.batch_stats = BatchStats()
        self.config_hash = run_config_hash(cfg)
        self.throughput = Throughput(tc.timing_warmup_steps)
        self.step = 0
        self.t_start = time.monotonic()
        self.last_dice: list[float] = []
        self.evaluated_at = -1
        self.resumed_world_size: int | None = None

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        resumed_at = self._resume()
        if self.env.is_main:
            write_run_config(self.cfg)
        header = training_header(
            self.env,
            self.run_dir.name,
            self.tc,
            self.model_info,
            self.global_batch,
            self.lr_peak,
            (len(self.train_ds), len(self.val_ds)),
            resumed_at,
        )
        header["resumed_from_world_size"] = self.resumed_world_size  # each segment has its own world_size
        path = self.run_dir / "timing" / f"rank{self.env.rank}.jsonl"
        self.timing = TimingLog(path, header, append=resumed_at is not None)
        status = "completed"
        self.tb = TensorBoardLog(None, False, False)  # off until the line below opens it
        try:
            self.tb = TensorBoardLog(self.run_dir, self.tc.tensorboard, self.env.is_main, resumed_at)
            status = self._loop()
            if status == "completed" and self.evaluated_at != self.step:
                self._evaluate()
            if status != "diverged":  # a diverged run keeps its last good checkpoint
                self._checkpoint()
            extra = {"nonfinite_steps": self.guard.streak} if status == "diverged" else {}
            weights = ckpt.weights_digest(self.model)
            self.timing.end(self.step, status=status, weights_sha256=weights, **extra)
        finally:
            self.timing.close()
            self.tb.close()
        result = run_result(
            status,
            self.run_dir.name,
            self.env,
            self.tc,
            self.model_info,
            self.step,
            self.throughput,
            self.last_dice,
            self.train_ds.class_names,
            time.monotonic() - self.t_start,
        )
        result["corrupt_samples_skipped"] = self.batch_stats.total_corrupt_skipped(self.env)
        # every start of this run (a preempted or timed-out job resumes as a new attempt): one header each
        result["attempts"] = sum(1 for rec in read_jsonl(self.timing.path) if rec.get("type") == "header")
        error = None
        if status == "diverged":
            report = self._divergence_report()
            error = diverged_message(self.run_dir, self.tc, report)
            result |= {"reason": diverged_reason(self.tc, report), "error": error}
        if self.env.is_main:
            write_result(self.run_dir, result)
        if error is not None:
            raise DivergedError(error)
        return result

    def _divergence_report(self) -> DivergenceReport:
        path, step = self.last_checkpoint if self.last_checkpoint else (None, None)
        return DivergenceReport(
            self.step,
            self.guard.first_bad_step,
            self.guard.streak,
            self.guard.first_bad_lr if self.guard.first_bad_lr is not None else math.nan,
            self.lr_peak,
            self.global_batch,
            path,
            step,
        )

    def _loop(self) -> str:
        self.bar = Progress(self.tc.max_steps, self.step, self.env.is_main, self.tc.log_every_steps)
        try:
            while self.step < self.tc.max_steps:
                epoch, offset = self._position()
                batches = self._epoch_batches(epoch, offset)
                left = min(
                    self.steps_per_epoch - offset // self.samples_per_step, self.tc.max_steps - self.step
                )
                for _ in range(left):
                    self._train_step(batches, epoch)
                    # A stop comes first: within the signal's grace window the one checkpoint that run()
                    # writes on leaving is all there is time for, not a due evaluation and a second save.
                    # It is outside the step's clock: the next step starts after the agreement.
                    if self.step % self.tc.stop_check_every_steps == 0:
                        # every step's non-finite flag is read before the ranks agree (no sync when the timer
                        # has just resolved, as it does at the same cadence by default)
                        self._record(self.timer.resolve())
                    if self.stopper.should_stop(self.step):
                        return self.stopper.reason or "preempted"
                    self._periodic()
                del batches
            return "completed"
        finally:
            self._record(self.timer.resolve())
            self.bar.close()

    def _epoch_batches(self, epoch: int, offset: int) -> Iterator[dict[str, Any]]:
        """The epoch's batches from ``offset`` on; the loader's restart (worker start-up, first batch) is timed
        and logged on its own, not booked as the first step's data wait."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(offset)
        self.train_ds.set_epoch(epoch)
        t0 = time.perf_counter()
        batches = iter(self.loader)
        try:  # counted in self.batch_stats when the step takes it from the chain
            first = [next_batch(batches, BatchStats())]
        except StopIteration:
            first = []
        self.timing.loader_restart(self.step + 1, epoch, time.perf_counter() - t0)
        return itertools.chain(first, batches)

    def _record(self, resolved: list[StepTimes]) -> None:
        """Logs resolved steps: timing lines, throughput, progress; reads their non-finite flags (same sync)."""
        if resolved:
            self.guard.resolve()
        for t in resolved:
            parts = {"exposed_comm_s": t.exposed_comm_s, "comm_s": t.comm_s, "other_s": t.other_s}
            samples = self.global_batch
            self.timing.step(
                t.step, t.epoch, t.data_wait_s, t.compute_s, t.step_s, samples, t.loss, t.lr, **parts
            )
            self.throughput.add(t.step, t.data_wait_s, t.step_s, samples)
            self.tb.step(t.step, t.loss, t.lr, samples, t.data_wait_s, t.step_s)
            self.bar.update(t.step, t.loss, t.lr)

    def _train_step(self, batches: Iterator[dict[str, Any]], epoch: int) -> None:
        """One optimizer step (grad_accum micro-batches, clipping, optimizer, scheduler), timed by ``self.timer``."""
        timer = self.timer
        timer.start()
        self.ddp.train()
        optimizer, scaler = self.parts.optimizer, self.parts.scaler
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)  # summed on the device: read when the timer resolves
        for micro in range(self.tc.grad_accum):
            timer.data_asked()
            batch = next_batch(batches, self.batch_stats)
            timer.data_ready()
            last = micro == self.tc.grad_accum - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss = self._loss(batch) / self.tc.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
            total += loss.detach()
            if not last:
                timer.compute_done()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = None
        if self.tc.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        elif self.guard.check_grads:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        timer.compute_done()
        lr = optimizer.param_groups[0]["lr"]
        self.parts.scheduler.step()
        self.step += 1
        self.guard.push(self.step, total, grad_norm, lr)  # before lap: a resolve there reads this flag too
        self._record(timer.lap(self.step, epoch, total, lr))
        if self.heartbeat is not None:
            self.heartbeat.beat(self.step)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward pass and loss of one micro-batch (under autocast when AMP is on)."""
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        if self.tc.channels_last:
            image = image.contiguous(memory_format=_channels_last(image))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.forward(image)
            if isinstance(out, list | tuple):
                return deep_supervision_loss(self.loss_fn, out, label)
            return self.loss_fn(out, label)

    def _position(self) -> tuple[int, int]:
        """(epoch, sample offset in the epoch) of the current step."""
        return position(self.step, self.steps_per_epoch, self.samples_per_step)

    def _periodic(self) -> None:
        tc, step = self.tc, self.step
        evaluate_now = bool(tc.eval_every_steps) and step % tc.eval_every_steps == 0
        checkpoint_now = bool(tc.checkpoint_every_steps) and step % tc.checkpoint_every_steps == 0
        checkpoint_now = checkpoint_now and step < tc.max_steps
        if evaluate_now or checkpoint_now:
            self._record(self.timer.resolve())  # their lines are on disk before either starts
        if step % tc.timing_sample_every_steps == 0 and self.timer.comm is not None:
            self.timing.comm(step, self.timer.comm.bucket_bytes, ddp_logging_fields(self.ddp))
        if evaluate_now:
            self._evaluate()
        if checkpoint_now:
            self._checkpoint()

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self) -> None:
        tc = self.tc
        dice = evaluate(
            self.model, self.val_ds, self.env, self.device, tc.eval_batch, self.amp_dtype, tc.num_workers
        )
        self.last_dice, self.evaluated_at = dice, self.step
        wall_s = time.monotonic() - self.t_start
        epoch, _ = self._position()
        self.timing.evaluation(self.step, epoch, dice, wall_s)
        self.tb.evaluation(self.step, dice, self.train_ds.class_names)
        if self.env.is_main:
            mean_fg = mean_foreground_dice(dice)
            line = {
                "step": self.step,
                "epoch": epoch,
                "dice_per_class": dice,
                "wall_s": round(wall_s, 3),
                "mean_foreground_dice": mean_fg if math.isfinite(mean_fg) else None,
            }
            path = self.run_dir / "metrics.jsonl"
            with (
                disk_guard(self.run_dir, f"the metrics log {path.name}", TRAIN_DISK_FIX),
                open(path, "a") as fh,
            ):
                fh.write(json.dumps(line) + "\n")
            shown = [round(d, 4) for d in dice]
            log.info("step %d: validation Dice %s (mean foreground %.4f)", self.step, shown, mean_fg)

    # ------------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        # Every line up to the checkpoint is on disk before it exists: a resumed log then has no hole.
        self.timing.flush()
        rng = ckpt.gather_rng_states(self.env, self.cpu_group)
        if self.guard.weights_suspect:
            log.warning(
                "step %d: no checkpoint (the last %d step(s) were non-finite); keeping %s",
                self.step,
                self.guard.streak,
                self.last_checkpoint[0] if self.last_checkpoint else "none",
            )
            return
        self.last_checkpoint = (self.run_dir / "checkpoints" / ckpt.LAST, self.step)
        if not self.env.is_main:
            return
        epoch, offset = self._position()
        state = ckpt.training_state(
            self.parts,
            step=self.step,
            epoch=epoch,
            offset=offset,
            seed=self.tc.seed,
            rng=rng,
            config_hash=self.config_hash,
            model_info=self.model_info,
            world_size=self.env.world_size,
            extra={"last_dice": self.last_dice, "config": plain_config(self.cfg)},
        )
        ckpt.save_checkpoint(self.run_dir / "checkpoints", state)

    def _resume(self) -> int | None:
        """Loads the checkpoint ``resume`` points at, if any; returns its step (None: a fresh start)."""
        mode = self.cfg.resume
        if mode == "never":
            return None
        target = self.run_dir / "checkpoints" if mode == "auto" else Path(mode)
        found = load_agreed_checkpoint(target, self.config_hash, self.env, self.cpu_group, self.device)
        if found is None:
            return None
        state, path = found
        changed = check_world_size(state, path, self.env, self.tc.allow_world_size_change)
        self.step = ckpt.restore_training_state(self.parts, state, self.env, path)
        if changed or _lr_settings_changed(state, self.tc, path):
            rescale_lr(self.parts, self.lr_peak)
        self.resumed_world_size = state["world_size"]
        self.last_dice = state.get("extra", {}).get("last_dice", [])
        self.last_checkpoint = (path, self.step)
        log.info("rank %d resumed from %s at step %d", self.env.rank, path, self.step)
        return self.step


def _lr_settings_changed(state: dict[str, Any], tc: Any, path: Path) -> bool:
    """Logs and returns whether the run resumes with other LR settings than its checkpoint's (allowed, see
    ``setup.LR_KEYS``: the way on after a divergence)."""
    before = state.get("extra", {}).get("config", {}).get("train", {})
    changed = [
        f"train.{k} {before[k]} -> {getattr(tc, k)}"
        for k in LR_KEYS
        if k in before and before[k] != getattr(tc, k)
    ]
    if changed:
        log.warning("resuming from %s with changed LR settings: %s", path, ", ".join(changed))
    return bool(changed)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if device.type != "cuda":
        log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, device)
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _channels_last(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def new_run_id() -> str:
    """A short unique run id (used when a run directory is not named by the launcher)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
