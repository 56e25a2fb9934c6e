"""The plan of a study: its models, and one run per model x scale x repeat with its training config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from r2d2_hpc.config import CONF_DIR, LaunchConfig, RunConfig
from r2d2_hpc.errors import ConfigError
from r2d2_hpc.launch.record import StudyRun


def model_configs(lc: LaunchConfig, explicit_model: bool) -> dict[str, dict[str, Any]]:
    """The model config of every model in the study.

    ``study.models`` lists names whose settings come from ``conf/model/<name>.yaml``; the model chosen by the
    ``model`` group keeps its command-line overrides; ``study.model_overrides`` then applies per model. An explicit ``model=<name>`` on the command line (and Hydra
    multirun ``-m model=unet,fcn``) restricts the study to that model.
    """
    chosen = dict(lc.model)
    names = [chosen["name"]] if explicit_model or not lc.study.models else list(lc.study.models)
    configs = {}
    for name in names:
        if name == chosen["name"]:
            configs[name] = chosen
            continue
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            valid = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
            raise ConfigError(f"study.models names {name!r}, which has no {path}. Valid models are: {valid}")
        configs[name] = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[assignment]
        configs[name]["spatial_dims"] = chosen.get("spatial_dims", configs[name].get("spatial_dims", 2))
    for name, overrides in lc.study.model_overrides.items():
        if name in configs:
            configs[name] = configs[name] | dict(overrides)
    return configs


def nodes_and_ranks(scale: int, unit: str, per_node: int) -> tuple[int, int]:
    """(nodes, total ranks) of one scale: ``scale`` nodes, or ``scale`` ranks packed ``per_node`` to a node."""
    if unit == "nodes":
        return scale, scale * per_node
    if scale > per_node and scale % per_node:
        raise ConfigError(
            f"study.scales has {scale} ranks, which do not fill nodes of {per_node} ranks "
            f"(launcher.tasks_per_node / gpus_per_node); use multiples of {per_node}"
        )
    return max(1, scale // per_node), scale


def plan(lc: LaunchConfig, models: dict[str, dict[str, Any]]) -> list[StudyRun]:
    """Every run of the study, smallest scale first."""
    per_node = lc.launcher.ranks_per_node()
    unit = "ranks" if lc.launcher.name in ("local", "debug") else lc.study.scale_unit  # one machine: ranks
    tag = "n" if unit == "nodes" else "w"
    runs = []
    for name in models:
        for scale in sorted({int(s) for s in lc.study.scales}):
            nodes, world = nodes_and_ranks(scale, unit, per_node)
            if lc.launcher.name in ("local", "debug"):
                nodes = 1  # every rank on this machine
            for repeat in range(lc.study.repeats):
                run_name = f"{name}-{tag}{scale}-r{repeat}"
                runs.append(StudyRun(run_name, name, nodes, world, repeat, f"runs/{run_name}"))
    return runs


def run_config(lc: LaunchConfig, model: dict[str, Any], study_dir: Path, run: StudyRun) -> RunConfig:
    """The training config of one run; checks the batch split for its world size up front.

    Repeat ``r`` trains with ``train.seed + r``: the repeats of a scale are independent seeds, so their spread
    is the spread over seeds (what the report's convergence check needs), and a scale's repeat ``r`` shares its
    seed with repeat ``r`` of every other scale.
    """
    train = replace(lc.train, seed=lc.train.seed + run.repeat)
    # Absolute paths: a job may start in another directory (sbatch --chdir, a requeue, another node).
    data = replace(lc.data, shards=str(Path(lc.data.shard_dir()).absolute()))
    cfg = RunConfig(data=data, model=model, train=train, run_dir=str(study_dir / run.run_dir), resume="auto")
    cfg.train.micro_batch(run.world_size)  # a global batch that cannot be split fails here, not in a job
    return cfg


def describe(lc: LaunchConfig, runs: list[StudyRun], study_dir: Path) -> str:
    """The plan in a few lines, printed before anything starts: runs, resources, steps, batch, LR, outputs."""
    from r2d2_hpc.train.schedule import scaled_lr

    t, lp = lc.train, lc.launcher
    models = list(dict.fromkeys(r.model for r in runs))
    scales = sorted({r.world_size if lp.name in ("local", "debug") else r.nodes for r in runs})
    unit = "ranks" if lp.name in ("local", "debug") else lc.study.scale_unit
    device = "GPU" if lp.gpus_per_node and lp.name not in ("local", "debug") else "CPU rank"
    lines = [
        f"plan: {len(runs)} run(s) = {len(models)} model(s) ({', '.join(models)}) x {len(scales)} scale(s) "
        f"({', '.join(map(str, scales))} {unit}) x {lc.study.repeats} repeat(s), launcher={lp.name}",
        f"  {'run':<22} {'nodes':>5} {device + 's':>10} {'global batch':>12} {'batch/rank':>10} {'peak lr':>9}",
    ]
    for r in runs:
        batch = t.effective_global_batch(r.world_size)
        lr = scaled_lr(t.lr, t.lr_scaling, batch, t.lr_reference_batch)
        lines.append(
            f"  {r.name:<22} {r.nodes:>5} {r.world_size:>10} {batch:>12} {batch // r.world_size:>10} {lr:>9.3g}"
        )
    fixed = "global batch fixed, split over ranks" if t.scaling == "strong" else "batch per rank fixed"
    warmup = "warmup from the LR rule" if t.warmup_steps is None else f"warmup {t.warmup_steps} step(s)"
    lines += [
        f"  training: {t.max_steps} steps, {t.scaling} scaling ({fixed}), lr {t.lr:g} with rule "
        f"{t.lr_scaling} (reference batch {t.lr_reference_batch}), {warmup}, "
        f"data {Path(lc.data.shard_dir()).absolute()}",
        f"  results: {study_dir}/runs/<run>/ (logs, checkpoints, result.json); report: {study_dir}/report/",
    ]
    return "\n".join(lines)
