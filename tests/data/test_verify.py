"""``verify`` and ``python -m r2d2_hpc.verify``: a sound set passes, every problem of a damaged set is listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r2d2_hpc.config import ShardConfig
from r2d2_hpc.data.manifest import open_shard, write_manifest
from r2d2_hpc.data.shards import ShardWriter
from r2d2_hpc.data.types import MANIFEST_FORMAT, MANIFEST_VERSION, PreparedCase
from r2d2_hpc.verify import verify

CLASSES = ["background", "a", "b"]


def _case(case_id: str, seed: int) -> PreparedCase:
    rng = np.random.default_rng(seed)
    return PreparedCase(
        case_id=case_id,
        image=rng.standard_normal((2, 10, 9, 6)).astype(np.float32),
        label=rng.integers(0, 3, size=(10, 9, 6)).astype(np.uint8),
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        geometry={},
        normalisation=[],
    )


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    """Three cases, one per shard (compression none, so a flipped byte hits raw data), with a manifest."""
    out = tmp_path / "shards"
    with ShardWriter(
        out,
        "shard",
        ShardConfig(compression="none", target_shard_mib=1e-6),
        {"kind": "2d", "slice_axis": 2},
        len(CLASSES),
    ) as writer:
        cases = {cid: writer.add(_case(cid, i)) for i, cid in enumerate(["c0", "c1", "c2"])}
        shards = writer.close()
    for cid, entry in cases.items():
        entry.update(split="val" if cid == "c2" else "train", source_files={}, source_sha256="0" * 64)
    write_manifest(
        out,
        {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "dataset": "unit",
            "created": "2025-01-01",
            "r2d2_version": "0.1.0",
            "classes": CLASSES,
            "channels": ["t1", "t2"],
            "modality": "MRI",
            "layout": {"kind": "2d", "slice_axis": 2},
            "preprocessing": {"settings_hash": "x"},
            "storage": {"compression": "none", "image_dtype": "float32"},
            "split": {"train": ["c0", "c1"], "val": ["c2"]},
            "shards": shards,
            "cases": cases,
        },
    )
    return out


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "r2d2_hpc.verify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _flip_image_byte(path: Path, case_id: str) -> None:
    with open_shard(path, "r") as f:
        info = f[f"cases/{case_id}/image"].id.get_chunk_info(2)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        value = fh.read(1)[0]
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([value ^ 0x10]))


def test_sound_set_passes(shard_set: Path) -> None:
    assert verify(shard_set) == []
    result = _cli(shard_set)
    assert result.returncode == 0, result.stdout + result.stderr
    total = sum(p.stat().st_size for p in shard_set.glob("*.h5"))
    assert f"OK: 3 case(s) in 3 shard(s), {total / 2**20:.1f} MiB verified (sha256 checked)" in result.stdout
    assert "problem" not in result.stdout


def test_flipped_byte_is_listed_and_fails_the_cli(shard_set: Path) -> None:
    _flip_image_byte(shard_set / "shard-0001.h5", "c1")
    problems = verify(shard_set)
    assert len(problems) == 2
    assert "shard-0001.h5: sha256 differs" in problems[0]
    assert "shard-0001.h5: case 'c1': image unreadable" in problems[1] and "fletcher32" in problems[1]
    assert verify(shard_set, check_sha256=False) == problems[1:]
    result = _cli(shard_set, "--no-sha256")
    assert result.returncode == 1
    assert "1 problem(s)" in result.stdout and "case 'c1'" in result.stdout and "force=true" in result.stdout


def test_every_problem_is_listed_at_once(shard_set: Path) -> None:
    (shard_set / "shard-0000.h5").unlink()
    with open_shard(shard_set / "shard-0001.h5", "r+") as f:
        f["cases/c1/label"][0, 0, 0] = 7  # a label value beyond the classes
        f.create_group("cases/stowaway")
    with open_shard(shard_set / "shard-0002.h5", "r+") as f:
        f.attrs["format_version"] = 5
        f["cases/c2/image"][0, 1, 1, 1] = np.nan
    manifest_path = shard_set / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cases"]["c2"]["voxels_per_class"] = [1, 2, 3]
    manifest["shards"][2]["cases"].append("c1")  # c1 listed twice
    manifest_path.write_text(json.dumps(manifest))

    problems = verify(shard_set)
    text = "\n".join(problems)
    expected = [
        "case 'c1' is listed 2 times in the shards",
        "shard-0000.h5: shard file is missing (it holds 1 case(s): c0)",
        "shard-0001.h5: sha256 differs",
        "shard-0001.h5: case group(s) not in the manifest: stowaway",
        "shard-0001.h5: case 'c1': label values [7] outside the 3 classes",
        "shard-0002.h5: format 'r2d2-shard' version 5; expected 'r2d2-shard' 1",
        "shard-0002.h5: case 'c2': image holds 1 NaN or infinite value(s)",
        "shard-0002.h5: case 'c2': voxels per class",
        "shard-0002.h5: case 'c1' has no group /cases/c1",
    ]
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    result = _cli(shard_set)
    assert result.returncode == 1
    assert f"{len(problems)} problem(s)" in result.stdout
    assert result.stdout.count("\n- ") == len(problems)


def test_padding_label_and_bad_foreground_are_named(shard_set: Path) -> None:
    with open_shard(shard_set / "shard-0000.h5", "r+") as f:
        f["cases/c0/label"][1, 1, 1] = 255
        rows = f["cases/c0/fg_locations"]
        rows[0, 0] = 3 - rows[0, 0]  # class 1 <-> 2: now points at a voxel of the other class
    problems = verify(shard_set, check_sha256=False)
    assert len(problems) == 2, problems
    assert "case 'c0': label values 255 (padding marker) outside the 3 classes" in problems[0]
    assert "case 'c0': fg_locations points at voxels of another class" in problems[1]


def test_missing_or_unknown_manifest(tmp_path: Path, shard_set: Path) -> None:
    assert len(problems := verify(tmp_path / "empty")) == 1 and "the data is not prepared" in problems[0]
    manifest_path = shard_set / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"format_version": 1', '"format_version": 2'))
    result = _cli(shard_set)
    assert (
        result.returncode == 1 and "format_version 2" in result.stdout and "upgrade r2d2_hpc" in result.stdout
    )
