"""Symmetric (mid-sagittal) registration: geometry helpers, recovered pose, exact label inverse, failures.

All volumes are small phantoms (96 x 96 x 32, 2.4 x 2.4 x 3 mm); a registration takes well under a
second on one core once ITK is loaded (the first ITK import costs 10-20 s per process).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from npc_gtv.phantoms import make_phantom
from shared_transforms.flip import lr_axis
from shared_transforms.io import InputError
from shared_transforms.symmetry import (
    SymmetricAlign,
    SymmetricAlignd,
    SymmetryError,
    apply_symmetry,
    estimate_symmetry,
    grid_mirror_matrix,
    grid_plane,
    invert_symmetry,
    make_symmetric_atlas,
    plane_angle_error_deg,
    plane_distance_mm,
    plane_from_reflection,
    ras_to_lps_matrix,
)


def _meta(array, affine, name="case"):
    return MetaTensor(torch.as_tensor(np.asarray(array)[None]), affine=torch.as_tensor(affine), meta={"filename_or_obj": name})


def _errors(result, info):
    ang = plane_angle_error_deg(result.plane_normal, info["plane_normal"])
    dist = plane_distance_mm(result.plane_normal, result.plane_point, info["plane_normal"], info["plane_point"])
    return ang, dist


# ----------------------------------------------------------------------------- geometry


def test_grid_mirror_matrix_is_the_array_flip_for_a_dicom_like_affine():
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    shape = (5, 6, 7)
    S = grid_mirror_matrix(affine, shape)
    # voxel (1, 2, 3) must go to voxel (5 - 1 - 1, 2, 3)
    p = affine @ np.array([1, 2, 3, 1.0])
    q = np.linalg.inv(affine) @ (S @ p)
    np.testing.assert_allclose(q[:3], [3, 2, 3], atol=1e-12)
    np.testing.assert_allclose(S[:3, :3], np.diag([-1.0, 1.0, 1.0]), atol=1e-12)
    # the grid centre plane is x = 10 - 2 * 2 = 6 mm
    normal, centre = grid_plane(affine, shape)
    np.testing.assert_allclose(normal, [1, 0, 0])
    np.testing.assert_allclose(centre, [6.0, 20 - 7.5, -5 + 12.0])


def test_plane_from_reflection_recovers_a_known_plane():
    n = np.array([np.cos(np.radians(10)), np.sin(np.radians(10)), 0.0])
    d = 7.0
    P = np.eye(4)
    P[:3, :3] = np.eye(3) - 2 * np.outer(n, n)
    P[:3, 3] = 2 * d * n
    normal, point, residual = plane_from_reflection(P, point=[30.0, -4.0, 2.0])
    np.testing.assert_allclose(normal, n, atol=1e-12)
    assert abs(normal @ point - d) < 1e-9
    assert residual < 1e-6
    # a reflection followed by a 3 degree rotation about the normal is not a pure reflection
    Q = P.copy()
    Q[:3, :3] = P[:3, :3] @ _rot_about(n, 3.0)
    _, _, residual = plane_from_reflection(Q, point=[0, 0, 0])
    assert abs(residual - 3.0) < 1e-6


def _rot_about(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def test_ras_lps_conversion_of_a_translation():
    m = np.eye(4)
    m[:3, 3] = [1.0, 2.0, 3.0]  # RAS shift: +1 mm towards the patient's left is -1 mm in LPS x
    np.testing.assert_allclose(ras_to_lps_matrix(m)[:3, 3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(ras_to_lps_matrix(ras_to_lps_matrix(m)), m)


def test_plane_metrics_hand_computed():
    assert plane_angle_error_deg([1, 0, 0], [np.cos(np.radians(2)), np.sin(np.radians(2)), 0]) == pytest.approx(2.0)
    assert plane_angle_error_deg([1, 0, 0], [-1, 0, 0]) == pytest.approx(0.0)
    # parallel planes 1.5 mm apart
    assert plane_distance_mm([1, 0, 0], [1.5, 9, 9], [1, 0, 0], [0, 0, 0]) == pytest.approx(1.5)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "seed, pose, tumour",
    [
        (3, {"yaw_deg": 9.0, "roll_deg": -7.0, "pitch_deg": 3.0, "translation_mm": [15.0, -10.0, 5.0]}, True),
        (4, {"yaw_deg": -10.0, "roll_deg": 10.0, "translation_mm": [-20.0, 20.0, 0.0]}, False),
    ],
)
def test_atlas_free_recovers_the_posed_plane(seed, pose, tumour):
    ph = make_phantom(seed, size="small", tumour=tumour, pose=pose)
    result = estimate_symmetry(ph.image, ph.affine, case=f"phantom{seed}")
    ang, dist = _errors(result, ph.info)
    assert result.ok, result.problems
    assert ang < 1.0 and dist < 1.0, (ang, dist)
    rep = result.report()
    assert rep["plane_yaw_deg"] == pytest.approx(pose["yaw_deg"], abs=1.0)
    assert rep["plane_roll_deg"] == pytest.approx(pose["roll_deg"], abs=1.0)
    assert rep["asymmetry_after"] < 0.5 * rep["asymmetry_before"]
    assert rep["reflection_residual_deg"] < 1.0
    json.dumps(rep)  # serialisable


def test_atlas_free_on_mri_intensities():
    ph = make_phantom(8, size="small", modality="mri", pose={"yaw_deg": 7.0, "roll_deg": 5.0, "translation_mm": [10.0, 0, 0]})
    result = estimate_symmetry(ph.image["t2"], ph.affine, case="mri8")
    ang, dist = _errors(result, ph.info)
    assert result.ok, result.problems
    assert ang < 1.0 and dist < 1.0, (ang, dist)


def test_aligned_image_is_mirror_symmetric_on_the_grid():
    ph = make_phantom(6, size="small", tumour=False, pose={"yaw_deg": 8.0, "roll_deg": -6.0, "translation_mm": [12.0, 0, 0]})
    out = SymmetricAlign()(_meta(ph.image.astype(np.float32), ph.affine, "sym6"))
    a = np.clip(out[0].numpy(), -200, 300)
    b = np.clip(ph.image.astype(np.float32), -200, 300)
    before = np.abs(b - b[::-1]).mean()
    after = np.abs(a - a[::-1]).mean()
    assert after < 0.3 * before, (before, after)  # what remains is mostly the 12 HU noise (floor about 14)
    assert out.meta["symmetry_ok"] is True
    np.testing.assert_allclose(out.affine.numpy(), ph.affine)  # output_affine="grid" keeps the grid


def test_physical_output_affine_records_the_scanner_position():
    ph = make_phantom(6, size="small", tumour=False, pose={"yaw_deg": 8.0, "translation_mm": [12.0, 0, 0]})
    out = SymmetricAlign(output_affine="physical")(_meta(ph.image.astype(np.float32), ph.affine))
    T = out.meta["symmetry_transform"].numpy()
    np.testing.assert_allclose(out.affine.numpy(), T @ ph.affine, atol=1e-9)


# ----------------------------------------------------------------------------- inverse


def _exact_source(index_map, shape):
    """Continuous input index of every output voxel under the exact map, ``(N, 3)``."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return grid @ index_map[:3, :3].T + index_map[:3, 3]


