#!/usr/bin/env bash
# Installs r2d2_hpc into a virtual environment (default .venv) and prints its python (an absolute path).
#
# torch: a torch that the base Python can already import (a cluster's CUDA build, a conda env, a module) is kept:
# the venv is then created with --system-site-packages so it sees that torch. Otherwise torch==2.13.0 is
# installed first — never an unpinned torch, which would pull a multi-GB CUDA build.
#
# Knobs: PYTHON (base interpreter, default python3), R2D2_VENV (venv folder, default .venv),
#        R2D2_TORCH (the torch requirement to install when none is importable, default torch==2.13.0),
#        R2D2_PIP_ARGS (extra pip install arguments).
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
  "$VENV/bin/python" -m pip install --quiet "$TORCH_REQ"
fi
# Reinstall the project only when its packaging changed (a stamp holds the hash of pyproject.toml and setup.py).
# Editable in compat mode: a .pth puts this checkout on sys.path, so `import r2d2_hpc` finds the real package even
# from the folder that holds the checkout (whose root, also named r2d2_hpc, would otherwise shadow it as an empty
# namespace package: setuptools' default editable finder is asked only after the current directory).
# R2D2_PIP_ARGS: extra pip arguments, e.g. "--no-index --no-build-isolation" on a machine without a package index.
stamp="$VENV/.r2d2_installed"
want=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! (cd / && "$VENV/bin/python" -c "import r2d2_hpc.config") >/dev/null 2>&1; then
  echo "install: installing r2d2_hpc and its dependencies into $VENV" >&2
  # shellcheck disable=SC2086  # R2D2_PIP_ARGS is a list of words
  "$VENV/bin/python" -m pip install --quiet ${R2D2_PIP_ARGS:-} --config-settings editable_mode=compat \
    -e ".[metrics,test]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
echo "$(cd "$VENV" && pwd)/bin/python"
