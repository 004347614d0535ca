"""Post-processing on hand-made masks with exact expected outputs."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared_transforms.postprocess import (
    BinaryOpening,
    BinaryOpeningd,
    LargestComponent,
    LargestComponentd,
    SliceLargestComponent,
    SliceLargestComponentd,
    structuring_element,
)

LPS = np.diag([-1.0, -1.0, 3.0, 1.0])  # slice (superior-inferior) axis = array axis 2
PERMUTED = np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # SI = array axis 0


def _components():
    m = np.zeros((8, 8, 4), np.uint8)
    m[1:3, 1:3, 1:3] = 1  # A: 8 voxels
    m[3, 3, 3] = 1  # C: touches A only at a corner
    m[5:8, 6, 0] = 1  # B: 3 voxels
    return m


def test_largest_component_connectivity():
    m = _components()
    full = LargestComponent()(m)  # 26-connected: A + C
    expected = np.zeros_like(m)
    expected[1:3, 1:3, 1:3] = 1
    expected[3, 3, 3] = 1
    np.testing.assert_array_equal(full, expected)
    assert full.dtype == np.uint8
    faces = LargestComponent(connectivity=1)(m)  # 6-connected: C is separate, A alone
    expected[3, 3, 3] = 0
    np.testing.assert_array_equal(faces, expected)
    # channel-first MetaTensor keeps type, dtype and meta
    mt = MetaTensor(torch.as_tensor(m[None]).float(), affine=torch.as_tensor(LPS), meta={"filename_or_obj": "pred.nii.gz"})
    out = LargestComponentd("pred", connectivity=1)({"pred": mt})["pred"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.meta["filename_or_obj"] == "pred.nii.gz"
    np.testing.assert_array_equal(out.numpy()[0], expected)
    # empty mask stays empty
    assert LargestComponent()(np.zeros((1, 3, 3, 3))).sum() == 0
    with pytest.raises(ValueError, match="connectivity"):
        LargestComponent(connectivity=4)


def _slices():
    m = np.zeros((6, 6, 3), np.uint8)
    m[0, 0:3, 0] = 1  # slice 0: 3 voxels ...
    m[5, 4:6, 0] = 1  # ... and 2 voxels
    m[0, 0, 1] = 1  # slice 1: 1 voxel (joined in 3D to the 3 voxels below it) ...
    m[2:4, 2:5, 1] = 1  # ... and 6 voxels
    expected = np.zeros_like(m)
    expected[0, 0:3, 0] = 1
    expected[2:4, 2:5, 1] = 1
    return m, expected


def test_slice_largest_component_axis_from_affine():
    m, expected = _slices()
    out = SliceLargestComponent()(MetaTensor(torch.as_tensor(m[None]), affine=torch.as_tensor(LPS)))
    np.testing.assert_array_equal(out.numpy()[0], expected)
    # 3D largest component keeps only the 6-voxel blob (the other 3D components have 4 and 2): different
    only_blob = np.zeros_like(m)
    only_blob[2:4, 2:5, 1] = 1
    np.testing.assert_array_equal(LargestComponent()(m), only_blob)
    # same anatomy stored with the slice axis first: the affine says so, the result follows
    mp, ep = np.transpose(m, (2, 0, 1)), np.transpose(expected, (2, 0, 1))
    np.testing.assert_array_equal(SliceLargestComponent()(mp[None], affine=PERMUTED)[0], ep)
    d = SliceLargestComponentd("pred", slice_axis=0)({"pred": torch.as_tensor(mp)})
    np.testing.assert_array_equal(d["pred"].numpy(), ep)
    # 4- vs 8-connectivity in the slice: a diagonal pair
    diag = np.zeros((4, 4, 1), np.uint8)
    diag[0, 0, 0] = diag[1, 1, 0] = 1
    assert SliceLargestComponent(slice_axis=2)(diag).sum() == 2
    assert SliceLargestComponent(slice_axis=2, connectivity=1)(diag).sum() == 1
    with pytest.raises(ValueError, match="affine"):
        SliceLargestComponent()(m)
    with pytest.raises(ValueError, match="slice_axis"):
        SliceLargestComponent(slice_axis=3)


def test_structuring_elements():
    assert structuring_element("ball", 1).sum() == 7
    assert structuring_element("cross", 2).sum() == 25
    assert structuring_element("ball", 2).sum() == 33
    assert structuring_element("cube", 1).sum() == 27
    flat = structuring_element("cube", 1, in_plane_axis=2)
    assert flat.sum() == 9 and flat[:, :, 1].all() and not flat[:, :, 0].any()
    with pytest.raises(ValueError, match="shape"):
        structuring_element("disk")
    with pytest.raises(ValueError, match="radius"):
        structuring_element("ball", 0)


def test_opening_removes_spur_exactly():
    m = np.zeros((9, 9, 9), np.uint8)
    m[2:5, 2:5, 2:5] = 1  # 3x3x3 cube
    m[5:8, 3, 3] = 1  # one-voxel-thin spur
    cube = np.zeros_like(m)
    cube[2:5, 2:5, 2:5] = 1
    np.testing.assert_array_equal(BinaryOpening("cube", 1)(m), cube)
    # with the 6-connected element (ball of radius 1) the erosion keeps the cube centre (3, 3, 3) and the
    # spur root (4, 3, 3) (all 6 neighbours set); the dilation turns each into a 7-voxel cross
    cross = np.zeros_like(m)
    for centre in ((3, 3, 3), (4, 3, 3)):
        cross[centre] = 1
        for axis in range(3):
            for step in (-1, 1):
                idx = list(centre)
                idx[axis] += step
                cross[tuple(idx)] = 1
    assert cross.sum() == 12
    np.testing.assert_array_equal(BinaryOpening("ball", 1)(m), cross)
    # explicit element equals the named one
    np.testing.assert_array_equal(BinaryOpening(np.ones((3, 3, 3)))(m), cube)


def test_in_plane_opening_keeps_single_slice():
    m = np.zeros((7, 7, 5), np.uint8)
    m[2:5, 2:5, 2] = 1  # a 3x3 square on one 3 mm slice
    mt = MetaTensor(torch.as_tensor(m[None]), affine=torch.as_tensor(LPS))
    assert BinaryOpening("cube", 1)(mt).sum() == 0  # a 3D opening removes it
    kept = BinaryOpeningd("pred", structure="cube", radius=1, in_plane=True)({"pred": mt})["pred"]
    np.testing.assert_array_equal(kept.numpy()[0], m)
    # slice axis from a permuted affine
    mp = np.transpose(m, (2, 0, 1))[None]
    np.testing.assert_array_equal(BinaryOpening("cube", 1, in_plane=True)(mp, affine=PERMUTED), mp)
    with pytest.raises(ValueError, match="in_plane"):
        BinaryOpening(in_plane=True)(m)
    with pytest.raises(ValueError, match="iterations"):
        BinaryOpening(iterations=0)
