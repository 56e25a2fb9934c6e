"""predict into a full or read-only folder: one clear message, complete masks stay, a rerun finishes.

The output folder is a real small tmpfs (the tests run as root in CI; elsewhere they are skipped with the reason).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import ODD_SHAPE, make_checkpoint, save_nifti

from r2d2_hpc.errors import DiskError
from r2d2_hpc.inference.config import PredictConfig
from r2d2_hpc.inference.runner import run_predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _images(folder: Path, num_cases: int) -> Path:
    rng = np.random.default_rng(3)
    for i in range(num_cases):
        save_nifti(folder / f"case{i:02d}.nii.gz", rng.normal(50, 10, ODD_SHAPE).astype(np.float32))
    return folder


def test_predict_into_a_full_disk_stops_with_one_message_and_a_rerun_finishes(
    tmp_path: Path, checkpoint: Path, tmpfs
) -> None:
    images = _images(tmp_path / "images", 12)
    out = tmpfs.mount("48k") / "masks"
    cfg = PredictConfig(checkpoint=str(checkpoint), input=str(images), out=str(out), save_probabilities=True)

    with pytest.raises(DiskError) as caught:
        run_predict(cfg, environ={})
    message = str(caught.value)
    assert message.startswith(f"{out}") and "failed: no space left on the device" in message
    assert "writing the r2d2_hpc" in message and "Fix: free space on that file system" in message
    assert "run predict again" in message
    leftovers = [p.name for p in out.rglob(".tmp-*")]
    assert leftovers == []
    written = sorted(out.glob("case*.nii.gz"))
    assert len(written) < 12
    for path in written:  # every mask under its final name is complete
        assert nib.load(path).get_fdata().shape == ODD_SHAPE

    tmpfs.resize("4m")
    run = run_predict(cfg, environ={})
    assert len(run.written) == 12 and run.failures == []
    assert all(nib.load(p).shape == ODD_SHAPE for p in run.written)


def test_an_unwritable_output_folder_is_reported_before_the_model_is_loaded(tmp_path: Path, tmpfs) -> None:
    disk = tmpfs.mount("1m", read_only=True)
    images = _images(tmp_path / "images", 1)
    cfg = PredictConfig(checkpoint=str(tmp_path / "absent.pt"), input=str(images), out=str(disk / "masks"))
    with pytest.raises(DiskError) as caught:  # not the missing checkpoint: nothing was loaded yet
        run_predict(cfg, environ={})
    message = str(caught.value)
    assert message.startswith(f"{disk / 'masks'}: writing a test file into the output folder (out=) failed")
    assert "the file system is read-only" in message and f"make {disk / 'masks'} writable" in message
