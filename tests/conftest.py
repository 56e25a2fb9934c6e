"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
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


class Tmpfs:
    """A real tmpfs mounted at ``path`` (a small disk that fills up); ``resize`` remounts it with another size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def mount(self, size: str, read_only: bool = False) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        self._mount("-t", "tmpfs", "-o", options, "tmpfs", str(self.path))
        self.mounted = True
        return self.path

    def resize(self, size: str) -> None:
        self._mount("-o", f"remount,size={size}", str(self.path))

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False

    @staticmethod
    def _mount(*args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise OSError(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A tmpfs to mount (CI runs the tests as root); skipped, with the reason printed, where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("a small disk needs `mount -t tmpfs`, which needs root (CI runs the tests as root)")
    probe = Tmpfs(tmp_path / "probe-mount")
    try:
        probe.mount("64k")
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}); CI runs the tests as root where it can")
    probe.unmount()
    fs = Tmpfs(tmp_path / "small-disk")
    yield fs
    fs.unmount()
