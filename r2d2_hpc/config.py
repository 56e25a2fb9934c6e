"""Configuration schemas, registered in Hydra's ConfigStore.

Each component owns one dataclass; every field has a one-line comment. Checks live in ``__post_init__`` so a
bad value fails where it enters, with a message that names the setting and the valid choices. The training code
receives these objects (or plain copies of them) and never imports Hydra itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r2d2_hpc.errors import ConfigError


def _conf_dir() -> Path:
    """``conf/``: R2D2_CONF_DIR, else the copy inside an installed wheel, else the checkout's own."""
    if os.environ.get("R2D2_CONF_DIR"):
        return Path(os.environ["R2D2_CONF_DIR"])
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


# The Hydra config folder; setup.py maps the checkout's conf/ into the wheel as r2d2_hpc/conf.
CONF_DIR = _conf_dir()

SOURCES = ("msd", "folders", "mni_tissue", "synthetic")
NORMALISATIONS = ("auto", "zscore_nonzero", "zscore", "ct_window", "ct_percentile", "none")
LAYOUTS = ("2d", "3d")
COMPRESSIONS = ("none", "gzip", "lz4", "zstd")
IMAGE_DTYPES = ("float32", "float16")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not a valid choice. Valid choices are: {', '.join(choices)}")


def _check_triplet(name: str, value: Any, positive: bool = True) -> None:
    if value is None:
        return
    if len(value) != 3 or (positive and any(float(v) <= 0 for v in value)):
        raise ConfigError(f"{name}={list(value)!r} must be three positive numbers, one per axis (x, y, z)")


