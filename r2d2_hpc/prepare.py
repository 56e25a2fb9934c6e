"""``python -m r2d2_hpc.prepare data=<source> out=<shard dir> ...``: a NIfTI dataset -> HDF5 shards + manifest.

Any setting of ``conf/prepare.yaml`` and the ``data/`` group is a Hydra override, e.g.
``python -m r2d2_hpc.prepare data=msd data.root=/data/Task01_BrainTumour out=/scratch/shards/brats storage.compression=gzip``.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from r2d2_hpc.config import CONF_DIR, PrepareConfig, register_configs, to_dataclass
from r2d2_hpc.errors import R2D2Error

log = logging.getLogger("r2d2_hpc.prepare")
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Composes the config, checks it, and prepares the dataset."""
    from r2d2_hpc.data.prepare import run_prepare

    try:
        manifest = run_prepare(to_dataclass(PrepareConfig, cfg))
    except R2D2Error as exc:
        log.error("%s", exc)
        sys.exit(1)
    print(f"shards ready: {manifest.parent} (check them with: python -m r2d2_hpc.verify {manifest.parent})")


if __name__ == "__main__":
    main()
