"""ShardWriter / ShardReader / manifest: round trips, chunking, rollover, corruption, pickling and fork."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from r2d2_hpc.config import ShardConfig
from r2d2_hpc.data.manifest import ShardReader, open_shard, read_manifest, sha256_file, write_manifest
from r2d2_hpc.data.shards import MAX_CHUNK_BYTES, ShardWriter, chunk_shape
from r2d2_hpc.data.types import MANIFEST_FORMAT, MANIFEST_VERSION, PreparedCase
from r2d2_hpc.errors import ConfigError, ShardError

CLASSES = ["background", "a", "b"]
LAYOUT_2D = {"kind": "2d", "slice_axis": 2}


def make_case(case_id: str, seed: int, shape: tuple[int, ...] = (2, 12, 10, 8)) -> PreparedCase:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, len(CLASSES), size=shape[1:]).astype(np.uint8)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, seed]
    return PreparedCase(
        case_id=case_id,
        image=rng.standard_normal(shape).astype(np.float32),
        label=label,
        affine=affine,
        spacing=(1.5, 1.0, 2.0),
        geometry={"source_shape": np.array(shape[1:]), "ornt": np.eye(3)[:, :2]},
        normalisation=[{"mean": np.float32(0.5), "std": 2.0}],
    )


def write_set(
    out: Path,
    cases: list[PreparedCase],
    cfg: ShardConfig,
    layout: dict = LAYOUT_2D,
    val: tuple[str, ...] = (),
) -> dict:
    """Writes shards and a complete manifest; returns the manifest."""
    with ShardWriter(out, "shard", cfg, layout, len(CLASSES)) as writer:
        entries = {c.case_id: writer.add(c) for c in cases}
        shards = writer.close()
    split = {"train": [c for c in entries if c not in val], "val": list(val)}
    for cid, entry in entries.items():
        entry.update(split="val" if cid in val else "train", source_files={}, source_sha256="0" * 64)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "dataset": "unit",
        "created": "2025-01-01T00:00:00",
        "r2d2_version": "0.1.0",
        "classes": CLASSES,
        "channels": ["t1", "t2"],
        "modality": "MRI",
        "layout": layout,
        "preprocessing": {"settings_hash": "abc"},
        "storage": {"compression": cfg.compression, "image_dtype": cfg.image_dtype},
        "split": split,
        "shards": shards,
        "cases": entries,
    }
    write_manifest(out, manifest)
    return manifest


@pytest.fixture
def cases() -> list[PreparedCase]:
    return [make_case(f"case{i}", seed=i) for i in range(3)]


@pytest.mark.parametrize("compression", ["none", "gzip", "lz4", "zstd"])
def test_float32_round_trip_is_exact(tmp_path: Path, cases: list[PreparedCase], compression: str) -> None:
    manifest = write_set(tmp_path, cases, ShardConfig(compression=compression), val=("case2",))
    reader = ShardReader(tmp_path)
    assert reader.case_ids("val") == ["case2"] and reader.case_ids() == ["case0", "case1", "case2"]
    assert (
        reader.class_names == CLASSES and reader.channel_names == ["t1", "t2"] and reader.layout == LAYOUT_2D
    )
    for case in cases:
        image = reader.read_image(case.case_id)
        assert image.dtype == np.float32 and np.array_equal(image, case.image)
        assert np.array_equal(reader.read_label(case.case_id), case.label)
        assert np.array_equal(
            reader.read_image(case.case_id, (slice(None), 3, slice(2, 7))), case.image[:, 3, 2:7]
        )
        assert np.array_equal(
            reader.read_label(case.case_id, (slice(None), slice(None), 5)), case.label[:, :, 5]
        )
        assert reader.shape(case.case_id) == (2, 12, 10, 8)
        entry = manifest["cases"][case.case_id]
        assert entry["voxels_per_class"] == np.bincount(case.label.ravel(), minlength=3).tolist()
        assert entry["affine"] == case.affine.tolist() and entry["spacing"] == [1.5, 1.0, 2.0]
        assert entry["geometry"]["source_shape"] == [12, 10, 8] and entry["normalisation"][0]["mean"] == 0.5
        fg = reader.read_fg_locations(case.case_id)
        assert fg.dtype == np.int32 and fg.shape == (int(np.count_nonzero(case.label)), 4)
        assert np.array_equal(case.label[fg[:, 1], fg[:, 2], fg[:, 3]], fg[:, 0])
    shard = manifest["shards"][0]
    path = tmp_path / shard["file"]
    assert shard["file"] == "shard-0000.h5" and shard["cases"] == ["case0", "case1", "case2"]
    assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256_file(path)
    with open_shard(path, "r") as f:
        assert f.attrs["format"] == "r2d2-shard" and f.attrs["format_version"] == 1
        group = f["cases/case1"]
        assert np.array_equal(group.attrs["affine"], cases[1].affine)
        for name in ("image", "label", "fg_locations"):
            assert group[name].fletcher32
        expected = {"none": None, "gzip": "gzip", "lz4": "32004", "zstd": "32015"}[compression]
        filters = group["image"].id.get_create_plist()
        ids = {str(filters.get_filter(i)[0]) for i in range(filters.get_nfilters())}
        assert expected is None or expected == group["image"].compression or expected in ids
    reader.close()


def test_float16_storage_within_precision(tmp_path: Path, cases: list[PreparedCase]) -> None:
    write_set(tmp_path, cases, ShardConfig(compression="zstd", image_dtype="float16"))
    reader = ShardReader(tmp_path)
    with open_shard(tmp_path / "shard-0000.h5", "r") as f:
        assert f["cases/case0/image"].dtype == np.float16
    for case in cases:
        image = reader.read_image(case.case_id)
        assert image.dtype == np.float32
        assert np.array_equal(image, case.image.astype(np.float16).astype(np.float32))
        assert np.allclose(image, case.image, rtol=2**-11, atol=2**-24)


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    case = make_case("loud", 0)
    case.image[0, 0, 0, 0] = 1e6
    with (
        pytest.raises(ShardError, match=r"float16.*image_dtype=float32"),
        ShardWriter(tmp_path, "shard", ShardConfig(image_dtype="float16"), LAYOUT_2D, 3) as writer,
    ):
        writer.add(case)
    assert list(tmp_path.iterdir()) == []  # the aborted shard's .tmp is gone


def test_rollover_into_several_shards(tmp_path: Path) -> None:
    cases = [make_case(f"c{i}", i) for i in range(5)]
    label_bytes = [c.image.nbytes + c.label.nbytes + 16 * int(np.count_nonzero(c.label)) for c in cases]
    target_mib = 1.5 * max(label_bytes) / 2**20  # two cases reach it, one does not
    manifest = write_set(tmp_path, cases, ShardConfig(compression="lz4", target_shard_mib=target_mib))
    files = [s["file"] for s in manifest["shards"]]
    assert files == ["shard-0000.h5", "shard-0001.h5", "shard-0002.h5"]
    assert [s["cases"] for s in manifest["shards"]] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert sorted(p.name for p in tmp_path.glob("*.h5*")) == files  # no .tmp left behind
    reader = ShardReader(tmp_path)
    for case in cases:
        assert manifest["cases"][case.case_id]["shard"] == files[int(case.case_id[1]) // 2]
        assert np.array_equal(reader.read_image(case.case_id), case.image)


@pytest.mark.parametrize(
    ("shape", "layout", "cfg", "expected"),
    [
        ((4, 64, 48, 20), {"kind": "2d", "slice_axis": 2}, ShardConfig(), (4, 64, 48, 1)),
        ((4, 64, 48, 20), {"kind": "2d", "slice_axis": 0}, ShardConfig(chunk_slices=3), (4, 3, 48, 20)),
        ((64, 48, 20), {"kind": "2d", "slice_axis": 1}, ShardConfig(chunk_slices=2), (64, 2, 20)),
        ((4, 1024, 1024, 10), {"kind": "2d", "slice_axis": 2}, ShardConfig(chunk_slices=4), (4, 512, 512, 1)),
        (
            (2, 100, 20, 70),
            {"kind": "3d", "patch_size": [32, 32, 32]},
            ShardConfig(chunk_edge=32),
            (2, 32, 20, 32),
        ),
        ((100, 20, 70), {"kind": "3d", "patch_size": [32, 32, 32]}, ShardConfig(chunk_edge=16), (16, 16, 16)),
        (
            (4, 200, 200, 200),
            {"kind": "3d", "patch_size": [96] * 3},
            ShardConfig(chunk_edge=128),
            (4, 64, 64, 64),
        ),
    ],
)
def test_chunk_shape(shape: tuple, layout: dict, cfg: ShardConfig, expected: tuple) -> None:
    chunks = chunk_shape(shape, layout, cfg)
    assert chunks == expected
    assert np.prod(chunks) * (4 if len(shape) == 4 else 1) <= MAX_CHUNK_BYTES


def test_stored_chunks_follow_the_layout(tmp_path: Path) -> None:
    case = make_case("c", 0, shape=(3, 20, 18, 16))
    layout = {"kind": "3d", "patch_size": [8, 8, 8]}
    manifest = write_set(tmp_path, [case], ShardConfig(chunk_edge=8, compression="gzip"), layout=layout)
    with open_shard(tmp_path / "shard-0000.h5", "r") as f:
        assert f["cases/c/image"].chunks == (3, 8, 8, 8) and f["cases/c/label"].chunks == (8, 8, 8)
    assert manifest["cases"]["c"]["chunks"] == {"image": [3, 8, 8, 8], "label": [8, 8, 8]}
    with pytest.raises(ConfigError, match="slice_axis"):
        chunk_shape((1, 4, 4, 4), {"kind": "2d", "slice_axis": 3}, ShardConfig())


def test_writer_refuses_bad_cases(tmp_path: Path) -> None:
    bad_label = make_case("bad", 1)
    bad_label.label[0, 0, 0] = 255
    with ShardWriter(tmp_path, "shard", ShardConfig(), LAYOUT_2D, 3) as writer:
        writer.add(make_case("ok", 0))
        with pytest.raises(ShardError, match="added twice"):
            writer.add(make_case("ok", 0))
        with pytest.raises(ShardError, match=r"label values in \[0, 255\].*0\.\.2"):
            writer.add(bad_label)
        assert [p.name for p in tmp_path.iterdir()] == ["shard-0000.h5.tmp"]  # not final until closed
    assert [p.name for p in tmp_path.iterdir()] == ["shard-0000.h5"]


def test_fg_locations_are_capped_and_deterministic(tmp_path: Path) -> None:
    case = make_case("big", 0, shape=(1, 40, 40, 10))
    case.label[:] = 0
    case.label[:, :, :8] = 1  # 12,800 voxels of class 1, none of class 2
    for out in (tmp_path / "a", tmp_path / "b"):
        write_set(out, [case], ShardConfig())
    first, second = (ShardReader(tmp_path / d).read_fg_locations("big") for d in "ab")
    assert first.shape == (10_000, 4) and np.array_equal(first, second)
    assert set(first[:, 0].tolist()) == {1} and len(np.unique(first[:, 1:], axis=0)) == 10_000
    assert (first[:, 3] < 8).all()


def test_read_manifest_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"no manifest\.json.*python -m r2d2_hpc\.prepare"):
        read_manifest(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ShardError, match=r"not valid JSON.*prepare"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"format": "something-else", "format_version": 1}))
    with pytest.raises(ShardError, match=r"format 'something-else'.*r2d2-manifest.*prepare"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "format_version": 99}))
    with pytest.raises(ShardError, match=r"format_version 99.*\(1\).*upgrade r2d2_hpc"):
        read_manifest(tmp_path)
    with pytest.raises(
        ShardError, match=r"elsewhere: does not exist: the data is not prepared.*r2d2_hpc\.prepare"
    ):
        ShardReader(tmp_path / "elsewhere")


def test_write_manifest_refuses_inconsistent_sets(tmp_path: Path, cases: list[PreparedCase]) -> None:
    manifest = write_set(tmp_path, cases, ShardConfig())
    assert read_manifest(tmp_path) == json.loads(json.dumps(manifest))
    manifest["shards"].append({"file": "x.h5", "bytes": 1, "sha256": "0", "cases": ["case1"]})
    manifest["split"]["val"] = ["ghost"]
    with pytest.raises(ShardError, match=r"case 'case1' is listed 2 times.*split 'val' names case 'ghost'"):
        write_manifest(tmp_path / "new", manifest)
    assert not (tmp_path / "new" / "manifest.json").exists()


def _flip_byte_in_image(path: Path, case_id: str) -> None:
    with open_shard(path, "r") as f:
        info = f[f"cases/{case_id}/image"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_byte_fails_the_read_naming_shard_and_case(tmp_path: Path, cases: list[PreparedCase]) -> None:
    write_set(tmp_path, cases, ShardConfig(compression="none"))
    _flip_byte_in_image(tmp_path / "shard-0000.h5", "case1")
    reader = ShardReader(tmp_path)
    with pytest.raises(
        ShardError,
        match=r"shard-0000\.h5.*'case1'.*failed its fletcher32 checksum.*r2d2_hpc\.verify.*force=true",
    ):
        reader.read_image("case1")
    assert np.array_equal(
        reader.read_image("case1", (slice(None), slice(None), slice(None), 4)), cases[1].image[..., 4]
    )  # other chunks stay readable
    assert np.array_equal(reader.read_image("case2"), cases[2].image)


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    cases = [make_case(f"c{i}", i) for i in range(2)]
    write_set(tmp_path, cases, ShardConfig(target_shard_mib=1e-6))
    (tmp_path / "shard-0001.h5").unlink()
    reader = ShardReader(tmp_path)
    assert np.array_equal(reader.read_label("c0"), cases[0].label)
    with pytest.raises(ShardError, match=r"shard-0001\.h5: shard file missing \(it holds case 'c1'\)"):
        reader.read_label("c1")
    with pytest.raises(ShardError, match="no case 'nope'"):
        reader.read_label("nope")


def test_reader_pickles_without_handles(tmp_path: Path, cases: list[PreparedCase]) -> None:
    write_set(tmp_path, cases, ShardConfig())
    reader = ShardReader(tmp_path, cache_mib=2)
    assert np.array_equal(reader.read_image("case0"), cases[0].image)
    assert reader._files  # a handle is open now
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._files == {} and len(copy._datasets) == 0 and copy.cache_mib == 2
    assert np.array_equal(copy.read_image("case2"), cases[2].image)
    assert np.array_equal(reader.read_label("case1"), cases[1].label)


_FORKED_READER: ShardReader | None = None


def _read_in_child(case_id: str) -> tuple[int, int | None, np.ndarray, np.ndarray]:
    assert _FORKED_READER is not None
    image = _FORKED_READER.read_image(case_id)
    return os.getpid(), _FORKED_READER._pid, image, _FORKED_READER.read_label(case_id)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_forked_children_reopen_and_read(tmp_path: Path, cases: list[PreparedCase]) -> None:
    global _FORKED_READER
    write_set(tmp_path, cases, ShardConfig(compression="lz4"))
    _FORKED_READER = ShardReader(tmp_path)
    assert np.array_equal(_FORKED_READER.read_image("case0"), cases[0].image)  # parent holds open handles
    try:
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map(_read_in_child, ["case0", "case1", "case2", "case1"])
        for (pid, reader_pid, image, label), cid in zip(
            results, ["case0", "case1", "case2", "case1"], strict=True
        ):
            case = cases[int(cid[-1])]
            assert pid != os.getpid() and reader_pid == pid
            assert np.array_equal(image, case.image) and np.array_equal(label, case.label)
        assert np.array_equal(_FORKED_READER.read_image("case2"), cases[2].image)  # parent unaffected
        assert _FORKED_READER._pid == os.getpid()
    finally:
        _FORKED_READER.close()
        _FORKED_READER = None


def test_truncated_shard_is_reported_as_corrupt(tmp_path: Path, cases: list[PreparedCase]) -> None:
    write_set(tmp_path, cases, ShardConfig())
    path = tmp_path / "shard-0000.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard-0000\.h5: reading label of case 'case0' failed.*truncated"):
        ShardReader(tmp_path).read_label("case0")