@dataclass
class DataConfig:
    """Where a dataset comes from and how it is preprocessed into shards (config group ``data/``)."""

    name: str = "mni_tissue"  # source kind: msd | folders | mni_tissue | synthetic
    root: str | None = None  # source folder (MSD task folder, image/label folder); None for mni_tissue
    dataset_name: str | None = None  # name written to the manifest; defaults to the folder or source name
    shards: str | None = (
        None  # prepared shard directory (prepare writes, training reads); None: data/prepared/<name>
    )
    # --- plain folders (name=folders) ---
    image_glob: str = "images/*.nii.gz"  # glob, relative to root, of image files
    label_glob: str = "labels/*.nii.gz"  # glob, relative to root, of label files
    case_id_regex: str = r"^(?P<case>.+?)(_\d{4})?\.nii(\.gz)?$"  # case id from a file name (group 'case')
    channel_regex: str | None = r"_(?P<channel>\d{4})\.nii(\.gz)?$"  # channel index of a per-channel file
    class_names: list[str] | None = None  # label value i -> name; MSD reads dataset.json 'labels'
    channel_names: list[str] | None = None  # channel names; MSD reads dataset.json 'modality'
    modality: str = "auto"  # MRI | CT | auto (from dataset.json, else MRI): picks the normalisation
    # --- preprocessing ---
    affine_tolerance: float = 1e-3  # largest allowed difference between image and label affines (mm)
    target_spacing: list[float] | None = None  # resample to this spacing in mm (x, y, z); None keeps it
    normalisation: str = "auto"  # auto | zscore_nonzero | zscore | ct_window | ct_percentile | none
    ct_window: list[float] | None = None  # [low, high] HU clip for ct_window, e.g. [-160, 240]
    ct_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # clip for ct_percentile
    crop_nonzero: bool = False  # crop every case to the bounding box of its non-zero image voxels
    label_map: Any = None  # {source value: new value}, e.g. {4: 3} (MSD BrainTumour); Any: OmegaConf cannot override a typed None dict
    # --- sample layout ---
    layout: str = "2d"  # 2d: slices along slice_axis | 3d: patches of patch_size
    slice_axis: int = 2  # axis (0=x, 1=y, 2=z in RAS) along which 2D slices are cut
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])  # 3D patch size (voxels)
    foreground_fraction: float = 0.33  # share of 3D patches centred on a foreground voxel
    samples_per_epoch: int | None = (
        None  # random 3D patches per epoch, all ranks; None: cases x patches_per_case
    )
    patches_per_case: int = 16  # default epoch: training cases x this (never shrinks with the world size)
    # --- reading shards ---
    chunk_cache_mib: float = (
        256.0  # decoded chunks kept per DataLoader worker (0: off; see data/chunk_cache.py)
    )
    hdf5_locking: bool = False  # HDF5 file locking of shard opens (off: no lock traffic on Lustre/NFS)
    on_corrupt_sample: str = "fail"  # fail: stop naming shard and case | skip: warn, count, read another
    # --- split ---
    val_fraction: float = 0.2  # share of cases held out for validation (by case, never by slice)
    split_seed: int = 0  # seed of the train/validation split
    val_cases: list[str] | None = None  # explicit validation case ids; overrides val_fraction
    # --- mni_tissue: one real volume cut into slabs of slices that never touch ---
    slab_thickness: int = 12  # slices per slab (case) along slab_axis
    slab_gap: int = 4  # slices dropped between neighbouring slabs so train and val do not leak
    slab_axis: int = 2  # axis along which the MNI volume is cut into slabs
    val_every: int = 3  # every n-th slab (counting from the second) is a validation case
    # --- synthetic phantoms (name=synthetic): written to root when it has no dataset.json yet ---
    num_cases: int = 6  # phantom cases
    num_channels: int = 2  # channels per phantom (1-4)
    num_classes: int = 3  # classes including background (2-6)
    phantom_shape: list[int] = field(default_factory=lambda: [48, 40, 32])  # voxels per phantom
    seed: int = 0  # phantom seed

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, SOURCES)
        _check_choice("data.normalisation", self.normalisation, NORMALISATIONS)
        _check_choice("data.layout", self.layout, LAYOUTS)
        _check_choice(
            "data.modality",
            str(self.modality).upper() if self.modality != "auto" else "auto",
            ("auto", "MRI", "CT"),
        )
        for axis_name in ("slice_axis", "slab_axis"):
            if getattr(self, axis_name) not in (0, 1, 2):
                raise ConfigError(f"data.{axis_name}={getattr(self, axis_name)} must be 0, 1 or 2")
        _check_triplet("data.target_spacing", self.target_spacing)
        _check_triplet("data.patch_size", self.patch_size)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"data.foreground_fraction={self.foreground_fraction} must be in [0, 1]")
        _check_choice("data.on_corrupt_sample", self.on_corrupt_sample, ("fail", "skip"))
        if (self.samples_per_epoch is not None and self.samples_per_epoch < 1) or self.patches_per_case < 1:
            raise ConfigError(
                f"data.samples_per_epoch={self.samples_per_epoch} and data.patches_per_case="
                f"{self.patches_per_case} must be at least 1 (samples_per_epoch may be null)"
            )
        if self.chunk_cache_mib < 0:
            raise ConfigError(f"data.chunk_cache_mib={self.chunk_cache_mib} must be >= 0 (0 turns it off)")
        if self.normalisation == "ct_window" and (self.ct_window is None or len(self.ct_window) != 2):
            raise ConfigError("data.normalisation=ct_window needs data.ct_window=[low,high] (HU)")
        if self.label_map is not None:
            try:
                self.label_map = {int(k): int(v) for k, v in dict(self.label_map).items()}
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    f"data.label_map={self.label_map!r} must map integers to integers, e.g. {{4: 3}}"
                ) from exc
        if self.name in ("msd", "folders") and not self.root:
            raise ConfigError(f"data={self.name} needs data.root=<folder of the dataset>")
        if not 1 <= self.num_channels <= 4 or not 2 <= self.num_classes <= 6:
            raise ConfigError("data.num_channels must be 1-4 and data.num_classes 2-6 (synthetic phantoms)")
        if self.slab_thickness < 1 or self.slab_gap < 0 or self.val_every < 2:
            raise ConfigError(
                "data.slab_thickness >= 1, data.slab_gap >= 0 and data.val_every >= 2 are needed"
            )

    def shard_dir(self) -> str:
        """The prepared shard directory: ``shards`` when set, else ``data/prepared/<name>``."""
        return self.shards or f"data/prepared/{self.name}"

    def preprocessing_settings(self) -> dict[str, Any]:
        """The settings that change the prepared arrays; their hash decides whether a case is redone."""
        keys = (
            "name",
            "affine_tolerance",
            "target_spacing",
            "normalisation",
            "ct_window",
            "ct_percentiles",
            "crop_nonzero",
            "label_map",
            "modality",
            "slab_thickness",
            "slab_gap",
            "slab_axis",
        )
        return {k: _plain(getattr(self, k)) for k in keys}


