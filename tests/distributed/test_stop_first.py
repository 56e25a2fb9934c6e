"""A stop request (SIGUSR1 before the time limit) is honoured before a due evaluation and checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r2d2_hpc.config import DataConfig, RunConfig, TrainConfig
from r2d2_hpc.train.dist import dist_env_from_environ
from r2d2_hpc.train.loop import StopFlag, train
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )


def test_a_stop_at_a_step_with_evaluation_and_checkpoint_due_checkpoints_once_and_leaves(
    shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    tc = TrainConfig(
        max_steps=6,
        global_batch=2,
        num_workers=0,
        threads_per_rank=1,
        eval_every_steps=1,  # due after every step
        checkpoint_every_steps=1,  # due after every step
        stop_check_every_steps=1,  # ranks agree on the flag after every step
        timing_warmup_steps=0,
    )
    cfg = RunConfig(
        data=DataConfig(shards=str(shards)),
        model={"name": "unet", "spatial_dims": 2, "depth": 2, "base_width": 4},
        train=tc,
        run_dir=str(run_dir),
    )
    stop = StopFlag()
    stop.set()  # the signal arrived during the first step
    result = train(cfg, dist_env_from_environ({}, backend="gloo"), stop)
    assert (result["status"], result["steps"]) == ("preempted", 1)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["last.pt"]  # saved once: a second save would have kept the first as prev.pt
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 1
    assert not (run_dir / "metrics.jsonl").exists()  # the due evaluation did not run
    lines = read_jsonl(run_dir / "timing" / "rank0.jsonl")
    assert [ln["type"] for ln in lines if ln["type"] not in ("header", "loader")] == ["step", "end"], lines
    assert json.loads((run_dir / "result.json").read_text())["status"] == "preempted"
