"""Fresh virtual environments for the install tests, fast and offline.

A cluster user creates a venv with ``--system-site-packages`` to keep the cluster's torch. Here the "system" is
the environment running the tests: a fresh venv (no pip of its own) gets a ``.pth`` line to a folder of symlinks
to every package of this environment except r2d2_hpc itself, so pip sees torch and the other dependencies as
installed, keeps them, and installs only r2d2_hpc (``--no-index``: nothing is downloaded).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

_SKIP = ("r2d2_hpc", "__editable__", "__pycache__")


def _site_dirs() -> list[Path]:
    import torch

    dirs = [Path(torch.__file__).resolve().parents[1], Path(sysconfig.get_paths()["purelib"])]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def venv_reusing_packages(path: Path) -> Path:
    """A venv at ``path`` that sees this environment's packages (torch included) but not r2d2_hpc; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    view = path / "reused-packages"
    view.mkdir()
    for site in _site_dirs():
        for entry in site.iterdir():
            if entry.name.startswith(_SKIP) or entry.suffix == ".pth" or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    (Path(purelib) / "_reused_packages.pth").write_text(f"{view}\n")
    return python


def run(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None) -> str:
    """Runs a command; returns its stdout, or fails the test with the command and the end of its output."""
    import os

    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {}),
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} (in {cwd}) exited {done.returncode}:\n{out[-3000:]}"
    )
    return done.stdout