@dataclass
class ShardConfig:
    """How prepared cases are stored in HDF5 shards."""

    target_shard_mib: float = 512.0  # a shard is closed once it holds at least this much data
    compression: str = "lz4"  # none | gzip | lz4 | zstd (lz4 and zstd through hdf5plugin)
    compression_level: int | None = None  # gzip 1-9, zstd 1-22; None takes the codec's default
    image_dtype: str = "float32"  # float32 | float16 storage of images (labels are always uint8)
    chunk_slices: int = 1  # 2D layout: slices per chunk along the slice axis
    chunk_edge: int = 32  # 3D layout: chunk edge in voxels (a 64^3 patch touches at most 27 chunks)

    def __post_init__(self) -> None:
        _check_choice("storage.compression", self.compression, COMPRESSIONS)
        _check_choice("storage.image_dtype", self.image_dtype, IMAGE_DTYPES)
        if self.target_shard_mib <= 0 or self.chunk_slices < 1 or self.chunk_edge < 4:
            raise ConfigError(
                "storage.target_shard_mib > 0, storage.chunk_slices >= 1, storage.chunk_edge >= 4"
            )


@dataclass
class PrepareConfig:
    """``python -m r2d2_hpc.prepare``: one source dataset -> a shard directory."""

    data: DataConfig = field(default_factory=DataConfig)
    storage: ShardConfig = field(default_factory=ShardConfig)
    out: str | None = None  # shard directory (manifest.json + shard-*.h5); None: data.shards
    num_workers: int = 2  # parallel preprocessing processes (0 = in this process)
    force: bool = False  # redo every case even when its source hash and settings are unchanged
    keep_cache: bool = False  # keep the per-case staging files after a successful run
    progress: bool = True  # progress bar (only when attached to a terminal)

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = self.data.shard_dir()


