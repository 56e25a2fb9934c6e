"""Data sources: list the cases of a dataset and load one case at a time, validating both.

A source is a small picklable object (prepare sends it to worker processes): ``info`` describes the dataset,
``cases()`` lists and checks the cases, ``load(ref)`` reads one. ``build_source(cfg)`` picks one by ``cfg.name``:

- ``msd``: a Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
- ``folders``: plain image and label folders matched by globs; nnU-Net style per-channel files are grouped.
- ``synthetic``: phantoms written once to ``cfg.root`` (see ``synthetic.py``), then read like ``msd``.
- ``mni_tissue``: slabs of the real MNI152 template shipped with nilearn (see ``mni.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.nifti import LABEL_ROLE, load_case_files, read_num_channels, strip_nifti_suffix
from r2d2_hpc.data.types import CaseRef, DatasetInfo, RawCase
from r2d2_hpc.errors import ConfigError, DataError, problem

DEFAULT_SYNTHETIC_ROOT = "data/raw/synthetic"
_MAX_LISTED = 10  # problems named in one message; the rest are counted


@runtime_checkable
class Source(Protocol):
    """What prepare needs from a dataset."""

    info: DatasetInfo

    def cases(self) -> list[CaseRef]:
        """Lists every training case, after checking the listing (files exist, ids unique)."""
        ...

    def load(self, ref: CaseRef) -> RawCase:
        """Reads and validates one case; ``RawCase.files`` is ``ref.files``."""
        ...


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _absolute(path: Path) -> Path:
    """Absolute and normalised ("./" dropped) but with symlinks kept, so messages name the user's paths."""
    return Path(os.path.abspath(path))


