"""Files of predict and evaluate: listing input cases, reading them, writing masks on the input's grid.

Input (``input=``) is one of:

- a NIfTI file (``.nii`` or ``.nii.gz``): one case, its id the file name without the suffix; a 4D file holds
  every channel on its last axis (as MSD stores them);
- an MSD task folder (with ``dataset.json``): the images of its ``test`` list, or of ``training`` with
  ``msd_list=training``;
- any other folder: every NIfTI file in it, grouped into cases by ``case_id_regex``; files with an nnU-Net
  channel suffix (``case_0000.nii.gz``, ``case_0001.nii.gz``) are the channels of one case, in that order.

Reference labels (``labels=``, ``ref=``) are ``<case>.nii.gz`` (or ``.nii``) in a folder, or one file for a single
case. Outputs keep the header of the input (qform and sform codes, units), with the data type of the output.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from r2d2_hpc import atomic
from r2d2_hpc.atomic import atomic_write
from r2d2_hpc.data.nifti import stack_channel_files, strip_nifti_suffix
from r2d2_hpc.errors import DataError, problem

NIFTI_GLOBS = ("*.nii.gz", "*.nii")
_MAX_LISTED = 10


PREDICT_FIX = "run predict again (the masks written so far are complete)"


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its id and its image files (one per channel, or one file holding every channel)."""

    case_id: str
    files: tuple[Path, ...]


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder``, sorted; hidden files (``._x.nii.gz`` of macOS archives) skipped."""
    found = {p for pattern in NIFTI_GLOBS for p in folder.glob(pattern) if p.is_file()}
    return sorted(p for p in found if not p.name.startswith("."))


def list_input_cases(
    path: str | Path, msd_list: str = "test", case_id_regex: str = "", channel_regex: str | None = None
) -> list[InputCase]:
    """Lists the cases of ``input=`` (see the module docstring), sorted by case id.

    Raises:
        DataError: the path does not exist, holds no NIfTI file, or its files do not form cases.
    """
    path = Path(os.path.abspath(path))
    if path.is_file():
        if not re.search(r"\.nii(\.gz)?$", path.name):
            raise DataError(
                problem(path, "not a NIfTI file", "a .nii or .nii.gz file", "convert it to NIfTI")
            )
        return [InputCase(strip_nifti_suffix(path.name), (path,))]
    if not path.is_dir():
        raise DataError(problem(path, "not found", "a NIfTI file or a folder", "check input="))
    if (path / "dataset.json").is_file():
        return _msd_cases(path, msd_list)
    files = nifti_files(path)
    if not files:
        raise DataError(problem(path, "no .nii/.nii.gz file", "NIfTI images to predict", "check input="))
    return _grouped_cases(path, files, case_id_regex or r"^(?P<case>.+?)\.nii(\.gz)?$", channel_regex)


def _msd_cases(root: Path, msd_list: str) -> list[InputCase]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            problem(meta_path, f"unreadable JSON ({exc})", "valid JSON", "repair the file")
        ) from exc
    entries = meta.get(msd_list) if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        other = "training" if msd_list == "test" else "test"
        raise DataError(
            problem(meta_path, f"no '{msd_list}' list", "a non-empty list of images", f"set msd_list={other}")
        )
    images = [e["image"] if isinstance(e, dict) else e for e in entries]
    cases = [InputCase(strip_nifti_suffix(Path(i).name), (Path(os.path.abspath(root / i)),)) for i in images]
    missing = [str(c.files[0]) for c in cases if not c.files[0].is_file()]
    if missing:
        raise DataError(
            problem(
                meta_path,
                f"listed image(s) missing: {_listing(missing)}",
                "every listed file",
                "restore them",
            )
        )
    return _unique(sorted(cases, key=lambda c: c.case_id), meta_path)


def _grouped_cases(
    root: Path, files: list[Path], case_id_regex: str, channel_regex: str | None
) -> list[InputCase]:
    by_case: dict[str, dict[int, Path]] = {}
    for file in files:
        match = re.match(case_id_regex, file.name)
        if match is None or not match.groupdict().get("case"):
            fix = "fix case_id_regex (it needs a group (?P<case>...))"
            raise DataError(problem(file, f"case_id_regex={case_id_regex!r} does not match", "a match", fix))
        channel_match = re.search(channel_regex, file.name) if channel_regex else None
        channel = int(channel_match.group("channel")) if channel_match else -1
        channels = by_case.setdefault(match.group("case"), {})
        if channel in channels:
            found = f"two files for case {match.group('case')!r}: {channels[channel].name} and {file.name}"
            raise DataError(problem(root, found, "one file per case and channel", "remove one of them"))
        channels[channel] = file
    cases = []
    for case_id, channels in sorted(by_case.items()):
        order = sorted(channels)
        if order != [-1] and order != list(range(len(order))):
            names = ", ".join(p.name for p in channels.values())
            found = f"case {case_id!r} has files {names}"
            expected = "one file, or per-channel files _0000, _0001, ... without gaps"
            fix = "add the missing channels, or set channel_regex=null when _NNNN is part of the case name"
            raise DataError(problem(root, found, expected, fix))
        cases.append(InputCase(case_id, tuple(channels[c] for c in order)))
    return cases


def _unique(cases: list[InputCase], where: Path) -> list[InputCase]:
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(
            problem(where, f"duplicate case id(s) {_listing(duplicates)}", "unique file names", "rename")
        )
    return cases


def read_case_image(
    case: InputCase, num_channels: int, channel_names: list[str], affine_tolerance: float
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Reads a case's channels as float32 ``(C, X, Y, Z)``; returns ``(image, affine, header of the first file)``.

    Raises:
        DataError: a file is unreadable, the channel files are on different grids, or the case has another
            number of channels than the model.
    """
    image, affine = stack_channel_files([(Path(f), "image") for f in case.files], affine_tolerance)
    if image.shape[0] != num_channels:
        found = f"{image.shape[0]} channel(s) in case {case.case_id!r} ({len(case.files)} file(s))"
        expected = f"{num_channels} channel(s) ({', '.join(channel_names)}), the model's input"
        fix = (
            "give one file per channel (<case>_0000.nii.gz, <case>_0001.nii.gz, ... in the training order) "
            "or one 4D file with channels last; or use a checkpoint trained on these channels"
        )
        raise DataError(problem(case.files[0], found, expected, fix))
    return image, affine, _header(case.files[0])


