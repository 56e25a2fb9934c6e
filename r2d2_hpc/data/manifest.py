"""manifest.json (the index of a shard set) and ``ShardReader``, which reads a shard set through it.

The manifest is written last and atomically: a shard directory without one is incomplete. A reader trusts a
shard set only through its manifest and refuses a format version it does not know.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  registers the lz4/zstd filters so that shards written with them can be decoded
import numpy as np

from r2d2_hpc.atomic import write_text
from r2d2_hpc.data.chunk_cache import ChunkCache, plain_window, read_window
from r2d2_hpc.data.types import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, SHARD_FORMAT, SHARD_VERSION
from r2d2_hpc.errors import ShardError, problem

KNOWN_MANIFEST_VERSIONS = (MANIFEST_VERSION,)
KNOWN_SHARD_VERSIONS = (SHARD_VERSION,)
DEFAULT_CHUNK_CACHE_MIB = 256.0  # decoded chunks kept per process (per DataLoader worker)
REQUIRED_KEYS = (
    "format",
    "format_version",
    "dataset",
    "created",
    "r2d2_version",
    "classes",
    "channels",
    "modality",
    "layout",
    "preprocessing",
    "storage",
    "split",
    "shards",
    "cases",
)
_REPREPARE = "run `python -m r2d2_hpc.prepare ...` again for this directory"
_CORRUPT_FIX = (
    "the shard is corrupt or truncated: run `python -m r2d2_hpc.verify {dir}` to list every problem, "
    "then re-run prepare with force=true"
)
_OPEN_DATASETS = 64  # datasets kept open per process (32 cases: image + label), reopening costs ~1 ms
_MAX_CACHE_SLOTS = 100_003  # HDF5 allocates every slot up front: bound it for tiny chunks
_MIN_CACHE_BYTES = 4 << 20


def sha256_file(path: str | Path, chunk_mib: float = 8) -> str:
    """Hex sha256 of a file, read in ``chunk_mib`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(int(chunk_mib * 2**20)):
            digest.update(block)
    return digest.hexdigest()


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """Every structural problem of a manifest: missing keys, cases not in exactly one shard, unknown split cases."""
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        return [f"manifest.json lacks the key(s) {', '.join(missing)}"]
    problems = []
    if not isinstance(manifest["preprocessing"], dict) or "settings_hash" not in manifest["preprocessing"]:
        problems.append("manifest.json: preprocessing must be a dict with a 'settings_hash'")
    storage = manifest["storage"]
    if not isinstance(storage, dict) or not {"compression", "image_dtype"} <= set(storage):
        problems.append("manifest.json: storage must be a dict with 'compression' and 'image_dtype'")
    cases, split = manifest["cases"], manifest["split"]
    if not isinstance(split, dict) or not {"train", "val"} <= set(split):
        return [*problems, "manifest.json: split must be a dict with 'train' and 'val' lists"]
    listed: dict[str, list[str]] = {}
    for shard in manifest["shards"]:
        for case_id in shard.get("cases", []):
            listed.setdefault(case_id, []).append(shard.get("file", "?"))
    for case_id, files in listed.items():
        if len(files) > 1:
            problems.append(
                f"case {case_id!r} is listed {len(files)} times in the shards ({', '.join(files)})"
            )
        if case_id not in cases:
            problems.append(f"case {case_id!r} is listed in shard {files[0]} but has no entry in 'cases'")
        elif cases[case_id].get("shard") != files[0]:
            problems.append(
                f"case {case_id!r} says shard {cases[case_id].get('shard')!r} but {files[0]} lists it"
            )
    problems += [f"case {c!r} is in 'cases' but in no shard's case list" for c in cases if c not in listed]
    files = [s.get("file") for s in manifest["shards"]]
    problems += [
        f"shard {f} is listed {files.count(f)} times" for f in sorted(set(files)) if files.count(f) > 1
    ]
    seen_split: dict[str, str] = {}
    for name, ids in split.items():
        for case_id in ids:
            if case_id not in cases:
                problems.append(f"split {name!r} names case {case_id!r}, which has no entry in 'cases'")
            if case_id in seen_split:
                problems.append(f"case {case_id!r} is in both split {seen_split[case_id]!r} and {name!r}")
            seen_split[case_id] = name
    return problems


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Checks ``manifest`` and writes ``out_dir/manifest.json`` atomically (tmp file, fsync, rename)."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    problems = manifest_problems(manifest)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
        problems.insert(0, f"format {manifest.get('format')!r} version {manifest.get('format_version')!r}")
    if problems:
        raise ShardError(
            problem(
                path,
                "refusing to write an inconsistent manifest: " + "; ".join(problems),
                f"a complete {MANIFEST_FORMAT} version {MANIFEST_VERSION} manifest",
                "this is a bug in the code that built the manifest; please report it",
            )
        )
    text = json.dumps(manifest, indent=1, default=_json_default) + "\n"
    fix = "run prepare again: the shards are complete, only the manifest is missing"
    return write_text(path, text, "the manifest (written last: without it the new shards are not used)", fix)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """Reads and checks ``shard_dir/manifest.json``; ShardError says what is wrong and how to fix it."""
    path = Path(shard_dir) / MANIFEST_NAME

    def error(found: str, expected: str, fix: str) -> ShardError:
        return ShardError(problem(path, found, expected, fix))

    if not path.is_file():
        if not any(Path(shard_dir).glob("shard-*.h5*")):
            found = (
                "does not exist" if not Path(shard_dir).exists() else "holds no shards and no manifest.json"
            )
            raise ShardError(
                problem(
                    shard_dir,
                    f"{found}: the data is not prepared",
                    "a shard directory written by prepare",
                    f"prepare it: python -m r2d2_hpc.prepare data=<source> data.root=<dataset> out={shard_dir}"
                    " (or point data.shards at the prepared directory)",
                )
            )
        raise error(
            "no manifest.json beside the shards",
            "a manifest beside the shards",
            f"the shard set is incomplete or prepare never finished; {_REPREPARE}",
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(
            f"not valid JSON ({exc})",
            "the manifest prepare writes",
            f"the file was damaged or cut short; {_REPREPARE}",
        ) from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != MANIFEST_FORMAT:
        raise error(
            f"format {fmt!r}",
            f"format {MANIFEST_FORMAT!r}",
            f"point at a shard directory written by r2d2_hpc.prepare, or {_REPREPARE}",
        )
    version = manifest.get("format_version")
    if version not in KNOWN_MANIFEST_VERSIONS:
        raise error(
            f"format_version {version!r}, which this r2d2_hpc does not know",
            f"one of the versions it reads ({', '.join(map(str, KNOWN_MANIFEST_VERSIONS))})",
            f"upgrade r2d2_hpc to read it, or {_REPREPARE} to write version {MANIFEST_VERSION}",
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise error(
            f"the key(s) {', '.join(missing)} are missing",
            "every manifest key",
            f"the manifest was edited or cut short; {_REPREPARE}",
        )
    return manifest


def describe_read_error(exc: BaseException) -> str:
    """An HDF5 read error in words; HDF5 2 reports a failed fletcher32 check only as a filter failure."""
    text = str(exc)
    if "fletcher32" in text or "filter returned failure" in text:
        return f"a chunk failed its fletcher32 checksum or could not be decompressed ({text})"
    return text


def open_shard(path: Path, mode: str = "r", locking: bool = False, **kwargs: Any) -> h5py.File:
    """Opens a shard file; every open of a shard (reader, writer, verify) goes through here.

    ``locking=False`` (the default, setting ``data.hdf5_locking``) opens without HDF5's file locks: shards are
    written once under a temporary name and then only read, and locks on Lustre/NFS cost lock traffic or fail
    where the filesystem does not support them. Opening one file twice in a process with different flags fails
    in HDF5 ("file locking flag values don't match"), so reader and writer share this one flag.
    """
    return h5py.File(path, mode, locking=bool(locking), **kwargs)


class ShardReader:
    """Reads cases of a shard set. Picklable; HDF5 files open lazily in each process that reads.

    Handles are never opened in ``__init__`` and never pickled; a process forked after a read reopens its own.
    Windowed reads (``read_image(case, index)`` with an index) go through a cache of decoded chunks
    (``chunk_cache_mib`` per process; 0 turns it off and every read decodes from the file), see
    ``chunk_cache``. Whole-array reads and reads with the cache off go through h5py, whose own per-dataset chunk
    cache is off unless ``cache_mib`` is given. ``locking`` is HDF5 file locking (see ``open_shard``).
    """

    def __init__(
        self,
        shard_dir: Path,
        manifest: dict | None = None,
        cache_mib: float | None = None,
        chunk_cache_mib: float = DEFAULT_CHUNK_CACHE_MIB,
        locking: bool = False,
    ) -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest: dict[str, Any] = read_manifest(self.shard_dir) if manifest is None else manifest
        self.class_names: list[str] = list(self.manifest.get("classes", []))
        self.channel_names: list[str] = list(self.manifest.get("channels", []))
        self.layout: dict[str, Any] = dict(self.manifest.get("layout", {}))
        if chunk_cache_mib < 0:
            raise ShardError(f"chunk_cache_mib={chunk_cache_mib} must be >= 0 (data.chunk_cache_mib)")
        self.cache_mib = cache_mib
        self.chunk_cache_mib = float(chunk_cache_mib)
        self.locking = bool(locking)
        self._pid: int | None = None
        self._files: dict[str, h5py.File] = {}
        self._datasets: OrderedDict[tuple[str, str], h5py.Dataset] = OrderedDict()
        self.chunk_cache = ChunkCache(int(self.chunk_cache_mib * 2**20))
        self._layouts: dict[tuple[str, str], tuple] = {}  # (case, dataset) -> (shape, chunks, dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _files={}, _datasets=OrderedDict(), chunk_cache=ChunkCache(0))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.chunk_cache = ChunkCache(int(self.chunk_cache_mib * 2**20))

    def case_ids(self, split: str | None = None) -> list[str]:
        """Case ids of one split (``manifest["split"][split]``), or every case."""
        if split is None:
            return list(self.manifest["cases"])
        splits = self.manifest.get("split", {})
        if split not in splits:
            raise ShardError(
                problem(
                    self.shard_dir / MANIFEST_NAME,
                    f"no split named {split!r}",
                    f"one of {sorted(splits)}",
                    "pass one of those split names",
                )
            )
        return list(splits[split])

    def shape(self, case_id: str) -> tuple[int, int, int, int]:
        """(C, X, Y, Z) of a case, from the manifest (no file access)."""
        c, x, y, z = self._entry(case_id)["shape"]
        return int(c), int(x), int(y), int(z)

    def read_image(self, case_id: str, index: tuple = ()) -> np.ndarray:
        """The image (or ``image[index]``, index over (C, X, Y, Z)) as float32."""
        return np.asarray(self._read(case_id, "image", index), dtype=np.float32)

    def read_label(self, case_id: str, index: tuple = ()) -> np.ndarray:
        """The label (or ``label[index]``, index over (X, Y, Z)) as uint8."""
        return np.asarray(self._read(case_id, "label", index), dtype=np.uint8)

    def read_fg_locations(self, case_id: str) -> np.ndarray:
        """(N, 4) int32 rows (class, x, y, z) of sampled foreground voxels."""
        return np.asarray(self._read(case_id, "fg_locations", ()), dtype=np.int32).reshape(-1, 4)

    def close(self) -> None:
        """Closes the files this reader opened (in a forked child: its copies of the inherited handles)."""
        self._drop_inherited()
        self._pid = None

    def _drop_inherited(self) -> None:
        """Closes handles inherited through fork (only this process's copies; the parent's stay open).

        Left open, HDF5 would hand the next open of the same file the inherited file and descriptor.
        """
        self._datasets.clear()
        self.chunk_cache.clear()
        for f in self._files.values():
            # A half-dead inherited handle must not stop this process from reading.
            with contextlib.suppress(Exception):
                f.close()
        self._files, self._pid = {}, os.getpid()

    def _entry(self, case_id: str) -> dict[str, Any]:
        entry = self.manifest["cases"].get(case_id)
        if entry is None:
            raise ShardError(
                problem(
                    self.shard_dir / MANIFEST_NAME,
                    f"no case {case_id!r}",
                    "a case id listed in the manifest",
                    "use reader.case_ids() to list them",
                )
            )
        return entry

    def _read(self, case_id: str, name: str, index: tuple) -> np.ndarray:
        shard = self._entry(case_id)["shard"]
        index = index if isinstance(index, tuple) else (index,)
        try:
            layout = self._layouts.get((case_id, name))
            if layout is None:
                ds = self._dataset(case_id, name, shard)
                layout = self._layouts[(case_id, name)] = (ds.shape, ds.chunks, ds.dtype)
            shape, chunks, dtype = layout
            plain = plain_window(index, shape) if index and chunks and self.chunk_cache.max_bytes else None
            if plain is None:
                return self._dataset(case_id, name, shard)[index]
            # a read served from the cache touches no h5py object (each costs several µs)
            return read_window(
                (shard, case_id, name),
                shape,
                chunks,
                dtype,
                *plain,
                self.chunk_cache,
                lambda box: self._dataset(case_id, name, shard)[box],
            )
        except (OSError, KeyError, RuntimeError) as exc:
            self._datasets.pop((case_id, name), None)
            path = self.shard_dir / shard
            if not path.is_file():
                raise ShardError(
                    problem(
                        path,
                        f"shard file missing (it holds case {case_id!r})",
                        "every shard listed in manifest.json",
                        "copy the complete shard directory again or re-run prepare with force=true",
                    )
                ) from exc
            raise ShardError(
                problem(
                    path,
                    f"reading {name} of case {case_id!r} failed: {describe_read_error(exc)}",
                    "a complete shard whose fletcher32 checksums match",
                    _CORRUPT_FIX.format(dir=self.shard_dir),
                )
            ) from exc

    def _dataset(self, case_id: str, name: str, shard: str) -> h5py.Dataset:
        if self._pid != os.getpid():
            self._drop_inherited()
        key = (case_id, name)
        ds = self._datasets.get(key)
        if ds is None:
            f = self._files.get(shard)
            if f is None:
                nbytes, nslots = self._cache_params(shard)
                f = open_shard(
                    self.shard_dir / shard, "r", self.locking, rdcc_nbytes=nbytes, rdcc_nslots=nslots
                )
                self._check_version(f, shard)
                self._files[shard] = f
            ds = f["cases"][case_id][name]
            self._datasets[key] = ds
            while len(self._datasets) > _OPEN_DATASETS:
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(key)
        return ds

    def _check_version(self, f: h5py.File, shard: str) -> None:
        fmt, version = (np.asarray(f.attrs.get(k)).tolist() for k in ("format", "format_version"))
        if fmt != SHARD_FORMAT or version not in KNOWN_SHARD_VERSIONS:
            f.close()
            raise ShardError(
                problem(
                    self.shard_dir / shard,
                    f"shard format {fmt!r} version {version!r}, which this r2d2_hpc does not read",
                    f"format {SHARD_FORMAT!r} version {' or '.join(map(str, KNOWN_SHARD_VERSIONS))}",
                    f"upgrade r2d2_hpc to read it, or re-run prepare with force=true for {self.shard_dir} "
                    f"to write version {SHARD_VERSION}",
                )
            )

    def _cache_params(self, shard: str) -> tuple[int, int]:
        """(rdcc_nbytes, rdcc_nslots) of HDF5's own chunk cache for a shard: none unless ``cache_mib`` is set.

        With the decoded-chunk cache on, HDF5's would hold the same chunks twice; with it off
        (``chunk_cache_mib=0``) every read decodes, and so re-verifies, its chunks from the file.
        """
        if self.cache_mib is None:
            return 0, 1
        itemsize = np.dtype(self.manifest.get("storage", {}).get("image_dtype", "float32")).itemsize
        smallest_chunk = _MIN_CACHE_BYTES
        for entry in self.manifest["cases"].values():
            chunks = entry.get("chunks")
            if entry.get("shard") == shard and chunks:
                smallest_chunk = min(
                    smallest_chunk, itemsize * math.prod(chunks["image"]), math.prod(chunks["label"])
                )
        nbytes = int(self.cache_mib * 2**20)
        return nbytes, _next_prime(min(_MAX_CACHE_SLOTS, 100 * max(1, nbytes // max(1, smallest_chunk))))


def _next_prime(n: int) -> int:
    n = max(2, n)
    while any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n
