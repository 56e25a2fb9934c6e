"""``python -m r2d2_hpc.launch``."""

from r2d2_hpc.launch.app import main

if __name__ == "__main__":
    main()