def _header(path: Path) -> nib.Nifti1Header:
    img = nib.load(path)
    header = img.header
    if not isinstance(header, nib.Nifti1Header):  # e.g. Analyze: write a NIfTI header with the same affine
        header = nib.Nifti1Header()
        header.set_qform(img.affine, code=1)
        header.set_sform(img.affine, code=1)
    return header


def _output_header(header: nib.Nifti1Header, dtype: type, description: str) -> nib.Nifti1Header:
    out = header.copy()
    out.set_data_dtype(dtype)
    out.set_slope_inter(1.0, 0.0)
    out["cal_min"], out["cal_max"] = 0.0, 0.0
    out.set_intent("none")
    out["descrip"] = description.encode()[:79]
    return out


def save_nifti_like(
    path: Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, description: str
) -> Path:
    """Writes ``data`` with ``affine`` and the input's header, atomically.

    ``affine`` is the input's own, so nibabel keeps the header's qform and sform (and their codes) as they are.
    """
    image = nib.Nifti1Image(
        data, np.asarray(affine, dtype=np.float64), _output_header(header, data.dtype, description)
    )
    with atomic_write(path, f"the {description} {path.name}", PREDICT_FIX, data.nbytes) as tmp:
        nib.save(image, tmp)  # the temporary name keeps the suffix: nibabel picks the format by it
    return path


def list_masks(folder: str | Path) -> dict[str, Path]:
    """Case id -> mask file of a predictions folder (``probabilities/`` and hidden files are not masks).

    Raises:
        DataError: the folder is missing, empty, or holds two files for one case.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(problem(folder, "not a folder", "a folder of <case>.nii.gz masks", "check pred="))
    masks: dict[str, Path] = {}
    for file in nifti_files(folder):
        case_id = strip_nifti_suffix(file.name)
        if case_id in masks:
            found = f"{masks[case_id].name} and {file.name} are one case"
            raise DataError(problem(folder, found, "one file per case", "remove one"))
        masks[case_id] = file
    if not masks:
        raise DataError(problem(folder, "no .nii/.nii.gz file", "predicted masks", "check pred="))
    return masks


def find_references(labels: str | Path, case_ids: list[str]) -> dict[str, Path]:
    """Case id -> reference label file: ``<labels>/<case>.nii(.gz)``, or ``labels`` itself for a single case.

    Raises:
        DataError: a case has no reference file.
    """
    labels = Path(os.path.abspath(labels))
    if labels.is_file():
        if len(case_ids) != 1:
            found = f"one label file for {len(case_ids)} cases"
            raise DataError(
                problem(labels, found, "a folder of <case>.nii.gz labels", "point labels= at a folder")
            )
        return {case_ids[0]: labels}
    if not labels.is_dir():
        raise DataError(
            problem(labels, "not found", "a folder of <case>.nii.gz labels", "check labels=/ref=")
        )
    found: dict[str, Path] = {}
    missing = []
    for case_id in case_ids:
        candidates = [labels / f"{case_id}{s}" for s in (".nii.gz", ".nii")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(case_id)
        else:
            found[case_id] = hit
    if missing:
        found_text = f"no reference label for case(s) {_listing(missing)}"
        fix = "name reference files <case>.nii.gz after the images, or leave labels= unset to skip metrics"
        raise DataError(problem(labels, found_text, "one <case>.nii.gz per predicted case", fix))
    return found


def write_json(path: Path, content: dict[str, Any]) -> None:
    """Writes JSON atomically (a reader never sees half a file)."""
    atomic.write_json(path, content, f"the record {path.name}", PREDICT_FIX, indent=2, default=str)