SCALING_MODES = ("strong", "weak")
LR_RULES = ("none", "linear", "sqrt")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly", "cosine", "constant")
AMP_MODES = ("none", "bf16", "fp16")
BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class TrainConfig:
    """The training loop (config group ``train/``). Batch sizes are in samples (2D slices or 3D patches)."""

    max_steps: int = 200  # optimizer steps of the whole run (over all epochs)
    scaling: str = "strong"  # strong: global_batch fixed and split across ranks | weak: batch_per_rank fixed
    global_batch: int = 16  # strong scaling: samples per optimizer step over all ranks
    batch_per_rank: int = 8  # weak scaling: samples per optimizer step on each rank
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float = 0.01  # peak learning rate at lr_reference_batch
    lr_scaling: str = "none"  # none | linear | sqrt: scale lr by (global batch / lr_reference_batch)
    lr_reference_batch: int = 16  # global batch at which lr applies unscaled
    momentum: float = 0.99  # SGD momentum (Nesterov)
    weight_decay: float = 3e-5  # decoupled for adamw, L2 for sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw betas
    schedule: str = "poly"  # poly | cosine | constant, after the warmup
    warmup_steps: int | None = (
        None  # linear warmup to the (scaled) peak lr; None: follows lr_scaling (schedule.py)
    )
    poly_power: float = 0.9  # exponent of the poly schedule
    min_lr_ratio: float = 0.0  # the schedule's floor, as a share of the peak lr
    dice_weight: float = 1.0  # loss = ce_weight * cross-entropy + dice_weight * soft Dice loss
    ce_weight: float = 1.0  # see dice_weight
    dice_over_ranks: bool = (
        True  # batch-Dice statistics summed over all ranks: the loss ignores the batch split
    )
    amp: str = (
        "none"  # none | bf16 | fp16 (fp16 with a grad scaler; CUDA only, ignored with a warning on CPU)
    )
    grad_clip: float | None = 12.0  # max global grad norm; None disables clipping
    ddp_bucket_mib: float = 25.0  # DDP gradient bucket size
    static_graph: bool = False  # DDP static_graph
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels-last memory format
    seed: int = 0  # base seed: ranks and workers derive theirs from it
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume tests use it)
    num_workers: int = 2  # DataLoader workers per rank
    persistent_workers: bool = True  # keep the workers (and their open shards and caches) across epochs
    prefetch_factor: int = 2  # batches each worker loads ahead (with num_workers > 0)
    pin_memory: bool = True  # page-locked batches for asynchronous host-to-device copies (CUDA only)
    augment: bool = True  # flips, 90-degree rotations, intensity scale/shift on training samples
    eval_every_steps: int = 50  # validation every N steps (and at the end); 0 = only at the end
    eval_batch: int = 8  # validation micro-batch per rank
    log_every_steps: int = 10  # a log line every N steps when no progress bar is shown
    tensorboard: bool = False  # rank 0 writes TensorBoard events to <run_dir>/tensorboard (needs tensorboard)
    checkpoint_every_steps: int = 50  # a checkpoint every N steps (and at the end); 0 = only at the end
    dist_timeout_s: float = 300.0  # process-group timeout: a dead or stuck rank fails the others after this
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | nccl | gloo
    threads_per_rank: int | None = (
        None  # torch threads per rank; None: OMP_NUM_THREADS, else the CPUs it may use / ranks
    )
    allow_world_size_change: bool = (
        False  # resume a checkpoint written by another number of ranks (LR rescaled)
    )
    timing_warmup_steps: int = 5  # steps excluded from the throughput in result.json
    timing_sync_every_steps: int = 10  # one host sync per N steps (CUDA events and the loss are read then)
    timing_sample_every_steps: int = 50  # a "comm" timing line (DDP's own comm/overlap numbers) every N steps
    stop_check_every_steps: int = (
        10  # ranks agree on a stop request (preemption) every N steps, on a CPU group
    )
    max_nonfinite_steps: int = (
        3  # consecutive steps with a NaN/inf loss (or grad norm) before a run is diverged
    )

    def __post_init__(self) -> None:
        for name, choices in (
            ("scaling", SCALING_MODES),
            ("lr_scaling", LR_RULES),
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("amp", AMP_MODES),
            ("backend", BACKENDS),
        ):
            _check_choice(f"train.{name}", getattr(self, name), choices)
        positive = (
            "max_steps",
            "global_batch",
            "batch_per_rank",
            "grad_accum",
            "lr_reference_batch",
            "eval_batch",
            "prefetch_factor",
            "timing_sync_every_steps",
            "timing_sample_every_steps",
            "stop_check_every_steps",
            "max_nonfinite_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.dist_timeout_s <= 0:
            raise ConfigError("train.lr and train.dist_timeout_s must be positive")
        if self.warmup_steps is not None and (
            self.warmup_steps < 0 or (self.warmup_steps >= self.max_steps and self.warmup_steps > 0)
        ):
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})"
            )

    def micro_batch(self, world_size: int) -> int:
        """Samples per forward pass on each rank, from the scaling mode; errors name the fix."""
        if self.scaling == "weak":
            per_rank = self.batch_per_rank
        else:
            if self.global_batch % world_size:
                raise ConfigError(
                    f"train.global_batch={self.global_batch} cannot be split over {world_size} ranks "
                    f"(strong scaling); set it to a multiple of {world_size}"
                )
            per_rank = self.global_batch // world_size
        if per_rank % self.grad_accum:
            raise ConfigError(
                f"{per_rank} samples per rank cannot be split into train.grad_accum={self.grad_accum} "
                "micro-batches; change train.grad_accum or the batch size"
            )
        return per_rank // self.grad_accum

    def effective_global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks."""
        return self.global_batch if self.scaling == "strong" else self.batch_per_rank * world_size


@dataclass
class RunConfig:
    """``python -m r2d2_hpc.train``: one training run (one process per rank)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "unet", "spatial_dims": 2})  # model/ group
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = "runs/default"  # where logs, checkpoints and result.json go
    resume: str = (
        "auto"  # auto: continue from the run dir's last complete checkpoint | never | <checkpoint path>
    )

    def __post_init__(self) -> None:
        if "name" not in self.model:
            raise ConfigError("model.name is missing; choose one of: unet, fcn (e.g. model=unet)")
        if self.model.get("spatial_dims", 2) not in (2, 3):
            raise ConfigError(f"model.spatial_dims={self.model.get('spatial_dims')} must be 2 or 3")


LAUNCHERS = ("local", "slurm", "debug", "sbatch")


