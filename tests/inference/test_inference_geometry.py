"""Predictions come back on the input's own grid: shape, affine, orientation and header; exactly when they can."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import LPS_AFFINE, ODD_SHAPE, make_checkpoint, oracle_model, save_nifti

from r2d2_hpc.inference.config import PredictConfig
from r2d2_hpc.inference.predictor import predict_image
from r2d2_hpc.inference.runner import run_predict
from r2d2_hpc.inference.sliding import WindowSettings


def test_lps_anisotropic_odd_volume_comes_back_on_its_grid(tmp_path: Path) -> None:
    # Resampling to another spacing, z-score and a crop: every step of the preprocessing must be undone.
    checkpoint = make_checkpoint(
        tmp_path / "ckpt", preprocessing={"target_spacing": [1.0, 1.0, 1.0], "crop_nonzero": True}
    )
    rng = np.random.default_rng(0)
    image = np.zeros(ODD_SHAPE, dtype=np.float32)
    image[1:12, 2:10, 1:6] = rng.normal(100.0, 10.0, (11, 8, 5))
    source = save_nifti(tmp_path / "in" / "ct_lps.nii.gz", image, codes=(1, 2))
    out = tmp_path / "out"

    cfg = PredictConfig(checkpoint=str(checkpoint), input=str(source), out=str(out), save_probabilities=True)
    run = run_predict(cfg, environ={})

    assert run.failures == [] and [p.name for p in run.written] == ["ct_lps.nii.gz"]
    original, mask = nib.load(source), nib.load(out / "ct_lps.nii.gz")
    assert mask.shape == ODD_SHAPE
    assert np.array_equal(mask.affine, original.affine)
    assert nib.aff2axcodes(mask.affine) == ("L", "P", "S")
    assert int(mask.header["qform_code"]) == 1 and int(mask.header["sform_code"]) == 2
    assert np.array_equal(mask.header.get_zooms(), original.header.get_zooms())
    values = np.asarray(mask.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}
    probabilities = nib.load(out / "probabilities" / "ct_lps.nii.gz")
    assert probabilities.shape == (*ODD_SHAPE, 3)
    assert np.array_equal(probabilities.affine, original.affine)
    assert np.allclose(np.asarray(probabilities.dataobj).sum(axis=-1), 1.0, atol=1e-5)
    # The mask is the argmax of the probabilities, voxel for voxel, on the source grid.
    assert np.array_equal(np.asarray(probabilities.dataobj).argmax(axis=-1), values)


@pytest.mark.parametrize(
    ("spatial_dims", "window", "slice_axis", "crop"),
    [(2, [16, 12], 2, False), (2, [8, 8], 0, True), (3, [8, 4, 4], 2, False), (3, [16, 16, 8], 2, True)],
    ids=["2d-z", "2d-x-crop", "3d-small-windows", "3d-window-larger-than-volume-crop"],
)
def test_identity_preprocessing_round_trip_is_exact(
    label_volume: np.ndarray, spatial_dims: int, window: list[int], slice_axis: int, crop: bool
) -> None:
    loaded = oracle_model(3, spatial_dims, window, {"crop_nonzero": crop}, slice_axis)
    image = label_volume[None].astype(np.float32)

    prediction = predict_image(loaded, image, LPS_AFFINE, WindowSettings(batch_size=3, overlap=0.5))

    assert prediction.label.shape == ODD_SHAPE
    assert np.array_equal(prediction.label, label_volume)
    assert prediction.geometry["source_shape"] == list(ODD_SHAPE)


def test_tta_keeps_an_equivariant_prediction_exact(label_volume: np.ndarray) -> None:
    loaded = oracle_model(3, 3, [8, 8, 4])
    image = label_volume[None].astype(np.float32)

    prediction = predict_image(loaded, image, LPS_AFFINE, WindowSettings(batch_size=4, tta=True))

    assert np.array_equal(prediction.label, label_volume)
    # 8 flips of every window: the model saw each batch 8 times.
    assert len(loaded.model.seen) % 8 == 0 and len(loaded.model.seen) >= 8


def test_two_d_slices_are_padded_like_the_training_samples(label_volume: np.ndarray) -> None:
    # Training padded slices to 16 x 12 at the far end; a slice larger than that is padded to the stride.
    loaded = oracle_model(3, 2, [16, 12])
    loaded.info["required_multiple"] = 4
    predict_image(loaded, label_volume[None].astype(np.float32), LPS_AFFINE, WindowSettings(batch_size=5))
    assert loaded.model.seen == [(5, 1, 16, 12), (2, 1, 16, 12)]

    small_window = oracle_model(3, 2, [8, 8])
    small_window.info["required_multiple"] = 4
    predict_image(
        small_window, label_volume[None].astype(np.float32), LPS_AFFINE, WindowSettings(batch_size=7)
    )
    assert small_window.model.seen == [(7, 1, 16, 12)]
