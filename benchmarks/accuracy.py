"""Accuracy on real data, over seeds: U-Net and FCN-8s on the MNI152 tissue task (2D axial slices), on the CPU.

    .venv/bin/python -m benchmarks.accuracy --out benchmarks/results/accuracy.json [--only unet,fcn,strong,weak]
        [--seeds 0,1,2] [--quick]

Every configuration is trained once per seed (``train.seed``: the same initial weights and data order for the
same seed in every configuration), so each 2-rank run is compared with the 1-rank run of its own seed. For every
configuration the JSON holds ``seeds`` (one entry per seed with its Dice per class and mean foreground Dice) and,
for the 2-rank U-Net runs, ``delta_vs_1rank``: the mean over seeds of the paired Dice change against 1 rank, per
class and mean foreground, with a 95% Student-t interval (n - 1 degrees of freedom). A change is called a
``loss`` (or a ``gain``) only when its interval excludes zero; otherwise ``none_detected``.

Configurations:
- ``unet_1rank``, ``fcn8s_1rank``: one rank, global batch 8, ``--unet-steps`` / ``--fcn-steps`` steps (each chosen
  to take about 10 minutes on the 2-core machine; the JSON records the measured wall time beside the Dice);
- ``unet_2rank_strong``: the same global batch split over 2 ranks (4 + 4), the same steps;
- ``unet_2rank_weak_<rule>``: 2 ranks with 8 samples each (a global batch of 16) for half the steps, so every run
  sees the same number of samples; once per LR rule (none, linear, sqrt), each with its default warm-up
  (``train.warmup_steps`` unset: it follows the rule, see r2d2_hpc/train/schedule.py).
``recommended_weak`` is the weak-scaling rule with the best mean foreground Dice, its warm-up, its mean Dice
``delta`` against 1 rank and the interval: the rule the README recommends for weak scaling.

``--quick`` trains a tiny U-Net for a few steps: it checks the benchmark end to end in about a minute and says so
in the JSON (``"quick": true``); its figures are not accuracy results.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from scipy import stats

from benchmarks._common import REPO, ensure_demo_shards, machine, train_run, write_json

UNET = ["model=unet", "model.base_width=16"]
FCN = ["model=fcn", "model.base_width=16", "model.fc_width=256"]
QUICK_MODEL = ["model=unet", "model.base_width=4", "model.depth=2"]
BATCH = 8
RULES = ("none", "linear", "sqrt")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("dice_per_class", "mean_foreground_dice", "steps", "global_batch", "wall_s", "world_size")
    return {k: result.get(k) for k in keys} | {"warmup_steps": result.get("warmup_steps")}


def _train(work: Path, name: str, shards: Path, world: int, model: list[str], steps: int, extra: list[str]):
    overrides = [
        f"data.shards={shards}",
        *model,
        f"train.max_steps={steps}",
        f"train.eval_every_steps={max(1, steps // 4)}",
        "train.checkpoint_every_steps=0",
        f"train.threads_per_rank={max(1, 2 // world)}",
        "train.num_workers=1",
        *extra,
    ]
    t0 = time.monotonic()
    result = _summary(train_run(work / name, world, overrides))
    result["process_wall_s"] = round(time.monotonic() - t0, 1)
    print(
        f"{name}: mean foreground Dice {result['mean_foreground_dice']:.4f}, {result['wall_s']:.0f} s",
        flush=True,
    )
    return result


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of ``values``; a verdict only when the interval excludes zero."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "verdict": "too_few_seeds"}
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = "loss" if high < 0 else "gain" if low > 0 else "none_detected"
    return {"mean": mean, "ci95": [low, high], "n": n, "verdict": verdict}


def paired_delta(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Dice change against 1 rank, paired by seed: mean foreground and per class, each with its interval."""
    by_seed = {s["seed"]: s for s in base["seeds"]}
    pairs = [(s, by_seed[s["seed"]]) for s in run["seeds"] if s["seed"] in by_seed]
    mean_fg = [a["mean_foreground_dice"] - b["mean_foreground_dice"] for a, b in pairs]
    classes = len(pairs[0][0]["dice_per_class"]) if pairs else 0
    per_class = [
        interval([a["dice_per_class"][k] - b["dice_per_class"][k] for a, b in pairs]) for k in range(classes)
    ]
    return {
        "seeds": [a["seed"] for a, _ in pairs],
        "mean_foreground": interval(mean_fg),
        "per_class": per_class,
    }


