#!/usr/bin/env bash
# The test suite on a fresh machine: install, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/install.sh)
exec "$PYBIN" -m pytest "$@"
