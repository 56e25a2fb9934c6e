#!/usr/bin/env bash
# The test suite on a fresh machine: install, then pytest. Extra arguments go to pytest.
# Run as root (CI does), the Slurm tests start a real 2-node Slurm cluster (slurm/local/start.sh) on demand;
# elsewhere they are skipped with the reason printed. In CI a cluster that fails to start fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash scripts/install.sh)
if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
  export R2D2_REQUIRE_SLURM=1
fi
exec "$PYBIN" -m pytest "$@"
