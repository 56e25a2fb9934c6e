"""Prepares a source dataset into a shard directory, in parallel and resumably.

The steps, and why a ``kill -9`` at any moment is harmless:

1. Every case is preprocessed in a worker process and written to ``<out>/.staging/<case>-0000.h5``, then its
   sidecar ``<case>.json`` (source sha256 + settings hash) is written atomically. A case counts as staged only
   when its sidecar exists, so a half-written staging file is simply redone.
2. A case whose source files and preprocessing settings are unchanged is not redone: it is taken from its staging
   file, or from the current shard set when the manifest there already holds it.
3. All cases are packed into new shards named ``shard-<generation>-NNNN.h5`` (each written as ``.tmp`` and renamed),
   then ``manifest.json`` is written atomically, and only then are the previous generation's shards deleted.
   Readers trust a shard set only through its manifest, so they always see either the old set or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import r2d2_hpc
from r2d2_hpc.atomic import check_writable, disk_guard, write_text
from r2d2_hpc.config import DataConfig, PrepareConfig, ShardConfig
from r2d2_hpc.data.manifest import read_manifest, sha256_file, write_manifest
from r2d2_hpc.data.preprocess import preprocess
from r2d2_hpc.data.rerun import rerun_key
from r2d2_hpc.data.shards import ShardReader, ShardWriter
from r2d2_hpc.data.sources import Source, build_source
from r2d2_hpc.data.types import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, CaseRef, PreparedCase
from r2d2_hpc.errors import DataError, DiskError, R2D2Error, ShardError

log = logging.getLogger(__name__)

STAGING = ".staging"
RERUN_FIX = "run prepare again: cases already staged are not redone, and the manifest is written last"
# Staging files are an internal cache: lossless float32 and a fast codec, whatever the final storage is.
_STAGING_SHARDS = ShardConfig(compression="lz4", image_dtype="float32", target_shard_mib=1e9)


def layout_of(cfg: DataConfig) -> dict[str, Any]:
    """The sample layout recorded in the manifest and used for chunking."""
    if cfg.layout == "2d":
        return {"kind": "2d", "slice_axis": int(cfg.slice_axis)}
    return {"kind": "3d", "patch_size": [int(v) for v in cfg.patch_size]}


def settings_hash(settings: dict[str, Any]) -> str:
    """A short, stable hash of JSON-able settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_digest(ref: CaseRef) -> tuple[dict[str, dict[str, str]], str]:
    """sha256 of every file of a case, and one digest over all of them (role order)."""
    files: dict[str, dict[str, str]] = {}
    for role in sorted(ref.files):
        path = Path(ref.files[role])
        if not path.is_file():
            raise DataError(
                f"{path}: the {role} file of case {ref.case_id!r} is missing; expected a NIfTI file. "
                "Fix: restore the file or remove the case from the dataset listing."
            )
        files[role] = {"path": str(path), "sha256": _cached_sha256(str(path), path.stat().st_mtime_ns)}
    extra = json.dumps(ref.extra, sort_keys=True, default=str)
    combined = hashlib.sha256((json.dumps(files, sort_keys=True) + extra).encode()).hexdigest()
    return files, combined


_SHA_CACHE: dict[tuple[str, int], str] = {}


