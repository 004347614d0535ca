"""Per-case metrics against hand-computed values, MONAI's own metric functions and empty-mask rules."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from npc_gtv.evaluation.metrics import (
    EMPTY_BOTH,
    EMPTY_PRED,
    EMPTY_TRUTH,
    METRICS,
    compute_case_metrics,
    penalty_distance,
    spacing_from_affine,
    surface_distances,
    union_crop,
    weighted_percentile,
)


def _mask(shape=(16, 16, 24)):
    return np.zeros(shape, dtype=bool)


def test_line_segments_hand_computed():
    """Truth: 21 voxels along z; prediction: its first 11. Every value follows by hand.

    All voxels of a one-voxel-thin line are surface voxels. Pred->truth distances are all 0;
    truth->pred distances are 0 (11 times) and 1..10 slices = 2..20 mm (sz = 2 mm).
    """
    t, p = _mask(), _mask()
    t[5, 6, 2:23] = True
    p[5, 6, 2:13] = True
    m = compute_case_metrics(p, t, (0.5, 0.7, 2.0), slice_axis=2)
    assert m["empty_case"] == ""
    assert m["dsc"] == pytest.approx(2 * 11 / 32)
    assert m["iou"] == pytest.approx(11 / 21)
    assert m["sensitivity"] == pytest.approx(11 / 21)
    assert m["ppv"] == pytest.approx(1.0)
    assert m["rve"] == pytest.approx(10 / 21)
    assert m["hd"] == pytest.approx(20.0)
    # directed 95th percentiles: pred->truth 0; truth->pred: sorted d[0.95 * 20] = d[19] = 9 slices = 18 mm
    assert m["hd95"] == pytest.approx(18.0)
    # pooled mean over 11 + 21 distances (not the mean of the two directed means, which is 2.619)
    assert m["assd"] == pytest.approx(2 * 55 / 32)
    assert m["slice_recall"] == pytest.approx(11 / 21)
    assert m["slice_precision"] == pytest.approx(1.0)
    assert m["volume_truth_ml"] == pytest.approx(21 * 0.5 * 0.7 * 2.0 / 1000)
    assert m["volume_pred_ml"] == pytest.approx(11 * 0.5 * 0.7 * 2.0 / 1000)
    # surface-voxel NSD (no sub-voxels): 11 + 11 of 32 distances are within 1 mm
    m_vox = compute_case_metrics(p, t, (0.5, 0.7, 2.0), nsd_subvoxels=False)
    assert m_vox["nsd"] == pytest.approx(22 / 32)


def test_two_voxels_hd95_interpolates():
    t, p = _mask(), _mask()
    t[3, 3, 3:5] = True
    p[3, 3, 3] = True
    m = compute_case_metrics(p, t, (1.0, 1.0, 2.0))
    assert m["hd"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(1.9)  # linear interpolation of [0, 2] at 95 %
    assert m["assd"] == pytest.approx(2.0 / 3.0)
    assert m["dsc"] == pytest.approx(2 / 3)
    assert m["slice_recall"] == pytest.approx(0.5)


def test_disjoint_voxels_anisotropic_distance():
    t, p = _mask(), _mask()
    t[5, 5, 5] = True
    p[5, 7, 8] = True  # 2 voxels * 0.8 mm in y, 3 slices * 2.5 mm in z
    m = compute_case_metrics(p, t, (0.6, 0.8, 2.5))
    d = math.hypot(1.6, 7.5)
    for k in ("hd", "hd95", "assd"):
        assert m[k] == pytest.approx(d, rel=1e-6)
    for k in ("dsc", "iou", "sensitivity", "ppv", "nsd", "slice_recall", "slice_precision"):
        assert m[k] == 0.0


def test_shifted_cubes_overlap_values():
    t, p = _mask((40, 40, 20)), _mask((40, 40, 20))
    t[10:20, 10:20, 5:10] = True
    p[12:22, 10:20, 5:10] = True
    m = compute_case_metrics(p, t, (1.0, 1.5, 2.0))
    assert m["dsc"] == pytest.approx(0.8)
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["sensitivity"] == pytest.approx(0.8)
    assert m["ppv"] == pytest.approx(0.8)
    assert m["rve"] == 0.0
    assert m["hd"] == pytest.approx(2.0)  # the shift: 2 voxels of 1 mm
    assert m["slice_recall"] == 1.0 and m["slice_precision"] == 1.0


def test_identical_masks_are_perfect():
    t = _mask()
    t[4:9, 3:10, 6:15] = True
    m = compute_case_metrics(t.copy(), t, (1.0, 1.0, 3.0))
    for k in ("dsc", "iou", "sensitivity", "ppv", "nsd", "slice_recall", "slice_precision"):
        assert m[k] == pytest.approx(1.0)
    for k in ("hd", "hd95", "assd", "rve"):
        assert m[k] == 0.0


def test_concentric_spheres_known_distance():
    """Spheres of radius 9 and 12 mm: every surface distance is about 3 mm."""
    n = 40
    g = np.arange(n) - n / 2 + 0.5
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    t, p = r <= 9.0, r <= 12.0
    m = compute_case_metrics(p, t, (1.0, 1.0, 1.0))
    assert m["assd"] == pytest.approx(3.0, abs=0.35)
    assert m["hd"] == pytest.approx(3.0, abs=1.0)
    assert m["hd95"] == pytest.approx(3.0, abs=1.0)
    assert m["dsc"] == pytest.approx(2 * 9**3 / (9**3 + 12**3), abs=0.02)
    assert m["nsd"] < 0.2  # nearly all surface further than the 1 mm tolerance


def test_empty_cases_explicit():
    shape, sp = (16, 16, 24), (1.0, 1.5, 2.0)
    diag = math.sqrt(16**2 + 24**2 + 48**2)
    t, e = _mask(shape), _mask(shape)
    t[3:6, 3:6, 3:6] = True

    both = compute_case_metrics(e, e.copy(), sp)
    assert both["empty_case"] == EMPTY_BOTH
    assert both["dsc"] == 1.0 and both["nsd"] == 1.0 and both["hd95"] == 0.0 and both["rve"] == 0.0

    pred_empty = compute_case_metrics(e, t, sp)
    assert pred_empty["empty_case"] == EMPTY_PRED
    assert pred_empty["dsc"] == 0.0 and pred_empty["sensitivity"] == 0.0 and pred_empty["ppv"] == 0.0
    assert pred_empty["hd"] == pytest.approx(diag) and pred_empty["hd95"] == pytest.approx(diag)
    assert pred_empty["assd"] == pytest.approx(diag)
    assert pred_empty["rve"] == 1.0
    assert pred_empty["volume_truth_ml"] == pytest.approx(27 * 3.0 / 1000)

    truth_empty = compute_case_metrics(t, e, sp, penalty=50.0)
    assert truth_empty["empty_case"] == EMPTY_TRUTH
    assert truth_empty["dsc"] == 0.0 and truth_empty["hd"] == 50.0 and truth_empty["assd"] == 50.0
    assert math.isnan(truth_empty["rve"])
    assert set(METRICS) <= set(truth_empty)


def test_crop_gives_identical_values_even_at_the_image_border():
    rng = np.random.default_rng(0)
    t = rng.random((20, 18, 12)) > 0.55
    p = rng.random((20, 18, 12)) > 0.6
    t[0, :, :] = True  # touches the image border
    a = compute_case_metrics(p, t, (0.9, 1.1, 2.5), crop=True)
    b = compute_case_metrics(p, t, (0.9, 1.1, 2.5), crop=False)
    for k in METRICS:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), k


def test_union_crop_box_and_margin():
    t, p = _mask((10, 10, 10)), _mask((10, 10, 10))
    t[2:4, 5, 5] = True
    p[9, 6, 5] = True
    pc, tc, box = union_crop(p, t, margin=1)
    assert box == (slice(2, 10), slice(5, 7), slice(5, 6))
    assert pc.shape == tc.shape == (10, 4, 3)
    assert pc.sum() == 1 and tc.sum() == 2
    e = _mask((4, 4, 4))
    pe, te, box_e = union_crop(e, e)
    assert pe.size == 0 and box_e == (slice(0, 0),) * 3


def _blobs(seed, shape=(30, 28, 16)):
    from scipy.ndimage import binary_opening, gaussian_filter

    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random(shape), 2.0)
    b = gaussian_filter(rng.random(shape), 2.0)
    return binary_opening(a > np.percentile(a, 80)), binary_opening(b > np.percentile(b, 82))


@pytest.mark.parametrize("seed", [1, 2])
def test_agrees_with_monai_where_definitions_agree(seed):
    from monai.metrics import (
        compute_average_surface_distance,
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
        get_confusion_matrix,
    )

    p, t = _blobs(seed)
    sp = (0.8, 1.2, 2.5)
    ours = compute_case_metrics(p, t, sp)
    P = torch.as_tensor(p)[None, None].float()
    T = torch.as_tensor(t)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {
            "dsc": compute_dice(P, T, include_background=True),
            "iou": compute_iou(P, T, include_background=True),
            "hd": compute_hausdorff_distance(P, T, spacing=sp),
            "hd95": compute_hausdorff_distance(P, T, spacing=sp, percentile=95),
            "assd": compute_average_surface_distance(P, T, spacing=sp, symmetric=True),
            "nsd": compute_surface_dice(P, T, [1.0], spacing=sp, use_subvoxels=True),
        }
        cm = get_confusion_matrix(P, T, include_background=True)
        ref["sensitivity"] = compute_confusion_matrix_metric("sensitivity", cm)
        ref["ppv"] = compute_confusion_matrix_metric("precision", cm)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(float(v.flatten()[0]), rel=1e-5, abs=1e-5), k
    assert 0.0 < ours["nsd"] < 1.0 and ours["hd"] > ours["hd95"] > 0


def test_penalty_and_argument_validation():
    assert penalty_distance((10, 20, 5), (1.0, 0.5, 2.0)) == pytest.approx(math.sqrt(100 + 100 + 100))
    assert penalty_distance((10, 20, 5), (1.0, 0.5, 2.0), 12) == 12.0
    with pytest.raises(ValueError, match="penalty"):
        penalty_distance((4, 4, 4), (1, 1, 1), "max")
    with pytest.raises(ValueError, match="penalty"):
        penalty_distance((4, 4, 4), (1, 1, 1), -1)
    t = _mask((8, 8, 8))
    with pytest.raises(ValueError, match="binary"):
        compute_case_metrics(t.astype(np.uint8) + 2, t, (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(_mask((8, 8, 7)), t, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        compute_case_metrics(t, t, (1, 0, 1))
    with pytest.raises(ValueError, match="slice_axis"):
        compute_case_metrics(t, t, (1, 1, 1), slice_axis=3)


def test_spacing_from_affine_lps():
    aff = np.diag([-0.9, -0.9, 3.0, 1.0])
    aff[:3, 3] = [100, 120, -40]
    assert spacing_from_affine(aff) == pytest.approx((0.9, 0.9, 3.0))
    rot = np.array([[0, 0, 2.0, 0], [1.5, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    assert spacing_from_affine(rot) == pytest.approx((1.5, 1.0, 2.0))


def test_subvoxel_surface_equals_monai_conv():
    """The numpy neighbourhood codes give exactly MONAI's get_mask_edges(spacing=...) edges and areas."""
    from monai.metrics.utils import get_mask_edges

    from npc_gtv.evaluation.metrics import subvoxel_surface

    rng = np.random.default_rng(3)
    a = np.pad(rng.random((17, 13, 9)) > 0.5, 1)
    b = np.pad(rng.random((17, 13, 9)) > 0.3, 1)
    sp = (0.7, 1.1, 2.5)
    ea, eb, aa, ab = get_mask_edges(torch.as_tensor(a), torch.as_tensor(b), crop=False, spacing=sp)
    mine_a, area_a = subvoxel_surface(a, sp)
    mine_b, area_b = subvoxel_surface(b, sp)
    assert mine_a.shape == (18, 14, 10)
    assert np.array_equal(mine_a, ea.numpy()) and np.array_equal(mine_b, eb.numpy())
    assert np.array_equal(area_a, aa.numpy()) and np.array_equal(area_b, ab.numpy())
    assert area_a[mine_a].sum() > 0 and np.all(area_a[~mine_a] == 0)


