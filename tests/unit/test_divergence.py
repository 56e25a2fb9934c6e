"""The non-finite guard, the divergence message, a resume with a new peak LR, and a diverged run in study.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r2d2_hpc.config import TrainConfig
from r2d2_hpc.launch.record import Study, StudyRun, run_outcome
from r2d2_hpc.train.divergence import DivergenceReport, NonFiniteGuard, diverged_message

NAN, INF = float("nan"), float("inf")


def test_the_flag_stays_on_the_device_and_grads_count_only_without_a_scaler() -> None:
    guard = NonFiniteGuard(3, check_grads=True)
    flags = [
        guard.flag(torch.tensor(loss), torch.tensor(norm))
        for loss, norm in ((1.0, 2.0), (NAN, 2.0), (1.0, INF), (INF, NAN))
    ]
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.float32 for f in flags)
    assert [float(f) for f in flags] == [0.0, 1.0, 1.0, 1.0]
    with_scaler = NonFiniteGuard(3, check_grads=False)  # fp16: an inf gradient is a normal skipped step
    assert float(with_scaler.flag(torch.tensor(1.0), torch.tensor(INF))) == 0.0
    assert float(with_scaler.flag(torch.tensor(NAN), torch.tensor(1.0))) == 1.0


def test_only_consecutive_bad_steps_count() -> None:
    guard = NonFiniteGuard(3, check_grads=True)
    for step, bad in enumerate([True, True, False, True, True], start=1):
        guard.observe(step, bad, lr=0.1 * step)
        assert not guard.exhausted
    assert guard.streak == 2 and guard.first_bad_step == 4 and guard.first_bad_lr == pytest.approx(0.4)
    assert guard.weights_suspect
    guard.observe(6, True, lr=0.6)
    assert guard.exhausted and guard.first_bad_step == 4


def test_the_message_names_step_lr_rule_batch_and_what_to_try(tmp_path: Path) -> None:
    tc = TrainConfig(lr=0.1, lr_scaling="linear", lr_reference_batch=16, max_steps=1000, grad_clip=None)
    report = DivergenceReport(
        step=42,
        first_bad_step=40,
        num_bad_steps=3,
        lr=3.2,
        lr_peak=3.2,
        global_batch=512,
        last_checkpoint=tmp_path / "checkpoints" / "last.pt",
        last_checkpoint_step=25,
    )
    message = diverged_message(tmp_path, tc, report)
    assert message.startswith(f"{tmp_path}: training diverged at step 42: the loss or gradient norm was NaN")
    assert "3 consecutive step(s) from step 40 at lr 3.2" in message
    assert "train.lr 0.1 with train.lr_scaling=linear for global batch 512, reference batch 16" in message
    assert "warm-up 100 steps" in message  # the linear rule's own warm-up (train.warmup_steps=null)
    assert f"the last good checkpoint {tmp_path / 'checkpoints' / 'last.pt'} (step 25) is kept" in message
    for hint in (
        "lower train.lr (e.g. 0.01)",
        "a longer warm-up (e.g. train.warmup_steps=200)",
        "train.lr_scaling=sqrt",
        "grad_clip",
    ):
        assert hint in message
    assert "resume=auto" in message


class _FailedJob:
    """What submitit hands back for a job whose ranks exited non-zero."""

    state = "FAILED"

    def results(self) -> None:
        raise RuntimeError("Job failed with exit code 1")

    def stderr(self) -> str:
        return "ERROR r2d2_hpc.train: training diverged"


def test_a_run_whose_result_says_diverged_is_diverged_in_study_json(tmp_path: Path) -> None:
    runs = [StudyRun("a", "unet", 1, 1, 0, "runs/a"), StudyRun("b", "unet", 1, 1, 0, "runs/b")]
    study = Study.create(tmp_path, runs, "local", {})
    (tmp_path / "runs" / "a").mkdir(parents=True)
    result = {"status": "diverged", "error": "runs/a: training diverged at step 9: ...", "reason": "r"}
    (tmp_path / "runs" / "a" / "result.json").write_text(json.dumps(result))
    assert run_outcome(study, runs[0], _FailedJob()) == ("DIVERGED", result["error"])
    state, error = run_outcome(study, runs[1], _FailedJob())  # no result.json: an ordinary failure
    assert state == "FAILED" and "exit code 1" in error
