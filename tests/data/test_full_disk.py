"""prepare on a disk that fills up: one clear message, no partial file left, and a rerun that continues.

The shard folder is a real small tmpfs (the tests run as root in CI; elsewhere they are skipped with the reason).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from r2d2_hpc.config import DataConfig, PrepareConfig
from r2d2_hpc.data.manifest import read_manifest
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.shards import ShardReader
from r2d2_hpc.data.synthetic import write_phantom_dataset
from r2d2_hpc.errors import DiskError


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "phantoms"
    write_phantom_dataset(root, num_cases=4, num_channels=2, num_classes=3, shape=(32, 32, 15), seed=1)
    return root


def _prepare(raw: Path, out: Path) -> Path:
    data = DataConfig(name="msd", root=str(raw), val_cases=["phantom_003"])
    return run_prepare(PrepareConfig(data=data, out=str(out), num_workers=0, progress=False))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if "tmp" in p.name)


def test_prepare_on_a_full_disk_stops_cleanly_and_a_rerun_continues(raw: Path, tmpfs, caplog) -> None:
    out = tmpfs.mount("400k") / "shards"  # ~110 kB per staged case (~210 kB uncompressed), ~400 kB of shards

    with pytest.raises(DiskError) as caught:
        _prepare(raw, out)
    message = str(caught.value)
    # HDF5 would crash the process on a full disk: the space for each case is checked before it is written
    assert message.startswith(f"{out / '.staging'}: writing case 'phantom_00")
    assert "would not fit: it needs about" in message and "KiB free there" in message
    assert "Fix: free space on that file system" in message and "run prepare again" in message
    assert _leftovers(out) == []
    staged_first = {p.name for p in (out / ".staging").glob("*.json")}
    assert 1 <= len(staged_first) < 4

    tmpfs.resize("800k")  # room for the staging files, not for the shards beside them
    with pytest.raises(
        DiskError, match=rf"^{out}: writing case 'phantom_00\d' \(uncompressed\) would not fit"
    ):
        _prepare(raw, out)
    assert _leftovers(out) == [] and not list(out.glob("shard-*")) and not (out / "manifest.json").exists()
    assert len(list((out / ".staging").glob("*.json"))) == 4

    tmpfs.resize("4m")
    with caplog.at_level(logging.INFO, logger="r2d2_hpc.data.prepare"):
        manifest_path = _prepare(raw, out)
    assert "staged 4 case(s) (0 preprocessed now)" in caplog.text  # the staged cases were not redone
    manifest = read_manifest(out)
    assert manifest_path == out / "manifest.json" and sorted(manifest["cases"]) == [
        f"phantom_00{i}" for i in range(4)
    ]
    reader = ShardReader(out, manifest=manifest)
    assert reader.read_image("phantom_002").shape[0] == 2
    reader.close()
    assert _leftovers(out) == []


def test_an_unwritable_shard_folder_is_reported_before_any_case_is_read(tmp_path: Path, tmpfs) -> None:
    disk = tmpfs.mount("1m", read_only=True)
    with pytest.raises(DiskError) as caught:
        _prepare(tmp_path / "no-such-dataset", disk / "shards")  # the source is never opened
    message = str(caught.value)
    assert "the shard folder (prepare.out)" in message and "read-only" in message
