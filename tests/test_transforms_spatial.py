"""Resampling to a spacing and back, body crop, and exact inverse round trips (shape, affine, voxels)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged

from shared_transforms.io import InputError, save_nifti
from shared_transforms.postprocess import largest_component
from shared_transforms.spatial import (
    BodyCrop,
    BodyCropd,
    ResampleToSpacing,
    ResampleToSpacingd,
    body_mask,
    world_to_array_pixdim,
)

# LPS-like phantom affine: 2 x 2 mm in-plane, 3 mm slices, non-zero origin
AFF = np.diag([-2.0, -2.0, 3.0, 1.0])
AFF[:3, 3] = [60.0, 50.0, -20.0]


def _mt(arr, affine=AFF, name="case.nii.gz"):
    return MetaTensor(torch.as_tensor(np.asarray(arr, np.float32)[None]), affine=torch.as_tensor(affine), meta={"filename_or_obj": name})


def _head(shape=(24, 20, 8)):
    """Air with a body block at [4:18, 3:15, 1:7], a couch slab joined by a 1-voxel bridge, a tumour."""
    img = np.full(shape, -1000.0, np.float32)
    img[4:18, 3:15, 1:7] = 40.0
    img[4:18, 17:19, :] = 200.0  # couch below the head (posterior, along y)
    img[10, 15:17, 3] = 40.0  # thin bridge body -> couch
    lab = np.zeros(shape, np.uint8)
    lab[8:11, 6:9, 3:5] = 1
    return img, lab


def test_world_to_array_pixdim():
    assert world_to_array_pixdim((1, 1, 3), AFF) == (1.0, 1.0, 3.0)
    permuted = np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # SI is array axis 0
    assert world_to_array_pixdim((0.8, 0.9, 3), permuted) == (3.0, 0.8, 0.9)
    with pytest.raises(ValueError, match="3 values"):
        world_to_array_pixdim((1, 3), AFF)


def test_resample_to_spacing_world_axes():
    permuted = np.array([[0, 2.0, 0, 0], [0, 0, -2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # (SI, LR, AP) array order
    img = MetaTensor(torch.zeros(1, 8, 10, 12), affine=torch.as_tensor(permuted))
    out = ResampleToSpacing()(img)  # 1 x 1 mm in-plane, 3 mm along the SI axis = array axis 0
    # MONAI keeps the extent between the first and last voxel centres: 9 x 2 mm -> 19 voxels of 1 mm
    assert tuple(out.shape) == (1, 8, 19, 23)
    np.testing.assert_allclose(out.pixdim.numpy(), [3.0, 1.0, 1.0])
    arr = ResampleToSpacing(axis_order="array")(img)  # MONAI semantics: (1, 1, 3) per array axis
    assert tuple(arr.shape) == (1, 22, 19, 8)
    # dictionary version with one key: the default mode is linear for that (image) key
    one = ResampleToSpacingd("image")({"image": MetaTensor(torch.arange(3.0).reshape(1, 3, 1, 1), affine=torch.diag(torch.tensor([2.0, 1, 3, 1])))})
    np.testing.assert_allclose(one["image"].numpy().ravel(), [0.0, 0.5, 1.0, 1.5, 2.0], atol=1e-6)
    with pytest.raises(ValueError, match="MetaTensor"):
        ResampleToSpacing()(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="axis_order"):
        ResampleToSpacing(axis_order="ras")
    with pytest.raises(ValueError, match="positive"):
        ResampleToSpacing(pixdim=(1, 0, 3))


def test_resample_round_trip_exact_grid_and_label():
    img, lab = _head()
    data = {"image": _mt(img), "label": _mt(lab)}
    pre = ResampleToSpacingd(["image", "label"])
    out = pre(data)
    # 2 mm -> 1 mm in-plane: 2 n - 1 voxels (same first and last voxel centre), 3 mm slices unchanged
    assert tuple(out["image"].shape) == (1, 47, 39, 8) and tuple(out["label"].shape) == (1, 47, 39, 8)
    np.testing.assert_allclose(out["label"].pixdim.numpy(), [1.0, 1.0, 3.0])
    np.testing.assert_allclose(out["label"].affine.numpy()[:3, 3], AFF[:3, 3])
    assert set(out["label"].unique().tolist()) == {0.0, 1.0}  # nearest keeps a binary label
    # every second new voxel sits on an old voxel centre: the values there are the old ones
    np.testing.assert_array_equal(out["label"].numpy()[0, ::2, ::2], lab)
    np.testing.assert_allclose(out["image"].numpy()[0, ::2, ::2], img, atol=1e-3)
    # a half-way voxel between 40 HU and -1000 HU is interpolated linearly
    assert out["image"].numpy()[0, 7, 10, 3] == pytest.approx(-480.0, abs=1e-3)
    out["pred"] = out["label"].clone()
    inv = Invertd(["pred", "image"], pre, orig_keys=["label", "image"], nearest_interp=[True, False])(out)
    for key in ("pred", "image"):
        assert tuple(inv[key].shape) == (1, 24, 20, 8)
        np.testing.assert_allclose(inv[key].affine.numpy(), AFF, atol=1e-6)
    np.testing.assert_array_equal(inv["pred"].numpy()[0], lab)
    # image linear up then back: grid points of the original are sampled exactly
    np.testing.assert_allclose(inv["image"].numpy()[0], img, atol=1e-3)


def test_largest_component_and_body_mask():
    m = np.zeros((6, 6, 1), bool)
    m[0:2, 0:2] = True  # 4 voxels
    m[3:6, 3:6] = True  # 9 voxels
    m[0, 5] = True
    np.testing.assert_array_equal(largest_component(m, connectivity=1), np.pad(np.ones((3, 3, 1), bool), ((3, 0), (3, 0), (0, 0))))
    assert not largest_component(np.zeros((3, 3, 3))).any()
    with pytest.raises(ValueError, match="connectivity"):
        largest_component(m, connectivity=4)
    img, _ = _head()
    body = body_mask(img)
    expected = np.zeros(img.shape, bool)
    expected[4:18, 3:15, 1:7] = True  # the box is restored exactly
    expected[10, 15, 3] = True  # the bridge is re-entered by one voxel (core reached y=13), couch not reached
    np.testing.assert_array_equal(body, expected)
    no_restore = body_mask(img, restore=False)
    # eroded by 2 on each side, plus the bridge root voxel (10, 13, 3) that survives the erosion
    assert no_restore.sum() == (14 - 4) * (12 - 4) * (6 - 4) + 1 and no_restore[10, 13, 3]
    # without erosion the bridge joins body and couch into one component
    assert body_mask(img, erosion_iterations=0)[4:18, 17:19].all()


def test_body_crop_box_and_inverse_array():
    img, lab = _head()
    cropper = BodyCrop(margin=1)
    out = cropper(_mt(img))
    # body x 4..17, y 3..15 (one bridge voxel), z 1..6, + 1 voxel margin
    assert tuple(out.shape) == (1, 16, 15, 8)
    expected_aff = AFF.copy()
    expected_aff[:3, 3] = AFF[:3, :3] @ np.array([3, 2, 0]) + AFF[:3, 3]  # origin moves to voxel (3, 2, 0)
    np.testing.assert_allclose(out.affine.numpy(), expected_aff)
    np.testing.assert_array_equal(out.numpy()[0], img[3:19, 2:17, 0:8])
    back = cropper.inverse(out)
    assert tuple(back.shape) == (1, 24, 20, 8)
    np.testing.assert_allclose(back.affine.numpy(), AFF)
    inside = np.zeros(img.shape, bool)
    inside[3:19, 2:17, 0:8] = True
    np.testing.assert_array_equal(back.numpy()[0][inside], img[inside])
    assert np.all(back.numpy()[0][~inside] == 0)  # padded with zeros outside the box


def test_body_crop_dict_resample_pipeline_inverts_to_exact_grid(tmp_path):
    img, lab = _head()
    save_nifti(img.astype(np.int16), AFF, tmp_path / "img.nii.gz")
    save_nifti(lab, AFF, tmp_path / "lab.nii.gz")
    keys = ["image", "label"]
    pre = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), ResampleToSpacingd(keys), BodyCropd(keys, margin=2)])
    out = pre({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    assert out["image"].shape == out["label"].shape
    resampled = ResampleToSpacingd(keys)(EnsureChannelFirstd(keys)(LoadImaged(keys)({k: out[k].meta["filename_or_obj"] for k in keys})))
    start, end = np.asarray(out["body_box_start"]), np.asarray(out["body_box_end"])
    np.testing.assert_array_equal(end - start, np.asarray(out["image"].shape[1:]))
    assert out["image"].shape[1] < 47 and out["image"].shape[2] < 39  # cropped after resampling
    sl = tuple(slice(int(a), int(b)) for a, b in zip(start, end))
    np.testing.assert_array_equal(out["image"].numpy()[0], resampled["image"].numpy()[0][sl])
    assert int(out["label"].sum()) == int(resampled["label"].sum()) > 0  # the tumour is inside the box
    out["pred"] = out["label"].clone()
    inv = Invertd("pred", pre, orig_keys="label", nearest_interp=True)(out)
    assert tuple(inv["pred"].shape) == (1, 24, 20, 8)
    np.testing.assert_allclose(inv["pred"].affine.numpy(), AFF, atol=1e-6)
    np.testing.assert_array_equal(inv["pred"].numpy()[0], lab)


def test_body_crop_in_plane_keeps_thin_volumes():
    img = np.full((12, 12, 3), -1000.0, np.float32)
    img[2:10, 3:9, :] = 40.0  # a body in only 3 slices: a 3D erosion by 2 removes it
    assert not body_mask(img).any()
    np.testing.assert_array_equal(body_mask(img, slice_axis=2), img > 0)
    out = BodyCropd("image", in_plane=True)({"image": _mt(img)})
    assert tuple(out["image"].shape) == (1, 8, 6, 3)
    np.testing.assert_array_equal(out["body_box_start"], [2, 3, 0])
    with pytest.raises(ValueError, match="MetaTensor"):
        BodyCrop(in_plane=True)(torch.as_tensor(img[None]))


def test_body_crop_empty_image_error_names_file():
    air = np.full((8, 8, 4), -1000.0)
    with pytest.raises(InputError, match=r"air\.nii\.gz: no body found"):
        BodyCrop()(_mt(air, name="air.nii.gz"))
    kept = BodyCrop(allow_empty=True)(_mt(air))
    assert tuple(kept.shape) == (1, 8, 8, 4)
    with pytest.raises(ValueError, match="channel-first"):
        BodyCrop()(torch.zeros(8, 8, 4))
    with pytest.raises(ValueError, match="erosion_iterations"):
        BodyCrop(erosion_iterations=-1)