def _cached_sha256(path: str, mtime_ns: int) -> str:
    # The MNI slabs share their three source files: hash each once per process.
    key = (path, mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _stage_case(
    source: Source,
    ref: CaseRef,
    cfg: DataConfig,
    staging: Path,
    s_hash: str,
    reusable: dict[str, str],
    force: bool,
) -> dict[str, Any]:
    """Worker job: returns the case's staging record, preprocessing the case only when needed."""
    files, digest = source_digest(ref)
    sidecar = staging / f"{ref.case_id}.json"
    if not force:
        if reusable.get(ref.case_id) == digest:
            return {
                "case_id": ref.case_id,
                "origin": "shards",
                "source_files": files,
                "source_sha256": digest,
            }
        if sidecar.is_file():
            record = json.loads(sidecar.read_text())
            if record.get("source_sha256") == digest and record.get("settings_hash") == s_hash:
                return record | {"origin": "staging"}
    raw = source.load(ref)
    case = preprocess(raw, cfg, source.info)
    what = f"the staging file of case {ref.case_id!r}"
    with (
        disk_guard(staging, what, RERUN_FIX, case.image.size * 4 + case.label.size),
        ShardWriter(
            staging,
            ref.case_id,
            _STAGING_SHARDS,
            layout_of(cfg),
            len(source.info.class_names),
            locking=cfg.hdf5_locking,
        ) as w,
    ):
        entry = w.add(case)
    record = {
        "case_id": ref.case_id,
        "entry": entry,
        "source_files": files,
        "source_sha256": digest,
        "settings_hash": s_hash,
        "split": ref.split,
    }
    write_text(sidecar, json.dumps(record), f"the staging record of case {ref.case_id!r}", RERUN_FIX)
    return record | {"origin": "new"}


def _old_manifest(out: Path) -> dict[str, Any] | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out)
    except ShardError as exc:
        log.warning("ignoring the existing manifest (%s); every case will be prepared again", exc)
        return None


def _reusable_cases(
    out: Path, old: dict[str, Any] | None, s_hash: str, storage: dict[str, Any], layout: dict[str, Any]
) -> dict[str, str]:
    """Case id -> source digest for the cases the current shard set holds with the same settings."""
    if old is None or old["preprocessing"].get("settings_hash") != s_hash:
        return {}
    if old.get("layout") != layout or old["storage"].get("image_dtype") != storage["image_dtype"]:
        return {}
    present = {s["file"] for s in old["shards"] if (out / s["file"]).is_file()}
    return {cid: e["source_sha256"] for cid, e in old["cases"].items() if e["shard"] in present}


def _split(refs: list[CaseRef], cfg: DataConfig) -> dict[str, list[str]]:
    """Train/validation split by case: explicit ids, the source's own choice, or a seeded random draw."""
    ids = sorted(r.case_id for r in refs)
    if cfg.val_cases:
        unknown = sorted(set(cfg.val_cases) - set(ids))
        if unknown:
            raise DataError(
                f"data.val_cases names unknown case(s) {unknown}; expected ids among {ids[:10]}... "
                "Fix: correct data.val_cases."
            )
        val = set(cfg.val_cases)
    elif all(r.split is not None for r in refs):
        val = {r.case_id for r in refs if r.split == "val"}
    else:
        num_val = round(len(ids) * cfg.val_fraction)
        if cfg.val_fraction > 0 and len(ids) >= 2:
            num_val = min(max(num_val, 1), len(ids) - 1)
        order = np.random.default_rng(cfg.split_seed).permutation(len(ids))
        val = {ids[i] for i in order[:num_val]}
    return {"train": [c for c in ids if c not in val], "val": [c for c in ids if c in val]}


def _run_workers(
    cfg: PrepareConfig,
    source: Source,
    refs: list[CaseRef],
    staging: Path,
    s_hash: str,
    reusable: dict[str, str],
) -> list[dict[str, Any]]:
    """Stages every case, in parallel processes; collects every failure before raising."""
    args = (cfg.data, staging, s_hash, reusable, cfg.force)
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    bar = _progress(len(refs), cfg.progress)
    if cfg.num_workers <= 0:
        for ref in refs:
            try:
                records.append(_stage_case(source, ref, *args))
            except DiskError:
                raise  # one message for a full disk, not one per remaining case
            except R2D2Error as exc:
                errors.append(f"case {ref.case_id}: {exc}")
            bar.update(1)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # no inherited h5py/HDF5 state in the workers
        with ProcessPoolExecutor(max_workers=cfg.num_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_stage_case, source, ref, *args): ref for ref in refs}
            for fut in as_completed(futures):
                try:
                    records.append(fut.result())
                except DiskError:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                except R2D2Error as exc:
                    errors.append(f"case {futures[fut].case_id}: {exc}")
                bar.update(1)
    bar.close()
    if errors:
        raise DataError(
            f"{len(errors)} of {len(refs)} case(s) could not be prepared (the others are staged "
            "and will not be redone):\n  - " + "\n  - ".join(sorted(errors))
        )
    return sorted(records, key=lambda r: r["case_id"])


