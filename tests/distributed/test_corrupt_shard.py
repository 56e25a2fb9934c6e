"""A byte flipped in a shard while `python -m r2d2_hpc.train` runs: a clean stop naming shard and case, or a skip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r2d2_hpc.data.manifest import open_shard, read_manifest
from r2d2_hpc.train.timing import read_jsonl

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
SMALL_UNET = ["model=unet", "model.depth=2", "model.base_width=4"]
STEPS_PER_EPOCH = 11  # 3 training cases x 15 slices, batch 4


@pytest.fixture
def shards(make_phantom_shards, tmp_path: Path) -> Path:
    made = make_phantom_shards(
        num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1, val_case="phantom_003"
    )
    return Path(shutil.copytree(made, tmp_path / "shards"))  # this test damages its copy


def _start(shards: Path, run_dir: Path, max_steps: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "r2d2_hpc.train",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        *SMALL_UNET,
        "train.num_workers=1",
        "train.persistent_workers=true",
        "train.threads_per_rank=1",
        "train.global_batch=4",
        "train.augment=false",
        f"train.max_steps={max_steps}",
        "train.eval_every_steps=0",
        "train.checkpoint_every_steps=0",
        "data.chunk_cache_mib=0",  # every read decodes from the file, so a flip is met at the next read
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _flip_between_epochs(proc: subprocess.Popen, run_dir: Path, shard: Path, case_id: str) -> None:
    """Waits for the first step of epoch 1, pauses the run (and its worker), flips a byte, lets it go on."""
    timing = run_dir / "timing" / "rank0.jsonl"
    deadline = time.monotonic() + 240
    while not (
        timing.is_file() and any(r.get("epoch", 0) >= 1 for r in read_jsonl(timing) if r["type"] == "step")
    ):
        assert proc.poll() is None, f"training ended before epoch 1:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no step of epoch 1 within 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        with open_shard(shard) as f:
            info = f[f"cases/{case_id}/image"].id.get_chunk_info(3)  # slice 3 of the case
        with open(shard, "r+b") as fh:
            fh.seek(info.byte_offset + info.size // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def _train_case(shards: Path) -> tuple[Path, str]:
    manifest = read_manifest(shards)
    case_id = manifest["split"]["train"][0]
    return shards / manifest["cases"][case_id]["shard"], case_id


def test_a_flipped_byte_mid_run_stops_it_naming_shard_and_case(shards: Path, tmp_path: Path) -> None:
    shard, case_id = _train_case(shards)
    proc = _start(shards, tmp_path / "run", 1000 * STEPS_PER_EPOCH, [])
    try:
        _flip_between_epochs(proc, tmp_path / "run", shard, case_id)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    last = next((ln for ln in err.splitlines() if "reading image of case" in ln), "")
    assert f"{shard}: reading image of case '{case_id}' failed" in last and "fletcher32" in last, err[-3000:]
    assert "r2d2_hpc.verify" in last and "force=true" in last
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert not (tmp_path / "run" / "result.json").exists()


def test_with_skip_the_run_completes_and_counts_the_skips(shards: Path, tmp_path: Path) -> None:
    shard, case_id = _train_case(shards)
    epochs = 8
    run_dir = tmp_path / "run"
    proc = _start(shards, run_dir, epochs * STEPS_PER_EPOCH, ["data.on_corrupt_sample=skip"])
    try:
        _flip_between_epochs(proc, run_dir, shard, case_id)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == epochs * STEPS_PER_EPOCH
    # the slice is read once per epoch after the flip: at least the last epoch, at most the 7 after epoch 0
    assert 1 <= result["corrupt_samples_skipped"] <= epochs - 1
    assert f"skipping a corrupt sample (data.on_corrupt_sample=skip): {shard}" in err
    assert f"case '{case_id}'" in err
