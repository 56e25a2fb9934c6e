"""prepare end to end: sources -> shards + manifest, resume, kill -9 safety, orientation, round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from r2d2_hpc.config import DataConfig, PrepareConfig, ShardConfig
from r2d2_hpc.data.manifest import read_manifest
from r2d2_hpc.data.prepare import run_prepare
from r2d2_hpc.data.preprocess import preprocess
from r2d2_hpc.data.shards import ShardReader
from r2d2_hpc.data.sources import build_source
from r2d2_hpc.data.synthetic import write_phantom_dataset
from r2d2_hpc.errors import DataError
from r2d2_hpc.verify import verify

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "Task99_Phantom"
    write_phantom_dataset(root, num_cases=5, num_channels=2, num_classes=3, shape=(32, 28, 20), seed=3)
    return root


def _cfg(root: Path, out: Path, **storage: object) -> PrepareConfig:
    return PrepareConfig(
        data=DataConfig(name="msd", root=str(root), val_fraction=0.4),
        storage=ShardConfig(**storage),  # type: ignore[arg-type]
        out=str(out),
        num_workers=0,
        progress=False,
    )


def test_round_trip_float32_is_exact(phantoms: Path, tmp_path: Path) -> None:
    cfg = _cfg(phantoms, tmp_path / "shards", compression="gzip", target_shard_mib=0.05)
    run_prepare(cfg)
    manifest = read_manifest(tmp_path / "shards")
    assert len(manifest["shards"]) >= 2, "a small target size must roll over into several shards"
    assert sorted(manifest["split"]["train"] + manifest["split"]["val"]) == sorted(manifest["cases"])
    assert len(manifest["split"]["val"]) == 2
    source = build_source(cfg.data)
    reader = ShardReader(tmp_path / "shards")
    for ref in source.cases():
        expected = preprocess(source.load(ref), cfg.data, source.info)
        np.testing.assert_array_equal(reader.read_image(ref.case_id), expected.image)
        np.testing.assert_array_equal(reader.read_label(ref.case_id), expected.label)
        entry = manifest["cases"][ref.case_id]
        np.testing.assert_allclose(entry["affine"], expected.affine)
        assert entry["voxels_per_class"] == np.bincount(expected.label.ravel(), minlength=3).tolist()
        assert set(entry["source_files"]) == set(ref.files)
    assert verify(tmp_path / "shards") == []
    assert not (tmp_path / "shards" / ".staging").exists()


def test_rerun_skips_unchanged_cases_and_redoes_changed_ones(phantoms: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(phantoms), str(root)], check=True)
    out = tmp_path / "shards"
    run_prepare(_cfg(root, out))
    first = read_manifest(out)
    run_prepare(_cfg(root, out))  # nothing changed: the same manifest, untouched
    assert read_manifest(out) == first

    # Change one source image: only that case is preprocessed again, the others come from the old shards.
    case = sorted(first["cases"])[0]
    img_path = Path(first["cases"][case]["source_files"]["image"]["path"])
    img = nib.load(img_path)
    data = np.asarray(img.dataobj, dtype=np.float32) * 2.0 + 1.0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), img_path)
    run_prepare(_cfg(root, out))
    second = read_manifest(out)
    assert second["cases"][case]["source_sha256"] != first["cases"][case]["source_sha256"]
    for other in sorted(first["cases"])[1:]:
        assert second["cases"][other]["source_sha256"] == first["cases"][other]["source_sha256"]
    old_files = {s["file"] for s in first["shards"]}
    new_files = {s["file"] for s in second["shards"]}
    assert not old_files & new_files, "a new generation of shards replaces the old one"
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(new_files), "old shards are removed"
    assert verify(out) == []


def test_failed_case_keeps_the_others_staged(phantoms: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(phantoms), str(root)], check=True)
    bad = sorted((root / "imagesTr").glob("*.nii.gz"))[1]
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated gzip
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=bad.name):
        run_prepare(_cfg(root, out))
    assert not (out / "manifest.json").exists(), "no manifest while a case failed"
    staged = sorted(p.stem for p in (out / ".staging").glob("*.json"))
    assert len(staged) == 4
    bad.write_bytes(good_bytes)
    run_prepare(_cfg(root, out))
    assert len(read_manifest(out)["cases"]) == 5
    assert verify(out) == []


def test_lps_volume_keeps_world_coordinates(tmp_path: Path) -> None:
    """A voxel marked in an LPS-stored file sits at the same world position after preparing."""
    shape = (12, 10, 8)
    affine = np.diag([-1.5, -1.0, 2.0, 1.0])
    affine[:3, 3] = [20.0, 15.0, -8.0]
    image = np.ones(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    marker = (2, 7, 5)
    image[marker] = 50.0
    label[marker] = 1
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "labels").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "src" / "images" / "lps.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "src" / "labels" / "lps.nii.gz")
    cfg = PrepareConfig(
        data=DataConfig(
            name="folders",
            root=str(tmp_path / "src"),
            class_names=["bg", "mark"],
            normalisation="none",
            val_fraction=0.0,
        ),
        out=str(tmp_path / "shards"),
        num_workers=0,
        progress=False,
    )
    run_prepare(cfg)
    manifest = read_manifest(tmp_path / "shards")
    entry = manifest["cases"]["lps"]
    label_out = ShardReader(tmp_path / "shards").read_label("lps")
    (found,) = np.argwhere(label_out == 1)
    world_in = affine @ np.array([*marker, 1.0])
    world_out = np.asarray(entry["affine"]) @ np.array([*found, 1.0])
    np.testing.assert_allclose(world_out, world_in, atol=1e-6)
    assert nib.aff2axcodes(np.asarray(entry["affine"])) == ("R", "A", "S")


def _prepare_cmd(root: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "r2d2_hpc.prepare",
        "data=msd",
        f"data.root={root}",
        f"out={out}",
        "num_workers=1",
        "storage.compression=gzip",
        "storage.target_shard_mib=0.05",
    ]


@pytest.mark.slow
def test_kill_9_at_any_moment_never_leaves_a_set_that_looks_complete(phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for delay_s in (0.5, 1.5, 2.5, 3.5):
        proc = subprocess.Popen(
            _prepare_cmd(phantoms, out),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (out / "manifest.json").exists():
            assert verify(out) == [], (
                f"after kill -9 at {delay_s} s the manifest must describe a complete set"
            )
    done = subprocess.run(_prepare_cmd(phantoms, out), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert verify(out) == []
    assert len(json.loads((out / "manifest.json").read_text())["cases"]) == 5
    assert not list(out.glob("*.tmp")) and not list(out.glob("shard-*.h5.tmp"))
