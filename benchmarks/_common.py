"""Shared helpers of the training benchmarks: the demo shards, running real training processes, machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def ensure_demo_shards(shards: Path) -> Path:
    """Prepares the MNI tissue demo shards (real data) unless a manifest is already there."""
    if not (shards / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "r2d2_hpc.prepare", "data=mni_tissue", f"data.shards={shards}"]
        subprocess.run(cmd, cwd=REPO, check=True)
    return shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(
    run_dir: Path, world_size: int, overrides: list[str], timeout_s: float = 3600
) -> dict[str, Any]:
    """Runs `python -m r2d2_hpc.train` on `world_size` local ranks (torchrun) and returns its result.json."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world_size}",
        "--master_port",
        str(free_port()),
        "-m",
        "r2d2_hpc.train",
        f"run_dir={run_dir}",
        "resume=never",
        *overrides,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    result["process_wall_s"] = time.monotonic() - t0
    return result


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
