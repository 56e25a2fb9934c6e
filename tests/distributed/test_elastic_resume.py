"""Elastic resume for real: a 1-rank run resumed on 2 gloo ranks, refused by default, then allowed.

Weak scaling with the linear LR rule: 1 rank x 2 samples is the reference batch (peak = train.lr), 2 ranks make a
global batch of 4 (peak = 2 x train.lr). The resumed steps must train at the new peak, each segment's header must
carry its own world size, and the analysis must count each segment at its own number of ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2d2_hpc.analysis.load import RunRef, load_run
from r2d2_hpc.analysis.runs import rank_seconds, segment_duration_s
from r2d2_hpc.train.dist import free_port
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
LR = 0.01
COMMON = [
    "model=unet",
    "model.depth=2",
    "model.base_width=4",
    "train.scaling=weak",
    "train.batch_per_rank=2",
    "train.lr_scaling=linear",
    "train.lr_reference_batch=2",
    f"train.lr={LR}",
    "train.schedule=constant",
    "train.warmup_steps=0",
    "train.num_workers=0",
    "train.threads_per_rank=1",
    "train.eval_every_steps=0",
    "train.checkpoint_every_steps=0",
    "train.timing_warmup_steps=0",
]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )


def _train(shards: Path, run_dir: Path, world: int, extra: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
        env |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        env |= {"LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env |= {"OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "r2d2_hpc.train", f"data.shards={shards}", f"run_dir={run_dir}"]
        procs.append(
            subprocess.Popen(
                [*cmd, *COMMON, *extra],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_a_world_size_change_is_refused_then_allowed_and_trains_at_the_new_peak(
    shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = _train(shards, run_dir, 1, ["train.max_steps=3"])
    assert first[0].returncode == 0, first[0].stderr[-3000:]

    refused = _train(shards, run_dir, 2, ["train.max_steps=6"])
    assert [p.returncode for p in refused] == [1, 1], [p.stderr[-2000:] for p in refused]
    assert "written by 1 rank(s), this run has 2" in refused[0].stderr, refused[0].stderr[-3000:]
    assert "train.allow_world_size_change=true" in refused[0].stderr

    allowed = _train(shards, run_dir, 2, ["train.max_steps=6", "train.allow_world_size_change=true"])
    assert [p.returncode for p in allowed] == [0, 0], [p.stderr[-3000:] for p in allowed]

    lines = read_jsonl(run_dir / "timing" / "rank0.jsonl")
    headers = [ln for ln in lines if ln["type"] == "header"]
    steps = {ln["step"]: ln for ln in lines if ln["type"] == "step"}
    assert [(h["world_size"], h["resumed_at_step"], h["lr_peak"]) for h in headers] == [
        (1, None, pytest.approx(LR)),
        (2, 3, pytest.approx(2 * LR)),
    ]
    assert headers[1]["resumed_from_world_size"] == 1
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert [steps[s]["lr"] for s in (1, 2, 3)] == pytest.approx([LR] * 3)
    assert [steps[s]["lr"] for s in (4, 5, 6)] == pytest.approx([2 * LR] * 3)  # not the restored LR
    assert [steps[s]["samples"] for s in (3, 4)] == [2, 4]
    rank1 = [ln for ln in read_jsonl(run_dir / "timing" / "rank1.jsonl") if ln["type"] == "header"]
    assert [(h["world_size"], h["resumed_at_step"]) for h in rank1] == [(2, 3)]

    run = load_run(RunRef(run_dir))
    seconds = [segment_duration_s(run, i, h) for i, h in enumerate(run.headers)]
    assert len(seconds) == 2 and min(seconds) > 0
    assert rank_seconds(run, 1) == pytest.approx(seconds[0] * 1 + seconds[1] * 2)
