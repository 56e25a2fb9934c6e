"""Metrics against values computed by hand, an independent brute force, and MONAI's own metric functions."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import save_nifti
from scipy import ndimage

from r2d2_hpc.errors import DataError
from r2d2_hpc.inference.config import EvaluateConfig
from r2d2_hpc.inference.evaluation import run_evaluate
from r2d2_hpc.inference.metrics import (
    CASE_COLUMNS,
    case_metrics,
    format_table,
    read_case_csv,
    summarise,
    surface_metrics,
    write_csv,
)

SPACING = (2.0, 1.0, 0.5)  # mm along array axes 0, 1, 2


def _cube(
    start: tuple[int, int, int], edge: int = 4, shape: tuple[int, int, int] = (10, 10, 10)
) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + edge) for s in start)] = True
    return mask


def test_cubes_offset_along_the_coarse_axis() -> None:
    # Two 4^3 cubes, the prediction 2 voxels (4 mm) further along axis 0. Of the 56 surface voxels of either cube
    # (64 minus the 2^3 interior), 24 lie on the other surface (0 mm), 4 face centres are 0.5 mm (one z voxel)
    # from it, 12 rim voxels one x voxel away (2 mm) and the 16 voxels of the far face two x voxels (4 mm).
    ref, pred = _cube((2, 2, 2)), _cube((4, 2, 2))

    (row,) = case_metrics("c", pred.astype(np.uint8), ref.astype(np.uint8), SPACING, [(1, "cube")], 1.0)

    assert row["dice"] == pytest.approx(0.5)  # 32 shared voxels of 64 + 64
    assert row["iou"] == pytest.approx(1 / 3)
    assert row["hd95_mm"] == pytest.approx(4.0)  # the 95th percentile falls among the 16 far-face voxels
    assert row["assd_mm"] == pytest.approx((4 * 0.5 + 12 * 2.0 + 16 * 4.0) / 56)
    assert row["surface_dice"] == pytest.approx(28 / 56)  # 24 at 0 mm and 4 at 0.5 mm are within 1 mm
    assert (row["tp"], row["fp"], row["fn"]) == (32, 32, 32)
    assert row["ref_volume_ml"] == pytest.approx(64 * 1.0 / 1000)
    assert surface_metrics(pred, ref, SPACING, 2.0)["surface_dice"] == pytest.approx(40 / 56)


def test_cubes_offset_along_the_fine_axis() -> None:
    # The same shift along axis 2 (0.5 mm voxels): distances 0 (24), 0.5 (4 + 12) and 1.0 mm (16).
    ref, pred = _cube((2, 2, 2)), _cube((2, 2, 4))
    values = surface_metrics(pred, ref, SPACING, 1.0)
    assert values["hd95_mm"] == pytest.approx(1.0)
    assert values["assd_mm"] == pytest.approx((16 * 0.5 + 16 * 1.0) / 56)
    assert values["surface_dice"] == pytest.approx(1.0)


def _brute_force(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float
) -> dict[str, float]:
    """Surface = mask voxels with a 6-neighbour outside the mask (or outside the array); all-pairs distances."""

    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    a, b = surface(pred), surface(ref)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    both = np.concatenate([a_to_b, b_to_a])
    return {
        "hd95_mm": max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)),
        "assd_mm": both.mean(),
        "surface_dice": np.mean(both <= tol),
    }


def _blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = ndimage.binary_opening(rng.random((14, 12, 9)) < 0.55, iterations=1)
    pred = ref.copy()
    pred[rng.random(ref.shape) < 0.08] ^= True
    pred = np.roll(pred, 1, axis=1)
    return pred, ref


@pytest.mark.parametrize("seed", [0, 1])
def test_irregular_shapes_match_a_brute_force_computation(seed: int) -> None:
    pred, ref = _blobs(seed)
    spacing = (0.7, 1.3, 2.1)
    got = surface_metrics(pred, ref, spacing, 1.5)
    expected = _brute_force(pred, ref, spacing, 1.5)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def test_the_metrics_equal_monai_metric_functions() -> None:
    from monai.metrics import (
        compute_average_surface_distance,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    pred, ref = _blobs(3)
    spacing = [0.7, 1.3, 2.1]
    p, r = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float()
    got = surface_metrics(pred, ref, spacing, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of MONAI's internals
        hd95 = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(
            p, r, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = compute_surface_dice(p, r, [1.5], include_background=True, spacing=spacing)
    assert got["hd95_mm"] == pytest.approx(float(hd95), rel=1e-5)
    assert got["assd_mm"] == pytest.approx(float(assd), rel=1e-5)
    assert got["surface_dice"] == pytest.approx(float(nsd), rel=1e-6)


def test_empty_masks_follow_the_documented_convention() -> None:
    empty, cube = np.zeros((6, 6, 6), np.uint8), _cube((1, 1, 1), 3, (6, 6, 6)).astype(np.uint8)
    (both,) = case_metrics("b", empty, empty, SPACING, [(1, "x")], 1.0)
    assert all(math.isnan(both[k]) for k in ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice"))
    for pred, ref in ((cube, empty), (empty, cube)):
        (one,) = case_metrics("o", pred, ref, SPACING, [(1, "x")], 1.0)
        assert (one["dice"], one["iou"], one["surface_dice"]) == (0.0, 0.0, 0.0)
        assert one["hd95_mm"] == math.inf and one["assd_mm"] == math.inf


def test_summary_leaves_nan_and_inf_out_and_pools_the_counts() -> None:
    def row(case: str, dice: float, hd: float, tp: int, fp: int, fn: int) -> dict:
        return {
            "case_id": case,
            "class_value": 1,
            "class_name": "x",
            "dice": dice,
            "iou": dice,
            "hd95_mm": hd,
            "assd_mm": hd,
            "surface_dice": dice,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    rows = [
        row("a", 0.5, 2.0, 2, 2, 2),
        row("b", 1.0, 4.0, 10, 0, 0),
        row("c", 0.0, math.inf, 0, 5, 0),
        row("d", math.nan, math.nan, 0, 0, 0),
    ]
    summary = {r["metric"]: r for r in summarise(rows)}
    assert summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["dice"]["median"] == pytest.approx(0.5)
    assert summary["dice"]["std"] == pytest.approx(0.5)  # sample std of 0.5, 1.0, 0.0
    assert (summary["dice"]["num_finite"], summary["dice"]["num_nan"]) == (3, 1)
    assert summary["dice"]["pooled"] == pytest.approx(2 * 12 / (2 * 12 + 7 + 2))
    assert summary["hd95_mm"]["mean"] == pytest.approx(3.0) and summary["hd95_mm"]["num_inf"] == 1
    assert math.isnan(summary["hd95_mm"]["pooled"])
    table = format_table(summarise(rows), 4, 1.0)
    assert "0.5000 ± 0.5000" in table and "0.7273" in table and "1/1" in table


def test_csv_round_trip_keeps_nan_inf_and_integers(tmp_path: Path) -> None:
    rows = case_metrics(
        "z", np.zeros((3, 3, 3), np.uint8), np.ones((3, 3, 3), np.uint8), SPACING, [(1, "x")], 1.0
    )
    back = read_case_csv(write_csv(tmp_path / "m.csv", rows, CASE_COLUMNS))
    assert back[0]["hd95_mm"] == math.inf and back[0]["fn"] == 27 and isinstance(back[0]["fn"], int)
    assert back[0]["dice"] == 0.0 and back[0]["case_id"] == "z"


def test_evaluate_folders_and_its_errors(tmp_path: Path) -> None:
    ref, pred = _cube((2, 2, 2)).astype(np.uint8), _cube((4, 2, 2)).astype(np.uint8) * 2
    affine = np.diag([*SPACING, 1.0])
    for case in ("a", "b"):
        save_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, affine)
        save_nifti(tmp_path / "ref" / f"{case}.nii.gz", ref * 4, affine)  # source values: 4 -> class 2

    cfg = EvaluateConfig(
        pred=str(tmp_path / "pred"),
        ref=str(tmp_path / "ref"),
        out=str(tmp_path / "m.csv"),
        class_names=["bg", "one", "two"],
        label_map={4: 2},
    )
    run = run_evaluate(cfg)

    assert [(r["case_id"], r["class_value"]) for r in run.rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    two = [r for r in run.rows if r["class_value"] == 2]
    assert all(r["dice"] == pytest.approx(0.5) and r["hd95_mm"] == pytest.approx(4.0) for r in two)
    assert all(math.isnan(r["dice"]) for r in run.rows if r["class_value"] == 1)
    assert run.summary_csv == tmp_path / "m_summary.csv" and run.summary_csv.is_file()

    save_nifti(tmp_path / "pred" / "c.nii.gz", pred, affine)
    with pytest.raises(DataError, match=r"no reference label for case\(s\) c"):
        run_evaluate(cfg)
    save_nifti(tmp_path / "ref" / "c.nii.gz", ref, np.diag([1.0, 1.0, 1.0, 1.0]))
    run = run_evaluate(cfg)
    assert [f["case_id"] for f in run.failures] == ["c"] and "affine differs" in run.failures[0]["error"]
