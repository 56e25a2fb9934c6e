"""Clinical segmentation metrics per case and class, in millimetres, and their summary over cases.

Per case and foreground class (background is not scored): Dice, IoU, the 95th-percentile Hausdorff distance
(``hd95_mm``), the average symmetric surface distance (``assd_mm``) and the surface Dice at a tolerance
(``surface_dice``, Nikolov et al. 2021), plus the confusion counts and both volumes in ml.

**Library.** Surface distances come from MONAI (``monai.metrics.utils.get_edge_surface_distance``, tested
with MONAI 1.6.1): the surface of a mask is its voxels with a 6-connected neighbour outside it (scipy's binary
erosion, so voxels on the array border are surface too), and each surface voxel's distance to the other surface
is the Euclidean distance between voxel centres scaled by the spacing (a KD-tree, exact). From the two directed
distance sets ``d(pred->ref)`` and ``d(ref->pred)`` the metrics follow MONAI's own definitions, so they equal
``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)`` and
``compute_surface_dice(use_subvoxels=False)`` (a test checks this) while the distances are computed once:

- ``hd95_mm`` = max(95th percentile of d(pred->ref), 95th percentile of d(ref->pred)), linear interpolation;
- ``assd_mm`` = mean of both sets together, (sum d(pred->ref) + sum d(ref->pred)) / (n_pred + n_ref);
- ``surface_dice`` = share of both surfaces' voxels within ``tolerance_mm`` of the other surface.

**Empty masks** (MONAI itself mixes NaN and inf there, so they are decided here, before MONAI is called):

- class absent from both prediction and reference: every metric is NaN ("undefined"), as for the training's
  validation Dice, and the summary leaves it out (``num_nan`` counts it);
- class in exactly one of them: Dice 0, IoU 0, surface Dice 0, ``hd95_mm`` and ``assd_mm`` +inf (no surface to
  measure to); the summary's mean, median and std leave inf out and ``num_inf`` counts it.

The summary gives, per class and metric, mean, median and sample std (ddof 1) over the cases where the metric is
finite, and for Dice and IoU also the **pooled** value over all cases' voxels together (2 sum tp / (2 sum tp +
sum fp + sum fn)), which is what the training's validation Dice reports.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r2d2_hpc.atomic import atomic_write
from r2d2_hpc.errors import R2D2Error

METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "surface_dice")
CASE_COLUMNS = (
    "case_id",
    "class_value",
    "class_name",
    *METRICS,
    "surface_tolerance_mm",
    "tp",
    "fp",
    "fn",
    "ref_volume_ml",
    "pred_volume_ml",
)
SUMMARY_COLUMNS = (
    "class_value",
    "class_name",
    "metric",
    "mean",
    "median",
    "std",
    "pooled",
    "num_finite",
    "num_nan",
    "num_inf",
)
_INT_COLUMNS = ("class_value", "tp", "fp", "fn")
_TEXT_COLUMNS = ("case_id", "class_name")


def overlap_metrics(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice and IoU from confusion counts; NaN for both when the class is in neither mask."""
    union = tp + fp + fn
    if union == 0:
        return {"dice": math.nan, "iou": math.nan}
    return {"dice": 2.0 * tp / (2.0 * tp + fp + fn), "iou": tp / union}


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's directed surface distances ``(d(pred->ref), d(ref->pred))`` in mm of two non-empty bool masks."""
    try:
        import torch
        from monai.metrics.utils import get_edge_surface_distance
    except ImportError as exc:  # pragma: no cover - MONAI is the [metrics] extra
        raise R2D2Error(
            "surface metrics need MONAI; expected it installed next to torch. "
            "Fix: pip install 'r2d2_hpc[metrics]' (the MONAI extra; pip keeps the torch that is installed)"
        ) from exc
    with warnings.catch_warnings():
        # MONAI's notes on its internals' deprecations; empty masks never get here (handled by the caller).
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred, dtype=bool)),
            torch.from_numpy(np.ascontiguousarray(ref, dtype=bool)),
            distance_metric="euclidean",
            spacing=[float(s) for s in spacing_mm],
            symmetric=True,
        )
    pred_to_ref, ref_to_pred = distances
    return pred_to_ref.double().cpu().numpy(), ref_to_pred.double().cpu().numpy()


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """``hd95_mm``, ``assd_mm`` and ``surface_dice`` of two bool masks (empty masks: see the module docstring)."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"hd95_mm": math.nan, "assd_mm": math.nan, "surface_dice": math.nan}
    if has_pred != has_ref:
        return {"hd95_mm": math.inf, "assd_mm": math.inf, "surface_dice": 0.0}
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing_mm)
    both = np.concatenate([pred_to_ref, ref_to_pred])
    hd95 = max(float(np.percentile(pred_to_ref, 95)), float(np.percentile(ref_to_pred, 95)))
    return {
        "hd95_mm": hd95,
        "assd_mm": float(both.mean()),
        "surface_dice": float(np.count_nonzero(both <= tolerance_mm)) / both.size,
    }


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the norms of the affine's columns)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def case_metrics(
    case_id: str,
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float],
    classes: Iterable[tuple[int, str]],
    tolerance_mm: float,
) -> list[dict[str, Any]]:
    """One row (``CASE_COLUMNS``) per class of ``classes`` (``(value, name)``) of one case on one voxel grid."""
    if pred.shape != ref.shape:
        raise R2D2Error(
            f"case {case_id!r}: prediction {pred.shape} and reference {ref.shape} differ in shape"
        )
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    rows = []
    for value, name in classes:
        pred_mask, ref_mask = pred == value, ref == value
        tp = int(np.count_nonzero(pred_mask & ref_mask))
        num_pred, num_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
        row: dict[str, Any] = {"case_id": case_id, "class_value": int(value), "class_name": str(name)}
        row.update(overlap_metrics(tp, num_pred - tp, num_ref - tp))
        row.update(surface_metrics(pred_mask, ref_mask, spacing_mm, tolerance_mm))
        row.update(
            surface_tolerance_mm=float(tolerance_mm),
            tp=tp,
            fp=num_pred - tp,
            fn=num_ref - tp,
            ref_volume_ml=num_ref * voxel_ml,
            pred_volume_ml=num_pred * voxel_ml,
        )
        rows.append(row)
    return rows


def foreground_classes(
    class_names: Sequence[str] | None, pred: np.ndarray, ref: np.ndarray
) -> list[tuple[int, str]]:
    """``(value, name)`` of classes 1..K-1; without names, every non-zero value present in either mask."""
    if class_names:
        return [(v, str(n)) for v, n in enumerate(class_names) if v > 0]
    values = np.union1d(np.unique(pred), np.unique(ref))
    return [(int(v), str(int(v))) for v in values if v != 0]


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row (``SUMMARY_COLUMNS``) per class and metric over the cases of ``rows``."""
    by_class: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(int(row["class_value"]), []).append(row)
    summary = []
    for value in sorted(by_class):
        class_rows = by_class[value]
        tp, fp, fn = (sum(int(r[k]) for r in class_rows) for k in ("tp", "fp", "fn"))
        pooled = overlap_metrics(tp, fp, fn)
        for metric in METRICS:
            values = np.array([float(r[metric]) for r in class_rows], dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary.append(
                {
                    "class_value": value,
                    "class_name": class_rows[0]["class_name"],
                    "metric": metric,
                    "mean": float(finite.mean()) if finite.size else math.nan,
                    "median": float(np.median(finite)) if finite.size else math.nan,
                    "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
                    "pooled": pooled.get(metric, math.nan),
                    "num_finite": int(finite.size),
                    "num_nan": int(np.count_nonzero(np.isnan(values))),
                    "num_inf": int(np.count_nonzero(np.isinf(values))),
                }
            )
    return summary


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Writes ``rows`` atomically; floats in full precision (``repr``), NaN as ``nan`` and inf as ``inf``."""
    path = Path(path)
    with (
        atomic_write(path, f"the metrics table {path.name}", "run predict again") as tmp,
        open(tmp, "w", newline="") as fh,
    ):
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_case_csv(path: Path) -> list[dict[str, Any]]:
    """Reads a per-case CSV written by :func:`write_csv` back into typed rows."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if key in _TEXT_COLUMNS:
                    row[key] = text
                elif key in _INT_COLUMNS:
                    row[key] = int(text)
                else:
                    row[key] = float(text)
            rows.append(row)
    return rows


def summary_path(per_case_csv: Path) -> Path:
    """``metrics.csv`` -> ``metrics_summary.csv`` (beside it)."""
    per_case_csv = Path(per_case_csv)
    return per_case_csv.with_name(f"{per_case_csv.stem}_summary{per_case_csv.suffix or '.csv'}")


def write_tables(
    per_case_csv: Path, rows: Sequence[dict[str, Any]]
) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Writes the per-case CSV and its summary beside it; returns both paths and the summary rows."""
    ordered = sorted(rows, key=lambda r: (r["case_id"], int(r["class_value"])))
    summary = summarise(ordered)
    return (
        write_csv(per_case_csv, ordered, CASE_COLUMNS),
        write_csv(summary_path(per_case_csv), summary, SUMMARY_COLUMNS),
        summary,
    )


def _cell(record: dict[str, Any] | None) -> str:
    if record is None or not math.isfinite(record["mean"]):
        return "-"
    std = record["std"]
    return f"{record['mean']:.4f}" + (f" ± {std:.4f}" if math.isfinite(std) else "")


def format_table(summary: Sequence[dict[str, Any]], num_cases: int, tolerance_mm: float) -> str:
    """The summary as a plain-text table: mean ± std per class and metric, and the pooled Dice.

    ``nan/inf`` counts the cases where the class is in neither mask (NaN) or in only one of them (inf distances).
    """
    header = ("class", *METRICS, "dice_pooled", "nan/inf")
    lines = []
    for value in sorted({int(r["class_value"]) for r in summary}):
        records = {r["metric"]: r for r in summary if int(r["class_value"]) == value}
        dice = records["dice"]
        lines.append(
            (
                f"{value} {dice['class_name']}",
                *(_cell(records.get(m)) for m in METRICS),
                f"{dice['pooled']:.4f}" if math.isfinite(dice["pooled"]) else "-",
                f"{dice['num_nan']}/{records['hd95_mm']['num_inf']}",
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    text = [
        f"metrics over {num_cases} case(s); surface Dice at {tolerance_mm:g} mm; mean ± std over finite values"
    ]
    for row in [header, *lines]:
        text.append(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(text)
