"""The rerun key of ``prepare``: every data/ and storage setting that changes what is written.

A shard set is "up to date" only when the key recorded in its manifest equals the key of the settings asked for
now. The key holds every field of :class:`DataConfig` and :class:`ShardConfig` except those listed in
:data:`OUTPUT_NEUTRAL`, each with the reason it cannot change the output. A new field is therefore part of the key
until someone argues otherwise here (tests/data/test_rerun_key.py checks every field either way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from r2d2_hpc.config import DataConfig, ShardConfig, _plain

# "<section>.<field>" -> why changing it leaves every written byte (shards and manifest) as it was.
OUTPUT_NEUTRAL: dict[str, str] = {
    "data.shards": "the output folder itself (prepare's out), not what is written into it",
    "data.foreground_fraction": (
        "read by training only (share of 3D patches centred on foreground); prepare stores every foreground "
        "location whatever it is"
    ),
    "data.samples_per_epoch": "read by training only (the length of a random-patch epoch); prepare ignores it",
    "data.patches_per_case": "read by training only (random patches per case and epoch); prepare ignores it",
    "data.chunk_cache_mib": "a reader's cache of decoded chunks in each DataLoader worker; prepare writes none",
    "data.hdf5_locking": "how readers open the shards (HDF5 file locks on or off); the bytes written are the same",
    "data.on_corrupt_sample": "what training does with a sample that fails its checksum; prepare ignores it",
}


def rerun_settings(data: DataConfig, storage: ShardConfig) -> dict[str, Any]:
    """The settings that make up the key, as plain JSON values, by ``<section>.<field>``."""
    settings = {}
    for section, cfg in (("data", data), ("storage", storage)):
        for f in dataclasses.fields(cfg):
            name = f"{section}.{f.name}"
            if name not in OUTPUT_NEUTRAL:
                settings[name] = _plain(getattr(cfg, f.name))
    return settings


def rerun_key(data: DataConfig, storage: ShardConfig) -> str:
    """A short, stable hash of :func:`rerun_settings`."""
    blob = json.dumps(rerun_settings(data, storage), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
