"""Checkpoints: round trip, kill simulations, foreign checkpoints, unusable ones, RNG capture and restore."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from r2d2_hpc.errors import R2D2Error
from r2d2_hpc.train import checkpoint as ckpt
from r2d2_hpc.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from r2d2_hpc.train.dist import DistEnv

HASH = ckpt.config_hash({"model": {"name": "unet"}, "train": {"lr": 0.01}})


def make_state(step: int, config_hash: str = HASH) -> dict[str, Any]:
    """A real (tiny) model, optimizer and scheduler after ``step`` SGD steps."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(2, 3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(step):
        opt.zero_grad()
        model(torch.ones(1, 2, 5, 5)).sum().backward()
        opt.step()
        sched.step()
    return {
        "step": step,
        "epoch": step // 10,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "sampler": {"epoch": 0, "offset": step * 4},
        "rng": [ckpt.capture_rng_state()],
        "config_hash": config_hash,
        "model_info": {"name": "unet"},
        "world_size": 1,
        "extra": {"last_dice": [0.9, 0.5]},
    }


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_config_hash_is_stable_and_sensitive() -> None:
    a = ckpt.config_hash({"b": 1, "a": [1, 2], "c": {"y": 2, "x": 1}})
    assert a == ckpt.config_hash({"c": {"x": 1, "y": 2}, "a": [1, 2], "b": 1})
    assert a != ckpt.config_hash({"b": 2, "a": [1, 2], "c": {"y": 2, "x": 1}})
    assert len(a) == 16 and int(a, 16) >= 0


def test_round_trip(tmp_path: Path) -> None:
    state = make_state(3)
    path = save_checkpoint(tmp_path / "checkpoints", state)
    assert path == tmp_path / "checkpoints" / "last.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    loaded, where = load_checkpoint(tmp_path / "checkpoints", HASH)
    assert where == path
    assert (loaded["format"], loaded["format_version"], loaded["step"], loaded["epoch"]) == (
        ckpt.FORMAT,
        1,
        3,
        0,
    )
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, state["optimizer"]["state"][0]["momentum_buffer"])
    assert loaded["scheduler"]["last_epoch"] == 3 and loaded["sampler"] == {"epoch": 0, "offset": 12}
    assert loaded["extra"] == {"last_dice": [0.9, 0.5]} and loaded["torch_version"] == torch.__version__


def test_second_save_keeps_the_previous_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(1))
    save_checkpoint(tmp_path, make_state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]
    assert torch.load(tmp_path / "prev.pt", weights_only=False)["step"] == 1
    assert load_checkpoint(tmp_path, HASH)[0]["step"] == 2


def test_kill_while_writing_uses_prev(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, make_state(1))
    save_checkpoint(tmp_path, make_state(2))
    save_checkpoint(tmp_path, make_state(3))  # prev.pt = step 2, last.pt = step 3
    (tmp_path / "last.pt.tmp").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # a cut next write
    truncate(tmp_path / "last.pt")  # and a damaged last.pt
    with caplog.at_level(logging.WARNING):
        state, path = load_checkpoint(tmp_path, HASH)
    assert (path.name, state["step"]) == ("prev.pt", 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "last.pt") in w and "truncated or not a torch file" in w for w in warnings)
    assert any("older checkpoint" in w and "prev.pt" in w for w in warnings)


def test_kill_between_the_two_renames(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(1))
    save_checkpoint(tmp_path, make_state(2))
    (tmp_path / "last.pt").replace(tmp_path / "prev.pt")  # the first rename happened, the second did not
    (tmp_path / "last.pt.tmp").write_bytes(b"complete or not, it is never read")
    state, path = load_checkpoint(tmp_path, HASH)
    assert (path.name, state["step"]) == ("prev.pt", 2)


def test_nothing_to_resume(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "missing", HASH) is None
    assert load_checkpoint(tmp_path, HASH) is None
    (tmp_path / "last.pt.tmp").write_bytes(b"first save was killed")
    assert load_checkpoint(tmp_path, HASH) is None


def test_foreign_checkpoint_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, make_state(4))
    save_checkpoint(tmp_path, make_state(9, config_hash="0123456789abcdef"))  # another run wrote last.pt
    with caplog.at_level(logging.WARNING):
        state, path = load_checkpoint(tmp_path, HASH)
    assert (path.name, state["step"]) == ("prev.pt", 4)
    text = caplog.text
    assert str(tmp_path / "last.pt") in text and "another run or model (config_hash 0123456789abcdef" in text
    assert load_checkpoint(tmp_path, None)[0]["step"] == 9  # no expected hash: anything of the format goes