# ------------------------------------------------------------------------------- HD95 definitions
def _line_case(far_z=(21, 23)):
    """A 1-voxel-thick line (z = 2..11) as truth; the prediction adds isolated voxels further along z (1 mm grid).

    Every voxel of such thin masks is a surface voxel, so the distances are easy to count by hand:
    truth -> prediction: ten 0 mm; prediction -> truth: ten 0 mm plus (z - 11) mm per far voxel.
    """
    t = np.zeros((3, 3, 30), bool)
    t[1, 1, 2:12] = True
    p = t.copy()
    for z in far_z:
        p[1, 1, z] = True
    return p, t


def test_hd95_definitions_by_hand():
    """The three published HD95 definitions on a case with a far false positive, computed by hand."""
    p, t = _line_case()
    spacing = (1.0, 1.0, 1.0)
    # max_directed: p95 of [0 x 10, 10, 12] (numpy: rank 0.95 * 11 = 10.45 -> 10 + 0.45 * 2); p95 of [0 x 10] = 0
    m = compute_case_metrics(p, t, spacing, hd95="max_directed")
    assert m["hd95"] == pytest.approx(10.9)
    # medpy: both directions pooled, 22 values [0 x 20, 10, 12]: rank 0.95 * 21 = 19.95 -> 0 + 0.95 * 10
    assert compute_case_metrics(p, t, spacing, hd95="medpy")["hd95"] == pytest.approx(9.5)
    # deepmind: sub-voxel surface elements on the 2x2x2 block lattice. The line's blocks: 8 end blocks holding one
    # voxel (area sqrt(3)/8 each: a corner triangle) and 36 blocks holding two voxels along z (sqrt(2)/2: a
    # quad), all at 0 mm; each far voxel adds 8 one-voxel blocks, 4 at (z - 12) mm and 4 at (z - 11) mm, i.e. at
    # 9, 10 (z = 21) and 11, 12 mm (z = 23). Cumulative area fraction: 0 mm 0.887, 9 mm 0.915, 10 mm 0.943,
    # 11 mm 0.972 >= 0.95 -> 11 mm.
    corner, edge = math.sqrt(3) / 8, math.sqrt(2) / 2
    zero = 8 * corner + 36 * edge
    total = zero + 16 * corner
    assert (zero + 8 * corner) / total < 0.95 <= (zero + 12 * corner) / total
    sv = surface_distances(*union_crop(p, t)[:2], spacing, subvoxels=True)
    np.testing.assert_allclose(np.sort(sv.pred_areas)[-36:], edge, rtol=1e-5)
    assert sv.pred_areas.sum() == pytest.approx(total, rel=1e-5)
    assert compute_case_metrics(p, t, spacing, hd95="deepmind")["hd95"] == pytest.approx(11.0)
    # the default is the toolkit's definition; a missed component (swap the roles) gives the same by symmetry
    assert compute_case_metrics(p, t, spacing)["hd95"] == pytest.approx(10.9)
    for definition, value in (("max_directed", 10.9), ("medpy", 9.5), ("deepmind", 11.0)):
        assert compute_case_metrics(t, p, spacing, hd95=definition)["hd95"] == pytest.approx(value)
    with pytest.raises(ValueError, match="hd95 must be one of"):
        compute_case_metrics(p, t, spacing, hd95="robust")


def test_weighted_percentile_by_hand():
    # sorted distances 0, 1, 5, 9 with areas 0.5, 0.3, 0.15, 0.05: cumulative 0.5, 0.8, 0.95, 1.0
    assert weighted_percentile([9.0, 0.0, 5.0, 1.0], [0.05, 0.5, 0.15, 0.3], 95) == 5.0
    assert weighted_percentile([9.0, 0.0, 5.0, 1.0], [0.05, 0.5, 0.15, 0.3], 96) == 9.0
    assert weighted_percentile([9.0, 0.0, 5.0, 1.0], [0.05, 0.5, 0.15, 0.3], 50) == 0.0
    assert weighted_percentile([], [], 95) == math.inf
