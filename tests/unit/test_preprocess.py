"""Preprocessing of one case: orientation, resampling, normalisation, crop, label checks, and the way back."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from r2d2_hpc.config import DataConfig
from r2d2_hpc.data.preprocess import (
    apply_normalisation,
    canonical_orientation,
    crop_to_nonzero,
    normalise,
    prepare_image,
    preprocess,
    remap_labels,
    resample,
    restore_label,
)
from r2d2_hpc.data.types import DatasetInfo, RawCase
from r2d2_hpc.errors import DataError

INFO = DatasetInfo("toy", ("background", "a", "b", "c"), ("t1",), "MRI")

LPS = np.array([[-1.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
LAS = np.array([[-0.8, 0, 0, 4], [0, 1.2, 0, -7], [0, 0, 2.5, 1], [0, 0, 0, 1]])
# Voxel axis i runs to posterior, j to superior, k to left: axcodes ("P", "S", "L").
PERMUTED = np.array([[0, 0, -1.5, 30], [-2.0, 0, 0, 11], [0, 1.0, 0, -3], [0, 0, 0, 1]])


def _cfg(**settings) -> DataConfig:
    return DataConfig(name="synthetic", **settings)


def _raw(image, label=None, affine=None, label_file="case_seg.nii.gz") -> RawCase:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[None]
    return RawCase(
        "case",
        image,
        label,
        np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64),
        files={"image": "case_img.nii.gz", "label": label_file},
    )


def _world(affine, index) -> np.ndarray:
    return (np.asarray(affine) @ np.array([*index, 1.0]))[:3]


@pytest.mark.parametrize("affine", [LPS, LAS, PERMUTED], ids=["LPS", "LAS", "permuted"])
def test_orientation_keeps_world_coordinates_and_gives_ras(affine):
    shape, marked = (4, 5, 7), (1, 3, 5)
    image = np.zeros(shape, dtype=np.float32)
    image[marked] = 9.0
    label = np.zeros(shape, dtype=np.uint8)
    label[marked] = 2
    prepared = preprocess(_raw(image, label, affine), _cfg(normalisation="none"), INFO)
    found_image = np.unravel_index(np.argmax(prepared.image[0]), prepared.image.shape[1:])
    found_label = np.argwhere(prepared.label == 2)
    assert found_label.tolist() == [list(found_image)]
    np.testing.assert_allclose(_world(prepared.affine, found_image), _world(affine, marked), atol=1e-9)
    assert nib.aff2axcodes(prepared.affine) == ("R", "A", "S")
    direction = prepared.affine[:3, :3]
    assert (np.diag(direction) > 0).all()
    assert (np.abs(np.diag(direction)) >= np.abs(direction).max(axis=0)).all()
    np.testing.assert_allclose(sorted(prepared.spacing), sorted(np.linalg.norm(affine[:3, :3], axis=0)))


def test_orientation_matches_nibabel_closest_canonical(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(3, 4, 5)).astype(np.float32), PERMUTED), path)
    img = nib.load(path)
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj)[None]
    image, label, affine, _ = canonical_orientation(data, None, img.affine)
    assert label is None
    np.testing.assert_array_equal(image[0], np.asarray(canonical.dataobj))
    np.testing.assert_allclose(affine, canonical.affine, atol=1e-6)
    assert np.shares_memory(image, data)  # a view: orientation copies nothing


def test_resampling_shape_labels_and_world_positions():
    shape = (6, 5, 10)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [-2.0, 4.0, 10.0]
    zz = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape)
    image = 10.0 + 3.0 * zz  # intensity = 10 + world z offset: linear interpolation must follow it exactly
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 1:3, 3:6] = 1
    label[4:6, 0:2, 7:9] = 3
    prepared = preprocess(
        _raw(image, label, affine), _cfg(normalisation="none", target_spacing=[1, 1, 1.5]), INFO
    )

    assert prepared.image.shape == (1, 6, 5, 20) and prepared.label.shape == (6, 5, 20)
    np.testing.assert_allclose(prepared.spacing, (1.0, 1.0, 1.5))
    assert set(np.unique(prepared.label).tolist()) == {0, 1, 3}
    # Field of view: the outer corner (index -0.5) and the centre of the grid are the same world points.
    np.testing.assert_allclose(_world(prepared.affine, (-0.5,) * 3), _world(affine, (-0.5,) * 3))
    np.testing.assert_allclose(_world(prepared.affine, (2.5, 2, 9.5)), _world(affine, (2.5, 2, 4.5)))
    for value in (1, 3):
        before = _world(affine, np.argwhere(label == value).mean(axis=0))
        after = _world(prepared.affine, np.argwhere(prepared.label == value).mean(axis=0))
        assert np.abs(after - before).max() <= 0.75  # half a new voxel along z
    inner_z = np.arange(1, 19)  # the outermost new voxels lie beyond the old centres (edge value)
    world_z = np.array([_world(prepared.affine, (0, 0, k))[2] for k in inner_z])
    np.testing.assert_allclose(prepared.image[0, 0, 0, inner_z], 10.0 + (world_z - 10.0), rtol=1e-6)
    assert prepared.image[0, 0, 0, 0] == image[0, 0, 0]  # no extrapolation below the first centre


def test_resample_is_a_no_op_at_the_current_spacing():
    image = np.ones((1, 3, 3, 3), dtype=np.float32)
    out_image, out_label, out_affine = resample(image, None, np.eye(4), [1.0, 1.0, 1.0])
    assert out_image is image and out_label is None
    np.testing.assert_array_equal(out_affine, np.eye(4))


def _two_channels():
    image = np.zeros((2, 5, 4, 3), dtype=np.float32)
    rng = np.random.default_rng(1)
    image[0, 1:4, 1:3, :] = rng.uniform(50, 150, size=(3, 2, 3))
    image[1, 1:4, 1:3, :] = rng.uniform(-5, 5, size=(3, 2, 3))
    image[1, 0, 0, 0] = 7.0  # non-zero only in channel 1: inside the union mask
    return image


def test_zscore_nonzero_uses_the_union_mask_and_keeps_background_zero():
    image = _two_channels()
    out, stats = normalise(image, "MRI", _cfg())  # auto -> zscore_nonzero for MRI
    mask = (image != 0).any(axis=0)
    assert [s["method"] for s in stats] == ["zscore_nonzero"] * 2
    for c in range(2):
        np.testing.assert_allclose(out[c][mask].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(out[c][mask].std(), 1.0, atol=1e-5)
        assert (out[c][~mask] == 0).all()
        np.testing.assert_allclose(stats[c]["mean"], image[c][mask].astype(np.float64).mean())
    # Zero in channel 0 but inside the union mask: dark tissue, normalised like any other value.
    np.testing.assert_allclose(out[0, 0, 0, 0], -stats[0]["mean"] / stats[0]["std"], rtol=1e-6)
    assert out.dtype == np.float32 and image[0, 0, 0, 0] == 0  # the input is untouched


def test_zscore_whole_volume_and_constant_channel():
    image = np.stack([_two_channels()[0], np.full((5, 4, 3), 4.0, dtype=np.float32)])
    out, stats = normalise(image, "MRI", _cfg(normalisation="zscore"))
    np.testing.assert_allclose(out[0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[0].std(), 1.0, atol=1e-5)
    assert stats[1] == {"method": "zscore", "mean": 4.0, "std": 1.0, "clip": None}
    assert (out[1] == 0).all()


def test_ct_window_clips_then_zscores():
    image = np.linspace(-1000, 1000, 60, dtype=np.float32).reshape(1, 5, 4, 3)
    out, stats = normalise(image, "CT", _cfg(normalisation="ct_window", ct_window=[-100, 200]))
    clipped = np.clip(image[0].astype(np.float64), -100, 200)
    assert stats[0]["clip"] == [-100.0, 200.0]
    np.testing.assert_allclose(stats[0]["mean"], clipped.mean())
    np.testing.assert_allclose(stats[0]["std"], clipped.std())
    restored = out[0] * stats[0]["std"] + stats[0]["mean"]
    np.testing.assert_allclose([restored.min(), restored.max()], [-100, 200], atol=1e-3)


def test_ct_percentile_ignores_the_padding_value():
    rng = np.random.default_rng(2)
    image = rng.uniform(-1000, 1500, size=(1, 6, 6, 6)).astype(np.float32)
    image[0, :2] = -3024.0  # outside the reconstruction circle
    out, stats = normalise(image, "CT", _cfg())  # auto -> ct_percentile for CT
    body = image[0, 2:].astype(np.float64).ravel()
    low, high = np.percentile(body, [0.5, 99.5])
    assert stats[0]["method"] == "ct_percentile"
    np.testing.assert_allclose(stats[0]["clip"], [low, high])
    np.testing.assert_allclose(stats[0]["mean"], np.clip(body, low, high).mean())
    np.testing.assert_allclose(out[0, :2], (low - stats[0]["mean"]) / stats[0]["std"], rtol=1e-5)


@pytest.mark.parametrize("method", ["zscore_nonzero", "ct_percentile", "ct_window"])
def test_apply_normalisation_reproduces_preprocess_exactly(method):
    image = _two_channels() * 10 - 3
    cfg = _cfg(normalisation=method, ct_window=[-20, 900])
    prepared = preprocess(_raw(image), cfg, INFO)
    np.testing.assert_array_equal(apply_normalisation(image, prepared.normalisation), prepared.image)
    assert json.loads(json.dumps(prepared.normalisation)) == prepared.normalisation


def test_crop_bbox_is_the_union_of_channels_and_label():
    image = np.zeros((2, 8, 7, 6), dtype=np.float32)
    image[0, 2:5, 1:3, 3:4] = 1.0
    image[1, 3:6, 2:4, 2:3] = -2.0
    label = np.zeros((8, 7, 6), dtype=np.uint8)
    cropped, cropped_label, bbox = crop_to_nonzero(image, label)
    assert bbox == [[2, 6], [1, 4], [2, 4]]
    np.testing.assert_array_equal(cropped, image[:, 2:6, 1:4, 2:4])
    assert cropped_label.shape == (4, 3, 2)
    label[7, 6, 5] = 1  # a label voxel outside the image box widens the box
    _, _, bbox = crop_to_nonzero(image, label)
    assert bbox == [[2, 8], [1, 7], [2, 6]]
    _, _, empty_box = crop_to_nonzero(np.zeros((1, 3, 4, 5), dtype=np.float32), None)
    assert empty_box == [[0, 3], [0, 4], [0, 5]]


def test_crop_in_preprocess_moves_the_affine_origin():
    image = np.zeros((1, 8, 7, 6), dtype=np.float32)
    image[0, 2:5, 1:3, 3:5] = 5.0
    affine = np.diag([0.5, 2.0, 1.0, 1.0])
    prepared = preprocess(_raw(image, None, affine), _cfg(normalisation="none", crop_nonzero=True), INFO)
    assert prepared.geometry["crop_bbox"] == [[2, 5], [1, 3], [3, 5]]
    assert (prepared.image == 5.0).all() and prepared.label.shape == (3, 2, 2) and not prepared.label.any()
    np.testing.assert_allclose(_world(prepared.affine, (0, 0, 0)), _world(affine, (2, 1, 3)))


def test_remap_labels_maps_all_values_at_once():
    label = np.array([0, 1, 2, 4, 4], dtype=np.int16).reshape(5, 1, 1)
    assert remap_labels(label, {4: 3}, 4, "seg.nii.gz").ravel().tolist() == [0, 1, 2, 3, 3]
    swapped = remap_labels(label, {1: 2, 2: 1, 4: 0}, 3, "seg.nii.gz")
    assert swapped.dtype == np.uint8 and swapped.ravel().tolist() == [0, 2, 1, 0, 0]
    as_float = remap_labels(label.astype(np.float32), {4: 3}, 4, "seg.nii.gz")
    assert as_float.ravel().tolist() == [0, 1, 2, 3, 3]
    negative = np.array([-1, 0, 2], dtype=np.int8).reshape(3, 1, 1)
    assert remap_labels(negative, {-1: 0}, 3, "seg.nii.gz").ravel().tolist() == [0, 0, 2]


@pytest.mark.parametrize(
    ("values", "label_map", "needle"),
    [
        ([0, 1, 5], None, "5"),
        ([0, 255], None, "255"),
        ([0, -1], None, "-1"),
        ([0, 4], {4: 7}, "4"),
        ([0, 1.5], None, "non-integer"),
    ],
)
def test_bad_label_values_name_the_file(values, label_map, needle):
    label = np.array(values).reshape(len(values), 1, 1)
    with pytest.raises(DataError, match=r"case_007_seg\.nii\.gz") as caught:
        remap_labels(label, label_map, 4, "case_007_seg.nii.gz")
    assert needle in str(caught.value) and "Fix:" in str(caught.value)


def test_preprocess_refuses_bad_labels_and_images():
    image = np.ones((1, 3, 3, 3), dtype=np.float32)
    label = np.zeros((3, 3, 3), dtype=np.uint8)
    label[0, 0, 0] = 255
    with pytest.raises(DataError, match=r"brain_seg\.nii\.gz.*255.*reserved"):
        preprocess(_raw(image, label, label_file="brain_seg.nii.gz"), _cfg(), INFO)
    with pytest.raises(DataError, match=r"brain_seg\.nii\.gz.*label shape"):
        preprocess(_raw(image, label[:2], label_file="brain_seg.nii.gz"), _cfg(), INFO)
    image[0, 1, 1, 1] = np.nan
    with pytest.raises(DataError, match=r"case_img\.nii\.gz.*NaN"):
        preprocess(_raw(image), _cfg(), INFO)


def _lps_case(shape=(5, 7, 9)):
    rng = np.random.default_rng(3)
    image = np.zeros((2, *shape), dtype=np.float32)
    image[:, 1:4, 2:6, 1:8] = rng.uniform(1, 10, size=(2, 3, 4, 7))
    label = np.zeros(shape, dtype=np.uint8)
    label[1:4, 2:6, 1:8] = rng.integers(0, 4, size=(3, 4, 7))
    return image, label, np.diag([-1.0, -1.0, 3.0, 1.0]) + np.array([[0, 0, 0, 5.0]] * 3 + [[0, 0, 0, 0]])


def test_restore_label_is_the_exact_inverse_without_resampling():
    image, label, affine = _lps_case()
    prepared = preprocess(_raw(image, label, affine), _cfg(crop_nonzero=True), INFO)
    assert prepared.label.shape == (3, 4, 7)
    geometry = json.loads(json.dumps(prepared.geometry))  # as stored in the manifest
    restored = restore_label(prepared.label, geometry)
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, label)


def test_restore_label_after_resampling_gives_the_source_grid():
    image, label, affine = _lps_case()
    up = preprocess(_raw(image, label, affine), _cfg(crop_nonzero=True, target_spacing=[1, 1, 1.5]), INFO)
    assert up.geometry["resampled_shape"] == [5, 7, 18]
    np.testing.assert_array_equal(
        restore_label(up.label, up.geometry), label
    )  # 2x nearest upsampling is exact
    down = preprocess(_raw(image, label, affine), _cfg(target_spacing=[2, 0.7, 3]), INFO)
    assert restore_label(down.label, down.geometry).shape == label.shape
    with pytest.raises(DataError, match="prepared grid"):
        restore_label(down.label[:-1], down.geometry)


def test_normalisation_in_place_after_resampling_equals_a_fresh_copy():
    image, label, affine = _lps_case()
    prepared = preprocess(_raw(image, label, affine), _cfg(target_spacing=[1, 1.4, 1.5]), INFO)
    oriented, _, affine_ras, _ = canonical_orientation(image, None, affine)
    resampled, _, _ = resample(oriented, None, affine_ras, [1, 1.4, 1.5])
    assert resampled.shape == (2, 5, 5, 18)
    np.testing.assert_array_equal(apply_normalisation(resampled, prepared.normalisation), prepared.image)
    mask = (resampled != 0).any(axis=0)
    np.testing.assert_allclose(prepared.image[1][mask].mean(), 0.0, atol=1e-5)
    assert (prepared.image[:, ~mask] == 0).all() and (~mask).any()


def test_prepare_image_follows_the_same_path_as_preprocess():
    image, label, affine = _lps_case()
    cfg = _cfg(crop_nonzero=True, target_spacing=[1, 1, 1.5])
    prepared = preprocess(_raw(image, label, affine), cfg, INFO)
    again = prepare_image(image, affine, cfg, "MRI", file="new.nii.gz")
    np.testing.assert_array_equal(again.image, prepared.image)
    np.testing.assert_array_equal(again.affine, prepared.affine)
    assert again.geometry == prepared.geometry and not again.label.any()
    reused = prepare_image(image * 2, affine, cfg, "MRI", stats=prepared.normalisation)
    assert reused.normalisation is prepared.normalisation
    np.testing.assert_array_equal(restore_label(prepared.label, again.geometry), label)


def test_float32_round_trip_is_bit_identical():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    image[0, 0, 0, 0] = np.float32(1e-38)
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    prepared = preprocess(_raw(image, None, affine), _cfg(normalisation="none"), INFO)
    assert prepared.image.dtype == np.float32 and prepared.image.flags.c_contiguous
    assert prepared.image.tobytes() == image.tobytes()
    assert not np.shares_memory(prepared.image, image)
    assert prepared.label.dtype == np.uint8 and prepared.label.shape == (4, 5, 6)
    np.testing.assert_array_equal(prepared.affine, affine)
    geometry = prepared.geometry
    assert geometry["ornt"] == [[0, 1], [1, 1], [2, 1]] and geometry["crop_bbox"] is None
    assert geometry["source_shape"] == geometry["canonical_shape"] == geometry["resampled_shape"] == [4, 5, 6]
