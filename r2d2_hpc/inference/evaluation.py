"""``evaluate``: predicted masks against reference labels, file by file, into a per-case CSV and a summary.

Masks and references are paired by case id (``<case>.nii.gz`` in both folders) and must share one voxel grid
(shape, and affine within ``affine_tolerance`` mm). Spacing, hence every distance, comes from that affine. When
the predictions folder holds the ``predict.json`` that predict writes, its class names and the training's
``label_map`` (applied to the references, which hold source label values) are used unless set explicitly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from r2d2_hpc.data.nifti import check_same_grid, load_nifti
from r2d2_hpc.data.preprocess import remap_labels
from r2d2_hpc.errors import DataError, R2D2Error, problem
from r2d2_hpc.inference import metrics as m
from r2d2_hpc.inference.config import EvaluateConfig
from r2d2_hpc.inference.io import find_references, list_masks

log = logging.getLogger(__name__)


@dataclass
class EvaluateRun:
    """The tables an evaluation wrote, and the cases it could not score."""

    per_case_csv: Path
    summary_csv: Path
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    table: str
    failures: list[dict[str, str]] = field(default_factory=list)


def _predict_record(pred_dir: Path) -> dict[str, Any]:
    path = pred_dir / "predict.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            problem(path, f"unreadable ({exc})", "the JSON predict wrote", "delete it or rerun")
        ) from exc


def _settings(cfg: EvaluateConfig, pred_dir: Path) -> tuple[list[str] | None, dict[int, int] | None]:
    record = _predict_record(pred_dir)
    class_names = cfg.class_names if cfg.class_names else record.get("class_names")
    label_map = cfg.label_map if cfg.label_map is not None else record.get("label_map")
    label_map = {int(k): int(v) for k, v in label_map.items()} if label_map else None
    return class_names, label_map


def score_files(
    case_id: str,
    pred_file: Path,
    ref_file: Path,
    class_names: list[str] | None,
    label_map: dict[int, int] | None,
    tolerance_mm: float,
    affine_tolerance: float,
) -> list[dict[str, Any]]:
    """Metric rows of one predicted mask file against its reference file.

    Raises:
        DataError: a file is unreadable, the grids differ, or a value is not one of the classes.
    """
    pred, pred_affine = load_nifti(pred_file, "label")
    ref, ref_affine = load_nifti(ref_file, "label")
    check_same_grid((ref_file, ref.shape, ref_affine), (pred_file, pred.shape, pred_affine), affine_tolerance)
    if class_names:
        ref = remap_labels(ref, label_map, len(class_names), ref_file)
        if pred.min() < 0 or pred.max() >= len(class_names):
            found = f"mask values {np.unique(pred)[:10].tolist()}"
            expected = f"class values 0..{len(class_names) - 1} ({', '.join(class_names)})"
            raise DataError(problem(pred_file, found, expected, "set class_names= to the model's classes"))
    elif label_map:
        ref = remap_labels(ref, label_map, int(max(ref.max(), *label_map.values())) + 1, ref_file)
    classes = m.foreground_classes(class_names, pred, ref)
    return m.case_metrics(case_id, pred, ref, m.spacing_of(ref_affine), classes, tolerance_mm)


def run_evaluate(cfg: EvaluateConfig) -> EvaluateRun:
    """Scores every mask of ``cfg.pred`` against ``cfg.ref``; writes ``cfg.out`` and its summary beside it.

    Raises:
        R2D2Error: the folders are missing or empty, a mask has no reference, or no case could be scored.
    """
    pred_dir = Path(cfg.pred)  # type: ignore[arg-type]
    masks = list_masks(pred_dir)
    references = find_references(cfg.ref, sorted(masks))  # type: ignore[arg-type]
    class_names, label_map = _settings(cfg, pred_dir)
    rows: list[dict[str, Any]] = []
    failures = []
    for case_id in sorted(masks):
        try:
            rows += score_files(
                case_id,
                masks[case_id],
                references[case_id],
                class_names,
                label_map,
                cfg.surface_tolerance_mm,
                cfg.affine_tolerance,
            )
        except R2D2Error as exc:
            log.error("case %s failed: %s", case_id, exc)
            failures.append({"case_id": case_id, "file": str(masks[case_id]), "error": str(exc)})
    if not rows:
        listing = "; ".join(f"{f['case_id']}: {f['error']}" for f in failures[:3])
        raise R2D2Error(f"{pred_dir}: no case could be scored ({listing})")
    out = Path(cfg.out) if cfg.out else pred_dir / "metrics.csv"
    per_case, summary_csv, summary = m.write_tables(out, rows)
    table = m.format_table(summary, len({r["case_id"] for r in rows}), cfg.surface_tolerance_mm)
    return EvaluateRun(per_case, summary_csv, rows, summary, table, failures)