def test_invertd_returns_labels_to_the_original_grid_exactly():
    ph = make_phantom(5, size="small", tumour=True)  # random pose
    assert max(abs(ph.info["yaw_deg"]), abs(ph.info["roll_deg"])) > 3.0  # a real rotation, not a voxel shift
    data = {"image": _meta(ph.image.astype(np.float32), ph.affine, "case5"), "label": _meta(ph.label, ph.affine, "case5")}
    pre = Compose([SymmetricAlignd(keys=["image", "label"])])
    out = pre(data)
    assert out["label"].dtype == torch.uint8
    assert int(out["label"].sum()) == int(ph.label.sum())  # a bijection: no tumour voxel doubled or dropped
    out["pred"] = out["label"].clone()  # a "prediction" that is exactly the forward-moved label
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert tuple(inv.shape) == (1,) + ph.label.shape
    np.testing.assert_array_equal(inv.affine.numpy(), ph.affine)
    np.testing.assert_array_equal(inv[0].numpy(), ph.label)  # voxel-exact, every voxel
    # the moved label is where the exact transform puts it: tumour centroid within a voxel
    estimate = estimate_symmetry(ph.image, ph.affine)  # deterministic: same transform as the pipeline
    np.testing.assert_allclose(estimate.transform, out["image"].meta["symmetry_transform"].numpy(), atol=1e-9)
    centroid_out = ph.affine @ np.r_[np.argwhere(out["label"][0].numpy()).mean(0), 1.0]
    centroid_in = ph.affine @ np.r_[np.argwhere(ph.label).mean(0), 1.0]
    assert np.linalg.norm(estimate.transform @ centroid_out - centroid_in) < 1.0  # mm; voxels are 2.4 x 2.4 x 3
    # the image goes back too (bilinear), to the same grid
    img_inv = Invertd(keys="image", transform=pre, orig_keys="image")(dict(out))["image"]
    np.testing.assert_array_equal(img_inv.affine.numpy(), ph.affine)
    assert tuple(img_inv.shape) == (1,) + ph.label.shape


