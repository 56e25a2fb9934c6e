"""Settings of ``python -m r2d2_hpc.predict`` and ``python -m r2d2_hpc.evaluate`` (registered in Hydra's store).

Everything about the model and its preprocessing comes from the checkpoint; these settings only say what to
predict, where to write it, and how to run the sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r2d2_hpc.errors import ConfigError

AMP_MODES = ("none", "bf16", "fp16")
MSD_LISTS = ("test", "training")
DEFAULT_CASE_ID_REGEX = r"^(?P<case>.+?)(_\d{4})?\.nii(\.gz)?$"
DEFAULT_CHANNEL_REGEX = r"_(?P<channel>\d{4})\.nii(\.gz)?$"


def _required(name: str, value: Any, example: str) -> None:
    if value in (None, "", "???"):
        raise ConfigError(f"{name}= is required, e.g. {example}")


@dataclass
class PredictConfig:
    """``python -m r2d2_hpc.predict checkpoint=<file> input=<path> out=<dir> [labels=<path>]``."""

    checkpoint: str | None = None  # a training checkpoint (runs/<run>/checkpoints/last.pt) or its run folder
    input: str | None = None  # a NIfTI file, a folder of NIfTI files, or an MSD task folder (dataset.json)
    out: str | None = None  # folder for <case>.nii.gz masks, predict.json and the metric tables (created)
    labels: str | None = None  # reference labels (folder of <case>.nii.gz, or one file): writes metrics.csv
    msd_list: str = "test"  # MSD task folder input: predict dataset.json's "test" or "training" images
    case_id_regex: str = DEFAULT_CASE_ID_REGEX  # folder input: case id of a file name (group 'case')
    channel_regex: str | None = DEFAULT_CHANNEL_REGEX  # folder input: channel of a file (null: none)
    batch_size: int = 8  # 2D slices or 3D windows per forward pass
    overlap: float = 0.5  # 3D: share of a window that its neighbour overlaps (0 <= overlap < 1)
    gaussian_sigma: float = 0.125  # 3D: sigma of the Gaussian window weights, as a share of the window edge
    tta: bool = False  # test-time augmentation: average every flip of the spatial axes (4 in 2D, 8 in 3D)
    save_probabilities: bool = False  # also write probabilities/<case>.nii.gz (float32, classes last)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is present, else cpu | cpu | cuda | cuda:<i>
    amp: str = "none"  # none | bf16 | fp16 autocast of the forward pass (CUDA only)
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    part: int | None = None  # which share of the cases this process predicts; None: the distributed rank
    num_parts: int | None = None  # shares the cases are split into; None: the distributed world size
    surface_tolerance_mm: float = 1.0  # tolerance of the surface Dice (mm)
    progress: bool = True  # progress bar on the first part (only when attached to a terminal)
    # --- a launched job (launcher=local|slurm): one task per part, followed with python -m r2d2_hpc.study ---
    launcher: Any = None  # None: predict in this process | a launcher/ group config (conf/launcher/)
    nodes: int = 1  # launcher=slurm: nodes of the job (parts: nodes x launcher.tasks_per_node or GPUs)
    wait: bool = True  # launcher=slurm: wait for the job and print its end (false: submit and return)

    def __post_init__(self) -> None:
        example = "python -m r2d2_hpc.predict checkpoint=runs/x/checkpoints/last.pt input=scans/ out=pred/"
        for name in ("checkpoint", "input", "out"):
            _required(name, getattr(self, name), example)
        if self.msd_list not in MSD_LISTS:
            raise ConfigError(
                f"msd_list={self.msd_list!r} is not valid. Valid choices are: {', '.join(MSD_LISTS)}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp={self.amp!r} is not valid. Valid choices are: {', '.join(AMP_MODES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap={self.overlap} must be in [0, 1)")
        if self.gaussian_sigma <= 0:
            raise ConfigError(f"gaussian_sigma={self.gaussian_sigma} must be positive")
        if self.surface_tolerance_mm < 0:
            raise ConfigError(f"surface_tolerance_mm={self.surface_tolerance_mm} must be >= 0")
        if (self.part is None) != (self.num_parts is None):
            raise ConfigError("set both part= and num_parts= (or neither, to split by the distributed rank)")
        if self.num_parts is not None and not 0 <= int(self.part) < int(self.num_parts):  # type: ignore[arg-type]
            raise ConfigError(f"part={self.part} must be in [0, num_parts={self.num_parts})")


@dataclass
class EvaluateConfig:
    """``python -m r2d2_hpc.evaluate pred=<dir> ref=<dir> out=<file.csv>``."""

    pred: str | None = None  # folder of predicted <case>.nii.gz masks (class values)
    ref: str | None = None  # folder of reference <case>.nii.gz labels on the same grids
    out: str | None = None  # per-case CSV (summary: <stem>_summary.csv beside it); None: <pred>/metrics.csv
    class_names: list[str] | None = None  # value i -> name, background first; None: <pred>/predict.json's
    # Remap reference values, e.g. {4: 3}; None: <pred>/predict.json's. Typed Any: OmegaConf cannot merge a
    # command-line dict into an Optional[Dict[int, int]] that is None; __post_init__ checks and converts it.
    label_map: Any = None
    surface_tolerance_mm: float = 1.0  # tolerance of the surface Dice (mm)
    affine_tolerance: float = 1e-3  # largest allowed difference between prediction and reference affines (mm)

    def __post_init__(self) -> None:
        example = "python -m r2d2_hpc.evaluate pred=pred/ ref=labelsTr/ out=metrics.csv"
        _required("pred", self.pred, example)
        _required("ref", self.ref, example)
        if self.surface_tolerance_mm < 0:
            raise ConfigError(f"surface_tolerance_mm={self.surface_tolerance_mm} must be >= 0")
        if self.label_map is not None:
            try:
                self.label_map = {int(k): int(v) for k, v in dict(self.label_map).items()}
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"label_map={self.label_map!r} must map integers to integers, e.g. label_map={{4:3}}"
                ) from exc


def register_configs() -> None:
    """Registers both schemas in Hydra's ConfigStore (the entry points call it before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
