"""End to end on the real demo data: prepare MNI slabs, train briefly, predict the held-out slabs, evaluate.

The held-out (validation) slabs are written as NIfTI files, predicted by the CLI from a checkpoint that was moved
away from its run (the shards are deleted first), and the Dice pooled over their voxels must equal the training's
own validation Dice: the same checkpoint on the same voxels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from r2d2_hpc.config import DataConfig, PrepareConfig
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.sources import build_source
from r2d2_hpc.inference.metrics import read_case_csv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Thin slabs keep it quick: 7 slabs of 8 slices, slabs 1 and 4 held out.
DATA = DataConfig(name="mni_tissue", slab_thickness=8, slab_gap=16, val_every=3)


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e")
    shards, run_dir = base / "shards", base / "run"
    run_prepare(PrepareConfig(data=DATA, out=str(shards), num_workers=0, progress=False))
    done = _run(
        "r2d2_hpc.train",
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        "train.max_steps=4",
        "model.depth=2",
        "model.base_width=8",
        "train.global_batch=4",
        "train.num_workers=0",
        "train.threads_per_rank=1",
        "train.eval_every_steps=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    source = build_source(DATA)
    (base / "images").mkdir()
    (base / "labels").mkdir()
    for ref in source.cases():
        if ref.split == "val":
            raw = source.load(ref)
            nib.save(nib.Nifti1Image(raw.image[0], raw.affine), base / "images" / f"{ref.case_id}.nii.gz")
            nib.save(
                nib.Nifti1Image(raw.label.astype(np.uint8), raw.affine),
                base / "labels" / f"{ref.case_id}.nii.gz",
            )
    # Another machine: only the checkpoint file travels, the shards and the run folder are gone.
    moved = base / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", moved)
    result = run_dir / "result.json"
    shutil.copy(result, base / "result.json")
    shutil.rmtree(shards)
    shutil.rmtree(run_dir)
    return {"base": base, "checkpoint": moved, "result": base / "result.json"}


def test_predict_and_evaluate_reproduce_the_validation_dice(trained: dict[str, Path]) -> None:
    base = trained["base"]
    out = base / "pred"
    done = _run(
        "r2d2_hpc.predict",
        f"checkpoint={trained['checkpoint']}",
        f"input={base / 'images'}",
        f"out={out}",
        f"labels={base / 'labels'}",
        "threads=1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "part 0 of 1: wrote 2 mask(s)" in done.stdout and "dice_pooled" in done.stdout

    for case in ("mni_slab01", "mni_slab04"):
        image, mask = nib.load(base / "images" / f"{case}.nii.gz"), nib.load(out / f"{case}.nii.gz")
        assert mask.shape == image.shape and np.array_equal(mask.affine, image.affine)
    validation = json.loads(trained["result"].read_text())["dice_per_class"]
    summary = {}
    with open(out / "metrics_summary.csv") as fh:
        header = fh.readline().strip().split(",")
        for line in fh:
            row = dict(zip(header, line.strip().split(","), strict=True))
            if row["metric"] == "dice":
                summary[int(row["class_value"])] = float(row["pooled"])
    assert sorted(summary) == [1, 2, 3]
    for value, dice in summary.items():
        assert dice == pytest.approx(validation[value], abs=1e-12), (value, dice, validation)

    evaluated = _run("r2d2_hpc.evaluate", f"pred={out}", f"ref={base / 'labels'}", f"out={base / 'eval.csv'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert read_case_csv(base / "eval.csv") == read_case_csv(out / "metrics.csv")
    assert (base / "eval_summary.csv").read_text() == (out / "metrics_summary.csv").read_text()
    print(done.stdout)


def test_cli_names_a_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "last.pt"
    done = _run("r2d2_hpc.predict", f"checkpoint={missing}", f"input={tmp_path}", f"out={tmp_path / 'o'}")
    assert done.returncode == 1
    assert str(missing) in done.stderr and "does not exist" in done.stderr
