"""Each entry point's --help: what it does, its main settings, an example, and only the config groups it uses;
error hints that name the command at hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r2d2_hpc.config import CONF_DIR
from r2d2_hpc.data.manifest import read_manifest
from r2d2_hpc.errors import ShardError
from r2d2_hpc.inference.model import load_model
from r2d2_hpc.train.checkpoint import CheckpointError

APPS = ("launch", "prepare", "train", "predict", "evaluate")


def _groups_used(app: str) -> dict[str, list[str]]:
    """The config groups of an app's defaults list, each with the options conf/ has for it."""
    defaults = yaml.safe_load((CONF_DIR / f"{app}.yaml").read_text())["defaults"]
    groups = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    groups = [g for g in groups if not g.startswith("override ")]
    return {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in groups}


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    procs = {
        app: subprocess.Popen(
            [sys.executable, "-m", f"r2d2_hpc.{app}", "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for app in APPS
    }
    out = {}
    for app, proc in procs.items():
        out[app], _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[app][-2000:]
    return out


@pytest.mark.parametrize("app", APPS)
def test_help_says_what_the_command_does_with_an_example_and_only_its_groups(app: str, helps) -> None:
    text = helps[app]
    assert text.startswith(f"python -m r2d2_hpc.{app} "), text[:200]
    intro = text.split("\n\n")[0]
    assert 150 < len(intro) < 800  # one paragraph
    assert "Main settings:" in text and f"Example:\n  python -m r2d2_hpc.{app} " in text.replace(
        "torchrun --nproc_per_node=2 -m", "python -m"
    )
    assert "schema" not in text and "hydra/" not in text
    used = _groups_used(app)
    listed = {}
    if used:
        section = text.split("Config groups (group=option):\n")[1].split("\n\n")[0]
        for line in section.splitlines():
            group, options = line.strip().split(": ")
            listed[group] = options.split(", ")
    else:
        assert "Config groups: none" in text
    assert listed == used, f"conf/{app}.yaml hydra.help.template lists {listed}; the app uses {used}"


def test_predict_hints_name_the_checkpoint_setting_not_training_resume(tmp_path: Path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a torch file")
    for path in (tmp_path / "missing.pt", tmp_path / "missing-run", bad):
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        message = str(err.value)
        assert str(path) in message and "checkpoint=" in message, message
        assert "resume=" not in message, message


def test_a_missing_shard_folder_is_not_prepared_with_the_command(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "missing", empty):
        with pytest.raises(ShardError) as err:
            read_manifest(folder)
        message = str(err.value)
        assert "the data is not prepared" in message and "python -m r2d2_hpc.prepare" in message
        assert f"out={folder}" in message and "never finished" not in message
    (empty / "shard-abc-0000.h5").write_bytes(b"")
    with pytest.raises(ShardError, match="prepare never finished"):
        read_manifest(empty)
