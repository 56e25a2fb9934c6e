"""Atomic writes and a full or read-only disk, on a real small tmpfs (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r2d2_hpc.atomic import atomic_write, check_writable, disk_failure, write_json, write_text
from r2d2_hpc.errors import DiskError
from r2d2_hpc.train import checkpoint as ckpt
from r2d2_hpc.train.timing import TimingLog, read_jsonl


def _state(step: int, numel: int, fill: float = 1.0) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "model": {"w": torch.full((numel,), fill)},
        "optimizer": {},
        "config_hash": "abc",
        "world_size": 1,
    }


def test_the_short_write_of_torch_save_is_a_full_disk(tmpfs) -> None:
    disk = tmpfs.mount("256k")
    with pytest.raises(RuntimeError) as caught, open(disk / "x.pt", "wb") as fh:
        torch.save({"w": torch.zeros(200_000)}, fh)  # 800 kB into 256 kB
    assert "unexpected pos" in str(caught.value)  # the message users saw, with nothing about space
    assert disk_failure(caught.value) == "no space left on the device"
    assert disk_failure(RuntimeError("a shape mismatch")) is None


def test_a_write_into_a_full_disk_names_the_folder_and_keeps_the_old_file(tmpfs) -> None:
    disk = tmpfs.mount("128k")
    target = write_text(disk / "result.json", '{"old": 1}', "the result")
    with pytest.raises(DiskError) as caught:
        write_text(target, "x" * 300_000, "the run's result (result.json)", "run again with resume=auto")
    message = str(caught.value)
    assert message.startswith(f"{disk}: writing the run's result (result.json) failed: no space left")
    assert "it needs about 293 KiB" in message and "KiB free there" in message
    assert "Fix: free space on that file system" in message and "resume=auto" in message
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in disk.iterdir()) == ["result.json"]  # the partial temporary file is gone
    tmpfs.resize("1m")
    write_json(target, {"new": "x" * 300_000}, "the result")
    assert len(json.loads(target.read_text())["new"]) == 300_000


def test_a_failed_block_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = write_text(tmp_path / "a.txt", "complete", "a")
    with pytest.raises(ValueError, match="boom"), atomic_write(target, "a") as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert target.read_text() == "complete" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_read_only_folder_is_reported_before_anything_is_written(tmpfs) -> None:
    disk = tmpfs.mount("1m", read_only=True)
    with pytest.raises(DiskError) as caught:
        check_writable(disk / "run", "the run folder (run_dir)", "run again")
    message = str(caught.value)
    assert "the file system is read-only" in message and f"make {disk / 'run'} writable" in message
    assert "free there" not in message  # space is not the problem


def test_a_checkpoint_that_does_not_fit_keeps_last_and_prev(tmpfs) -> None:
    disk = tmpfs.mount("500k")
    folder = disk / "checkpoints"
    ckpt.save_checkpoint(folder, _state(1, 50_000))  # ~200 kB each
    ckpt.save_checkpoint(folder, _state(2, 50_000, 2.0))
    with pytest.raises(DiskError) as caught:
        ckpt.save_checkpoint(folder, _state(3, 50_000, 3.0))  # last + prev + tmp do not fit
    message = str(caught.value)
    assert f"{folder}: writing the checkpoint of step 3 (last.pt.tmp) failed" in message
    assert "it needs about 195 KiB" in message and f"it continues from {folder / 'last.pt'}" in message
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "prev.pt"]
    state, path = ckpt.load_checkpoint(folder, "abc")
    assert path.name == "last.pt" and state["step"] == 2 and float(state["model"]["w"][0]) == 2.0
    tmpfs.resize("2m")
    ckpt.save_checkpoint(folder, _state(3, 50_000, 3.0))
    assert ckpt.load_checkpoint(folder, "abc")[0]["step"] == 3


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, _state(1, 10))
    with pytest.raises(ckpt.CheckpointError, match="refusing to write a checkpoint of non-finite weights"):
        ckpt.save_checkpoint(tmp_path, _state(2, 10, float("nan")))
    assert ckpt.load_checkpoint(tmp_path, "abc")[0]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_timing_log_on_a_full_disk_keeps_its_complete_lines(tmpfs) -> None:
    disk = tmpfs.mount("64k")
    log = TimingLog(disk / "timing" / "rank0.jsonl", {"run_id": "r"}, append=False)
    with pytest.raises(DiskError, match=r"writing the timing log rank0.jsonl failed: no space left"):
        for step in range(1, 100_000):
            log.step(step, 0, 0.0, 0.1, 0.1, 4, 0.5, 1e-3)
        log.close()
    log.close()  # idempotent, also after a failed write
    tmpfs.resize("8m")
    resumed = TimingLog(disk / "timing" / "rank0.jsonl", {"run_id": "r"}, append=True)
    resumed.step(7, 0, 0.0, 0.1, 0.1, 4, 0.5, 1e-3)
    resumed.close()
    lines = read_jsonl(disk / "timing" / "rank0.jsonl")  # strict: a cut line would raise
    assert lines[0]["type"] == "header" and lines[-1]["step"] == 7 and len(lines) > 100