def test_pixdim_resamples_once_onto_a_centred_grid_of_that_spacing():
    ph = make_phantom(5, size="small", tumour=True)  # 2.4 x 2.4 x 3 mm
    # the same volume stored with its axes permuted (array axes: SI, LR, AP): pixdim stays per world axis
    perm_img = np.transpose(ph.image, (2, 0, 1)).astype(np.float32)
    perm_aff = ph.affine[:, [2, 0, 1, 3]]
    for img, aff, expect_sp in ((ph.image.astype(np.float32), ph.affine, (1.5, 2.0, 4.0)), (perm_img, perm_aff, (4.0, 1.5, 2.0))):
        align = SymmetricAlignd(keys="image", pixdim=(1.5, 2.0, 4.0))
        out = Compose([align])({"image": _meta(img, aff, "case5")})["image"]
        out_aff = out.affine.numpy()
        np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), expect_sp, atol=1e-9)
        centre = lambda a, shape: a[:3, :3] @ ((np.asarray(shape) - 1) / 2) + a[:3, 3]  # noqa: E731
        np.testing.assert_allclose(centre(out_aff, out.shape[1:]), centre(aff, img.shape), atol=1e-6)
        expect_shape = np.floor(np.asarray(img.shape) * np.linalg.norm(aff[:3, :3], axis=0) / expect_sp + 0.5)
        np.testing.assert_array_equal(out.shape[1:], expect_shape)
        # the head is symmetric about the new grid's central sagittal plane (the remainder is mostly noise)
        ax = lr_axis(out_aff)
        a = np.clip(out[0].numpy(), -200, 300)
        before = np.clip(img, -200, 300)
        assert np.abs(a - np.flip(a, ax)).mean() < 0.5 * np.abs(before - np.flip(before, lr_axis(aff))).mean()
        back = Invertd(keys="image", transform=Compose([align]), orig_keys="image")({"image": out})["image"]
        assert tuple(back.shape[1:]) == img.shape
        np.testing.assert_allclose(back.affine.numpy(), aff, atol=1e-9)
    with pytest.raises(ValueError, match="pixdim"):
        SymmetricAlignd(keys="image", pixdim=(1.0, float("nan"), 3.0))


def _rotation_z(deg):
    a = np.radians(deg)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return rot


def test_nearest_inverse_is_exact_for_shifts_and_rotations():
    rng = np.random.default_rng(0)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    label = (rng.random((20, 18, 10)) > 0.7).astype(np.uint8)
    label[:3] = label[-3:] = 0  # keep the border empty so nothing leaves the grid
    shift = np.eye(4)
    shift[:3, 3] = [2.0 * 2, 0.0, -3.0]  # two voxels in x, one in z (world mm)
    fwd = apply_symmetry(label, shift, affine, label.shape, affine, "nearest")
    np.testing.assert_array_equal(fwd[2:, :, 1:], np.roll(label, (2, 1), (0, 2))[2:, :, 1:])  # a plain voxel shift
    back, unread = invert_symmetry(fwd, shift, label.shape, affine, affine, "nearest")
    inner = np.zeros_like(label, dtype=bool)
    inner[:, :, :-1] = True  # output voxel k reads input k - 1: the last input slice is read by nobody
    np.testing.assert_array_equal(back[inner], label[inner])
    assert unread == 2 * 18 * 10 + 20 * 18 - 2 * 18  # x: the 2 top rows; z: the last slice (overlap counted once)

    # rotations about z and about the anterior-posterior axis (mixing 2 mm columns with 3 mm slices)
    roll = np.eye(4)
    b = np.radians(6.0)
    roll[[0, 0, 2, 2], [0, 2, 0, 2]] = [np.cos(b), -np.sin(b), np.sin(b), np.cos(b)]
    blob = np.zeros((24, 24, 14), np.uint8)
    blob[8:16, 7:17, 4:10] = rng.integers(1, 4, size=(8, 10, 6))  # multi-label, away from the border
    for tmap in (_rotation_z(7.0), _rotation_z(-10.0), roll, _rotation_z(4.0) @ roll):
        fwd = apply_symmetry(blob, tmap, affine, blob.shape, affine, "nearest")
        assert np.array_equal(np.bincount(fwd.ravel(), minlength=4), np.bincount(blob.ravel(), minlength=4))
        back, unread = invert_symmetry(fwd, tmap, blob.shape, affine, affine, "nearest")
        np.testing.assert_array_equal(back, blob)
        # every output voxel inside the exact map's footprint reads near where the exact map says
        idx_map = np.linalg.inv(affine) @ tmap @ affine
        src = _exact_source(idx_map, blob.shape)
        moved = fwd.ravel() > 0
        assert moved.sum() == (blob > 0).sum()
        # each moved voxel's exact source lies within 1 voxel (in mm: 2 in-plane, 1.5 + rounding along z) of a tumour voxel
        nearest = np.floor(src[moved] + 0.5).astype(int)
        near = np.zeros(moved.sum(), bool)
        for d in np.ndindex(3, 3, 3):
            q = np.clip(nearest + np.asarray(d) - 1, 0, np.asarray(blob.shape) - 1)
            near |= blob[tuple(q.T)] > 0
        assert near.all()
        assert unread < 0.2 * blob.size  # only voxels that rotated out of the grid's corners


