"""study.attach on a local study whose launcher was killed (SIGKILL, ranks included) mid-way: the unfinished run
resumes from its checkpoint and ends with the weights of an uninterrupted run; relaunching says attach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
# Two repeats of one run: repeat 0 runs whole, repeat 1 (seed + 1) is killed after a checkpoint and attached.
STUDY = [
    "model=unet",
    "model.base_width=4",
    "model.depth=2",
    "study.scales=[1]",
    "study.repeats=2",
    "train.max_steps=24",
    "train.global_batch=4",
    "train.eval_every_steps=0",
    "train.checkpoint_every_steps=4",
    "train.num_workers=0",
    "train.timing_warmup_steps=0",
    "train.threads_per_rank=1",
    "train.deterministic=true",
]


@pytest.fixture(scope="module")
def shards(make_phantom_shards) -> Path:
    return make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=4, val_case="phantom_002"
    )


def _launch(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "r2d2_hpc.launch", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.timeout(900)  # four launches and five short runs on a shared 2-core machine
def test_attach_resumes_a_killed_local_study_and_relaunch_says_attach(shards: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    args = [f"data.shards={shards}", f"study.dir={study}", *STUDY]
    proc = _launch(args, start_new_session=True)  # its own process group: the launcher and its ranks
    killed_run = study / "runs" / "unet-w1-r1"
    deadline = time.monotonic() + 400
    while not (killed_run / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the second run never wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.communicate()
    assert not (killed_run / "result.json").exists(), "the run finished before the kill: nothing to resume"
    states = {r["name"]: r["state"] for r in json.loads((study / "study.json").read_text())["runs"]}
    assert states == {"unet-w1-r0": "COMPLETED", "unet-w1-r1": "RUNNING"}

    again = _launch(args)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 1 and f"study.attach={study} continues it" in err, err[-2000:]

    attach = _launch([f"study.attach={study}"])
    out, err = attach.communicate(timeout=600)
    assert attach.returncode == 0, err[-3000:]
    assert "unet-w1-r0: completed before; kept" in out
    (line,) = [line for line in out.splitlines() if line.startswith("unet-w1-r1: ")]
    assert line.endswith("running it again (from its checkpoint)"), out
    record = json.loads((study / "study.json").read_text())
    assert {r["state"] for r in record["runs"]} == {"COMPLETED"}
    headers = [
        json.loads(line)
        for line in (killed_run / "timing" / "rank0.jsonl").read_text().splitlines()
        if '"type": "header"' in line
    ]
    assert len(headers) == 2 and headers[1]["resumed_at_step"] > 0  # it resumed, it did not start over
    for name in ("unet-w1-r0", "unet-w1-r1"):
        assert json.loads((study / "runs" / name / "result.json").read_text())["steps"] == 24
    # The uninterrupted twin of the killed run: repeat 1 trains with seed 0 + 1.
    twin = tmp_path / "twin"
    ref = _launch([f"data.shards={shards}", f"study.dir={twin}", *STUDY, "study.repeats=1", "train.seed=1"])
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    whole, resumed = _weights(twin / "runs" / "unet-w1-r0"), _weights(killed_run)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert (study / "report" / "report.md").is_file()

    # Attaching to the complete study rebuilds the report and runs nothing.
    (study / "report" / "report.md").unlink()
    attach = _launch([f"study.attach={study}"])
    out, err = attach.communicate(timeout=300)
    assert attach.returncode == 0, err[-3000:]
    assert out.count("completed before; kept") == 2 and (study / "report" / "report.md").is_file()