def _config(work: Path, name: str, seeds: list[int], train) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        runs.append({"seed": seed} | train(work, f"{name}_s{seed}", [f"train.seed={seed}"]))
    fg = [r["mean_foreground_dice"] for r in runs]
    return {"seeds": runs, "mean_foreground_dice": interval(fg), "wall_s_max": max(r["wall_s"] for r in runs)}


def _configs(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    """(name -> (world, model, steps, extra overrides)) of the parts asked for."""
    unet = QUICK_MODEL if args.quick else UNET
    fcn = QUICK_MODEL if args.quick else FCN
    weak_steps = args.weak_steps or args.unet_steps // 2
    batch = [f"train.global_batch={BATCH}"]
    parts = set(args.only.split(","))
    wanted: dict[str, Any] = {}
    if parts & {"unet", "strong", "weak"}:
        wanted["unet_1rank"] = (1, unet, args.unet_steps, batch)
    if "fcn" in parts:
        wanted["fcn8s_1rank"] = (1, fcn, args.fcn_steps, batch)
    if "strong" in parts:
        wanted["unet_2rank_strong"] = (2, unet, args.unet_steps, batch)
    if "weak" in parts:
        for rule in RULES:
            weak = ["train.scaling=weak", f"train.batch_per_rank={BATCH}", f"train.lr_scaling={rule}"]
            wanted[f"unet_2rank_weak_{rule}"] = (
                2,
                unet,
                weak_steps,
                [*weak, f"train.lr_reference_batch={BATCH}"],
            )
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/accuracy.json")
    parser.add_argument("--shards", type=Path, default=REPO / "data/prepared/mni_tissue")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (at least 3)")
    parser.add_argument("--unet-steps", type=int, default=300)
    parser.add_argument("--fcn-steps", type=int, default=400)
    parser.add_argument("--weak-steps", type=int, default=None, help="default: --unet-steps / 2")
    parser.add_argument("--only", default="unet,fcn,strong,weak", help="parts: unet, fcn, strong, weak")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and 8 steps: checks the benchmark only"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    if args.quick:
        args.unet_steps, args.fcn_steps = 8, 8
    seeds = [int(s) for s in args.seeds.split(",")]
    shards = ensure_demo_shards(args.shards)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="r2d2-accuracy-") as tmp:
        work = args.work or Path(tmp)
        for name, (world, model, steps, extra) in _configs(args, shards).items():

            def train(work: Path, run: str, more: list[str], w=world, m=model, s=steps, e=extra):
                return _train(work, run, shards, w, m, s, [*e, *more])

            results[name] = _config(work, name, seeds, train)
    base = results.get("unet_1rank")
    for name, config in results.items():
        if base is not None and name.startswith("unet_2rank"):
            config["delta_vs_1rank"] = paired_delta(config, base)
    weak = {n: c for n, c in results.items() if n.startswith("unet_2rank_weak_") and "delta_vs_1rank" in c}
    payload: dict[str, Any] = {
        "benchmark": "accuracy",
        "quick": args.quick,
        "machine": machine(),
        "data": "mni_tissue (2D axial, held-out slabs)",
        "seeds": seeds,
        "configurations": results,
        "targets": {
            "unet_mean_foreground_dice": ">= 0.90, each run within 600 s",
            "fcn8s_mean_foreground_dice": ">= 0.80",
            "weak_2rank_recommended_rule": "mean Dice within 0.005 of 1 rank",
        },
    }
    if weak:
        name = max(weak, key=lambda n: weak[n]["mean_foreground_dice"]["mean"])
        delta = weak[name]["delta_vs_1rank"]["mean_foreground"]
        payload["recommended_weak"] = {
            "rule": name.removeprefix("unet_2rank_weak_"),
            "warmup_steps": weak[name]["seeds"][0].get("warmup_steps"),
            "delta": delta["mean"],
            "ci95": delta["ci95"],
            "verdict": delta["verdict"],
        }
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