def test_nearest_inverse_for_a_scaling_map_is_exact_where_the_forward_map_read():
    """An affine that is not volume preserving has no lattice bijection: round-half-up, exact where read."""
    rng = np.random.default_rng(1)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    label = (rng.random((20, 18, 10)) > 0.7).astype(np.uint8)
    tmap = _rotation_z(5.0) @ np.diag([1.1, 0.95, 1.0, 1.0])
    fwd = apply_symmetry(label, tmap, affine, label.shape, affine, "nearest")
    back, unread = invert_symmetry(fwd, tmap, label.shape, affine, affine, "nearest")
    idx_map = np.linalg.inv(affine) @ tmap @ affine
    src = np.floor(_exact_source(idx_map, label.shape) + 0.5).astype(int)
    ok = np.all((src >= 0) & (src < np.asarray(label.shape)), axis=1)
    read = np.zeros(label.shape, dtype=bool)
    read[tuple(src[ok].T)] = True
    np.testing.assert_array_equal(fwd.ravel()[ok], label[tuple(src[ok].T)])  # plain nearest neighbour
    np.testing.assert_array_equal(back[read], label[read])
    assert unread == int((~read).sum()) > 0


# ----------------------------------------------------------------------------- atlas mode


@pytest.fixture(scope="module")
def atlas():
    ref = make_phantom(21, size="small", tumour=False, pose={"yaw_deg": 4.0, "roll_deg": -3.0, "translation_mm": [6, 0, 0]})
    arr, aff, result = make_symmetric_atlas(ref.image, ref.affine, case="atlas21")
    return arr, aff


def test_made_atlas_is_exactly_symmetric(atlas):
    arr, aff = atlas
    np.testing.assert_array_equal(arr, arr[::-1])  # axis 0 is left-right for diag(-sx, -sy, sz)


@pytest.mark.parametrize("atlas_transform", ["rigid", "affine"])
def test_atlas_mode_recovers_the_posed_plane(atlas, atlas_transform):
    ph = make_phantom(22, size="small", tumour=True, pose={"yaw_deg": -8.0, "roll_deg": 6.0, "translation_mm": [-15.0, 10.0, 5.0]})
    result = estimate_symmetry(ph.image, ph.affine, atlas=atlas, atlas_transform=atlas_transform, case="p22")
    ang, dist = _errors(result, ph.info)
    assert result.ok, result.problems
    assert result.mode == "atlas" and result.metric == "mattes"
    assert ang < 1.0 and dist < 1.0, (ang, dist)
    assert result.output_shape == atlas[0].shape


# ----------------------------------------------------------------------------- failure paths


def test_non_3d_input_names_the_case():
    with pytest.raises(InputError, match=r"flat\.nii\.gz.*expected a 3D volume"):
        estimate_symmetry(np.zeros((30, 30), np.float32), np.eye(4), case="flat.nii.gz")
    with pytest.raises(InputError, match=r"vol4d.*channel-first"):
        SymmetricAlign().estimate(MetaTensor(torch.zeros(30, 30, 30)), case="vol4d")


def test_not_enough_head_in_view_is_an_error():
    ph = make_phantom(9, size="small", tumour=False, pose="identity")
    img = ph.image.copy()
    img[:, :, 3:] = -1000  # only three slices of anatomy left
    with pytest.raises(InputError, match=r"case9.*not enough head in view"):
        estimate_symmetry(img, ph.affine, case="case9")


