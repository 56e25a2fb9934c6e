#!/usr/bin/env bash
# Installs r2d2_hpc into a virtual environment (default .venv) and prints its python.
#
# torch: a torch that the base Python can already import (a cluster's CUDA build, a conda env, a module) is kept:
# the venv is then created with --system-site-packages so it sees that torch. Otherwise torch==2.13.0 is
# installed first — never an unpinned torch, which would pull a multi-GB CUDA build.
#
# Knobs: PYTHON (base interpreter, default python3), R2D2_VENV (venv folder, default .venv),
#        R2D2_TORCH (the torch requirement to install when none is importable, default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${R2D2_VENV:-.venv}
TORCH_REQ=${R2D2_TORCH:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)') from $PY" >&2
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "install: no torch found; installing $TORCH_REQ" >&2
  "$VENV/bin/pip" install --quiet "$TORCH_REQ"
fi
# Reinstall the project only when its dependency list changed (a stamp holds the hash of pyproject.toml).
stamp="$VENV/.r2d2_installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import r2d2_hpc" >/dev/null 2>&1; then
  echo "install: installing r2d2_hpc and its dependencies into $VENV" >&2
  "$VENV/bin/pip" install --quiet -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  # MONAI computes the clinical metrics (evaluate/predict). --no-deps: its own torch requirement must never make
  # pip replace the torch kept above (a cluster's CUDA build).
  "$VENV/bin/pip" install --quiet --no-deps "monai>=1.4,<1.7" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
echo "$VENV/bin/python"
