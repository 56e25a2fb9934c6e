"""Does the step-time model project? A CPU (gloo) strong-scaling study, fitted on small scales, checked at a larger.

    .venv/bin/python -m benchmarks.projection --out benchmarks/results/projection.json          # 1,2,4 -> 8
    .venv/bin/python -m benchmarks.projection --quick --out benchmarks/results/projection-quick.json  # 1, 2

The real trainer (``torchrun ... -m r2d2_hpc.train``) runs the MNI tissue demo shards at every scale with one
thread per rank and no DataLoader workers (each rank needs one core: 8 ranks need 8 free cores), strong scaling
(the global batch is fixed and split), ``--repeats`` times per scale. The analysis (``r2d2_hpc.analysis``) then
fits :mod:`r2d2_hpc.analysis.model` to the runs at ``--fit-scales`` only, projects ``--project`` ranks, and the
JSON holds the projected step time with its 95% prediction interval, the measured one and the relative error.

``--quick`` runs 1 and 2 ranks only: the model needs three scales, so no projection is made and the JSON says
that the projection error has not been measured (it needs a machine with 8 free cores).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, ensure_demo_shards, machine, train_run, write_json
from r2d2_hpc.analysis import analyse
from r2d2_hpc.analysis.model import MIN_SCALES
from r2d2_hpc.analysis.scaling import fit_models

SMALL_UNET = ["model=unet", "model.depth=3", "model.base_width=8"]


def run_scales(
    shards: Path, scales: list[int], repeats: int, steps: int, global_batch: int, work: Path
) -> dict[int, list[Path]]:
    """Trains every scale ``repeats`` times; returns the run directories per scale."""
    runs: dict[int, list[Path]] = {}
    for repeat in range(repeats):
        for n in scales:  # scales interleaved: machine drift hits every scale alike
            run_dir = work / f"n{n}-r{repeat}"
            overrides = [
                f"data.shards={shards}",
                *SMALL_UNET,
                f"train.max_steps={steps}",
                "train.scaling=strong",
                f"train.global_batch={global_batch}",
                "train.threads_per_rank=1",
                "train.num_workers=0",
                "train.eval_every_steps=0",
                "train.checkpoint_every_steps=0",
                "train.timing_warmup_steps=3",
                f"train.seed={repeat}",
            ]
            result = train_run(run_dir, n, overrides)
            print(f"N={n} repeat {repeat}: {result['throughput_samples_per_s']:.2f} samples/s")
            runs.setdefault(n, []).append(run_dir)
    return runs


def measured_step_s(dirs: list[Path]) -> dict[str, Any]:
    """Median over repeats of each run's mean step time after the warm-up, and the repeats' range."""
    table = analyse(dirs, write=False, plots=False, workers=1).runs
    values = sorted(float(v) for v in table["step_s_mean"])
    return {"step_s_median": values[len(values) // 2], "step_s_min": values[0], "step_s_max": values[-1]}


def project(
    runs: dict[int, list[Path]], fit_scales: list[int], target: int, global_batch: int
) -> dict[str, Any]:
    """Fits on ``fit_scales`` and compares the projection at ``target`` with its measurement."""
    report = analyse([d for n in fit_scales for d in runs[n]], write=False, plots=False, workers=1)
    models, notes = fit_models(report.runs)
    if not models:
        return {"projected": None, "why": "; ".join(notes) or f"fewer than {MIN_SCALES} fit scales"}
    (series, model), *_ = models.items()
    b = global_batch / target
    low, high = (float(v[0]) for v in model.interval_s(target, b))
    predicted = float(model.step_time_s(target, b)[0])
    out: dict[str, Any] = {
        "series": series,
        "form": model.name,
        "loo_error": model.loo_error,
        "coefficients": model.coef,
        "projected_step_s": predicted,
        "prediction_interval_95": [low, high],
    }
    if target in runs:
        measured = measured_step_s(runs[target])
        error = (predicted - measured["step_s_median"]) / measured["step_s_median"]
        out.update(
            measured=measured, relative_error=error, inside_interval=low <= measured["step_s_median"] <= high
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/projection.json")
    parser.add_argument("--shards", type=Path, default=REPO / "data/prepared/mni_tissue")
    parser.add_argument("--scales", default="1,2,4,8")
    parser.add_argument("--fit-scales", default="1,2,4")
    parser.add_argument("--project", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 and 2 ranks, 1 repeat: no projection")
    args = parser.parse_args()
    scales = [1, 2] if args.quick else [int(s) for s in args.scales.split(",")]
    fit_scales = scales if args.quick else [int(s) for s in args.fit_scales.split(",")]
    repeats = 1 if args.quick else args.repeats
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shards = ensure_demo_shards(args.shards)
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="r2d2-projection-") as work:
        runs = run_scales(shards, scales, repeats, args.steps, args.global_batch, Path(work))
        measured = {n: measured_step_s(dirs) for n, dirs in runs.items()}
        projection = project(runs, fit_scales, args.project, args.global_batch)
    payload = {
        "benchmark": "projection",
        "machine": machine(),
        "cores_available": cores,
        "oversubscribed": max(scales) > (cores or 1),
        "load_avg_1m": {"start": load_start, "end": os.getloadavg()[0]},  # above the cores: a busy machine
        "model_overrides": SMALL_UNET,
        "scales": scales,
        "fit_scales": fit_scales,
        "target": args.project,
        "repeats": repeats,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "measured": measured,
        "projection": projection,
        "projection_error_measured": "relative_error" in projection,
        "total_s": round(time.monotonic() - t0, 1),
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
