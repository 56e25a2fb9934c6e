"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from r2d2_hpc.config import DataConfig, PrepareConfig
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.synthetic import write_phantom_dataset

MakeShards = Callable[..., Path]


@pytest.fixture(scope="session")
def make_phantom_shards(tmp_path_factory: pytest.TempPathFactory) -> MakeShards:
    """Builds (once per argument set) a prepared shard set of real phantom NIfTI files; returns its directory.

    Keyword arguments go to ``write_phantom_dataset``; ``val_case`` names the validation case.
    """
    made: dict[tuple, Path] = {}

    def make(
        *,
        num_cases: int,
        num_channels: int,
        num_classes: int,
        shape: tuple[int, int, int],
        seed: int,
        val_case: str,
        layout: str = "2d",
    ) -> Path:
        key = (num_cases, num_channels, num_classes, tuple(shape), seed, val_case, layout)
        if key not in made:
            base = tmp_path_factory.mktemp("phantom-shards")
            write_phantom_dataset(
                base / "raw",
                num_cases=num_cases,
                num_channels=num_channels,
                num_classes=num_classes,
                shape=shape,
                seed=seed,
            )
            data = DataConfig(name="msd", root=str(base / "raw"), val_cases=[val_case], layout=layout)
            run_prepare(PrepareConfig(data=data, out=str(base / "shards"), num_workers=0, progress=False))
            made[key] = base / "shards"
        return made[key]

    return make
