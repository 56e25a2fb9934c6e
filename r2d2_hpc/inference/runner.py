"""``predict`` over many cases: split across ranks or jobs, failures isolated, metrics merged at the end.

Cases are sorted by id and part ``p`` of ``n`` takes cases ``p, p + n, p + 2n, ...``. By default ``(p, n)`` is the
distributed ``(rank, world_size)`` read by :func:`~r2d2_hpc.train.dist.dist_env_from_environ`, so ``torchrun`` or
``srun`` start parts in parallel, each on its own GPU (``cuda:LOCAL_RANK``); ``part=``/``num_parts=`` set it by
hand, e.g. per Slurm job of an array. Parts never talk to each other: no process group, so a slow part never
times out a fast one.

A case that fails (unreadable file, wrong channel count, bad reference) is logged and listed in
``failures.json``; the other cases still finish. With several parts, each part writes
``parts/part<p>-of<n>.json`` (its masks and failures; numbers zero-padded to 4 digits) and, with labels,
``parts/metrics-part<p>-of<n>.csv``; the part that finishes when every part's record exists merges them into
``metrics.csv``, ``metrics_summary.csv`` and ``failures.json`` (a merge is idempotent, so two parts finishing
together write the same files; ``evaluate`` rebuilds the tables from the masks at any time).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2d2_hpc.atomic import check_writable
from r2d2_hpc.data.nifti import check_same_grid, load_nifti
from r2d2_hpc.data.preprocess import remap_labels
from r2d2_hpc.errors import DiskError, R2D2Error
from r2d2_hpc.inference import metrics as m
from r2d2_hpc.inference.config import PredictConfig
from r2d2_hpc.inference.io import (
    InputCase,
    find_references,
    list_input_cases,
    read_case_image,
    save_nifti_like,
    write_json,
)
from r2d2_hpc.inference.model import LoadedModel, load_model, resolve_device
from r2d2_hpc.inference.predictor import AMP_DTYPES, predict_image
from r2d2_hpc.inference.sliding import WindowSettings
from r2d2_hpc.train.dist import dist_env_from_environ

log = logging.getLogger(__name__)

PREDICTIONS_FORMAT = "r2d2-predictions"
PREDICTIONS_VERSION = 1
# Per-case failures that must not stop the other cases; anything else is a bug and stops the run.
CASE_ERRORS = (R2D2Error, OSError, MemoryError, torch.cuda.OutOfMemoryError)


@dataclass
class PredictRun:
    """What one part did, and the merged results when this part completed the set."""

    part: int
    num_parts: int
    num_cases: int  # cases of the whole input
    written: list[Path] = field(default_factory=list)  # this part's masks
    failures: list[dict[str, str]] = field(default_factory=list)  # this part's failed cases
    all_failures: list[dict[str, str]] | None = None  # every part's, once merged
    metrics_csv: Path | None = None  # set once every part is done and labels were given
    summary: list[dict[str, Any]] | None = None
    table: str | None = None


def resolve_part(cfg: PredictConfig, environ: dict[str, str] | None = None) -> tuple[int, int, str]:
    """``(part, num_parts, device of this rank)`` from the settings, else from the launcher's variables."""
    env = dist_env_from_environ(environ)
    if cfg.part is not None and cfg.num_parts is not None:
        return int(cfg.part), int(cfg.num_parts), env.device
    return env.rank, env.world_size, env.device


def split_cases(cases: list[InputCase], part: int, num_parts: int) -> list[InputCase]:
    """Part ``part`` of ``num_parts`` round-robin shares of the cases (sorted by id)."""
    return sorted(cases, key=lambda c: c.case_id)[part::num_parts]


def run_predict(cfg: PredictConfig, environ: dict[str, str] | None = None) -> PredictRun:
    """Predicts this part's cases of ``cfg.input`` into ``cfg.out`` (see the module docstring).

    Raises:
        R2D2Error: a problem that concerns every case (checkpoint, input listing, missing references).
    """
    part, num_parts, local_device = resolve_part(cfg, environ)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(str(cfg.out))
    check_writable(out, "the output folder (out=)", "run predict again")  # before any model is loaded
    loaded = load_model(str(cfg.checkpoint), resolve_device(cfg.device, local_device))
    cases = list_input_cases(str(cfg.input), cfg.msd_list, cfg.case_id_regex, cfg.channel_regex)
    references = find_references(cfg.labels, [c.case_id for c in cases]) if cfg.labels else {}
    if part == 0:
        write_json(out / "predict.json", _description(cfg, loaded, len(cases), num_parts))
    mine = split_cases(cases, part, num_parts)
    log.info(
        "part %d of %d: %d of %d case(s) with %s on %s -> %s",
        part, num_parts, len(mine), len(cases), Path(loaded.source).name, loaded.device, out,
    )  # fmt: skip
    settings = WindowSettings(cfg.batch_size, cfg.overlap, cfg.gaussian_sigma, cfg.tta, AMP_DTYPES[cfg.amp])
    run = PredictRun(part, num_parts, len(cases))
    rows: list[dict[str, Any]] = []
    for case in _progress(mine, enabled=cfg.progress and part == 0):
        start_s = time.monotonic()
        try:
            path, case_rows = _predict_case(loaded, case, settings, cfg, out, references.get(case.case_id))
        except DiskError:
            raise  # a full disk fails every case alike: stop with one message
        except CASE_ERRORS as exc:
            log.error("case %s failed: %s", case.case_id, exc)
            run.failures.append({"case_id": case.case_id, "file": str(case.files[0]), "error": str(exc)})
            continue
        run.written.append(path)
        rows += case_rows
        log.info("case %s: %s in %.1f s", case.case_id, path.name, time.monotonic() - start_s)
    _finish(run, out, rows, with_metrics=bool(references), tolerance_mm=cfg.surface_tolerance_mm)
    return run


