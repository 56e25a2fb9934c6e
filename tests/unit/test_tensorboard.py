"""train.tensorboard=true: rank 0's event files hold loss, LR, samples/s, data-wait share and Dice per class, a
resumed run does not double its curves, and without tensorboard installed the run fails at once with the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.train.tensorboard import TensorBoardLog, summary_writer_class

REPO = Path(__file__).resolve().parents[2]


def _train(shards: Path, run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(sys.executable, "-m", "r2d2_hpc.train", f"data.shards={shards}", f"run_dir={run_dir}"),
            *(f"train.max_steps={steps}", "train.eval_every_steps=3", "train.checkpoint_every_steps=3"),
            *("model.depth=2", "model.base_width=4", "train.global_batch=4", "train.num_workers=0"),
            "train.tensorboard=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_event_files_of_a_run_and_of_its_resume(make_phantom_shards, tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (optional)")
    shards = make_phantom_shards(
        num_cases=3, num_channels=1, num_classes=3, shape=(32, 32, 9), seed=4, val_case="phantom_002"
    )
    run_dir = tmp_path / "run"
    done = _train(shards, run_dir, 6)
    assert done.returncode == 0, done.stderr[-3000:]
    scalars = _scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_share"):
        assert [step for step, _ in scalars[tag]] == list(range(1, 7)), tag
    assert all(0 <= share <= 1 for _, share in scalars["train/data_wait_share"])
    assert scalars["train/lr"][0][1] > 0
    dice_tags = sorted(t for t in scalars if t.startswith("val/dice/"))
    assert len(dice_tags) == 3  # one per class, named after the dataset's classes
    assert [step for step, _ in scalars["val/mean_foreground_dice"]] == [3, 6]

    # Resume from step 6 to 9: the curves continue, no step appears twice.
    done = _train(shards, run_dir, 9)
    assert done.returncode == 0, done.stderr[-3000:]
    scalars = _scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 10))
    assert [step for step, _ in scalars["val/mean_foreground_dice"]] == [3, 6, 9]


def test_missing_tensorboard_is_a_config_error_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import of it now raises ImportError
    with pytest.raises(ConfigError) as err:
        summary_writer_class()
    assert "train.tensorboard=true" in str(err.value) and "pip install tensorboard" in str(err.value)
    with pytest.raises(ConfigError):
        TensorBoardLog(Path("unused"), enabled=True, is_main=False)  # every rank checks, not only rank 0
    off = TensorBoardLog(Path("unused"), enabled=False, is_main=True)
    off.step(1, 0.5, 0.01, 4, 0.1, 1.0)  # off: nothing imported, nothing written
    off.close()
    assert not Path("unused").exists()
