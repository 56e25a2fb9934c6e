"""Faults a long run meets, for real: a diverging LR (1 and 2 gloo ranks), a full and a read-only run folder.

Every run is `python -m r2d2_hpc.train` processes on this machine; the small disks are real tmpfs mounts (root
only, as in CI; skipped with the reason elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
UNET = ["model=unet", "model.depth=2", "model.base_width=4"]
# The reproduction: AdamW at lr 1e6 has a NaN loss within a few steps.
DIVERGING = ["train.optimizer=adamw", "train.lr=1e6", "train.grad_clip=null"]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(shards: Path, run_dir: Path, world: int, overrides: list[str]) -> list[tuple[int, str]]:
    """Runs `world` ranks to the end; returns (exit code, stderr) per rank."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = os.environ | {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "r2d2_hpc.train",
            f"data.shards={shards}",
            f"run_dir={run_dir}",
            "train.num_workers=0",
            "train.threads_per_rank=1",
            "train.timing_warmup_steps=1",
            "train.global_batch=4",
            *UNET,
            *overrides,
        ]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def _ends(run_dir: Path, world: int) -> list[dict]:
    return [
        [ln for ln in read_jsonl(run_dir / "timing" / f"rank{r}.jsonl") if ln["type"] == "end"][-1]
        for r in range(world)
    ]


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def test_a_diverging_lr_stops_the_run_and_never_checkpoints_non_finite_weights(
    shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    common = ["train.max_steps=30", "train.eval_every_steps=0", "train.checkpoint_every_steps=1"]
    [(code, err)] = _train(shards, run_dir, 1, [*common, *DIVERGING])

    assert code == 1, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "diverged" and result["steps"] < 30
    stopped = result["steps"]
    steps = [ln for ln in read_jsonl(run_dir / "timing" / "rank0.jsonl") if ln["type"] == "step"]
    losses = {ln["step"]: ln["loss"] for ln in steps}
    first_bad = min(s for s, loss in losses.items() if loss is None)  # NaN is logged as null
    streak = stopped - first_bad + 1  # flags are read every train.timing_sync_every_steps, at no extra sync
    assert streak >= 3 and all(losses[s] is None for s in range(first_bad, stopped + 1))
    assert all(losses[s] is not None for s in range(1, first_bad))
    assert f"training diverged at step {stopped}: the loss or gradient norm was NaN or infinite" in err
    assert f"for {streak} consecutive step(s) from step {first_bad} at lr" in err
    assert "train.lr 1e+06 with train.lr_scaling=none for global batch 4" in err
    assert "lower train.lr (e.g. 100000)" in err and "train.warmup_steps=3" in err and "resume=auto" in err
    assert result["reason"] in result["error"] and result["error"] in err
    end = _ends(run_dir, 1)[0]
    assert end["status"] == "diverged" and end["step"] == stopped and end["nonfinite_steps"] == streak

    # A checkpoint every step, but none from the non-finite weights: last.pt is the step before the first bad one.
    for name, step in (("last.pt", first_bad - 1), ("prev.pt", first_bad - 2)):
        state = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)
        assert state["step"] == step
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert f"the last good checkpoint {run_dir / 'checkpoints' / 'last.pt'} (step {first_bad - 1})" in err


def test_a_diverged_run_resumes_from_its_last_good_checkpoint_with_a_lower_lr(
    shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    common = ["train.eval_every_steps=0", "train.optimizer=adamw", "train.grad_clip=null"]
    [(code, err)] = _train(shards, run_dir, 1, [*common, "train.max_steps=5", "train.lr=1e-3"])
    assert code == 0, err[-3000:]  # a good start, checkpointed at step 5
    # Then the LR is raised (a resume may change the LR settings): the run diverges, last.pt stays the good one.
    [(code, err)] = _train(shards, run_dir, 1, [*common, "train.max_steps=30", "train.lr=1e6", "resume=auto"])
    assert code == 1 and "training diverged" in err, err[-3000:]
    assert "resuming from" in err and "with changed LR settings: train.lr 0.001 -> 1000000.0" in err
    assert json.loads((run_dir / "result.json").read_text())["status"] == "diverged"
    assert _checkpoint(run_dir)["step"] == 5

    [(code, err)] = _train(
        shards, run_dir, 1, [*common, "train.max_steps=30", "train.lr=1e-3", "resume=auto"]
    )
    assert code == 0, err[-3000:]
    assert (
        "changed LR settings" not in err and "resumed from" in err and "at step 5" in err
    )  # step 5 had 1e-3
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 30
    lines = read_jsonl(run_dir / "timing" / "rank0.jsonl")
    last_header = max(i for i, ln in enumerate(lines) if ln["type"] == "header")
    resumed = [ln for ln in lines[last_header:] if ln["type"] == "step"]
    assert [ln["step"] for ln in resumed] == list(range(6, 31))
    assert all(math.isfinite(ln["loss"]) and ln["lr"] <= 1e-3 for ln in resumed)


def test_two_ranks_stop_together_when_the_loss_diverges(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    outcomes = _train(shards, run_dir, 2, ["train.max_steps=30", "train.eval_every_steps=0", *DIVERGING])

    for rank, (code, err) in enumerate(outcomes):
        assert code == 1, f"rank {rank}:\n{err[-3000:]}"
        assert "training diverged at step" in err, f"rank {rank}:\n{err[-3000:]}"
    ends = _ends(run_dir, 2)
    assert ends[0]["status"] == ends[1]["status"] == "diverged"
    assert ends[0]["step"] == ends[1]["step"] < 30  # the same step boundary on both ranks
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "diverged" and result["world_size"] == 2 and result["steps"] == ends[0]["step"]
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # checkpoint_every_steps=50: none was good yet


def test_a_full_run_folder_stops_with_one_message_and_resumes_after_it_grows(shards: Path, tmpfs) -> None:
    # The case: checkpoints of ~100 kB; the third one (beside last.pt and prev.pt) does not fit.
    disk = tmpfs.mount("250k")
    run_dir = disk / "run"
    common = ["train.max_steps=12", "train.eval_every_steps=4", "train.checkpoint_every_steps=2"]

    [(code, err)] = _train(shards, run_dir, 1, common)
    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "unexpected pos" not in err
    message = (
        f"{run_dir / 'checkpoints'}: writing the checkpoint of step 6 (last.pt.tmp) failed: no space left"
    )
    assert message in err, err[-3000:]
    assert (
        "Fix: free space on that file system (or choose a larger one), then run again with resume=auto" in err
    )
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "last.pt.tmp").exists() and not list(run_dir.rglob(".tmp-*"))
    done_before = _checkpoint(run_dir)["step"]  # what was complete stays complete and loadable
    assert done_before == 4

    tmpfs.resize("8m")
    [(code, err)] = _train(shards, run_dir, 1, [*common, "resume=auto"])
    assert code == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 12
    headers = [ln for ln in read_jsonl(run_dir / "timing" / "rank0.jsonl") if ln["type"] == "header"]
    assert headers[-1]["resumed_at_step"] == done_before


def test_a_read_only_run_folder_is_reported_before_any_compute(shards: Path, tmpfs) -> None:
    disk = tmpfs.mount("1m", read_only=True)
    [(code, err)] = _train(shards, disk / "run", 1, ["train.max_steps=2"])
    assert code == 1, err[-3000:]
    assert f"{disk / 'run' / 'timing'}: writing a test file into the run folder (run_dir) failed" in err
    assert "the file system is read-only" in err and "Traceback" not in err
    assert "model" not in err.lower()  # nothing was built before the check