def test_failed_registration_is_flagged_and_never_silent():
    ph = make_phantom(10, size="small", tumour=False, pose={"yaw_deg": 10.0, "translation_mm": [5.0, 0, 0]})
    img = _meta(ph.image.astype(np.float32), ph.affine, "bad10.nii.gz")
    # a plane tilted by 10 degrees is rejected when at most 2 degrees are allowed
    with pytest.raises(SymmetryError, match=r"bad10\.nii\.gz.*tilted"):
        SymmetricAlign(max_angle_deg=2.0)(img)
    with pytest.warns(UserWarning, match=r"bad10\.nii\.gz.*tilted"):
        out = SymmetricAlign(max_angle_deg=2.0, on_failure="warn")(img)
    assert out.meta["symmetry_ok"] is False
    assert json.loads(out.meta["symmetry_report"])["ok"] is False
    with pytest.warns(UserWarning, match="identity"):
        out = SymmetricAlign(max_angle_deg=2.0, on_failure="identity")(img)
    np.testing.assert_allclose(out[0].numpy(), ph.image.astype(np.float32), atol=1e-6)  # unmoved


def test_iteration_limit_is_reported():
    ph = make_phantom(11, size="small", tumour=False, pose={"yaw_deg": 10.0, "roll_deg": 10.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = SymmetricAlign(iterations=(1, 1), on_failure="warn").estimate(
            _meta(ph.image.astype(np.float32), ph.affine), case="slow11")
    assert result.converged is False
    assert any("slow11" in str(w.message) and "iteration limit" in str(w.message) for w in caught)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_failure"):
        SymmetricAlign(on_failure="ignore")
    with pytest.raises(ValueError, match="output_affine"):
        SymmetricAlign(output_affine="ras")
    with pytest.raises(ValueError, match="mode"):
        SymmetricAlignd(keys=["image"], mode="cubic")
    with pytest.raises(InputError, match="does not exist"):
        SymmetricAlign(atlas="/nonexistent/atlas.nii.gz")


def test_batched_dataloader_then_decollated_invertd():
    """The bundle path: Dataset -> DataLoader (collate) -> decollate_batch -> Invertd back to each case's grid."""
    from monai.data import DataLoader, Dataset, decollate_batch

    cases = []
    for seed in (12, 13):
        ph = make_phantom(seed, size="small", tumour=True)
        cases.append({"image": _meta(ph.image.astype(np.float32), ph.affine, f"c{seed}"),
                      "label": _meta(ph.label, ph.affine, f"c{seed}"), "truth": ph.label})
    pre = Compose([SymmetricAlignd(keys=["image", "label"])])
    loader = DataLoader(Dataset([{k: c[k] for k in ("image", "label")} for c in cases], transform=pre), batch_size=2)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (2, 1, 96, 96, 32)
    post = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)
    for item, case in zip(decollate_batch(batch), cases):
        item["pred"] = item["label"].clone()
        back = post(item)["pred"]
        np.testing.assert_array_equal(back.affine.numpy(), case["image"].affine.numpy())
        assert int((back[0].numpy() != case["truth"]).sum()) <= max(3, int(0.03 * case["truth"].sum()))
        assert json.loads(item["image"].meta["symmetry_report"])["ok"] is True


def test_linear_resampling_matches_scipy_for_c_and_fortran_ordered_input():
    """ITK takes the numpy buffer without a transposed copy in both memory orders; the result is C-ordered."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    vol = ndimage.gaussian_filter(rng.random((30, 26, 12)), 2).astype(np.float32)
    affine = np.array([[-2.0, 0.1, 0, 10], [0.05, 2.2, 0, -5], [0, 0, 3, 7], [0, 0, 0, 1]])
    tmap = _rotation_z(6.0)
    tmap[:3, 3] = [1.5, -2.0, 0.7]
    idx = np.linalg.inv(affine) @ tmap @ affine
    ref = ndimage.affine_transform(vol, idx[:3, :3], offset=idx[:3, 3], output_shape=(28, 24, 11), order=1, cval=-1.0)
    inner = (slice(3, -3),) * 3  # ITK and scipy differ only within a voxel of the input's edge
    for arr in (vol, np.asfortranarray(vol), np.asfortranarray(vol.astype(np.float64))):
        out = apply_symmetry(arr, tmap, affine, (28, 24, 11), affine, "bilinear", cval=-1.0)
        assert out.flags.c_contiguous
        np.testing.assert_allclose(out[inner], ref[inner], atol=1e-5)
