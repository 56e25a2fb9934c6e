"""All ranks resume from one checkpoint: two real gloo processes, one of them with an injected read failure.

The file is also the worker script: ``python test_resume_agreement.py <rank> <port> <ckpt_dir> <out> <fail>``.
``fail=1`` makes rank 1's reads of ``last.pt`` fail with EIO (what a transient shared-file-system error looks
like to Python), as if only that node's mount hiccuped.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.distributed
HASH = "0123456789abcdef"


def _worker(rank: int, port: int, ckpt_dir: Path, out: Path, fail: bool) -> None:
    from r2d2_hpc.errors import R2D2Error
    from r2d2_hpc.train.dist import destroy_process_group, dist_env_from_environ, init_process_group
    from r2d2_hpc.train.resume import load_agreed_checkpoint

    if fail and rank == 1:
        real_open = builtins.open

        def flaky_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if str(file).endswith("last.pt"):
                raise OSError(errno.EIO, "Input/output error", str(file))
            return real_open(file, *args, **kwargs)

        builtins.open = flaky_open
    environ = {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env = dist_env_from_environ(environ, backend="gloo")
    group = init_process_group(env, 30.0)
    try:
        state, path = load_agreed_checkpoint(ckpt_dir, HASH, env, group)
        result = {"step": state["step"], "path": Path(path).name, "weight": state["model"]["w"].tolist()}
    except R2D2Error as exc:
        result = {"error": str(exc)}
    finally:
        destroy_process_group()
    out.joinpath(f"rank{rank}.json").write_text(json.dumps(result))


def _checkpoints(directory: Path) -> None:
    from r2d2_hpc.train.checkpoint import save_checkpoint

    for step in (2, 4):  # prev.pt holds step 2, last.pt step 4
        state = {"step": step, "epoch": 0, "model": {"w": torch.full((2,), float(step))}, "optimizer": {}}
        save_checkpoint(directory, {**state, "config_hash": HASH, "world_size": 2})


def _run(tmp_path: Path, fail: bool) -> dict[int, dict[str, Any]]:
    from r2d2_hpc.train.dist import free_port

    ckpt_dir, out = tmp_path / "checkpoints", tmp_path / "out"
    out.mkdir()
    _checkpoints(ckpt_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(ckpt_dir), str(out), str(int(fail))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)}


def test_every_rank_resumes_from_rank_zeros_choice(tmp_path: Path) -> None:
    results = _run(tmp_path, fail=False)
    assert results[0] == results[1] == {"step": 4, "path": "last.pt", "weight": [4.0, 4.0]}


def test_a_read_failure_on_one_rank_fails_every_rank_instead_of_resuming_it_at_another_step(
    tmp_path: Path,
) -> None:
    """Before: rank 1 fell back to prev.pt (step 2) while rank 0 resumed at step 4."""
    results = _run(tmp_path, fail=True)
    for rank in (0, 1):
        message = results[rank].get("error", "")
        assert "rank 0 chose this checkpoint (step 4)" in message, results
        assert "rank 1 on " in message and "Input/output error" in message, results
        assert "the same directory on every node" in message, results
        assert "step" not in results[rank]  # nobody trains on


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1")
