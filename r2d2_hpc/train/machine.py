"""What a timing header records about the machine: CPUs, load, GPU and software versions, and a device peak.

Everything here is cheap (well under a second in all) and never raises: a fact that cannot be read is None.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak FLOP/s per GPU (tensor cores; bf16/fp16 for AMP runs, tf32/fp32 otherwise), from the vendors' data
# sheets. Matched by substring of torch.cuda.get_device_name, the first match wins (longer names first).
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    # name, bf16/fp16 dense, fp32 (non-tensor-core)
    ("H200", 989e12, 67e12),
    ("H100 PCIe", 756e12, 51e12),
    ("H100", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A40", 149.7e12, 37.4e12),
    ("A10", 125e12, 31.2e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
)


def machine_load() -> dict[str, Any]:
    """The 1-minute load average and the CPU steal counters (jiffies since boot; the analysis takes the
    difference between a run's header and end line); None where /proc is missing."""
    try:
        load_1m = os.getloadavg()[0]
    except OSError:
        load_1m = None
    steal, total = _steal_jiffies()
    return {"load_avg_1m": load_1m, "cpu_steal_jiffies": steal, "cpu_total_jiffies": total}


def _steal_jiffies() -> tuple[int | None, int | None]:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None, None
    return (values[7] if len(values) > 7 else None), sum(values)


def cpu_facts() -> dict[str, Any]:
    """CPUs of the machine and those this process may run on, and torch's intra-op threads."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count()
    return {
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "threads_per_rank": torch.get_num_threads(),
    }


def software_versions() -> dict[str, Any]:
    """GPU driver, NCCL and Slurm versions where present, and the job's node list."""
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = None
    return {
        "gpu_driver_version": _gpu_driver(),
        "nccl_version": nccl,
        "slurm_version": _slurm_version() if os.environ.get("SLURM_JOB_ID") else None,
        "node_list": os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST"),
    }


@functools.cache
def _gpu_driver() -> str | None:
    path = Path("/proc/driver/nvidia/version")
    try:
        first = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else None


@functools.cache
def _slurm_version() -> str | None:
    """``sinfo --version`` (a subprocess: no Slurm library is imported by training code)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().removeprefix("slurm ").strip() or None


def gpu_peak_flops(device_name: str, amp: str) -> float | None:
    """The data-sheet dense peak of a known GPU (bf16/fp16 when ``amp`` is on), else None."""
    for name, half, single in GPU_PEAK_FLOPS:
        if name.lower() in device_name.lower():
            return half if amp in ("bf16", "fp16") else single
    return None


@functools.cache
def measured_cpu_matmul_flops(size: int = 256, budget_s: float = 0.15) -> float:
    """FLOP/s of float32 square matmuls with this process' threads, measured for about ``budget_s`` seconds.

    The best of several short timings: a stand-in for the CPU's attainable peak (what MFU on a CPU is
    measured against), not its data-sheet peak.
    """
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a resumed run's streams must not shift
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best = 0.0
    deadline = time.perf_counter() + budget_s
    reps = 4
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        elapsed = time.perf_counter() - t0
        best = max(best, 2 * size**3 * reps / elapsed if elapsed > 0 else 0.0)
    return best


def device_peak(device: str, device_name: str, amp: str) -> dict[str, Any]:
    """The peak MFU is measured against: a GPU's data-sheet value, or a measured matmul rate on a CPU."""
    if device.startswith("cuda"):
        peak = gpu_peak_flops(device_name, amp)
        return {"peak_flops": peak, "peak_flops_source": "datasheet" if peak else None}
    return {"peak_flops": measured_cpu_matmul_flops(), "peak_flops_source": "measured fp32 matmul 256^3"}


def device_name(device: str) -> str:
    """The GPU's name for ``cuda:<i>``, else the CPU model from /proc/cpuinfo."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_name()


@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def git_sha() -> str | None:
    """The commit of the r2d2_hpc checkout, or None (no git, not a checkout); never raises."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None
