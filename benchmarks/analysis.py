"""Analysis benchmark: a large study's logs analysed end to end, against a target of < 60 s and < 4 GiB.

Run by hand::

    .venv/bin/python benchmarks/analysis.py --out benchmarks/results/analysis.json            # ~2 GB of logs
    .venv/bin/python benchmarks/analysis.py --quick --out benchmarks/results/analysis-quick.json

The default study: 200 runs, 2 models x 2 scaling modes, world sizes 4/8/16 (80/80/40 runs; 8 ranks on average,
1,600 rank logs) of 5,000 steps = 8,000,000 step lines in the exact format r2d2_hpc.train writes, with an
evaluation every 500 steps, result.json, config.json, metrics.jsonl and study.json. The logs are generated once
into ``--work-dir`` (kept for reruns; ``--clean`` removes them) and so are read from the page cache.

Measured: wall-clock time of ``python -m r2d2_hpc.analysis <study> --out <dir>`` in a fresh process (plots and
report included) and the peak resident memory of that process and its workers together (sampled every 20 ms
from /proc). Also, on one rank log, the rate of three ways to read JSONL: ``json.loads`` per line,
``pandas.read_json(lines=True)``, and the analysis' bulk reader.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STEP = (
    '{"type": "step", "step": %d, "epoch": %d, "data_wait_s": %r, "compute_s": %r, "step_s": %r, '
    '"samples": %d, "loss": %r, "lr": %r, "time": %r}\n'
)
GRAD_BYTES = 4 * 7_800_000
SCALES = ((4, 0.4), (8, 0.4), (16, 0.2))  # world size, share of the runs
EVAL_EVERY = 500


def plan(num_runs: int) -> list[dict[str, Any]]:
    """The runs: models x modes x world sizes x repeats, as in a launcher study."""
    runs = []
    series = [(m, s) for m in ("unet", "fcn") for s in ("strong", "weak")]
    for ws, share in SCALES:
        per_series = max(1, round(num_runs * share / len(series)))
        for model, scaling in series:
            for repeat in range(per_series):
                runs.append({"model": model, "scaling": scaling, "world_size": ws, "repeat": repeat})
    return runs[:num_runs]


def step_time_s(model: str, scaling: str, ws: int) -> float:
    """A plausible step time: compute per sample on each rank plus a ring all-reduce."""
    per_sample = 0.012 if model == "unet" else 0.008
    batch = 64 / ws if scaling == "strong" else 8
    return per_sample * batch + 2 * (ws - 1) / ws * GRAD_BYTES / 10e9 + 2 * (ws - 1) * 20e-6


def write_run(study: Path, spec: dict[str, Any], num_steps: int, rng: np.random.Generator) -> str:
    """One run directory with every rank's timing log; returns its name."""
    model, scaling, ws, repeat = spec["model"], spec["scaling"], spec["world_size"], spec["repeat"]
    name = f"{model}-{scaling}-w{ws}-r{repeat}"
    run = study / "runs" / name
    (run / "timing").mkdir(parents=True, exist_ok=True)
    gb = 64 if scaling == "strong" else 8 * ws
    base_s = step_time_s(model, scaling, ws)
    steps = np.arange(1, num_steps + 1)
    loss = (2.0 / np.sqrt(steps)).tolist()
    lr = (0.01 * (1 - steps / (num_steps + 1)) ** 0.9).tolist()
    dice = [1.0, 0.7 + 0.1 * (1 - 1 / np.log2(2 * ws)), 0.8]
    for rank in range(ws):
        step_s = base_s * rng.uniform(0.97, 1.05, num_steps)
        wait_s = step_s * rng.uniform(0.0, 0.05, num_steps)
        t = 1.7e9 + np.cumsum(step_s)
        head = {
            "resumed_at_step": None,
            "type": "header",
            "schema": 1,
            "run_id": name,
            "nodes": max(1, ws // 4),
            "world_size": ws,
            "rank": rank,
            "host": f"node{rank // 4}",
            "device": f"cuda:{rank % 4}",
            "model": model,
            "batch_per_rank": gb // ws,
            "global_batch": gb,
            "scaling": scaling,
            "lr_rule": "linear",
            "amp": "bf16",
            "started_at": "2023-11-14T22:13:20+00:00",
            "max_steps": num_steps,
            "grad_bytes": GRAD_BYTES,
            "num_params": GRAD_BYTES // 4,
            "train_samples": 12800,
        }
        parts = [json.dumps(head) + "\n"]
        rows = zip(
            steps.tolist(),
            (steps // 200).tolist(),
            wait_s.tolist(),
            (step_s - wait_s).tolist(),
            step_s.tolist(),
            [gb] * num_steps,
            loss,
            lr,
            np.round(t, 3).tolist(),
            strict=True,
        )
        for row in rows:
            parts.append(STEP % row)
            if row[0] % EVAL_EVERY == 0:
                wall = float(row[-1] - 1.7e9)
                parts.append(
                    json.dumps(
                        {
                            "type": "eval",
                            "step": row[0],
                            "epoch": row[1],
                            "dice_per_class": dice,
                            "wall_s": wall,
                        }
                    )
                    + "\n"
                )
        parts.append(
            json.dumps({"type": "end", "step": num_steps, "time": float(t[-1]) + 1, "status": "completed"})
        )
        (run / "timing" / f"rank{rank}.jsonl").write_text("".join(parts) + "\n")
    result = {
        "status": "completed",
        "run_id": name,
        "model": model,
        "world_size": ws,
        "scaling": scaling,
        "global_batch": gb,
        "steps": num_steps,
        "dice_per_class": dice,
        "class_names": ["bg", "a", "b"],
        "peak_memory_gib": 12.5,
        "wall_s": float(t[-1] - 1.7e9),
        "device": "cuda:0",
    }
    (run / "result.json").write_text(json.dumps(result))
    (run / "config.json").write_text(json.dumps({"train": {"timing_warmup_steps": 20, "scaling": scaling}}))
    slurm = {
        "job_id": str(1000 + repeat),
        "state": "COMPLETED",
        "queue_wait_s": 30.0,
        "elapsed_s": float(t[-1] - 1.7e9) + 60,
        "nodes": max(1, ws // 4),
        "gpus": ws,
        "cpus": 8 * ws,
    }
    (run / "slurm.json").write_text(json.dumps(slurm))
    return name


def generate(study: Path, num_runs: int, num_steps: int) -> dict[str, Any]:
    """Writes the study unless the same one is already there."""
    stamp = {"runs": num_runs, "steps": num_steps, "format": 1}
    marker = study / "benchmark.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return {"generated_s": 0.0, "reused": True}
    shutil.rmtree(study, ignore_errors=True)
    study.mkdir(parents=True)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    specs = plan(num_runs)
    names = [write_run(study, spec, num_steps, rng) for spec in specs]
    entries = [
        {
            "name": n,
            "model": s["model"],
            "world_size": s["world_size"],
            "run_dir": f"runs/{n}",
            "state": "COMPLETED",
        }
        for n, s in zip(names, specs, strict=True)
    ]
    (study / "study.json").write_text(json.dumps({"format": "r2d2-study", "version": 1, "runs": entries}))
    marker.write_text(json.dumps(stamp))
    return {"generated_s": time.perf_counter() - start, "reused": False}


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
        except (OSError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * page
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_analysis(study: Path, out: Path, workers: int | None) -> dict[str, Any]:
    """Times the CLI in a fresh process and samples its memory (with its workers)."""
    cmd = [sys.executable, "-m", "r2d2_hpc.analysis", str(study), "--out", str(out)]
    if workers:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the analysis failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall_s, "cpu_s": cpu_s, "peak_rss_gib": peak[0] / 2**30, "stdout": stdout.strip()}


def compare_readers(path: Path, repeats: int = 3) -> dict[str, float]:
    """Lines per second of three JSONL readers on one rank log (best of ``repeats``)."""
    from r2d2_hpc.analysis.jsonl import read_rank_log

    def json_per_line() -> None:
        with open(path, "rb") as fh:
            records = [json.loads(line) for line in fh]
        pd.DataFrame([r for r in records if r.get("type") == "step"])

    readers = {
        "json_loads_per_line": json_per_line,
        "pandas_read_json_lines": lambda: pd.read_json(path, lines=True),
        "bulk_reader": lambda: read_rank_log(path),
    }
    with open(path, "rb") as fh:
        num_lines = sum(1 for _ in fh)
    rates = {}
    for name, reader in readers.items():
        best = min(_timed(reader) for _ in range(repeats))
        rates[f"{name}_lines_per_s"] = num_lines / best
    return rates


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Generates the study (once), runs the analysis, prints and writes the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--quick", action="store_true", help="20 runs x 1,000 steps")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/r2d2_analysis_bench"))
    p.add_argument("--workers", type=int, help="the analysis' --workers (default: one per CPU)")
    p.add_argument("--clean", action="store_true", help="remove the generated logs afterwards")
    p.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = p.parse_args()
    num_runs, num_steps = (20, 1000) if args.quick else (args.runs, args.steps)
    study = args.work_dir / f"study-{num_runs}x{num_steps}"
    gen = generate(study, num_runs, num_steps)
    logs = sorted((study / "runs").glob("*/timing/rank*.jsonl"))
    num_step_lines = num_steps * len(logs)
    log_bytes = sum(f.stat().st_size for f in logs)
    load_before = os.getloadavg()[0]  # other work on the machine slows the analysis down
    timing = run_analysis(study, args.work_dir / "report", args.workers)
    rates = compare_readers(logs[0])
    figures = {
        "runs": num_runs,
        "rank_logs": len(logs),
        "step_lines": num_step_lines,
        "log_gib": log_bytes / 2**30,
        **gen,
        "analysis_wall_s": timing["wall_s"],
        "analysis_cpu_s": timing["cpu_s"],  # user + system, the analysis and its workers
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "analysis_peak_rss_gib": timing["peak_rss_gib"],
        "step_lines_per_s": num_step_lines / timing["wall_s"],
        "targets": {"wall_s": 60, "peak_rss_gib": 4},
        "meets_targets": timing["wall_s"] < 60 and timing["peak_rss_gib"] < 4,
        "readers_on_one_log": rates,
        "cli_output": timing["stdout"],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pandas": pd.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "page_cache": "warm (the logs were written or read just before)",
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    if args.clean:
        shutil.rmtree(study)


if __name__ == "__main__":
    main()