def test_all_bad_lists_every_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_state(1))
    save_checkpoint(tmp_path, make_state(2))
    truncate(tmp_path / "last.pt", 0.3)
    (tmp_path / "prev.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, HASH)
    message = str(info.value)
    assert isinstance(info.value, R2D2Error)
    assert f"{tmp_path}: no usable checkpoint" in message
    assert f"{tmp_path / 'last.pt'}: it cannot be read" in message
    assert f"{tmp_path / 'prev.pt'}: it cannot be read" in message
    assert "resume=never" in message and "point resume= at a good checkpoint file" in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format": "something-else", "step": 1}, "not an r2d2_hpc checkpoint"),
        ([1, 2, 3], r"not an r2d2_hpc checkpoint \(a list\)"),
        ({"format": ckpt.FORMAT, "format_version": 2}, "written by a newer r2d2_hpc"),
        ({"format": ckpt.FORMAT, "format_version": 1, "step": 1}, "it lacks epoch, model"),
    ],
)
def test_explicit_file_problems_raise(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, HASH)


def test_explicit_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, make_state(5))
    assert load_checkpoint(path, HASH)[0]["step"] == 5
    with pytest.raises(CheckpointError, match="another run or model"):
        load_checkpoint(path, "ffffffffffffffff")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", HASH)


def test_save_needs_the_core_keys(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="lacks optimizer, config_hash"):
        save_checkpoint(tmp_path, {"step": 1, "epoch": 0, "model": {}, "world_size": 1})


def _draws() -> tuple[list[float], list[float], float]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_rng_capture_restore_reproduces_the_next_numbers(tmp_path: Path) -> None:
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    _draws()
    state = ckpt.capture_rng_state()
    expected = _draws()
    _draws()  # move every stream on
    ckpt.restore_rng_state(state)
    assert _draws() == expected
    # the same through a checkpoint file (numpy's state needs weights_only=False)
    save_checkpoint(tmp_path, {**make_state(0), "rng": [state]})
    torch.manual_seed(99)
    ckpt.restore_rng_state(load_checkpoint(tmp_path, HASH)[0]["rng"][0])
    assert _draws() == expected


def test_gather_single_process() -> None:
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, 1, "gloo", "cpu", "single", None)
    torch.manual_seed(5)
    states = ckpt.gather_rng_states(env, None)
    assert len(states) == 1 and torch.equal(states[0]["torch"], torch.get_rng_state())


def _parts(seed: int) -> ckpt.TrainingParts:
    torch.manual_seed(seed)
    model = torch.nn.Conv2d(2, 3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return ckpt.TrainingParts(model, opt, sched, None)


def test_training_state_round_trip_restores_parts_and_rng(tmp_path: Path) -> None:
    trained = _parts(0)
    trained.model(torch.ones(1, 2, 5, 5)).sum().backward()
    trained.optimizer.step()
    trained.scheduler.step()
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, 1, "gloo", "cpu", "single", None)
    state = ckpt.training_state(
        trained,
        step=7,
        epoch=1,
        offset=12,
        seed=3,
        rng=[ckpt.capture_rng_state()],
        config_hash=HASH,
        model_info={"name": "unet"},
        world_size=1,
        extra={"last_dice": [0.5]},
    )
    expected_next = torch.rand(3)
    path = save_checkpoint(tmp_path, state)
    loaded, _ = load_checkpoint(tmp_path, HASH)
    assert loaded["sampler"] == {"epoch": 1, "offset": 12, "seed": 3}
    fresh = _parts(1)
    assert ckpt.weights_digest(fresh.model) != ckpt.weights_digest(trained.model)
    assert ckpt.restore_training_state(fresh, loaded, env, path) == 7
    assert ckpt.weights_digest(fresh.model) == ckpt.weights_digest(trained.model)
    assert fresh.scheduler.last_epoch == 1 and fresh.optimizer.state_dict()["state"]
    torch.testing.assert_close(torch.rand(3), expected_next)  # this rank's RNG stream continues


def test_restore_with_another_world_size_keeps_the_rng(caplog: pytest.LogCaptureFixture) -> None:
    parts = _parts(0)
    state = ckpt.training_state(
        parts,
        step=2,
        epoch=0,
        offset=4,
        seed=0,
        rng=[ckpt.capture_rng_state()] * 2,
        config_hash=HASH,
        model_info={},
        world_size=2,
        extra={},
    )
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, 1, "gloo", "cpu", "single", None)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore_training_state(parts, state, env, Path("x.pt")) == 2
    torch.testing.assert_close(torch.rand(2), expected)
    assert "written with 2 ranks, this run has 1" in caplog.text