def _globbed(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern``, sorted; hidden files (macOS ``._x.nii.gz`` in MSD archives) are skipped."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))


def _modality(cfg: DataConfig, declared: str | None) -> str:
    if str(cfg.modality).lower() != "auto":
        return str(cfg.modality).upper()
    return declared or "MRI"


def _check_unique_ids(pairs: list[tuple[str, str]], where: Path, fix: str) -> None:
    """``pairs`` of (case id, file); raises naming every id that more than one file maps to."""
    files_by_id: dict[str, list[str]] = defaultdict(list)
    for case_id, file in pairs:
        files_by_id[case_id].append(file)
    duplicates = [f"{cid!r} <- {', '.join(fs)}" for cid, fs in files_by_id.items() if len(fs) > 1]
    if duplicates:
        raise DataError(
            problem(where, f"duplicate case id(s): {_listing(duplicates)}", "one file per case", fix)
        )


# ----------------------------------------------------------------------------------------------- MSD layout
def _read_dataset_json(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise DataError(problem(root, "dataset folder not found", "an existing folder", "check data.root"))
    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(
            problem(
                path,
                "file not found",
                "an MSD task folder with dataset.json, imagesTr/ and labelsTr/",
                "point data.root at the task folder (e.g. Task01_BrainTumour), or use data=folders for plain "
                "image/label folders",
            )
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(problem(path, f"unreadable JSON ({exc})", "valid JSON", "repair the file")) from exc
    training = meta.get("training") if isinstance(meta, dict) else None
    if (
        not isinstance(training, list)
        or not training
        or not all(
            isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)
            for e in training
        )
    ):
        raise DataError(
            problem(
                path,
                "no usable 'training' list",
                'a non-empty list of {"image": ..., "label": ...} entries',
                "list every training case with its image and label path (relative to the folder)",
            )
        )
    return meta


def _indexed_names(mapping: Any, path: Path, key: str) -> dict[int, str]:
    """``{"0": "background", ...}`` (MSD) or ``{"background": 0, ...}`` (nnU-Net v2) -> {value: name}."""
    try:
        if all(str(k).lstrip("-").isdigit() for k in mapping):
            return {int(k): str(v) for k, v in mapping.items()}
        return {int(v): str(k) for k, v in mapping.items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(
            problem(path, f"'{key}' = {mapping!r}", '{"0": "name", "1": "name", ...}', f"repair '{key}'")
        ) from exc


def class_names_after_map(labels: dict[int, str], label_map: dict | None, path: Path) -> tuple[str, ...]:
    """Names of the label values after ``label_map`` (names that merge are joined with '+')."""
    mapping = {int(k): int(v) for k, v in (label_map or {}).items()}
    names: dict[int, list[str]] = defaultdict(list)
    for value, name in sorted(labels.items()):
        names[mapping.get(value, value)].append(name)
    values = sorted(names)
    if values != list(range(len(values))):
        raise DataError(
            problem(
                path,
                f"label values {values} (after data.label_map={label_map})",
                "consecutive values 0..K-1",
                "set data.label_map to make them consecutive (e.g. {4: 3}) or give data.class_names",
            )
        )
    return tuple("+".join(names[v]) for v in values)


@dataclass
class MsdSource:
    """A Medical Segmentation Decathlon task folder; ``imagesTs/`` (no labels) is ignored."""

    info: DatasetInfo
    root: Path
    entries: list[tuple[str, str]]  # (image, label) as listed in dataset.json
    affine_tolerance: float

    @classmethod
    def from_config(cls, cfg: DataConfig, root: Path | None = None) -> MsdSource:
        """Reads ``dataset.json``; settings in ``cfg`` override what it declares."""
        root = _absolute(Path(root if root is not None else cfg.root))
        meta = _read_dataset_json(root)
        path = root / "dataset.json"
        if cfg.class_names:
            class_names = tuple(cfg.class_names)
        elif "labels" in meta:
            class_names = class_names_after_map(
                _indexed_names(meta["labels"], path, "labels"), cfg.label_map, path
            )
        else:
            raise DataError(
                problem(path, "no 'labels'", "labels: {value: name}", "add it or set data.class_names")
            )
        declared = meta.get("modality", meta.get("channel_names"))
        if cfg.channel_names:
            channel_names = tuple(cfg.channel_names)
        elif declared:
            by_index = _indexed_names(declared, path, "modality")
            channel_names = tuple(by_index[k] for k in sorted(by_index))
        else:
            raise DataError(
                problem(
                    path, "no 'modality'", 'modality: {"0": "T1", ...}', "add it or set data.channel_names"
                )
            )
        declared_values = declared.values() if isinstance(declared, dict) else []
        is_ct = any(re.search(r"\bCT\b", str(v).upper()) for v in declared_values)
        info = DatasetInfo(
            name=cfg.dataset_name or str(meta.get("name") or root.name),
            class_names=class_names,
            channel_names=channel_names,
            modality=_modality(cfg, "CT" if is_ct else None),
        )
        entries = [(e["image"], e["label"]) for e in meta["training"]]
        return cls(info=info, root=root, entries=entries, affine_tolerance=cfg.affine_tolerance)

    def cases(self) -> list[CaseRef]:
        """One case per ``training`` entry; its id is the image file name without ``.nii.gz``."""
        path = self.root / "dataset.json"
        refs = [
            CaseRef(
                case_id=strip_nifti_suffix(Path(image).name),
                files={"image": _absolute(self.root / image), LABEL_ROLE: _absolute(self.root / label)},
            )
            for image, label in self.entries
        ]
        _check_unique_ids(
            [(r.case_id, str(r.files["image"])) for r in refs],
            path,
            "list each case once in 'training', with distinct image file names",
        )
        missing = [str(f) for r in refs for f in r.files.values() if not f.is_file()]
        if missing:
            raise DataError(
                problem(
                    path,
                    f"{len(missing)} listed file(s) missing: {_listing(missing)}",
                    "every image and label of 'training' to exist",
                    "restore the files or remove their entries from dataset.json",
                )
            )
        return refs

    def load(self, ref: CaseRef) -> RawCase:
        """Reads one case: image ``(C, X, Y, Z)`` (4D files have channels last on disk), integer label."""
        return load_case_files(ref.case_id, ref.files, len(self.info.channel_names), self.affine_tolerance)


# ----------------------------------------------------------------------------------------------- plain folders
@dataclass
class FolderSource:
    """Images and labels found by globs under ``root``; case ids from ``case_id_regex`` on the file name."""

    info: DatasetInfo
    root: Path
    image_glob: str
    label_glob: str
    case_id_regex: str
    channel_regex: str | None
    affine_tolerance: float

    @classmethod
    def from_config(cls, cfg: DataConfig) -> FolderSource:
        """Checks the settings; the channel count is read from the first case's header when not given."""
        if not cfg.class_names:
            raise ConfigError(
                "data.class_names is required for data=folders (label value i -> name, background first), "
                "e.g. data.class_names=[background,liver,tumour]"
            )
        root = _absolute(Path(cfg.root))
        if not root.is_dir():
            raise DataError(
                problem(root, "dataset folder not found", "an existing folder", "check data.root")
            )
        source = cls(
            info=DatasetInfo(cfg.dataset_name or root.name, tuple(cfg.class_names), (), _modality(cfg, None)),
            root=root,
            image_glob=cfg.image_glob,
            label_glob=cfg.label_glob,
            case_id_regex=cfg.case_id_regex,
            channel_regex=cfg.channel_regex,
            affine_tolerance=cfg.affine_tolerance,
        )
        refs = source.cases()
        channel_names = tuple(cfg.channel_names) if cfg.channel_names else None
        if channel_names is None:
            image_roles = [r for r in refs[0].files if r != LABEL_ROLE]
            num_channels = len(image_roles)
            if num_channels == 1:  # one file holds every channel: its header says how many
                num_channels = read_num_channels(refs[0].files["image"])
            channel_names = tuple(f"ch{c}" for c in range(num_channels))
        source.info = DatasetInfo(
            source.info.name, source.info.class_names, channel_names, source.info.modality
        )
        return source

    def _case_id(self, path: Path) -> str:
        match = re.match(self.case_id_regex, path.name)
        if match is None or not match.groupdict().get("case"):
            raise DataError(
                problem(
                    path,
                    f"a file name that data.case_id_regex={self.case_id_regex!r} does not "
                    "match (or has no group 'case')",
                    "a match with a non-empty (?P<case>...)",
                    "fix data.case_id_regex or data.image_glob/label_glob",
                )
            )
        return match.group("case")

    def _images_by_case(self) -> dict[str, dict[int | None, Path]]:
        images = _globbed(self.root, self.image_glob)
        if not images:
            raise DataError(
                problem(
                    self.root,
                    f"no file matches data.image_glob={self.image_glob!r}",
                    "at least one image",
                    "check data.root and data.image_glob",
                )
            )
        by_case: dict[str, dict[int | None, Path]] = defaultdict(dict)
        pairs = []
        for path in images:
            match = re.search(self.channel_regex, path.name) if self.channel_regex else None
            channel = int(match.group("channel")) if match else None
            case_id = self._case_id(path)
            pairs.append((f"{case_id} (channel {channel})" if channel is not None else case_id, str(path)))
            by_case[case_id][channel] = path
        _check_unique_ids(pairs, self.root, "rename the files or narrow data.image_glob")
        for case_id, channels in by_case.items():
            ordered = sorted(-1 if c is None else c for c in channels)  # -1: one file holds every channel
            if ordered != [-1] and ordered != list(range(len(ordered))):
                names = ", ".join(p.name for p in channels.values())
                raise DataError(
                    problem(
                        self.root,
                        f"case {case_id!r} has image files {names}",
                        "either one file or per-channel files _0000, _0001, ... without gaps",
                        "add the missing channels; or set data.channel_regex=null when _NNNN is "
                        "part of the case name",
                    )
                )
        return by_case

    def _labels_by_case(self, image_ids: set[str]) -> dict[str, Path]:
        labels = _globbed(self.root, self.label_glob)
        pairs = []
        for path in labels:
            case_id = self._case_id(path)
            # The default regex strips a trailing _NNNN (a channel suffix) that is part of a label's case name.
            if case_id not in image_ids and strip_nifti_suffix(path.name) in image_ids:
                case_id = strip_nifti_suffix(path.name)
            pairs.append((case_id, str(path)))
        _check_unique_ids(pairs, self.root, "keep one label file per case or narrow data.label_glob")
        return {case_id: Path(file) for case_id, file in pairs}

    def cases(self) -> list[CaseRef]:
        """Pairs every image case with its label; unpaired files on either side are an error."""
        images = self._images_by_case()
        labels = self._labels_by_case(set(images))
        no_label, no_image = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
        if no_label or no_image:
            found = "; ".join(
                s
                for s in (
                    f"images without a label: {_listing(no_label)}" if no_label else "",
                    f"labels without an image: {_listing(no_image)}" if no_image else "",
                )
                if s
            )
            raise DataError(
                problem(
                    self.root,
                    found,
                    f"one label (data.label_glob={self.label_glob!r}) per image "
                    f"case (data.image_glob={self.image_glob!r})",
                    "add or remove the unpaired files, or fix the globs/data.case_id_regex",
                )
            )
        refs = []
        for case_id in sorted(images):
            channels = images[case_id]
            files = {
                ("image" if not c else f"image_{c:04d}"): p
                for c, p in sorted(channels.items(), key=lambda kv: kv[0] or 0)
            }
            refs.append(CaseRef(case_id=case_id, files={**files, LABEL_ROLE: labels[case_id]}))
        return refs

    def load(self, ref: CaseRef) -> RawCase:
        """Reads one case; per-channel files are stacked in channel order."""
        return load_case_files(ref.case_id, ref.files, len(self.info.channel_names), self.affine_tolerance)


# ----------------------------------------------------------------------------------------------- dispatch
def build_source(cfg: DataConfig) -> Source:
    """The source named by ``cfg.name`` (msd | folders | mni_tissue | synthetic)."""
    if cfg.name == "msd":
        return MsdSource.from_config(cfg)
    if cfg.name == "folders":
        return FolderSource.from_config(cfg)
    if cfg.name == "synthetic":
        from r2d2_hpc.data.synthetic import ensure_phantom_dataset

        root = Path(cfg.root or DEFAULT_SYNTHETIC_ROOT)
        ensure_phantom_dataset(
            root, cfg.num_cases, cfg.num_channels, cfg.num_classes, cfg.phantom_shape, cfg.seed
        )
        return MsdSource.from_config(cfg, root)
    if cfg.name == "mni_tissue":
        from r2d2_hpc.data.mni import MniTissueSource

        return MniTissueSource.from_config(cfg)
    raise ConfigError(
        f"data.name={cfg.name!r} is not a source. Valid choices are: msd, folders, mni_tissue, synthetic"
    )
