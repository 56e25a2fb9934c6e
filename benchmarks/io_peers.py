"""The storage formats peers read training samples from, for ``benchmarks/io.py``: blosc2 ``.b2nd`` and zarr v3.

- ``.b2nd`` (blosc2 NDArray files) is what nnU-Net v2 stores preprocessed cases in; written here with its
  codec settings (ZSTD level 8) and read the way its loader does (``blosc2.open(..., mmap_mode="r")``, one
  decompression thread per process). The chunk is our shard chunk; blosc2 picks the block.
- zarr v3 with the sharding codec: one shard per case array, inner chunks equal to our shard chunks, zarr's
  default codecs (zstd).

Both are optional: ``available()`` says which are importable and why not; the benchmark skips the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

try:
    import blosc2
except ImportError as exc:  # pragma: no cover - depends on the environment
    blosc2 = None
    _BLOSC2_MISSING = f"blosc2 not installed ({exc}); pip install blosc2"
try:
    import zarr
except ImportError as exc:  # pragma: no cover - depends on the environment
    zarr = None
    _ZARR_MISSING = f"zarr not installed ({exc}); pip install 'zarr>=3'"


def available() -> dict[str, str | None]:
    """Format name -> None when it can be benchmarked, else the reason it is skipped."""
    out: dict[str, str | None] = {"b2nd": None, "zarr": None}
    if blosc2 is None:
        out["b2nd"] = _BLOSC2_MISSING
    if zarr is None:
        out["zarr"] = _ZARR_MISSING
    elif int(zarr.__version__.split(".")[0]) < 3:
        out["zarr"] = f"zarr {zarr.__version__} has no v3 sharding; pip install 'zarr>=3'"
    return out


def versions() -> dict[str, str | None]:
    return {
        "blosc2": blosc2.__version__ if blosc2 is not None else None,
        "zarr": zarr.__version__ if zarr is not None else None,
    }


def write_b2nd(path: Path, array: np.ndarray, chunks: tuple[int, ...]) -> Path:
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 8}
    blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), mode="w", chunks=chunks, cparams=cparams)
    return path


def write_zarr(path: Path, array: np.ndarray, chunks: tuple[int, ...]) -> Path:
    shards = tuple(-(-n // c) * c for n, c in zip(array.shape, chunks, strict=True))
    z = zarr.create_array(
        store=str(path), shape=array.shape, chunks=chunks, shards=shards, dtype=array.dtype, overwrite=True
    )
    z[...] = array
    return path


def dir_bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


class PeerReader:
    """Lazily opened ``.b2nd`` or zarr arrays of (image, label) per case; picklable before the first read."""

    def __init__(self, kind: str, pairs: list[tuple[Path, Path]]) -> None:
        self.kind, self.pairs, self._open = kind, pairs, {}

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "pairs": self.pairs, "_open": {}}

    def _arrays(self, case: int) -> list[Any]:
        if case not in self._open:
            if self.kind == "b2nd":
                opened = [
                    blosc2.open(str(p), mode="r", mmap_mode="r", dparams={"nthreads": 1})
                    for p in self.pairs[case]
                ]
            else:
                opened = [zarr.open_array(str(p), mode="r") for p in self.pairs[case]]
            self._open[case] = opened
        return self._open[case]

    def read(self, case: int, window: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
        image, label = self._arrays(case)
        return np.asarray(image[(slice(None), *window)]), np.asarray(label[window])
