#!/usr/bin/env bash
# The main job on a fresh machine: install, then the demo study (experiment=demo) on this machine: the real demo
# data (MNI152 tissue, prepared and verified once here, since launch never prepares data), U-Net and FCN at 1 and
# 2 ranks (gloo), and the study's report.
# Extra arguments are Hydra overrides for the launcher, e.g. `bash scripts/main.sh study.repeats=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/install.sh)
shards=data/prepared/mni_tissue
if [ ! -f "$shards/manifest.json" ]; then
  "$PYBIN" -m r2d2_hpc.prepare data=mni_tissue "data.shards=$shards"
  "$PYBIN" -m r2d2_hpc.verify "$shards"
fi
exec "$PYBIN" -m r2d2_hpc.launch experiment=demo "data.shards=$shards" "$@"