@dataclass
class LauncherConfig:
    """Where the ranks of each run start (config group ``launcher/``)."""

    name: str = (
        "local"  # local: processes on this machine | slurm: submitit | sbatch: scripts | debug: in-process
    )
    partition: str | None = None  # Slurm partition (None: the cluster's default)
    account: str | None = None  # Slurm account to charge
    qos: str | None = None  # Slurm quality of service
    time_min: int = 60  # time limit of each job, minutes
    gpus_per_node: int = 0  # GPUs per node; one task (rank) per GPU. 0: CPU ranks
    tasks_per_node: int | None = None  # ranks per node; None: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int = 2  # CPUs per rank (DataLoader workers need some)
    mem_gb: float | None = None  # memory per node in GB (None: the partition's default)
    constraint: str | None = None  # Slurm --constraint (e.g. a GPU model)
    exclusive: bool = True  # Slurm: node-exclusive jobs, so runs of a study never share a node (false: small runs may share)
    signal_delay_s: int = 90  # seconds before the time limit at which Slurm sends the preemption signal
    max_requeues: int = 3  # requeues after preemption or time-out before the run is reported failed
    setup: list[str] = field(
        default_factory=list
    )  # shell lines run before each job (module load, conda activate)
    extra_sbatch: dict[str, Any] = field(
        default_factory=dict
    )  # any other sbatch option, e.g. {mail-type: END}
    submit: bool = False  # sbatch launcher: submit the rendered scripts (else print how)
    python: str | None = None  # python on the compute nodes (None: the one running the launcher)

    def __post_init__(self) -> None:
        _check_choice("launcher.name", self.name, LAUNCHERS)
        if self.time_min < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.max_requeues < 0:
            raise ConfigError(
                "launcher.time_min >= 1, gpus_per_node >= 0, cpus_per_task >= 1, max_requeues >= 0"
            )
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(f"launcher.tasks_per_node={self.tasks_per_node} must be at least 1")

    def ranks_per_node(self) -> int:
        """One rank per GPU, or ``tasks_per_node`` (default 1) on CPU nodes."""
        return self.tasks_per_node or self.gpus_per_node or 1


@dataclass
class StudyConfig:
    """A scaling study: models x scales x repeats (config group ``study/``)."""

    name: str = "demo"  # study name (used in the default directory)
    models: list[str] | None = None  # model names (conf/model/<name>.yaml); None: the model group's choice
    scales: list[int] = field(default_factory=lambda: [1, 2])  # per run: nodes, or ranks (see scale_unit)
    scale_unit: str = (
        "nodes"  # nodes: each node runs ranks_per_node ranks | ranks: total ranks, packed on nodes
    )
    repeats: int = 1  # runs per model and scale (spread in the report)
    model_overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # per model name, e.g. {fcn: {base_width: 16}}
    dir: str | None = None  # study directory; None: runs/<name>-<date>
    attach: str | None = (
        None  # a study directory to continue: run/wait for what did not complete, then report
    )
    wait: bool = True  # wait for the jobs and write the report (false: submit and return)
    dry_run: bool = False  # print the plan and the scripts it would submit; start and write nothing
    report: bool = True  # run the analysis when the study is complete

    def __post_init__(self) -> None:
        _check_choice("study.scale_unit", self.scale_unit, ("nodes", "ranks"))
        if not self.scales or any(int(s) < 1 for s in self.scales) or self.repeats < 1:
            raise ConfigError(
                f"study.scales={self.scales} must list positive node counts and study.repeats >= 1"
            )


@dataclass
class LaunchConfig:
    """``python -m r2d2_hpc.launch``: a study run through a launcher, then its report."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "unet", "spatial_dims": 2})
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


def _plain(value: Any) -> Any:
    """Turns OmegaConf containers and tuples into plain JSON-able Python values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def to_dataclass(cls: type, cfg: Any) -> Any:
    """Builds dataclass ``cls`` from a DictConfig or dict, running its ``__post_init__`` checks.

    Unknown keys give a ConfigError that lists the valid ones.
    """
    raw = _plain(cfg)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(
            f"Unavailable setting(s) for {cls.__name__}: {', '.join(unknown)}. "
            f"Valid settings are: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in raw.items():
        target = _DATACLASS_FIELDS.get((cls.__name__, key))
        kwargs[key] = to_dataclass(target, value) if target is not None and isinstance(value, dict) else value
    return cls(**kwargs)


_DATACLASS_FIELDS: dict[tuple[str, str], type] = {
    ("LaunchConfig", "data"): DataConfig,
    ("LaunchConfig", "train"): TrainConfig,
    ("LaunchConfig", "launcher"): LauncherConfig,
    ("LaunchConfig", "study"): StudyConfig,
    ("RunConfig", "data"): DataConfig,
    ("RunConfig", "train"): TrainConfig,
    ("PrepareConfig", "data"): DataConfig,
    ("PrepareConfig", "storage"): ShardConfig,
}


def register_configs() -> None:
    """Registers the schemas in Hydra's ConfigStore (called by the Hydra apps before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(group="train", name="schema", node=TrainConfig)
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="launcher", name="schema", node=LauncherConfig)
    cs.store(group="study", name="schema", node=StudyConfig)
    cs.store(name="launch_schema", node=LaunchConfig)
