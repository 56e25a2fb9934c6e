"""The written report: CSV columns, a self-contained HTML page holding every plot and table, and plots whose
content (axes, points, error bars, projections, references) is what the tables say."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from analysis_logs import write_run
from matplotlib.container import BarContainer, ErrorbarContainer

from r2d2_hpc.analysis import analyse, load_references
from r2d2_hpc.analysis import plots as P

SCALES = (1, 2, 4)


def _step_s(n: int) -> float:
    return 0.05 * 16 / n + 2 * (n - 1) / n * 4e6 * 1e-9 + 2 * (n - 1) * 1e-4


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("study")
    for n in SCALES:
        for r in range(2):
            write_run(
                root,
                f"unet{n}_{r}",
                world_size=n,
                step_s=_step_s(n) * (1 + 0.02 * r),
                num_steps=12,
                evals=[(6, 3.0, [1.0, 0.5, 0.5]), (12, 6.0 / n, [1.0, 0.8, 0.8 - 0.01 * n])],
            )
        write_run(
            root,
            f"fcn{n}",
            model="fcn",
            scaling="weak",
            world_size=n,
            batch_per_rank=4,
            step_s=0.2 + 0.01 * n,
        )
    report = analyse([root], out=root / "report", reference=True, workers=1)
    return root / "report", report


def test_files_and_scaling_csv(study) -> None:
    out, report = study
    names = {p.name for p in out.iterdir()}
    expected_png = {"speedup", "efficiency", "throughput", "breakdown", "dice", "cost", "loss"}
    assert {f"{n}.png" for n in expected_png} <= names and {
        "report.md",
        "report.html",
        "scaling.csv",
    } <= names
    table = pd.read_csv(out / "scaling.csv")
    for column in (
        "model",
        "scaling",
        "nodes",
        "world_size",
        "throughput",
        "throughput_min",
        "throughput_max",
        "speedup",
        "speedup_min",
        "speedup_max",
        "efficiency",
        "efficiency_min",
        "efficiency_max",
    ):
        assert column in table.columns
    assert len(table) == 2 * len(SCALES)  # one row per model and scale
    assert sorted(set(zip(table["model"], table["scaling"], strict=True))) == [
        ("fcn", "weak"),
        ("unet", "strong"),
    ]
    unet = table[table["model"] == "unet"].set_index("world_size")
    assert unet.loc[4, "speedup"] == pytest.approx(
        report.scaling.set_index(["model", "world_size"]).loc[("unet", 4), "speedup"]
    )


def test_html_is_self_contained_with_every_plot_and_table(study) -> None:
    out, report = study
    page = (out / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(report.figures) == 7
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all(link.startswith("data:") for link in links)
    assert not re.search(r"<(script|link|iframe)\b|url\(|@import", page)
    for title in (
        "Scaling",
        "Step-time model and projections",
        "Time breakdown (measured)",
        "Honesty checks",
        "Environment",
        "Utilisation",
        "Stragglers",
        "Accuracy, time to target and cost",
        "Published references",
        "Per run",
        "Definitions",
    ):
        assert f"<h2>{title}</h2>" in page
    # scaling, fit, projections, breakdown, stragglers, quality, convergence, references, runs (no utilisation:
    # these logs carry no FLOPs per sample, and the report says so)
    assert page.count("<table>") == 9 and "No run logged its FLOPs per sample" in page
    assert "PROJECTIONS (model, not measured)" in page and "NVIDIA" in page and "10.1002/spe.2878" in page
    md = (out / "report.md").read_text()
    assert all(f"]({name}.png)" in md for name in report.figures)


def test_png_files_hold_pictures(study) -> None:
    out, _ = study
    image = matplotlib.image.imread(out / "speedup.png")
    assert image.shape[0] > 300 and image.shape[1] > 500 and float(np.std(image)) > 0.05


def _errorbars(ax) -> list[ErrorbarContainer]:
    """Measured points' bars (the projections' prediction intervals are error bars too, labelled apart)."""
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    return [c for c in bars if "prediction interval" not in c.get_label()]


def _intervals(ax) -> list[ErrorbarContainer]:
    return [
        c
        for c in ax.containers
        if isinstance(c, ErrorbarContainer) and "prediction interval" in c.get_label()
    ]


def _line(ax, label: str):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return line


def test_speedup_plot_content(study) -> None:
    _, report = study
    fig = P.plot_speedup(report.scaling, report.curves, report.references)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "ranks (world size N)" and ax.get_ylabel().startswith("speedup")
    bars = _errorbars(ax)
    assert len(bars) == 2  # one measured series each: fcn weak, unet strong
    for bar in bars:
        x, y = bar.lines[0].get_data()
        assert list(x) == list(SCALES) and y[0] == pytest.approx(1.0)
    unet = report.scaling[report.scaling["model"] == "unet"]
    (measured,) = [b for b in bars if b.get_label() == "unet strong G=16 (measured)"]
    assert list(measured.lines[0].get_ydata()) == pytest.approx(list(unet["speedup"]))
    proj = _line(ax, "unet strong G=16 (projection)")
    assert list(proj.get_xdata()) == [8, 16] and proj.get_linestyle() == "None"
    assert _line(ax, "unet strong G=16 (model)").get_linestyle() == "--"
    assert sum(t.get_text() == "projection" for t in ax.texts) == 4  # 2 series x (2x, 4x)
    (interval,) = [b for b in _intervals(ax) if b.get_label().startswith("unet")]
    assert list(interval.lines[2][0].get_segments()[0][:, 0]) == [8, 8]  # drawn around the projection
    # 2 repeats (fewer than 3): the measured bars have no length, and the caption says so
    assert all(np.ptp(seg[:, 1]) == 0 for b in bars for seg in b.lines[2][0].get_segments())
    assert "no error bars (fewer than 3 repeats per point" in report.markdown()
    ideal = _line(ax, "ideal (N / 1)")
    assert list(ideal.get_ydata()) == list(ideal.get_xdata())
    published = [ln for ln in ax.get_lines() if ln.get_label().endswith("(published)")]
    assert {ln.get_label() for ln in published} >= {
        "NVIDIA nnU-Net 2D (published)",
        "NVIDIA nnU-Net 3D (published)",
    }
    assert any("R2D2 U-Net: 17.5" in t.get_text() for t in ax.texts)


def test_efficiency_throughput_breakdown_dice_loss_content(study) -> None:
    _, report = study
    (ax,) = P.plot_efficiency(report.scaling, report.curves, report.references).axes
    horovod = _line(ax, "Horovod VGG-16 (published)")
    assert sorted(zip(horovod.get_xdata(), horovod.get_ydata(), strict=True)) == [(128, 0.79), (512, 0.68)]
    assert len(_errorbars(ax)) == 2
    (ax,) = P.plot_throughput(report.scaling).axes
    assert ax.get_yscale() == "log" and [len(b.lines[0].get_xdata()) for b in _errorbars(ax)] == [3, 3]
    (ax,) = P.plot_breakdown(report.breakdown).axes
    stacks = [c for c in ax.containers if isinstance(c, BarContainer)]
    labels = [c.get_label() for c in stacks]
    assert labels == ["data wait", "compute", "other (step bookkeeping)"]  # legacy logs: comm not measured
    assert all(len(c.patches) == 2 * len(SCALES) for c in stacks)
    heights = np.sum([[p.get_height() for p in c.patches] for c in stacks], axis=0)
    assert heights == pytest.approx(
        report.breakdown.sort_values(["series", "world_size"])["step_s"].to_numpy()
    )
    assert not _errorbars(ax)  # 1-2 repeats per point: no min-max spread drawn
    (ax,) = P.plot_dice(report.quality).axes
    (bar,) = _errorbars(ax)  # only the U-Net logged evaluations
    assert list(bar.lines[0].get_ydata()) == pytest.approx([0.8 - 0.005 * n for n in SCALES])
    axes = P.plot_loss(report.loss).axes
    assert [a.get_title() for a in axes] == ["fcn weak b=4/rank", "unet strong G=16"]
    assert len(axes[1].get_lines()) == 2 * len(SCALES) and axes[1].get_xlabel() == "samples seen"


def test_reference_tables_cite_their_sources() -> None:
    refs = load_references()
    assert refs["source"].notna().all() and refs["url"].str.startswith("https://").all()
    r2d2 = refs[refs["system"] == "R2D2"].set_index("model")["speedup"]
    assert r2d2.to_dict() == {"U-Net": 17.5, "FCN": 10.4}
    hvd = refs[(refs["system"] == "Horovod") & (refs["num_gpus"] == 512)].set_index("model")["efficiency"]
    assert hvd.to_dict() == {"Inception V3": 0.9, "ResNet-101": 0.9, "VGG-16": 0.68}
    nv = refs[(refs["system"] == "NVIDIA") & (refs["model"] == "nnU-Net 3D") & (refs["batch_per_gpu"] == 2)]
    a100 = nv[nv["hardware"].str.contains("A100") & (nv["precision"] == "AMP")].set_index("num_gpus")[
        "throughput"
    ]
    assert a100.to_dict() == {1: 27.48, 8: 220.83}
