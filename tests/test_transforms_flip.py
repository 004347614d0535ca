"""Left-right flip pairing and the asymmetric mask m = s - (s AND s') on hand-made masks."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared_transforms.flip import LRFlipPair, LRFlipPaird, asymmetric_mask, flip_lr, lr_axis, si_axis

LPS = np.diag([-0.9, -0.9, 3.0, 1.0])  # phantom convention: x runs right->left, y anterior->posterior
# array axis 0 = superior-inferior, axis 1 = left-right, axis 2 = anterior-posterior
PERMUTED = np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])


def _rot_z(deg):
    a = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def test_lr_axis_from_affine():
    assert lr_axis(np.eye(4)) == 0
    assert lr_axis(LPS) == 0
    assert lr_axis(PERMUTED) == 1
    assert si_axis(PERMUTED) == 0
    assert si_axis(LPS) == 2
    # oblique by 30 degrees about z: axis 0 still closest to left-right, works with torch affines too
    assert lr_axis(torch.as_tensor(_rot_z(30) @ LPS)) == 0
    # rotated by 70 degrees: axis 1 is now closest to left-right
    assert lr_axis(_rot_z(70) @ np.eye(4)) == 1


def test_lr_axis_bad_affine():
    with pytest.raises(ValueError, match="4x4"):
        lr_axis(np.eye(2))
    bad = np.eye(4)
    bad[:, 1] = 0
    with pytest.raises(ValueError, match="zero or non-finite"):
        lr_axis(bad)


def _hand_mask():
    # 6 x 4 x 2 grid; tumour voxels at x = 0, 1 and 4 (row y=1, z=0)
    s = np.zeros((6, 4, 2), np.uint8)
    s[[0, 1, 4], 1, 0] = 1
    return s


def test_asymmetric_mask_hand_made_numpy_and_torch():
    s = _hand_mask()
    s_f = flip_lr(s, LPS)
    # mirror about the central plane x -> 5 - x: voxels 5, 4, 1
    assert sorted(np.argwhere(s_f)[:, 0].tolist()) == [1, 4, 5]
    m = asymmetric_mask(s, s_f)
    expected = np.zeros_like(s)
    expected[0, 1, 0] = 1  # only x=0 has no tumour at its mirror (x=5)
    np.testing.assert_array_equal(m, expected)
    assert m.dtype == np.uint8
    # same result on torch, with a channel dimension, on the permuted grid
    s_perm = np.transpose(s, (2, 0, 1))[None]  # (1, Z=2, LR=6, AP=4) matches PERMUTED (axis 1 = LR)
    t = torch.as_tensor(s_perm).float()
    m_t = asymmetric_mask(t, flip_lr(t, PERMUTED))
    assert m_t.dtype == torch.float32
    np.testing.assert_array_equal(m_t.numpy(), np.transpose(expected, (2, 0, 1))[None].astype(np.float32))


def test_symmetric_mask_gives_empty_asymmetric_mask_and_flip_is_involution():
    s = np.zeros((6, 4, 3), np.uint8)
    s[1, :, 1] = s[4, :, 1] = 1  # symmetric pair
    s_f = flip_lr(s, LPS)
    np.testing.assert_array_equal(s_f, s)
    assert asymmetric_mask(s, s_f).sum() == 0
    img = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(flip_lr(flip_lr(img, LPS), LPS), img)
    # the flip acts on the left-right axis only: axis 1 of (C, X, Y, Z)
    np.testing.assert_array_equal(flip_lr(img, LPS), img[:, ::-1])


def test_flip_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        asymmetric_mask(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        flip_lr(np.zeros((4, 4)), LPS)
    with pytest.raises(ValueError, match="affine"):
        flip_lr(np.zeros((4, 4, 4)))


def test_lrflippair_metatensor_keeps_grid():
    img = MetaTensor(torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(1, 2, 6, 4), affine=torch.as_tensor(PERMUTED))
    out = LRFlipPair()(img)
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.affine.numpy(), PERMUTED)
    assert out.meta["lr_flipped"] is True and out.meta["lr_axis"] == 1
    np.testing.assert_array_equal(out.numpy(), img.numpy()[:, :, ::-1, :])
    # a plain array needs an affine
    with pytest.raises(ValueError, match="affine"):
        LRFlipPair()(np.zeros((1, 4, 4, 4)))
    np.testing.assert_array_equal(LRFlipPair(affine=LPS)(np.arange(8.0).reshape(1, 2, 2, 2)), np.arange(8.0).reshape(1, 2, 2, 2)[:, ::-1])


def test_lrflippaird_keys_and_asym_mask():
    s = _hand_mask()[None].astype(np.float32)
    image = MetaTensor(torch.as_tensor(s * 100.0 + 5.0), affine=torch.as_tensor(LPS))
    label = MetaTensor(torch.as_tensor(s), affine=torch.as_tensor(LPS))
    out = LRFlipPaird(keys=["image", "label"])({"image": image, "label": label})
    assert set(out) == {"image", "label", "image_flipped", "label_flipped", "asym_mask"}
    np.testing.assert_array_equal(out["image"].numpy(), image.numpy())  # input untouched
    np.testing.assert_array_equal(out["image_flipped"].numpy(), image.numpy()[:, ::-1])
    expected = np.zeros_like(s)
    expected[0, 0, 1, 0] = 1
    np.testing.assert_array_equal(out["asym_mask"].numpy(), expected)
    # configurable names; the label need not be among the mirrored keys; plain arrays with an affine key
    out2 = LRFlipPaird(keys="image", label_key="seg", flipped_suffix="_mirror", asym_key="m", affine_key="aff")(
        {"image": s.copy(), "seg": s.copy(), "aff": LPS}
    )
    assert set(out2) == {"image", "seg", "aff", "image_mirror", "m"}
    np.testing.assert_array_equal(out2["m"], expected)
    with pytest.raises(ValueError, match="flipped_suffix"):
        LRFlipPaird(keys="image", flipped_suffix="")


def test_lrflippaird_after_loading_nifti(tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from shared_transforms.io import save_nifti

    s = np.transpose(_hand_mask(), (2, 0, 1))  # (2, 6, 4) on the PERMUTED grid: left-right is array axis 1
    save_nifti(s, PERMUTED, tmp_path / "label.nii.gz")
    save_nifti(s.astype(np.int16) * 50, PERMUTED, tmp_path / "image.nii.gz")
    pipe = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), LRFlipPaird(["image", "label"])])
    out = pipe({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    assert out["image_flipped"].shape == (1, 2, 6, 4)
    np.testing.assert_array_equal(out["label_flipped"].numpy()[0], s[:, ::-1, :])
    expected = np.zeros_like(s)
    expected[0, 0, 1] = 1
    np.testing.assert_array_equal(out["asym_mask"].numpy()[0], expected)
