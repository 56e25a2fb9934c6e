"""Accuracy on real data: U-Net and FCN-8s on the MNI152 tissue task (2D axial slices), on this machine's CPU.

    .venv/bin/python -m benchmarks.accuracy --out benchmarks/results/accuracy.json [--only unet,fcn,scaling]

Budget: each single-rank run is a fixed number of optimizer steps chosen to take about 10 minutes on this 2-core
machine (`--unet-steps`, `--fcn-steps`); the JSON records the measured wall time next to the Dice, so the claim
"within 10 minutes" is checked, not assumed. Validation Dice is computed on the held-out slabs (never adjacent to
a training slice), per class, from counts summed over the whole validation set.

The scaling part measures the R2D2 paper's "accuracy loss" of distributed training on 2 ranks:
- strong scaling: the same global batch split over 2 ranks (the LR rules then change nothing: the global batch
  equals the reference batch), which isolates what data parallelism itself changes (per-rank batch Dice);
- weak scaling: 2 ranks with the single-rank per-rank batch, so the global batch doubles, once per LR rule
  (none, linear, sqrt) — the case where the rule matters. These runs take half the optimizer steps
  (`--weak-steps`, default unet-steps / 2), so every run sees the same number of samples (epochs): the classic
  large-batch comparison, where the LR rule has to make up for the fewer, larger steps.
The strong run is compared with the single-rank U-Net at the same number of optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, ensure_demo_shards, machine, train_run, write_json

UNET = ["model=unet", "model.base_width=16"]
FCN = ["model=fcn", "model.base_width=16", "model.fc_width=256"]
BATCH = 8


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "dice_per_class",
        "mean_foreground_dice",
        "class_names",
        "steps",
        "global_batch",
        "wall_s",
        "throughput_samples_per_s",
        "num_params",
        "world_size",
        "scaling",
    )
    return {k: result.get(k) for k in keys}


def _run(
    work: Path, name: str, shards: Path, world: int, model: list[str], steps: int, extra: list[str]
) -> dict[str, Any]:
    threads = max(1, 2 // world)
    overrides = [
        f"data.shards={shards}",
        *model,
        f"train.max_steps={steps}",
        f"train.eval_every_steps={steps // 4}",
        "train.checkpoint_every_steps=0",
        f"train.threads_per_rank={threads}",
        "train.num_workers=1",
        *extra,
    ]
    t0 = time.monotonic()
    result = _summary(train_run(work / name, world, overrides))
    result["process_wall_s"] = round(time.monotonic() - t0, 1)
    print(
        f"{name}: Dice {[round(d, 4) for d in result['dice_per_class']]}, mean foreground "
        f"{result['mean_foreground_dice']:.4f}, {result['wall_s']:.0f} s"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/accuracy.json")
    parser.add_argument("--shards", type=Path, default=REPO / "data/prepared/mni_tissue")
    parser.add_argument("--unet-steps", type=int, default=300)
    parser.add_argument("--fcn-steps", type=int, default=400)
    parser.add_argument("--weak-steps", type=int, default=None, help="default: --unet-steps / 2")
    parser.add_argument("--only", default="unet,fcn,strong,weak", help="parts: unet, fcn, strong, weak")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the run directories here (default: temporary)"
    )
    parser.add_argument(
        "--baseline-json",
        type=Path,
        default=None,
        help="take the 1-rank U-Net run from this earlier accuracy.json instead of training it again",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    shards = ensure_demo_shards(args.shards)
    runs: dict[str, Any] = {}
    batch = [f"train.global_batch={BATCH}"]
    with tempfile.TemporaryDirectory(prefix="r2d2-accuracy-") as tmp:
        work = args.work or Path(tmp)
        if args.baseline_json is not None:
            runs["unet_1rank"] = json.loads(args.baseline_json.read_text())["runs"]["unet_1rank"]
        elif parts & {"unet", "strong", "weak"}:
            runs["unet_1rank"] = _run(work, "unet_1rank", shards, 1, UNET, args.unet_steps, batch)
        if "fcn" in parts:
            runs["fcn8s_1rank"] = _run(work, "fcn8s_1rank", shards, 1, FCN, args.fcn_steps, batch)
        if "strong" in parts:
            runs["unet_2rank_strong"] = _run(
                work, "unet_2rank_strong", shards, 2, UNET, args.unet_steps, batch
            )
        if "weak" in parts:
            for rule in ("none", "linear", "sqrt"):
                weak = [
                    "train.scaling=weak",
                    f"train.batch_per_rank={BATCH}",
                    f"train.lr_scaling={rule}",
                    f"train.lr_reference_batch={BATCH}",
                ]
                runs[f"unet_2rank_weak_{rule}"] = _run(
                    work,
                    f"unet_2rank_weak_{rule}",
                    shards,
                    2,
                    UNET,
                    args.weak_steps or args.unet_steps // 2,
                    weak,
                )
    base = runs.get("unet_1rank")
    accuracy_loss = {}
    if base is not None:
        for name, run in runs.items():
            if name.startswith("unet_2rank"):
                accuracy_loss[name] = {
                    "mean_foreground_dice_minus_1rank": run["mean_foreground_dice"]
                    - base["mean_foreground_dice"],
                    "per_class_minus_1rank": [
                        a - b for a, b in zip(run["dice_per_class"], base["dice_per_class"], strict=True)
                    ],
                }
    payload = {
        "benchmark": "accuracy",
        "machine": machine(),
        "data": "mni_tissue (2D axial, held-out slabs)",
        "runs": runs,
        "accuracy_loss_vs_1rank": accuracy_loss,
        "targets": {
            "unet_mean_foreground_dice": ">= 0.90 within 600 s",
            "fcn8s_mean_foreground_dice": ">= 0.80",
        },
    }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
