"""``python -m r2d2_hpc.study``."""

import sys

from r2d2_hpc.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
