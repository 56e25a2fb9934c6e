#!/usr/bin/env bash
# Prepared GPU check (training issue): one GPU, NCCL backend, AMP bf16; a 3D U-Net on 128^3 patches and a 2D U-Net on
# the MNI demo slices. Writes samples/s, peak memory and the data-wait share to $OUT/gpu_check.json.
# Needs a CUDA build of torch and the project installed (bash scripts/install.sh keeps the CUDA torch).
# Budget: under 5 minutes on one H100/H200 (data preparation included).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=<python with torch+r2d2_hpc>  OUT=<dir>  WORK=<scratch dir>
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-$(mktemp -d /tmp/r2d2-gpu-XXXX)}
mkdir -p "$OUT" "$WORK"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this check needs one GPU and a CUDA build of torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
t0=$(date +%s)
# 2D: the real demo data. 3D: phantoms big enough for 128^3 patches, prepared with a 3D layout.
"$PY" -m r2d2_hpc.prepare data=mni_tissue "data.shards=$WORK/mni" num_workers=8 progress=false
"$PY" -m r2d2_hpc.prepare data=synthetic "data.root=$WORK/raw3d" "data.shards=$WORK/phantom3d" data.num_cases=6 \
  data.num_channels=1 'data.phantom_shape=[160,160,144]' data.layout=3d 'data.patch_size=[128,128,128]' \
  num_workers=8 progress=false
common=(train.backend=nccl train.amp=bf16 train.num_workers=6 train.eval_every_steps=0 train.checkpoint_every_steps=0
        train.timing_warmup_steps=10 resume=never)
"$PY" -m torch.distributed.run --nproc_per_node=1 -m r2d2_hpc.train "data.shards=$WORK/phantom3d" model=unet \
  model.spatial_dims=3 model.max_width=320 'data.patch_size=[128,128,128]' train.global_batch=2 train.max_steps=60 \
  "run_dir=$WORK/unet3d" "${common[@]}"
"$PY" -m torch.distributed.run --nproc_per_node=1 -m r2d2_hpc.train "data.shards=$WORK/mni" model=unet \
  train.global_batch=32 train.max_steps=150 "run_dir=$WORK/unet2d" "${common[@]}"
"$PY" - "$WORK" "$OUT/gpu_check.json" "$t0" <<'PY'
import json, sys, time, torch
work, out, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
keys = ("throughput_samples_per_s", "data_wait_share", "peak_memory_gib", "global_batch", "num_params",
        "flops_per_sample", "backend", "device", "steps", "wall_s")
runs = {name: {k: json.load(open(f"{work}/{name}/result.json")).get(k) for k in keys} for name in ("unet3d", "unet2d")}
payload = {"benchmark": "gpu_check", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "cuda": torch.version.cuda, "amp": "bf16", "runs": runs, "total_s": int(time.time()) - t0}
json.dump(payload, open(out, "w"), indent=1)
print(json.dumps(payload, indent=1))
PY