def _predict_case(
    loaded: LoadedModel,
    case: InputCase,
    settings: WindowSettings,
    cfg: PredictConfig,
    out: Path,
    reference: Path | None,
) -> tuple[Path, list[dict[str, Any]]]:
    image, affine, header = read_case_image(
        case, loaded.in_channels, loaded.channel_names, loaded.data_cfg.affine_tolerance
    )
    prediction = predict_image(
        loaded,
        image,
        affine,
        settings,
        case_id=case.case_id,
        file=case.files[0],
        with_probabilities=cfg.save_probabilities,
    )
    path = save_nifti_like(out / f"{case.case_id}.nii.gz", prediction.label, affine, header, "r2d2_hpc mask")
    if prediction.probabilities is not None:
        target = out / "probabilities" / f"{case.case_id}.nii.gz"
        save_nifti_like(target, prediction.probabilities, affine, header, "r2d2_hpc probabilities")
    if reference is None:
        return path, []
    return path, score_against_reference(
        case.case_id, prediction.label, affine, case.files[0], reference, loaded, cfg.surface_tolerance_mm
    )


def score_against_reference(
    case_id: str,
    label: np.ndarray,
    affine: np.ndarray,
    image_file: Path,
    reference: Path,
    loaded: LoadedModel,
    tolerance_mm: float,
) -> list[dict[str, Any]]:
    """Metric rows of a prediction on its image's grid against the reference file (label_map of training applied).

    Raises:
        DataError: the reference is unreadable, on another grid than the image, or holds values outside the
            model's classes after the training's label_map.
    """
    ref, ref_affine = load_nifti(reference, "label")
    tolerance = loaded.data_cfg.affine_tolerance
    check_same_grid((image_file, label.shape, affine), (reference, ref.shape, ref_affine), tolerance)
    ref = remap_labels(ref, loaded.data_cfg.label_map, loaded.num_classes, reference)
    classes = m.foreground_classes(loaded.class_names, label, ref)
    return m.case_metrics(case_id, label, ref, m.spacing_of(affine), classes, tolerance_mm)


def _description(cfg: PredictConfig, loaded: LoadedModel, num_cases: int, num_parts: int) -> dict[str, Any]:
    info = loaded.info
    return {
        "format": PREDICTIONS_FORMAT,
        "format_version": PREDICTIONS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": loaded.source,
        "step": loaded.step,
        "model": info["name"],
        "spatial_dims": loaded.spatial_dims,
        "class_names": loaded.class_names,
        "channel_names": loaded.channel_names,
        "label_map": loaded.data_cfg.label_map,
        "modality": loaded.modality,
        "preprocessing": info["preprocessing"],
        "input": str(cfg.input),
        "labels": cfg.labels,
        "num_cases": num_cases,
        "num_parts": num_parts,
        "settings": {
            "batch_size": cfg.batch_size,
            "overlap": cfg.overlap,
            "gaussian_sigma": cfg.gaussian_sigma,
            "tta": cfg.tta,
            "amp": cfg.amp,
            "surface_tolerance_mm": cfg.surface_tolerance_mm,
        },
    }


def _part_tag(part: int, num_parts: int) -> str:
    return f"part{part:04d}-of{num_parts:04d}"


def _finish(
    run: PredictRun, out: Path, rows: list[dict[str, Any]], with_metrics: bool, tolerance_mm: float
) -> None:
    """Writes this part's records and, once every part has written its own, the merged tables."""
    if run.num_parts == 1:
        _write_merged(run, out, rows if with_metrics else None, run.failures, tolerance_mm)
        return
    parts = out / "parts"
    tag = _part_tag(run.part, run.num_parts)
    if with_metrics:
        m.write_csv(parts / f"metrics-{tag}.csv", rows, m.CASE_COLUMNS)
    record = {"part": run.part, "num_parts": run.num_parts, "written": [p.name for p in run.written]}
    write_json(parts / f"{tag}.json", {**record, "failures": run.failures})
    records = [parts / f"{_part_tag(p, run.num_parts)}.json" for p in range(run.num_parts)]
    if not all(r.is_file() for r in records):
        log.info("part %d done; the part that finishes last writes the merged tables", run.part)
        return
    failures = [f for r in records for f in json.loads(r.read_text())["failures"]]
    merged_rows = None
    if with_metrics:
        merged_rows = []
        for p in range(run.num_parts):
            merged_rows += m.read_case_csv(parts / f"metrics-{_part_tag(p, run.num_parts)}.csv")
    _write_merged(run, out, merged_rows, failures, tolerance_mm)


def _write_merged(
    run: PredictRun,
    out: Path,
    rows: list[dict[str, Any]] | None,
    failures: list[dict[str, str]],
    tolerance_mm: float,
) -> None:
    run.all_failures = sorted(failures, key=lambda f: f["case_id"])
    failures_file = out / "failures.json"
    if failures:
        write_json(failures_file, {"failures": run.all_failures})
    elif failures_file.exists():
        failures_file.unlink()  # from an earlier run of the same out folder
    if rows is None:
        return
    run.metrics_csv, _, run.summary = m.write_tables(out / "metrics.csv", rows)
    num_cases = len({r["case_id"] for r in rows})
    run.table = m.format_table(run.summary, num_cases, tolerance_mm)


def _progress(cases: list[InputCase], enabled: bool) -> Iterable[InputCase]:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(cases, desc="predict", unit="case")
    return _plain(cases)


def _plain(cases: list[InputCase]) -> Iterator[InputCase]:
    yield from cases
