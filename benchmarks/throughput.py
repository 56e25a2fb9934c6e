"""Training throughput on this machine: U-Net and FCN at 1 and 2 ranks, and our U-Net against MONAI's.

    .venv/bin/python -m benchmarks.throughput --out benchmarks/results/throughput.json [--steps 14]

Part 1 runs the real trainer (`torchrun ... -m r2d2_hpc.train`) on the MNI tissue demo shards with one thread per
rank, weak scaling (the per-rank batch is fixed), and reads throughput and the data-wait share from result.json
(steps after `train.timing_warmup_steps` only). Weak-scaling efficiency = samples/s(2 ranks) / (2 x samples/s(1)).

Part 2 times forward + backward + SGD step of our default U-Net and MONAI's `monai.networks.nets.BasicUNet` of equal
widths (32..512) and depth (4 poolings): both are the classical design — two conv-norm-activation blocks per level,
max-pool down, transposed conv up, instance norm, LeakyReLU. (MONAI's `UNet` is a different network: one strided
conv per level, so it does about 8x less work at full resolution.) Same batch, the two models alternate so that
machine noise hits both alike. MONAI comes with scripts/install.sh (installed with --no-deps, so it keeps the
torch that is there).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import REPO, ensure_demo_shards, machine, train_run, write_json

MODELS = {"unet": ["model=unet"], "fcn": ["model=fcn"]}


def scaling_part(shards: Path, steps: int, batch_per_rank: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, model in MODELS.items():
        runs = {}
        for world in (1, 2):
            overrides = [
                f"data.shards={shards}",
                *model,
                f"train.max_steps={steps}",
                "train.scaling=weak",
                f"train.batch_per_rank={batch_per_rank}",
                "train.threads_per_rank=1",
                "train.num_workers=1",
                "train.eval_every_steps=0",
                "train.checkpoint_every_steps=0",
                "train.timing_warmup_steps=2",
            ]
            result = train_run(work / f"{name}-{world}", world, overrides)
            runs[world] = {
                k: result[k]
                for k in (
                    "throughput_samples_per_s",
                    "data_wait_share",
                    "global_batch",
                    "num_params",
                    "flops_per_sample",
                    "peak_memory_gib",
                    "wall_s",
                )
            }
            print(
                f"{name} x{world}: {result['throughput_samples_per_s']:.2f} samples/s, "
                f"data wait {100 * result['data_wait_share']:.1f}%"
            )
        speedup = runs[2]["throughput_samples_per_s"] / runs[1]["throughput_samples_per_s"]
        out[name] = {
            "ranks": runs,
            "speedup_2_over_1": round(speedup, 3),
            "weak_scaling_efficiency": round(speedup / 2, 3),
        }
    return out


def monai_part(repeats: int, batch: int, size: tuple[int, int]) -> dict[str, Any]:
    try:
        from monai.networks.nets import BasicUNet
    except ImportError:
        return {"skipped": "monai is not installed: pip install --no-deps 'monai>=1.4,<1.7'"}
    from r2d2_hpc.models import build_model

    torch.manual_seed(0)
    ours = build_model("unet", 1, 4, 2, depth=4, base_width=32, max_width=512, norm="instance")
    theirs = BasicUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=4,
        features=(32, 64, 128, 256, 512, 32),
        norm=("instance", {"affine": True}),
        act=("LeakyReLU", {"negative_slope": 0.01}),
    )
    x = torch.randn(batch, 1, *size)
    y = torch.randint(0, 4, (batch, *size))
    times: dict[str, list[float]] = {"r2d2_hpc": [], "monai": []}
    models = {"r2d2_hpc": ours, "monai": theirs}
    optims = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    for i in range(repeats + 1):
        for key in ("r2d2_hpc", "monai") if i % 2 else ("monai", "r2d2_hpc"):
            t0 = time.perf_counter()
            optims[key].zero_grad()
            torch.nn.functional.cross_entropy(models[key](x), y).backward()
            optims[key].step()
            if i > 0:  # the first round is warm-up
                times[key].append(time.perf_counter() - t0)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    import monai

    return {
        "monai_version": monai.__version__,
        "batch": batch,
        "size": list(size),
        "repeats": repeats,
        "step_s_median": med,
        "step_s_all": times,
        "parameters": params,
        "ours_over_monai_step_time": round(med["r2d2_hpc"] / med["monai"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/throughput.json")
    parser.add_argument("--shards", type=Path, default=REPO / "data/prepared/mni_tissue")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--batch-per-rank", type=int, default=2)
    parser.add_argument("--monai-repeats", type=int, default=6)
    args = parser.parse_args()
    shards = ensure_demo_shards(args.shards)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="r2d2-throughput-") as work:
        scaling = scaling_part(shards, args.steps, args.batch_per_rank, Path(work))
    torch.set_num_threads(1)
    versus = monai_part(args.monai_repeats, 4, (224, 192))
    payload = {
        "benchmark": "throughput",
        "machine": machine(),
        "steps": args.steps,
        "batch_per_rank": args.batch_per_rank,
        "threads_per_rank": 1,
        "scaling": scaling,
        "versus_monai": versus,
        "targets": {"speedup_2_over_1": ">= 1.8", "ours_over_monai": "<= 1.0"},
        "total_s": round(time.monotonic() - t0, 1),
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
