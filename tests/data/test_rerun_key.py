"""prepare's rerun key as a property: changing any one data/ or storage field rebuilds, or the field is listed as
output-neutral (with a reason) in r2d2_hpc/data/rerun.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from r2d2_hpc.config import DataConfig, PrepareConfig, ShardConfig
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.rerun import OUTPUT_NEUTRAL, rerun_key
from r2d2_hpc.data.synthetic import write_phantom_dataset

# One changed, valid value per field, for a 2-class, 1-channel MSD-layout phantom set. "root" is filled in by
# the test (a copy of the dataset). A field added to DataConfig or ShardConfig must be added here too.
CHANGED: dict[str, Any] = {
    "data.name": "synthetic",  # the same folder read as synthetic phantoms (it has a dataset.json)
    "data.root": None,
    "data.dataset_name": "renamed",
    "data.shards": "elsewhere",
    "data.image_glob": "img/*.nii.gz",
    "data.label_glob": "lab/*.nii.gz",
    "data.case_id_regex": r"^(?P<case>.+?)\.nii(\.gz)?$",
    "data.channel_regex": None,
    "data.class_names": ["background", "lesion"],
    "data.channel_names": ["T2"],
    "data.modality": "CT",
    "data.affine_tolerance": 1e-2,
    "data.target_spacing": [2.0, 2.0, 2.0],
    "data.normalisation": "zscore",
    "data.ct_window": [-100.0, 100.0],
    "data.ct_percentiles": [1.0, 99.0],
    "data.crop_nonzero": True,
    "data.label_map": {1: 1},
    "data.layout": "3d",
    "data.slice_axis": 1,
    "data.patch_size": [8, 8, 4],
    "data.foreground_fraction": 0.9,
    "data.samples_per_epoch": 64,
    "data.patches_per_case": 4,
    "data.chunk_cache_mib": 0.0,
    "data.hdf5_locking": True,
    "data.on_corrupt_sample": "skip",
    "data.val_fraction": 0.5,
    "data.split_seed": 3,
    "data.val_cases": ["phantom_000"],
    "data.slab_thickness": 6,
    "data.slab_gap": 2,
    "data.slab_axis": 1,
    "data.val_every": 4,
    "data.num_cases": 4,
    "data.num_channels": 1,
    "data.num_classes": 4,
    "data.phantom_shape": [20, 20, 10],
    "data.seed": 5,
    "storage.target_shard_mib": 0.01,
    "storage.compression": "gzip",
    "storage.compression_level": 3,
    "storage.image_dtype": "float16",
    "storage.chunk_slices": 2,
    "storage.chunk_edge": 8,
}
FIELDS = [f"data.{f.name}" for f in dataclasses.fields(DataConfig)] + [
    f"storage.{f.name}" for f in dataclasses.fields(ShardConfig)
]


def _configs(raw: Path, field: str | None = None, value: Any = None) -> tuple[DataConfig, ShardConfig]:
    data = {"name": "msd", "root": str(raw), "val_cases": ["phantom_002"]}
    storage: dict[str, Any] = {}
    if field is not None:
        section, name = field.split(".")
        (data if section == "data" else storage)[name] = value
    return DataConfig(**data), ShardConfig(**storage)


def test_every_field_is_classified_with_a_changed_value() -> None:
    assert sorted(CHANGED) == sorted(FIELDS), (
        "add the new field to CHANGED (and to rerun.py if output-neutral)"
    )
    assert set(OUTPUT_NEUTRAL) <= set(FIELDS)
    assert all(len(reason) > 20 for reason in OUTPUT_NEUTRAL.values())


@pytest.mark.parametrize("field", FIELDS)
def test_a_changed_field_changes_the_key_unless_it_is_listed_as_output_neutral(
    field: str, tmp_path: Path
) -> None:
    value = str(tmp_path / "copy") if field == "data.root" else CHANGED[field]
    before, after = rerun_key(*_configs(tmp_path)), rerun_key(*_configs(tmp_path, field, value))
    if field in OUTPUT_NEUTRAL:
        assert before == after
    else:
        assert before != after


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    write_phantom_dataset(raw, num_cases=3, num_channels=1, num_classes=2, shape=(12, 12, 8), seed=2)
    return raw


def _prepare(raw: Path, out: Path, field: str | None = None, value: Any = None) -> dict[str, Any]:
    data, storage = _configs(raw, field, value)
    data.shards = None
    run_prepare(PrepareConfig(data=data, storage=storage, out=str(out), num_workers=0, progress=False))
    return json.loads((out / "manifest.json").read_text())


# A real prepare for every field but the source kind (synthetic phantoms check their own settings against the
# folder); a rebuild is a new shard generation, "up to date" keeps the old one.
REAL = [f for f in FIELDS if f not in ("data.name",)]


def test_prepare_rebuilds_on_each_output_changing_field_and_not_on_neutral_ones(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "shards"
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    base = _prepare(dataset, out)
    assert len(base["classes"]) == 2 and base["classes"][1] != "lesion"
    problems = []
    for field in REAL:
        value = str(copy) if field == "data.root" else CHANGED[field]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="r2d2_hpc.data.prepare"):
            changed = _prepare(dataset, out, field, value)
        rebuilt = changed["shards"] != base["shards"]
        if rebuilt == (field in OUTPUT_NEUTRAL):
            problems.append(f"{field}={value!r}: {'rebuilt' if rebuilt else 'kept as up to date'}")
        if rebuilt:
            base = _prepare(dataset, out)  # back to the baseline for the next field
    assert not problems, "\n".join(problems)
    # The reported bug: new class names used to be "up to date", keeping the old names in the manifest.
    renamed = _prepare(dataset, out, "data.class_names", ["background", "lesion"])
    assert renamed["classes"] == ["background", "lesion"]