class _NullBar:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.last_s = total, 0, time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last_s > 10 or self.done == self.total:
            log.info("prepared %d/%d cases", self.done, self.total)
            self.last_s = time.monotonic()

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc="prepare", unit="case")
    return _NullBar(total)


def _read_case(reader: ShardReader, case_id: str, entry: dict[str, Any]) -> PreparedCase:
    return PreparedCase(
        case_id=case_id,
        image=reader.read_image(case_id),
        label=reader.read_label(case_id),
        affine=np.asarray(entry["affine"], dtype=np.float64),
        spacing=tuple(entry["spacing"]),
        geometry=entry["geometry"],
        normalisation=entry["normalisation"],
    )


def _pack(
    cfg: PrepareConfig,
    out: Path,
    staging: Path,
    records: list[dict[str, Any]],
    old: dict | None,
    num_classes: int,
) -> tuple[list[dict], dict[str, dict]]:
    """Writes the new generation of shards from staged cases and the old shard set."""
    generation = uuid.uuid4().hex[:12]  # unique per run, so a new set never overwrites the old one
    try:
        with disk_guard(out, "the new shards", RERUN_FIX, _pack_bytes(cfg, records)):
            return _write_generation(cfg, out, staging, records, old, num_classes, generation)
    except BaseException:
        # Shards of an unfinished generation are in no manifest: drop them, a rerun writes a new generation.
        for path in out.glob(f"shard-{generation}-*"):
            path.unlink(missing_ok=True)
        raise


def _pack_bytes(cfg: PrepareConfig, records: list[dict[str, Any]]) -> int | None:
    """About the bytes of the new shards before compression (image and label of every staged case)."""
    itemsize = np.dtype(cfg.storage.image_dtype).itemsize
    shapes = [r["entry"]["shape"] for r in records if "entry" in r]
    if len(shapes) < len(records):
        return None  # cases taken from the old shards: their size is not at hand here
    return sum(int(np.prod(s)) * itemsize + int(np.prod(s[1:])) for s in shapes)


def _write_generation(
    cfg: PrepareConfig,
    out: Path,
    staging: Path,
    records: list[dict[str, Any]],
    old: dict | None,
    num_classes: int,
    generation: str,
) -> tuple[list[dict], dict[str, dict]]:
    locking = cfg.data.hdf5_locking
    old_reader = ShardReader(out, manifest=old, locking=locking) if old is not None else None
    cases: dict[str, dict[str, Any]] = {}
    with ShardWriter(
        out, f"shard-{generation}", cfg.storage, layout_of(cfg.data), num_classes, locking=locking
    ) as writer:
        for rec in records:
            cid = rec["case_id"]
            if rec["origin"] == "shards":
                assert old is not None and old_reader is not None
                case = _read_case(old_reader, cid, old["cases"][cid])
            else:
                staged = ShardReader(staging, manifest=_staging_manifest(rec), locking=locking)
                case = _read_case(staged, cid, rec["entry"])
                staged.close()
            entry = writer.add(case)
            cases[cid] = entry | {"source_files": rec["source_files"], "source_sha256": rec["source_sha256"]}
        shards = writer.close()
    if old_reader is not None:
        old_reader.close()
    return shards, cases


