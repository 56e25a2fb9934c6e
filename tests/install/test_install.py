"""Installs as a user would: a wheel (no ``-e``) and an editable checkout used from the folder that holds it.

Both venvs reuse the packages of the environment running the tests (torch included, see ``install_venvs.py``), so pip
installs only r2d2_hpc, offline; every command then runs from a directory that is not the checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from install_venvs import run, venv_reusing_packages

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
OFFLINE = ["--no-index", "--no-build-isolation", "--quiet"]
# Every `python -m` entry point with a --help (Hydra apps and argparse CLIs).
ENTRY_POINTS = (
    "r2d2_hpc.launch",
    "r2d2_hpc.prepare",
    "r2d2_hpc.train",
    "r2d2_hpc.predict",
    "r2d2_hpc.evaluate",
    "r2d2_hpc.analysis",
    "r2d2_hpc.verify",
)
PREPARE = [
    "data=synthetic",
    "data.root=phantoms",
    "data.num_cases=3",
    "data.phantom_shape=[16,16,8]",
    "out=shards",
    "num_workers=0",
]
TINY_TRAIN = [
    "model=unet",
    "model.base_width=4",
    "model.depth=2",
    "train.max_steps=2",
    "train.global_batch=2",
    "train.eval_every_steps=0",
    "train.num_workers=0",
    "train.timing_warmup_steps=0",
]


def _copy_project(dest: Path) -> Path:
    """The files a build needs (what an sdist holds), away from the checkout's build/ and egg-info."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("r2d2_hpc", "conf", "analysis"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _help_of_every_entry_point(python: Path, cwd: Path) -> None:
    procs = {
        m: subprocess.Popen(
            [str(python), "-m", m, "--help"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for m in ENTRY_POINTS
    }
    for module, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, (
            f"python -m {module} --help (in {cwd}) exited {proc.returncode}:\n{out[-2000:]}"
        )
        assert "Traceback" not in out, out[-2000:]


def _prepare_train_analyse(python: Path, cwd: Path) -> None:
    run([str(python), "-m", "r2d2_hpc.prepare", *PREPARE], cwd)
    assert (cwd / "shards" / "manifest.json").is_file()
    run(
        [
            str(python),
            "-m",
            "r2d2_hpc.train",
            "data=synthetic",
            "data.shards=shards",
            "run_dir=run1",
            *TINY_TRAIN,
        ],
        cwd,
    )
    assert json.loads((cwd / "run1" / "result.json").read_text())["steps"] == 2
    run([str(python), "-m", "r2d2_hpc.analysis", "run1", "--out", "report", "--reference"], cwd)
    report = (cwd / "report" / "report.md").read_text()
    assert "Published references" in report and "Horovod" in report


def test_wheel_installs_and_runs_from_any_directory(tmp_path: Path) -> None:
    src = _copy_project(tmp_path / "src")
    python = venv_reusing_packages(tmp_path / "venv")
    run(
        [str(python), "-m", "pip", "wheel", *OFFLINE, "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("r2d2_hpc-*.whl")
    run([str(python), "-m", "pip", "install", *OFFLINE, f"{wheel}[metrics]"], tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    located = run(
        [str(python), "-c", "import r2d2_hpc, torch; print(r2d2_hpc.__file__, torch.__file__)"], work
    )
    assert str(tmp_path / "venv" / "lib") in located.split()[0], located  # the wheel's copy, not the checkout
    _help_of_every_entry_point(python, work)
    _prepare_train_analyse(python, work)


def test_editable_install_works_from_the_folder_holding_the_clone(tmp_path: Path) -> None:
    # The README's layout: the clone at ~/r2d2_hpc, commands typed in ~.
    home = tmp_path / "home"
    clone = _copy_project(home / "r2d2_hpc")
    (clone / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "install.sh", clone / "scripts" / "install.sh")
    venv = clone / ".venv"
    venv_reusing_packages(venv)
    out = run(["bash", "scripts/install.sh"], clone, env={"R2D2_PIP_ARGS": " ".join(OFFLINE)})
    python = Path(out.strip())
    assert python == venv / "bin" / "python", out  # absolute: main.sh and users run it from anywhere
    located = run([str(python), "-c", "import r2d2_hpc.data.manifest as m; print(m.__file__)"], home)
    assert located.strip() == str(clone / "r2d2_hpc" / "data" / "manifest.py")
    _help_of_every_entry_point(python, home)
    run([str(python), "-m", "r2d2_hpc.prepare", *PREPARE], home)
    assert (home / "shards" / "manifest.json").is_file()
