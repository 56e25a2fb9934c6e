"""predict over many cases: inputs, ranks and parts, isolated failures, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from inference_helpers import LPS_AFFINE, ODD_SHAPE, make_checkpoint, save_nifti

from r2d2_hpc.errors import ConfigError, DataError
from r2d2_hpc.inference.config import PredictConfig
from r2d2_hpc.inference.io import list_input_cases
from r2d2_hpc.inference.metrics import read_case_csv
from r2d2_hpc.inference.model import load_model
from r2d2_hpc.inference.runner import resolve_part, run_predict, split_cases
from r2d2_hpc.train.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _cases(folder: Path, names: list[str], with_labels: bool = True) -> Path:
    rng = np.random.default_rng(3)
    for name in names:
        save_nifti(folder / "images" / f"{name}.nii.gz", rng.normal(50, 10, ODD_SHAPE).astype(np.float32))
        if with_labels:
            save_nifti(folder / "labels" / f"{name}.nii.gz", rng.integers(0, 3, ODD_SHAPE).astype(np.uint8))
    return folder


def test_input_kinds_file_folder_channels_and_msd(tmp_path: Path) -> None:
    image = np.zeros(ODD_SHAPE, np.float32)
    one = save_nifti(tmp_path / "single" / "scan.nii", image)
    assert [(c.case_id, c.files) for c in list_input_cases(one)] == [("scan", (one,))]
    for name in ("b_0001", "b_0000", "a_0000", "a_0001"):
        save_nifti(tmp_path / "nnunet" / f"{name}.nii.gz", image)
    cases = list_input_cases(
        tmp_path / "nnunet",
        channel_regex=r"_(?P<channel>\d{4})\.nii(\.gz)?$",
        case_id_regex=r"^(?P<case>.+?)(_\d{4})?\.nii(\.gz)?$",
    )
    assert [(c.case_id, [f.name for f in c.files]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"]),
    ]
    msd = tmp_path / "Task09"
    save_nifti(msd / "imagesTs" / "t_7.nii.gz", image)
    save_nifti(msd / "imagesTr" / "t_1.nii.gz", image)
    (msd / "dataset.json").write_text(
        json.dumps(
            {
                "test": ["./imagesTs/t_7.nii.gz"],
                "training": [{"image": "./imagesTr/t_1.nii.gz", "label": "x"}],
            }
        )
    )
    assert [c.case_id for c in list_input_cases(msd)] == ["t_7"]
    assert [c.case_id for c in list_input_cases(msd, "training")] == ["t_1"]
    save_nifti(tmp_path / "gap" / "c_0001.nii.gz", image)
    with pytest.raises(DataError, match="channel_regex=null"):
        list_input_cases(tmp_path / "gap", channel_regex=r"_(?P<channel>\d{4})\.nii(\.gz)?$")


def test_parts_from_the_environment_and_by_hand() -> None:
    torchrun = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    cfg = PredictConfig(checkpoint="c", input="i", out="o", device="cpu")
    part, num_parts, _ = resolve_part(cfg, torchrun)
    assert (part, num_parts) == (1, 2)
    by_hand = PredictConfig(checkpoint="c", input="i", out="o", part=2, num_parts=3)
    assert resolve_part(by_hand, torchrun)[:2] == (2, 3)
    from r2d2_hpc.inference.io import InputCase

    cases = [InputCase(f"c{i}", ()) for i in range(7)]
    shares = [[c.case_id for c in split_cases(cases, p, 3)] for p in range(3)]
    assert shares == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]


def test_two_parts_write_disjoint_masks_and_the_last_one_merges_the_metrics(
    tmp_path: Path, checkpoint: Path
) -> None:
    data = _cases(tmp_path / "data", ["p0", "p1", "p2"])
    common = {"checkpoint": str(checkpoint), "input": str(data / "images"), "labels": str(data / "labels")}
    single = run_predict(PredictConfig(**common, out=str(tmp_path / "single")), environ={})

    out = tmp_path / "split"
    first = run_predict(PredictConfig(**common, out=str(out), part=1, num_parts=2), environ={})
    assert [p.name for p in first.written] == ["p1.nii.gz"]
    assert first.metrics_csv is None and not (out / "metrics.csv").exists()
    second = run_predict(PredictConfig(**common, out=str(out), part=0, num_parts=2), environ={})
    assert [p.name for p in second.written] == ["p0.nii.gz", "p2.nii.gz"]

    assert second.metrics_csv == out / "metrics.csv"
    merged, alone = read_case_csv(out / "metrics.csv"), read_case_csv(single.metrics_csv)
    assert [(r["case_id"], r["class_value"]) for r in merged] == [
        (c, k) for c in ("p0", "p1", "p2") for k in (1, 2)
    ]
    assert merged == alone
    assert (out / "metrics_summary.csv").read_text() == (
        tmp_path / "single" / "metrics_summary.csv"
    ).read_text()
    record = json.loads((out / "predict.json").read_text())
    assert record["class_names"] == ["background", "c1", "c2"] and record["num_parts"] == 2


def test_a_failing_case_is_reported_and_the_others_finish(tmp_path: Path, checkpoint: Path) -> None:
    data = _cases(tmp_path / "data", ["good"], with_labels=False)
    (data / "images" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    two_channels = np.zeros((*ODD_SHAPE, 2), np.float32)
    save_nifti(data / "images" / "twochan.nii.gz", two_channels)

    run = run_predict(
        PredictConfig(checkpoint=str(checkpoint), input=str(data / "images"), out=str(tmp_path / "o")),
        environ={},
    )

    assert [p.name for p in run.written] == ["good.nii.gz"]
    failures = {f["case_id"]: f["error"] for f in run.failures}
    assert set(failures) == {"broken", "twochan"}
    assert "broken.nii.gz" in failures["broken"] and "unreadable" in failures["broken"]
    assert "twochan.nii.gz" in failures["twochan"]
    assert "2 channel(s)" in failures["twochan"] and "1 channel(s) (ch0)" in failures["twochan"]
    recorded = json.loads((tmp_path / "o" / "failures.json").read_text())["failures"]
    assert [f["case_id"] for f in recorded] == ["broken", "twochan"]
    assert nib.load(tmp_path / "o" / "good.nii.gz").shape == ODD_SHAPE


def test_missing_reference_is_an_error_before_any_prediction(tmp_path: Path, checkpoint: Path) -> None:
    data = _cases(tmp_path / "data", ["x", "y"])
    (data / "labels" / "y.nii.gz").unlink()
    cfg = PredictConfig(
        checkpoint=str(checkpoint),
        input=str(data / "images"),
        out=str(tmp_path / "o"),
        labels=str(data / "labels"),
    )
    with pytest.raises(DataError, match=r"no reference label for case\(s\) y"):
        run_predict(cfg, environ={})
    assert not (tmp_path / "o" / "x.nii.gz").exists()


def test_bad_checkpoints_are_clear_errors(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere\.pt.*does not exist"):
        load_model(tmp_path / "nowhere.pt")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_model(tmp_path)

    state = torch.load(checkpoint, weights_only=False)
    for name, change in (
        ("channels", {"in_channels": 2}),
        ("model", {"name": "fcn", "options": {"base_width": 4}}),
        ("classes", {"num_classes": 5}),
    ):
        bad = tmp_path / f"{name}.pt"
        torch.save({**state, "model_info": {**state["model_info"], **change}}, bad)
        with pytest.raises(CheckpointError, match=r"weights do not fit") as caught:
            load_model(bad)
        assert str(bad) in str(caught.value)
    torch.save({**state, "model_info": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="model_info lacks name"):
        load_model(tmp_path / "old.pt")


def test_settings_are_checked_where_they_enter() -> None:
    with pytest.raises(ConfigError, match="checkpoint= is required"):
        PredictConfig(input="i", out="o")
    with pytest.raises(ConfigError, match=r"overlap=1\.0 must be in \[0, 1\)"):
        PredictConfig(checkpoint="c", input="i", out="o", overlap=1.0)
    with pytest.raises(ConfigError, match="set both part= and num_parts="):
        PredictConfig(checkpoint="c", input="i", out="o", part=1)


def test_lps_input_with_a_three_d_model_and_labels(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(
        tmp_path / "c3", spatial_dims=3, preprocessing={"target_spacing": [1.2, 1.2, 1.2]}
    )
    data = _cases(tmp_path / "data", ["v"])
    run = run_predict(
        PredictConfig(
            checkpoint=str(checkpoint),
            input=str(data / "images" / "v.nii.gz"),
            out=str(tmp_path / "o"),
            labels=str(data / "labels" / "v.nii.gz"),
            tta=True,
            batch_size=2,
        ),
        environ={},
    )
    mask = nib.load(tmp_path / "o" / "v.nii.gz")
    assert mask.shape == ODD_SHAPE
    assert np.array_equal(mask.affine, nib.load(data / "images" / "v.nii.gz").affine)
    assert np.allclose(mask.affine, LPS_AFFINE, atol=1e-6)
    assert [r["class_value"] for r in read_case_csv(run.metrics_csv)] == [1, 2]