def _staging_manifest(rec: dict[str, Any]) -> dict[str, Any]:
    """A one-case manifest so that a staging file is read through the same reader as shards."""
    entry = rec["entry"]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "classes": [],
        "channels": [],
        "layout": {},
        "split": {"train": [rec["case_id"]], "val": []},
        "cases": {rec["case_id"]: entry},
        "shards": [{"file": entry["shard"], "cases": [rec["case_id"]]}],
    }


def _up_to_date(old: dict | None, records: list[dict], split: dict, cfg: PrepareConfig, s_hash: str) -> bool:
    """Nothing to write: the same cases, split and rerun key (every output-changing setting, see data/rerun.py)."""
    if old is None or cfg.force or any(r["origin"] != "shards" for r in records):
        return False
    return (
        old["split"] == split
        and set(old["cases"]) == {r["case_id"] for r in records}
        and old["storage"] == _storage(cfg.storage)
        and old["preprocessing"]["settings_hash"] == s_hash
        and old["preprocessing"].get("rerun_key") == rerun_key(cfg.data, cfg.storage)
    )


def _storage(shards: ShardConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(shards).items() if k != "target_shard_mib"}


def _remove_stale(out: Path, keep: set[str]) -> None:
    for path in out.glob("shard-*.h5*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def run_prepare(cfg: PrepareConfig) -> Path:
    """Prepares ``cfg.data`` into ``cfg.out``; returns the path of the manifest."""
    out = Path(cfg.out)
    staging = out / STAGING
    check_writable(out, "the shard folder (prepare.out)", RERUN_FIX)
    with disk_guard(out, "the staging folder", RERUN_FIX):
        staging.mkdir(parents=True, exist_ok=True)
    source = build_source(cfg.data)
    refs = source.cases()
    if not refs:
        raise DataError(
            f"the {cfg.data.name} source listed no case; expected at least one. "
            "Fix: check data.root and the file patterns."
        )
    s_hash = settings_hash(cfg.data.preprocessing_settings())
    old = _old_manifest(out)
    reusable = (
        {} if cfg.force else _reusable_cases(out, old, s_hash, _storage(cfg.storage), layout_of(cfg.data))
    )
    t0 = time.monotonic()
    records = _run_workers(cfg, source, refs, staging, s_hash, reusable)
    split = _split(refs, cfg.data)
    manifest_path = out / MANIFEST_NAME
    if _up_to_date(old, records, split, cfg, s_hash):
        log.info("%s is up to date (%d cases unchanged); nothing to do", manifest_path, len(records))
        return manifest_path
    num_new = sum(r["origin"] == "new" for r in records)
    log.info(
        "staged %d case(s) (%d preprocessed now) in %.1f s; packing shards",
        len(records),
        num_new,
        time.monotonic() - t0,
    )
    shards, cases = _pack(cfg, out, staging, records, old, len(source.info.class_names))
    for cid in split["train"]:
        cases[cid]["split"] = "train"
    for cid in split["val"]:
        cases[cid]["split"] = "val"
    info = source.info
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "dataset": cfg.data.dataset_name or info.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "r2d2_version": r2d2_hpc.__version__,
        "classes": list(info.class_names),
        "channels": list(info.channel_names),
        "modality": info.modality,
        "layout": layout_of(cfg.data),
        "preprocessing": cfg.data.preprocessing_settings()
        | {"settings_hash": s_hash, "rerun_key": rerun_key(cfg.data, cfg.storage)},
        "storage": _storage(cfg.storage),
        "split": split,
        "shards": shards,
        "cases": cases,
    }
    write_manifest(out, manifest)
    _remove_stale(out, {s["file"] for s in shards})
    if not cfg.keep_cache:
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    total_mib = sum(s["bytes"] for s in shards) / 2**20
    log.info(
        "wrote %d case(s) into %d shard(s) (%.1f MiB) and %s in %.1f s",
        len(cases),
        len(shards),
        total_mib,
        manifest_path,
        time.monotonic() - t0,
    )
    return manifest_path
