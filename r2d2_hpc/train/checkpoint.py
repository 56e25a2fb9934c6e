"""Training checkpoints: ``checkpoints/last.pt`` (and ``prev.pt``), written so that a kill never loses both.

Format ``r2d2-checkpoint`` version 1 is a ``torch.save``'d dict with ``format``, ``format_version``, ``step``,
``epoch``, ``model`` (state dict of the unwrapped model), ``optimizer``, ``scheduler``, ``scaler`` (or None),
``sampler`` (dict), ``rng`` (a list indexed by rank of :func:`capture_rng_state` dicts), ``config_hash``,
``model_info``, ``world_size`` and ``extra``, plus ``saved_at`` and ``torch_version``.

Checkpoints are trusted files: numpy's RNG state is a pickled tuple, so they are loaded with
``weights_only=False``, which can run code from the file. Only resume from checkpoints you wrote yourself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from r2d2_hpc.atomic import atomic_write
from r2d2_hpc.errors import R2D2Error, problem
from r2d2_hpc.train.dist import DistEnv

log = logging.getLogger(__name__)

FORMAT = "r2d2-checkpoint"
VERSION = 1
FORMAT_VERSION = VERSION
LAST, PREV, TMP = "last.pt", "prev.pt", "last.pt.tmp"
REQUIRED_KEYS = ("step", "epoch", "model", "optimizer", "config_hash", "world_size")
_DEFAULTS: dict[str, Any] = {
    "scheduler": None,
    "scaler": None,
    "sampler": {},
    "rng": None,
    "model_info": {},
    "extra": {},
}
_FIX = "set resume=never to start over, or point resume= at a good checkpoint file"
RESUME_FIX = _FIX  # the training fix in every CheckpointError; predict swaps in its own (inference/model.py)


class CheckpointError(R2D2Error):
    """A checkpoint is missing, truncated, of an unknown format, or belongs to another run."""


def capture_rng_state() -> dict[str, Any]:
    """This process' RNG states: torch (CPU), CUDA (current device, when CUDA is in use), numpy, python."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured (tensors may have been mapped to a GPU by the load)."""
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8).cpu())
    np.random.set_state(state["numpy"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def gather_rng_states(env: DistEnv, group: tdist.ProcessGroup | None) -> list[dict[str, Any]] | None:
    """Every rank calls this; rank 0 gets every rank's :func:`capture_rng_state`, the others None.

    ``group`` must be a gloo group (what :func:`~r2d2_hpc.train.dist.init_process_group` returns): with NCCL,
    ``gather_object`` would open point-to-point links from rank 0 to every rank and copy through the GPUs.
    """
    own = capture_rng_state()
    if env.world_size == 1 or not (tdist.is_available() and tdist.is_initialized()):
        if env.world_size > 1:
            raise RuntimeError(
                "gather_rng_states needs the process group of a multi-rank job; call init_process_group first"
            )
        return [own]
    if group is None or tdist.get_backend(group) != "gloo":
        raise RuntimeError("gather_rng_states needs a gloo group (init_process_group returns one)")
    states: list[Any] | None = [None] * env.world_size if env.is_main else None
    tdist.gather_object(own, states, dst=0, group=group)
    return states


def config_hash(parts: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of JSON-able config parts (key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Writes ``directory/last.pt`` (rank 0 only) and keeps the previous one as ``prev.pt``; returns the path.

    The new file is written to ``last.pt.tmp``, flushed and fsynced, then ``last.pt`` becomes ``prev.pt`` and the
    temporary file becomes ``last.pt`` (both ``os.replace``, atomic on POSIX), and the directory is fsynced. A kill
    at any moment leaves at least one complete checkpoint whenever one existed before. A full or unwritable disk
    raises :class:`~r2d2_hpc.errors.DiskError` (the temporary file is removed, ``last.pt`` and ``prev.pt`` stay),
    and non-finite model weights raise :class:`CheckpointError`: a diverged run never overwrites a good checkpoint.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"save_checkpoint: the state lacks {', '.join(missing)}; a checkpoint needs "
            f"{', '.join(REQUIRED_KEYS)}"
        )
    full = {
        **_DEFAULTS,
        **state,
        "format": FORMAT,
        "format_version": VERSION,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_version": torch.__version__,
    }
    bad = nonfinite_tensors(state["model"])
    if bad:
        raise CheckpointError(
            problem(
                directory,
                f"refusing to write a checkpoint of non-finite weights ({', '.join(bad[:3])} hold NaN or inf)",
                "finite weights",
                "the run diverged: resume from the last good checkpoint with a lower train.lr",
            )
        )
    directory = Path(directory)
    last = directory / LAST

    def keep_previous() -> None:
        if last.exists():
            os.replace(last, directory / PREV)

    fix = (
        f"run again with resume=auto: it continues from {last}, the last complete checkpoint"
        if last.exists()
        else "run again (resume=auto)"
    )
    what = f"the checkpoint of step {state['step']} ({TMP})"
    with (
        atomic_write(last, what, fix, _nbytes(full), tmp=directory / TMP, before_rename=keep_previous) as tmp,
        open(tmp, "wb") as fh,
    ):
        torch.save(full, fh)
    return last


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [
        name
        for name, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays inside ``value``: about the size of its checkpoint file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def load_checkpoint(
    directory_or_file: Path, expected_config_hash: str | None, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """Loads the newest usable checkpoint; returns ``(state, path)``, or None when there is none at all.

    A directory is searched for ``last.pt`` then ``prev.pt``; a candidate that cannot be read, has another
    format or version, or another ``config_hash`` (a foreign checkpoint: another model or run) is logged as a
    warning and the next one is tried. A path that does not exist gives None unless it ends in ``.pt``.

    Raises:
        CheckpointError: checkpoints exist but none is usable (each file's problem is listed), or an explicitly
            named file is missing or unusable.
    """
    path = Path(directory_or_file)
    if path.is_file() or (not path.exists() and path.suffix == ".pt"):
        return _load_one(path, expected_config_hash, map_location), path
    candidates = [path / name for name in (LAST, PREV) if (path / name).is_file()]
    if not candidates:
        if (path / TMP).exists():
            log.info(
                "%s is an incomplete first checkpoint (the run was stopped while writing it); ignoring it",
                path / TMP,
            )
        return None
    problems = []
    for candidate in candidates:
        try:
            state = _load_one(candidate, expected_config_hash, map_location)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s", exc)
            problems.append(str(exc))
            continue
        if problems:
            log.warning("resuming from the older checkpoint %s", candidate)
        return state, candidate
    listing = "\n".join(f"  - {p}" for p in problems)
    raise CheckpointError(f"{path}: no usable checkpoint:\n{listing}\nFix: {_FIX}")


def _load_one(path: Path, expected_hash: str | None, map_location: Any) -> dict[str, Any]:
    """Loads and checks one file; every problem is a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(problem(path, "the file does not exist", "a checkpoint file", _FIX))
    try:
        with open(path, "rb") as fh:
            state = torch.load(fh, map_location=map_location, weights_only=False)  # trusted files (see above)
    except Exception as exc:  # any failure to unpickle means the file is cut or not a torch file
        found = f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]}): truncated or not a torch file"
        raise CheckpointError(problem(path, found, f"a complete {FORMAT} file", _FIX)) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = f"format {state.get('format')!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(
            problem(path, f"it is not an r2d2_hpc checkpoint ({found})", f"format {FORMAT!r}", _FIX)
        )
    version = state.get("format_version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        found = f"format_version {version!r}" + (" (written by a newer r2d2_hpc)" if newer else "")
        fix = "upgrade r2d2_hpc to read it, or " + _FIX if newer else _FIX
        raise CheckpointError(problem(path, found, f"format_version {VERSION}", fix))
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(problem(path, f"it lacks {', '.join(missing)}", "a complete checkpoint", _FIX))
    if expected_hash is not None and state["config_hash"] != expected_hash:
        found = (
            f"it belongs to another run or model (config_hash {state['config_hash']}, this run has "
            f"{expected_hash})"
        )
        raise CheckpointError(
            problem(path, found, "a checkpoint of this run's settings", "use a new run_dir, or " + _FIX)
        )
    return state


@dataclass
class TrainingParts:
    """What a checkpoint saves and restores in place: the unwrapped model, its optimizer, scheduler and scaler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any | None = None


def training_state(
    parts: TrainingParts,
    *,
    step: int,
    epoch: int,
    offset: int,
    seed: int,
    rng: list[dict[str, Any]] | None,
    config_hash: str,
    model_info: dict[str, Any],
    world_size: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The dict :func:`save_checkpoint` writes (format version 1; see the module docstring)."""
    return {
        "format": FORMAT,
        "format_version": VERSION,
        "step": step,
        "epoch": epoch,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler else None,
        "sampler": {"epoch": epoch, "offset": offset, "seed": seed},
        "rng": rng,
        "config_hash": config_hash,
        "model_info": model_info,
        "world_size": world_size,
        "extra": extra,
    }


def restore_training_state(parts: TrainingParts, state: dict[str, Any], env: DistEnv, path: Path) -> int:
    """Loads ``state`` into ``parts`` and this rank's RNG streams; returns the checkpoint's step.

    The RNG state of this rank is restored only when the checkpoint was written with the same number of ranks;
    otherwise data order and RNG streams restart (logged as a warning).
    """
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    if state.get("world_size") == env.world_size and state.get("rng"):
        restore_rng_state(state["rng"][env.rank])
    else:
        log.warning(
            "%s was written with %s ranks, this run has %d: data order and RNG streams restart",
            path,
            state.get("world_size"),
            env.world_size,
        )
    return int(state["step"])


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests on all ranks prove they hold the same model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
