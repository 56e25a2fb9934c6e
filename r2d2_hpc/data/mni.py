"""Real demo data: the MNI152 (ICBM 2009a symmetric) T1 template that nilearn ships, cut into tissue slabs.

Files (``nilearn/datasets/data/``, 197 x 233 x 189 voxels of 1 mm, uint8 0-255): the skull-stripped T1
``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` and the grey- and white-matter probability maps
``mni_icbm152_{gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` (scaled to 0-1 by their maximum, as nilearn does).

Tissue label (4 classes: 0 background, 1 CSF, 2 GM, 3 WM). nilearn ships no CSF map, so it is derived:

- intracranial mask = fill_holes(closing(p_gm + p_wm > 0.2)), the closing with a 6-connected element of
  radius 3 voxels: the closing bridges sulci and the hole filling takes in the ventricles, so sulcal and
  ventricular CSF are inside the mask;
- p_csf = mask * clip(1 - p_gm - p_wm, 0, 1) and p_bg = 1 - mask;
- label = argmax(p_bg, p_csf, p_gm, p_wm) (ties go to the lower class).

Cases are slabs of that one volume: along ``slab_axis``, within the extent of the mask on that axis, consecutive
slabs of ``slab_thickness`` slices separated by ``slab_gap`` dropped slices, so no two slabs touch. Slab 1,
1 + val_every, 1 + 2 * val_every, ... are validation cases, the others training cases. A slab's affine has
its origin shifted, so every voxel keeps its world coordinate.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.nifti import check_same_grid, load_nifti
from r2d2_hpc.data.types import CaseRef, DatasetInfo, RawCase
from r2d2_hpc.errors import ConfigError, DataError, problem

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASS_NAMES = ("background", "csf", "gm", "wm")
CHANNEL_NAMES = ("T1",)
TISSUE_THRESHOLD = 0.2  # p_gm + p_wm above which a voxel is brain tissue (before closing and filling)
CLOSING_RADIUS_VOX = 3  # bridges sulci up to about 6 mm wide


def nilearn_data_dir() -> Path:
    """``nilearn/datasets/data`` of the installed nilearn, found without importing nilearn (slow to import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            problem(
                None,
                "the nilearn package is not installed",
                "nilearn, which ships the MNI152 template used by data=mni_tissue",
                "pip install nilearn",
            )
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def template_files(data_dir: Path | None = None) -> dict[str, Path]:
    """Role (t1, gm, wm) -> template file; raises a DataError naming a missing one."""
    data_dir = Path(data_dir) if data_dir is not None else nilearn_data_dir()
    files = {role: data_dir / name for role, name in TEMPLATE_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise DataError(
                problem(
                    path,
                    "file not found",
                    "the MNI152 template files of nilearn",
                    "pip install --force-reinstall nilearn (they are part of its package data)",
                )
            )
    return files


def _probability(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, affine = load_nifti(path, "probability")
    peak = float(data.max())
    return (data[0] / peak if peak > 1.0 else data[0]), affine


def tissue_label(p_gm: np.ndarray, p_wm: np.ndarray) -> np.ndarray:
    """Background/CSF/GM/WM label (uint8) from GM and WM probabilities, as defined in the module docstring."""
    tissue = (p_gm + p_wm) > TISSUE_THRESHOLD
    label = np.zeros(tissue.shape, dtype=np.uint8)
    if not tissue.any():
        return label
    # Work in the tissue's bounding box, padded with zeros so the closing is not clipped at the volume edge.
    pad = CLOSING_RADIUS_VOX + 1
    box = ndimage.find_objects(tissue.astype(np.uint8))[0]
    # Iterated 6-connected steps: the same as one closing with the 3-voxel ball, several times faster.
    step = ndimage.generate_binary_structure(3, 1)
    dilated = ndimage.binary_dilation(np.pad(tissue[box], pad), structure=step, iterations=CLOSING_RADIUS_VOX)
    closed = ndimage.binary_erosion(dilated, structure=step, iterations=CLOSING_RADIUS_VOX)
    mask = ndimage.binary_fill_holes(closed)[pad:-pad, pad:-pad, pad:-pad]
    gm, wm = p_gm[box], p_wm[box]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    # Inside the mask p_bg = 0, so argmax over (csf, gm, wm) + 1; outside it p_bg = 1 wins every tie.
    inside = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    label[box] = np.where(mask, inside, 0)
    return label


@functools.lru_cache(maxsize=2)
def tissue_volumes(t1_path: str, gm_path: str, wm_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(t1 float32 (1, X, Y, Z), label uint8 (X, Y, Z), affine)`` of the whole template, cached per process.

    The arrays are shared by every caller, so they are made read-only.
    """
    t1, affine = load_nifti(Path(t1_path), "t1")
    reference = (Path(t1_path), t1.shape[1:], affine)
    p_gm, gm_affine = _probability(Path(gm_path))
    p_wm, wm_affine = _probability(Path(wm_path))
    check_same_grid(reference, (Path(gm_path), p_gm.shape, gm_affine), 1e-3)
    check_same_grid(reference, (Path(wm_path), p_wm.shape, wm_affine), 1e-3)
    label = tissue_label(p_gm, p_wm)
    t1.flags.writeable = False
    label.flags.writeable = False
    return t1, label, affine


def slab_bounds(label: np.ndarray, axis: int, thickness: int, gap: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the slabs inside the non-background extent of ``label`` along ``axis``."""
    present = np.nonzero(np.any(label > 0, axis=tuple(a for a in range(3) if a != axis)))[0]
    if present.size == 0:
        return []
    lo, hi = int(present[0]), int(present[-1]) + 1
    return [(start, start + thickness) for start in range(lo, hi - thickness + 1, thickness + gap)]


def slab_split(index: int, val_every: int) -> str:
    """``"val"`` for slab 1, 1 + val_every, ...; ``"train"`` otherwise."""
    return "val" if index >= 1 and (index - 1) % val_every == 0 else "train"


@dataclass
class MniTissueSource:
    """Slabs of the MNI152 template with a background/CSF/GM/WM label (``data=mni_tissue``)."""

    info: DatasetInfo
    files: dict[str, Path]
    slab_axis: int
    slab_thickness: int
    slab_gap: int
    val_every: int

    @classmethod
    def from_config(cls, cfg: DataConfig, data_dir: Path | None = None) -> MniTissueSource:
        """Finds the template files; class, channel and modality settings of ``cfg`` do not apply."""
        info = DatasetInfo(cfg.dataset_name or "mni_tissue", CLASS_NAMES, CHANNEL_NAMES, "MRI")
        return cls(
            info, template_files(data_dir), cfg.slab_axis, cfg.slab_thickness, cfg.slab_gap, cfg.val_every
        )

    def _volumes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tissue_volumes(str(self.files["t1"]), str(self.files["gm"]), str(self.files["wm"]))

    def cases(self) -> list[CaseRef]:
        """One case per slab, with the source's own train/val split."""
        _, label, _ = self._volumes()
        bounds = slab_bounds(label, self.slab_axis, self.slab_thickness, self.slab_gap)
        if len(bounds) < 2:
            raise ConfigError(
                f"data.slab_thickness={self.slab_thickness} with data.slab_gap={self.slab_gap} gives "
                f"{len(bounds)} slab(s) along axis {self.slab_axis} of the MNI brain; at least 2 are needed "
                "(one train, one val). Use thinner slabs or a smaller gap"
            )
        return [
            CaseRef(
                case_id=f"mni_slab{i:02d}",
                files=dict(self.files),
                split=slab_split(i, self.val_every),
                extra={"axis": self.slab_axis, "start": start, "stop": stop},
            )
            for i, (start, stop) in enumerate(bounds)
        ]

    def load(self, ref: CaseRef) -> RawCase:
        """The slab's T1 ``(1, X, Y, Z)`` and label, with the origin moved to the slab's first slice."""
        t1, label, affine = self._volumes()
        axis, start, stop = (int(ref.extra[k]) for k in ("axis", "start", "stop"))
        if axis not in (0, 1, 2) or not 0 <= start < stop <= label.shape[axis]:
            raise DataError(
                problem(
                    ref.files.get("t1"),
                    f"slab {ref.case_id!r} with bounds {ref.extra}",
                    f"axis 0-2 and 0 <= start < stop <= {label.shape}",
                    "list cases again",
                )
            )
        index = [slice(None)] * 3
        index[axis] = slice(start, stop)
        shift = np.zeros(3)
        shift[axis] = start
        slab_affine = affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ shift + affine[:3, 3]
        return RawCase(
            case_id=ref.case_id,
            image=np.array(t1[(slice(None), *index)]),
            label=np.array(label[tuple(index)]),
            affine=slab_affine,
            files=ref.files,
        )


def export_slabs(out: Path, split: str = "val", cfg: DataConfig | None = None) -> list[str]:
    """Writes the slabs of one split as NIfTI (``images/<case>.nii.gz``, ``labels/<case>.nii.gz``, raw T1 values).

    This is the demo's held-out data as a user would have it on disk, for ``predict`` and ``evaluate``.
    """
    import nibabel as nib

    source = MniTissueSource.from_config(cfg or DataConfig(name="mni_tissue"))
    refs = [r for r in source.cases() if split == "all" or r.split == split]
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for ref in refs:
        case = source.load(ref)
        for sub, array in (("images", case.image[0]), ("labels", case.label)):
            final = out / sub / f"{ref.case_id}.nii.gz"
            tmp = final.with_name(f".{final.name}.tmp.nii.gz")
            nib.save(nib.Nifti1Image(array, case.affine), tmp)
            tmp.replace(final)
    return [r.case_id for r in refs]


def main(argv: list[str] | None = None) -> int:
    """``python -m r2d2_hpc.data.mni --out DIR [--split val|train|all]``: the demo slabs as NIfTI files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("val", "train", "all"), default="val")
    args = parser.parse_args(argv)
    cases = export_slabs(args.out, args.split)
    print(f"wrote {len(cases)} case(s) to {args.out}/images and {args.out}/labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
