"""The decoded-chunk cache behind windowed shard reads, shard version checks and HDF5 file locking."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from r2d2_hpc.config import ShardConfig
from r2d2_hpc.data.chunk_cache import ChunkCache, plain_window
from r2d2_hpc.data.manifest import ShardReader, open_shard
from r2d2_hpc.errors import ShardError
from tests.data.test_shards import _flip_byte_in_image, make_case, write_set

LAYOUT_3D = {"kind": "3d", "patch_size": [8, 8, 8]}


def _random_index(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple:
    index = []
    for extent in shape:
        kind = rng.integers(3)
        if kind == 0:
            index.append(int(rng.integers(-extent, extent)))
        else:
            lo = int(rng.integers(0, extent))
            index.append(slice(lo, int(rng.integers(lo + 1, extent + 1))))
    return tuple(index[: int(rng.integers(1, len(shape) + 1))])


@pytest.mark.parametrize(
    ("compression", "layout"),
    [("lz4", {"kind": "2d", "slice_axis": 2}), ("none", LAYOUT_3D), ("zstd", LAYOUT_3D)],
)
def test_windowed_reads_equal_numpy_slicing(tmp_path: Path, compression: str, layout: dict) -> None:
    cases = [make_case(f"case{i}", seed=i, shape=(2, 19, 13, 11)) for i in range(2)]
    write_set(tmp_path, cases, ShardConfig(compression=compression, chunk_edge=4), layout)
    reader = ShardReader(tmp_path, chunk_cache_mib=1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        case = cases[int(rng.integers(2))]
        image_index = _random_index(rng, case.image.shape)
        label_index = _random_index(rng, case.label.shape)
        got_image = reader.read_image(case.case_id, image_index)
        got_label = reader.read_label(case.case_id, label_index)
        assert got_image.shape == case.image[image_index].shape
        assert np.array_equal(got_image, case.image[image_index])
        assert np.array_equal(got_label, case.label[label_index])
        got_image[...] = 0  # a copy: writing to it leaves the cached chunks alone
    cache = reader.chunk_cache
    assert cache.hits > cache.misses > 0
    assert 0 < cache.nbytes <= 2**20


def test_chunk_cache_evicts_least_recently_used() -> None:
    cache = ChunkCache(max_bytes=3 * 800)
    decoded = []

    def decode(key: int) -> np.ndarray:
        decoded.append(key)
        return np.full(100, key, dtype=np.float64)  # 800 bytes

    for key in [0, 1, 2, 0, 3, 1]:
        assert cache.get(key, lambda k=key: decode(k))[0] == key
    assert decoded == [0, 1, 2, 3, 1]  # 0 was used again before 3 came in, so 1 went first
    assert cache.nbytes == 2400 and len(cache) == 3
    assert cache.get("big", lambda: np.zeros(1000)).size == 1000 and "big" not in cache._chunks


def test_plain_window_refuses_what_it_cannot_serve() -> None:
    assert plain_window((slice(None), 3), (4, 5, 6)) == (((0, 4), (3, 4), (0, 6)), (1,))
    assert plain_window((-1,), (4, 5)) == (((3, 4), (0, 5)), (0,))
    assert plain_window((slice(0, 4, 2),), (4,)) is None
    assert plain_window((slice(2, 2),), (4,)) is None
    assert plain_window(([0, 1],), (4,)) is None
    assert plain_window((9,), (4,)) is None


def test_corruption_is_found_when_a_chunk_is_decoded(tmp_path: Path) -> None:
    cases = [make_case(f"case{i}", seed=i) for i in range(2)]
    write_set(tmp_path, cases, ShardConfig(compression="lz4"))
    cached = ShardReader(tmp_path)
    uncached = ShardReader(tmp_path, chunk_cache_mib=0)
    first_slice = (slice(None), slice(None), slice(None), 0)
    for reader in (cached, uncached):
        assert np.array_equal(reader.read_image("case1", first_slice), cases[1].image[first_slice])
    _flip_byte_in_image(tmp_path / "shard-0000.h5", "case1")  # chunk 0 holds slice 0
    # verified once when decoded; the copy in memory is what was verified
    assert np.array_equal(cached.read_image("case1", first_slice), cases[1].image[first_slice])
    for reader in (uncached, ShardReader(tmp_path)):
        with pytest.raises(
            ShardError, match=r"shard-0000\.h5: reading image of case 'case1' failed.*fletcher32"
        ):
            reader.read_image("case1", first_slice)
    assert np.array_equal(
        uncached.read_image("case1", (0, slice(None), slice(None), 1)), cases[1].image[0, ..., 1]
    )


def test_unknown_shard_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    write_set(tmp_path, [make_case("case0", 0)], ShardConfig())
    with open_shard(tmp_path / "shard-0000.h5", "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(
        ShardError,
        match=r"shard-0000\.h5: shard format 'r2d2-shard' version 99, which this r2d2_hpc does not read; "
        r"expected format 'r2d2-shard' version 1\. Fix: upgrade r2d2_hpc.*re-run prepare with force=true",
    ):
        ShardReader(tmp_path).read_label("case0", (0,))


_HOLD_LOCKED = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r+", locking=True)  # a writer: HDF5 holds an exclusive lock until close
print("locked", flush=True)
sys.stdin.read()
f.close()
"""


def test_shards_open_without_file_locks_unless_asked(tmp_path: Path) -> None:
    case = make_case("case0", 0)
    write_set(tmp_path, [case], ShardConfig())
    path = tmp_path / "shard-0000.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLD_LOCKED), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        reader = ShardReader(tmp_path)  # default: no locking, so another process's lock does not matter
        assert np.array_equal(reader.read_label("case0"), case.label)
        plist = reader._files["shard-0000.h5"].id.get_access_plist()
        assert not plist.get_file_locking()[0]
        # the same file opened again in this process with the same flag: no "flag values don't match"
        with open_shard(path) as again:
            assert again["cases/case0/label"].shape == case.label.shape
        reader.close()
        with pytest.raises(ShardError, match=r"shard-0000\.h5: reading label of case 'case0' failed.*lock"):
            ShardReader(tmp_path, locking=True).read_label("case0")  # the setting restores locking
    finally:
        holder.communicate("", timeout=30)
