"""Honesty checks, environment, utilisation and stragglers from real log files; figures as PNG, SVG and PDF."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from analysis_logs import write_run

from r2d2_hpc.analysis import analyse
from r2d2_hpc.analysis import plots as P


def _edit(
    run: Path, rank: int, header: dict | None = None, end: dict | None = None, step_factor: float = 1.0
):
    """Adds fields to a rank's header and end lines, and scales its step times."""
    path = run / "timing" / f"rank{rank}.jsonl"
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "header":
            rec.update(header or {})
        elif rec["type"] == "end":
            rec.update(end or {})
        elif rec["type"] == "step":
            rec["step_s"] *= step_factor
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


ENV = {
    "cpu_name": "Test CPU 9000",
    "cpu_count": 2,
    "cpus_available": 2,
    "threads_per_rank": 2,
    "gpu_driver_version": None,
    "nccl_version": None,
    "slurm_version": "24.05.1",
    "node_list": "node[0-1]",
    "git_sha": "0123456789abcdef0123456789abcdef01234567",
    "flops_per_sample": 1e9,
    "peak_flops": 1e11,
    "peak_flops_source": "measured fp32 matmul 256^3",
    "load_avg_1m": 0.5,
    "cpu_steal_jiffies": 0,
    "cpu_total_jiffies": 1000,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("checks")
    one = write_run(root, "one", world_size=1, step_s=0.10, num_steps=6)
    two = write_run(root, "two", world_size=2, step_s=0.12, num_steps=6)  # slower on 2 ranks than on 1
    _edit(one, 0, header=ENV, end={"load_avg_1m": 0.7, "cpu_steal_jiffies": 1, "cpu_total_jiffies": 1100})
    busy = {"load_avg_1m": 9.0, "cpu_steal_jiffies": 20, "cpu_total_jiffies": 1200}  # 20/200: 10% stolen
    _edit(two, 0, header=ENV, end=busy)
    _edit(two, 1, header={**ENV, "host": "node1"}, step_factor=1.5)  # rank 1 on node1 is the straggler
    out = root / "report"
    return analyse([root], out=out, workers=1), out


def test_honesty_checks_name_each_problem(report) -> None:
    rep, _ = report
    text = "\n".join(rep.checks)
    assert "two on node0: 2 ranks x 2 threads = 4 > 2 CPUs available" in text
    assert "one on node0" not in text.split("threads")[0]  # 1 rank x 2 threads fits 2 CPUs
    assert "two: load average 9.0 at the end on 2 CPUs" in text and "two: 10% of CPU time was stolen" in text
    assert "one: load average" not in text
    assert "one and two ran at the same time on node0" in text
    assert "speedup 0.67 < 1" in text  # mean over ranks: (0.12 + 0.18) / 2 against 0.10
    assert "at N=1: 1 repeat(s), fewer than 3: no spread" in text
    md = rep.markdown()
    assert "## Honesty checks" in md and "reason(s) to read the timings with care" in md


def test_environment_utilisation_and_stragglers(report) -> None:
    rep, _ = report
    env = rep.environment.set_index("run_id")
    assert env.loc["two", "nodes"] == "node[0-1]" and env.loc["two", "cpu"] == "Test CPU 9000"
    assert env.loc["one", "slurm_version"] == "24.05.1" and env.loc["one", "commit"] == "0123456789ab"
    assert "torch_version" in env.columns and "cpu_count: 2" in rep.markdown()
    util = rep.utilisation.set_index("run_id")
    thr = rep.runs.set_index("run_id").loc["one", "throughput"]
    assert util.loc["one", "tflops_per_device"] == pytest.approx(3 * 1e9 * thr / 1e12)
    assert util.loc["one", "mfu"] == pytest.approx(3 * 1e9 * thr / 1e11)
    (row,) = rep.stragglers.itertuples()
    assert (row.run_id, row.slowest_rank, row.slowest_host) == ("two", 1, "node1")
    assert row.spread == pytest.approx(0.5)


def _png_dpi(data: bytes) -> float:
    """Dots per inch from the PNG's pHYs chunk (pixels per metre)."""
    at = data.index(b"pHYs")
    per_metre = struct.unpack(">I", data[at + 4 : at + 8])[0]
    return per_metre * 0.0254


def test_every_figure_is_png_at_200_dpi_and_svg_and_pdf(report) -> None:
    rep, out = report
    assert rep.figures
    for name, png in rep.figures.items():
        assert _png_dpi(png) >= 199.9
        assert (out / f"{name}.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_log_axes_have_plain_tick_labels(report) -> None:
    rep, _ = report
    (ax,) = P.plot_throughput(rep.scaling).axes
    formatter = ax.yaxis.get_major_formatter()
    assert [formatter(v, 0) for v in (4.0, 40.0, 0.5)] == ["4", "40", "0.5"]
    assert ax.yaxis.get_minor_formatter()(3.0, 0) == ""
