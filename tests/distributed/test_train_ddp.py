"""DDP training for real: several `python -m r2d2_hpc.train` processes on this machine, gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from r2d2_hpc.config import DataConfig, PrepareConfig
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.synthetic import write_phantom_dataset
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
# Small but real: a 3-level U-Net and a 3-stage FCN-8s, 32x32 slices of 2-channel phantoms with 3 classes.
UNET = ["model=unet", "model.depth=2", "model.base_width=4"]
FCN = ["model=fcn", "model.convs_per_stage=[1,1,1]", "model.base_width=4", "model.fc_width=8"]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(shards: Path, run_dir: Path, world: int, overrides: list[str]) -> list[subprocess.Popen]:
    """Starts `world` ranks with the variables torchrun would set."""
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
            "train.deterministic=true",
            "train.timing_warmup_steps=1",
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def _run(shards: Path, run_dir: Path, world: int, overrides: list[str], timeout_s: float = 180) -> None:
    procs = _launch(shards, run_dir, world, overrides)
    outputs = [p.communicate(timeout=timeout_s) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def _end_lines(run_dir: Path, world: int) -> list[dict]:
    return [
        next(ln for ln in reversed(read_jsonl(run_dir / "timing" / f"rank{r}.jsonl")) if ln["type"] == "end")
        for r in range(world)
    ]


@pytest.mark.parametrize("model", [UNET, FCN], ids=["unet", "fcn"])
def test_two_ranks_end_with_identical_weights(shards: Path, tmp_path: Path, model: list[str]) -> None:
    run_dir = tmp_path / "run"
    _run(
        shards, run_dir, 2, [*model, "train.max_steps=4", "train.global_batch=4", "train.eval_every_steps=2"]
    )
    ends = _end_lines(run_dir, 2)
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]
    assert ends[0]["step"] == ends[1]["step"] == 4
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4 and len(result["dice_per_class"]) == 3
    assert result["throughput_samples_per_s"] > 0
    steps = [ln for ln in read_jsonl(run_dir / "timing" / "rank1.jsonl") if ln["type"] == "step"]
    assert [ln["step"] for ln in steps] == [1, 2, 3, 4]
    assert all(ln["samples"] == 4 and ln["data_wait_s"] >= 0 and ln["compute_s"] > 0 for ln in steps)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]


def test_two_ranks_take_the_same_step_as_one_rank_with_twice_the_batch(shards: Path, tmp_path: Path) -> None:
    """Strong scaling changes nothing but who computes what: with the default loss (batch Dice summed over
    ranks) and augmentation on, 2 ranks of 2 samples take the same steps as 1 rank of 4 (instance norm)."""
    common = [
        *UNET,
        "train.max_steps=2",
        "train.global_batch=4",
        "train.eval_every_steps=0",
        "train.lr=0.1",
    ]
    _run(shards, tmp_path / "one", 1, common)
    _run(shards, tmp_path / "two", 2, common)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    moved = 0
    for name, w1 in one.items():
        torch.testing.assert_close(two[name], w1, rtol=1e-5, atol=1e-6, msg=f"parameter {name} differs")
        moved += int(not torch.equal(w1, torch.zeros_like(w1)))
    assert moved > 0


def test_resume_after_sigkill_is_exact(shards: Path, tmp_path: Path) -> None:
    n = 3
    common = [
        *UNET,
        "model.dropout_p=0.2",
        f"train.max_steps={2 * n}",
        "train.global_batch=4",
        f"train.checkpoint_every_steps={n}",
        "train.eval_every_steps=1",
    ]
    _run(shards, tmp_path / "straight", 2, common)

    killed = tmp_path / "killed"
    procs = _launch(shards, killed, 2, common)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.02)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    _run(shards, killed, 2, common)  # resume=auto is the default

    torch_straight, torch_resumed = _weights(tmp_path / "straight"), _weights(killed)
    for name, w in torch_straight.items():
        assert torch.equal(torch_resumed[name], w), f"parameter {name} differs after resume"
    for rank in range(2):
        straight = _losses(tmp_path / "straight", rank)
        resumed = _losses(killed, rank)
        assert resumed == straight, f"rank {rank} loss log differs"
    headers = [ln for ln in read_jsonl(killed / "timing" / "rank0.jsonl") if ln["type"] == "header"]
    assert headers[-1]["resumed_at_step"] == n


def _losses(run_dir: Path, rank: int) -> dict[int, float]:
    """Loss per step; a resumed log may repeat steps done after the last checkpoint: the last one counts."""
    return {
        ln["step"]: ln["loss"]
        for ln in read_jsonl(run_dir / "timing" / f"rank{rank}.jsonl")
        if ln["type"] == "step"
    }


def test_dice_does_not_depend_on_the_number_of_ranks(shards: Path, tmp_path: Path) -> None:
    _run(shards, tmp_path / "trained", 1, [*UNET, "train.max_steps=3", "train.global_batch=4"])
    ckpt = tmp_path / "trained" / "checkpoints" / "last.pt"
    dice = {}
    for world in (1, 2):
        run_dir = tmp_path / f"eval{world}"
        _run(
            shards,
            run_dir,
            world,
            # Evaluating a 1-rank checkpoint on 2 ranks is a world-size change, refused unless allowed.
            [
                *UNET,
                "train.max_steps=3",
                "train.global_batch=4",
                f"resume={ckpt}",
                "train.eval_batch=1",
                "train.allow_world_size_change=true",
            ],
        )
        result = json.loads((run_dir / "result.json").read_text())
        assert result["steps"] == 3
        dice[world] = result["dice_per_class"]
    num_val = json.loads((tmp_path / "eval1" / "timing" / "rank0.jsonl").read_text().splitlines()[0])[
        "val_samples"
    ]
    assert num_val % 2 == 1, "an odd number of validation samples makes the 2-rank split uneven"
    assert dice[1] == dice[2]
    assert all(0.0 <= d <= 1.0 for d in dice[1])


def test_a_dead_rank_makes_the_other_fail_naming_it(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "dead"
    procs = _launch(
        shards,
        run_dir,
        2,
        [
            *UNET,
            "train.max_steps=100000",
            "train.global_batch=4",
            "train.eval_every_steps=0",
            "train.dist_timeout_s=30",
        ],
    )
    deadline = time.monotonic() + 120
    log1 = run_dir / "timing" / "rank1.jsonl"
    while not (log1.exists() and len(read_jsonl(log1)) > 3):
        assert time.monotonic() < deadline, "rank 1 never started stepping"
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].communicate()
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0
    assert time.monotonic() - t0 < 60, "the surviving rank must fail within the process-group timeout"
    assert "rank 1" in err, err[-2000:]


def test_torchrun_with_dataloader_workers(shards: Path, tmp_path: Path) -> None:
    """The documented interface: torchrun starts the ranks; two DataLoader workers per rank."""
    run_dir = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "r2d2_hpc.train",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        *UNET,
        "train.max_steps=3",
        "train.global_batch=4",
        "train.num_workers=2",
        "train.threads_per_rank=1",
    ]
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3 and result["backend"] == "gloo"
    ends = _end_lines(run_dir, 2)
    assert ends[0]["weights_sha256"] == ends[1]["weights_sha256"]
    header = read_jsonl(run_dir / "timing" / "rank1.jsonl")[0]
    assert header["rank"] == 1 and header["world_size"] == 2 and header["scaling"] == "strong"


def test_3d_unet_trains_on_patches_of_a_3d_layout(tmp_path: Path) -> None:
    raw, shards = tmp_path / "raw", tmp_path / "shards3d"
    write_phantom_dataset(raw, num_cases=3, num_channels=1, num_classes=3, shape=(24, 20, 16), seed=2)
    cfg = PrepareConfig(
        data=DataConfig(
            name="msd", root=str(raw), layout="3d", patch_size=[16, 16, 16], val_cases=["phantom_002"]
        ),
        out=str(shards),
        num_workers=0,
        progress=False,
    )
    run_prepare(cfg)
    run_dir = tmp_path / "run3d"
    _run(
        shards,
        run_dir,
        2,
        [
            "model=unet",
            "model.spatial_dims=3",
            "model.depth=2",
            "model.base_width=4",
            "data.patch_size=[16,16,16]",
            "train.max_steps=2",
            "train.global_batch=2",
        ],
    )
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2 and len(result["dice_per_class"]) == 3
    header = read_jsonl(run_dir / "timing" / "rank0.jsonl")[0]
    assert header["spatial_dims"] == 3
    # The validation grid covers the whole 24x20x16 case: 2x2x1 patches of 16^3.
    assert header["val_samples"] == 4
