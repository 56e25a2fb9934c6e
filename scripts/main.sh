#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the real demo dataset (MNI152 tissue), verify its shards.
# Extra arguments are Hydra overrides for prepare, e.g. `bash scripts/main.sh storage.compression=gzip`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/install.sh)
out=${R2D2_DEMO_OUT:-data/prepared/mni_tissue}
"$PYBIN" -m r2d2_hpc.prepare data=mni_tissue "out=$out" "$@"
"$PYBIN" -m r2d2_hpc.verify "$out"
