"""Published scaling figures (``analysis/reference/*.csv``, shipped in the wheel too), drawn beside measured ones on request.

Every CSV has the columns of :data:`COLUMNS`; ``source`` and ``url`` say where each number comes from and
``verified`` how it was checked. Empty cells are unknown (the R2D2 paper's abstract gives its speedups without
the scale they were reached at, so they are drawn as horizontal lines, not points).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from r2d2_hpc.analysis.jsonl import LogError
from r2d2_hpc.errors import problem

COLUMNS = (
    "system",
    "model",
    "hardware",
    "precision",
    "scaling",
    "baseline",
    "num_gpus",
    "num_nodes",
    "batch_per_gpu",
    "throughput",
    "throughput_unit",
    "speedup",
    "efficiency",
    "source",
    "url",
    "verified",
    "notes",
)


def default_reference_dir() -> Path:
    """The reference CSVs: inside an installed wheel (``reference_csv``), else the checkout's ``analysis/reference``."""
    packaged = Path(__file__).resolve().parent / "reference_csv"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "analysis" / "reference"


def load_references(directory: Path | None = None) -> pd.DataFrame:
    """All reference rows, with a ``file`` column; raises :class:`LogError` on a CSV without the columns."""
    directory = Path(directory) if directory is not None else default_reference_dir()
    files = sorted(directory.glob("*.csv")) if directory.is_dir() else []
    if not files:
        raise LogError(
            problem(
                directory,
                "no reference CSV files",
                "analysis/reference/*.csv of an r2d2_hpc checkout (or reference_csv/ of the wheel)",
                "reinstall r2d2_hpc, or pass reference_dir / --reference-dir",
            )
        )
    frames = []
    for path in files:
        table = pd.read_csv(path)
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise LogError(
                problem(path, f"columns {missing} are missing", f"the columns {list(COLUMNS)}", "add them")
            )
        frames.append(table.assign(file=path.name))
    table = pd.concat(frames, ignore_index=True)
    for column in ("num_gpus", "num_nodes", "batch_per_gpu", "throughput", "speedup", "efficiency"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def reference_label(row: pd.Series) -> str:
    """A legend entry: system and model, e.g. ``Horovod ResNet-101`` (one marker style per entry)."""
    return f"{row['system']} {row['model']}"
