"""``python -m r2d2_hpc.verify <dir>``: re-reads a whole shard set and lists every problem it finds.

Every shard is hashed and every dataset read in full, which makes HDF5 check each chunk's fletcher32 checksum.
Checks: the manifest (readable, known version, consistent), each shard (present, byte size, sha256, format
attrs, no case groups the manifest does not know), each case (image and label present, shapes, finite image,
label values, voxels per class, foreground locations). Exit code 1 when anything is wrong, else 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from r2d2_hpc.data.manifest import (
    describe_read_error,
    manifest_problems,
    open_shard,
    read_manifest,
    sha256_file,
)
from r2d2_hpc.data.types import IGNORE_INDEX, SHARD_FORMAT, SHARD_VERSION
from r2d2_hpc.errors import ShardError

_SLAB_BYTES = 64 << 20  # images are checked in slabs of about this size, so huge cases need little memory


def verify(shard_dir: Path, check_sha256: bool = True) -> list[str]:
    """Returns every problem of the shard set in ``shard_dir`` (empty when it is sound)."""
    shard_dir = Path(shard_dir)
    try:
        manifest = read_manifest(shard_dir)
    except ShardError as exc:
        return [str(exc)]
    problems = [f"{shard_dir / 'manifest.json'}: {p}" for p in manifest_problems(manifest)]
    num_classes = len(manifest["classes"])
    bar = _progress(sum(len(s.get("cases", [])) for s in manifest["shards"]))
    for shard in manifest["shards"]:
        problems += _verify_shard(shard_dir, shard, manifest["cases"], num_classes, check_sha256, bar)
    bar.close()
    return problems


def _verify_shard(
    shard_dir: Path,
    shard: dict[str, Any],
    cases: dict[str, Any],
    num_classes: int,
    check_sha256: bool,
    bar: Any,
) -> list[str]:
    path = shard_dir / shard["file"]
    listed = [c for c in shard.get("cases", []) if c in cases]
    if not path.is_file():
        bar.update(len(listed))
        return [
            f"{path}: shard file is missing (it holds {len(listed)} case(s): {', '.join(listed[:5])}"
            f"{' ...' if len(listed) > 5 else ''})"
        ]
    problems = []
    size = path.stat().st_size
    if size != shard.get("bytes"):
        problems.append(f"{path}: {size} bytes on disk, the manifest says {shard.get('bytes')}")
    if check_sha256 and sha256_file(path) != shard.get("sha256"):
        problems.append(f"{path}: sha256 differs from the manifest (the file changed after it was written)")
    try:
        f = open_shard(path, "r")
    except OSError as exc:
        bar.update(len(listed))
        return [*problems, f"{path}: cannot be opened as HDF5 ({exc})"]
    with f:
        fmt, version = (np.asarray(f.attrs.get(k)).tolist() for k in ("format", "format_version"))
        if fmt != SHARD_FORMAT or version != SHARD_VERSION:
            problems.append(
                f"{path}: format {fmt!r} version {version!r}; expected {SHARD_FORMAT!r} {SHARD_VERSION}"
            )
        groups = set(f["cases"]) if "cases" in f else set()
        extra = sorted(groups - set(shard.get("cases", [])))
        if extra:
            problems.append(f"{path}: case group(s) not in the manifest: {', '.join(extra)}")
        for case_id in listed:
            if case_id not in groups:
                problems.append(f"{path}: case {case_id!r} has no group /cases/{case_id}")
            else:
                problems += [
                    f"{path}: case {case_id!r}: {p}"
                    for p in _verify_case(f["cases"][case_id], cases[case_id], num_classes)
                ]
            bar.update(1)
    return problems


def _verify_case(group: h5py.Group, entry: dict[str, Any], num_classes: int) -> list[str]:
    missing = [n for n in ("image", "label") if n not in group]
    if missing:
        return [f"dataset(s) {', '.join(missing)} missing"]
    image, label = group["image"], group["label"]
    problems = []
    if list(image.shape) != list(entry.get("shape", [])):
        problems.append(f"image shape {image.shape} differs from the manifest's {entry.get('shape')}")
    if image.shape[1:] != label.shape:
        return [*problems, f"label shape {label.shape} does not match image shape {image.shape}"]
    problems += _check_image(image)
    try:
        values = label[()]
    except OSError as exc:
        return [*problems, f"label unreadable: {describe_read_error(exc)}"]
    counts = np.bincount(values.reshape(-1), minlength=num_classes)
    if len(counts) > num_classes:
        bad = sorted(int(v) for v in np.flatnonzero(counts[num_classes:]) + num_classes)
        what = "255 (padding marker)" if bad == [IGNORE_INDEX] else f"{bad[:10]}"
        problems.append(f"label values {what} outside the {num_classes} classes")
    elif counts.tolist() != list(entry.get("voxels_per_class", [])):
        problems.append(
            f"voxels per class {counts.tolist()} differ from the manifest's {entry.get('voxels_per_class')}"
        )
    if "fg_locations" in group:
        problems += _check_fg(group["fg_locations"], values, num_classes)
    else:
        problems.append("dataset fg_locations missing")
    return problems


def _check_image(image: h5py.Dataset) -> list[str]:
    """Reads the image slab by slab along the axis with the most chunks, so every chunk is read once."""
    chunks = image.chunks or image.shape
    axis = int(np.argmax([-(-n // c) for n, c in zip(image.shape, chunks, strict=True)]))
    plane_bytes = image.dtype.itemsize * image.size // max(1, image.shape[axis])
    step = max(1, _SLAB_BYTES // max(1, plane_bytes * chunks[axis])) * chunks[axis]
    num_bad = 0
    for lo in range(0, image.shape[axis], step):
        index = [slice(None)] * image.ndim
        index[axis] = slice(lo, lo + step)
        try:
            slab = image[tuple(index)]
        except OSError as exc:
            return [f"image unreadable (axis {axis}, from {lo}): {describe_read_error(exc)}"]
        num_bad += int(slab.size - np.count_nonzero(np.isfinite(slab)))
    return [f"image holds {num_bad} NaN or infinite value(s)"] if num_bad else []


def _check_fg(dataset: h5py.Dataset, label: np.ndarray, num_classes: int) -> list[str]:
    try:
        rows = dataset[()]
    except OSError as exc:
        return [f"fg_locations unreadable: {describe_read_error(exc)}"]
    if rows.ndim != 2 or rows.shape[1] != 4:
        return [f"fg_locations has shape {rows.shape}; expected (N, 4)"]
    if not len(rows):
        return []
    cls, xyz = rows[:, 0], rows[:, 1:]
    if cls.min() < 1 or cls.max() >= num_classes or (xyz < 0).any() or (xyz >= label.shape).any():
        return ["fg_locations holds classes or voxels out of range"]
    if (label[xyz[:, 0], xyz[:, 1], xyz[:, 2]] != cls).any():
        return ["fg_locations points at voxels of another class"]
    return []


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int) -> Any:
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc="verify", unit="case")
    return _NoBar()


def _totals(shard_dir: Path) -> tuple[int, int, int]:
    """(cases, shards, bytes) of a shard set, from its manifest."""
    manifest = read_manifest(shard_dir)
    return len(manifest["cases"]), len(manifest["shards"]), sum(int(s["bytes"]) for s in manifest["shards"])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m r2d2_hpc.verify", description=__doc__.splitlines()[0])
    parser.add_argument("shard_dir", type=Path, help="folder holding manifest.json and the shards")
    parser.add_argument("--no-sha256", action="store_true", help="skip hashing the shard files (faster)")
    args = parser.parse_args(argv)
    problems = verify(args.shard_dir, check_sha256=not args.no_sha256)
    if problems:
        print(f"{args.shard_dir}: {len(problems)} problem(s):")
        for p in problems:
            print(f"- {p}")
        print("Fix: re-run `python -m r2d2_hpc.prepare ...` with force=true for this directory.")
        return 1
    num_cases, num_shards, num_bytes = _totals(args.shard_dir)
    print(
        f"{args.shard_dir}: OK: {num_cases} case(s) in {num_shards} shard(s), {num_bytes / 2**20:.1f} MiB verified"
        f"{'' if args.no_sha256 else ' (sha256 checked)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
