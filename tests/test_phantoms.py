"""Phantom generator: determinism, HU ranges, geometry of the pose, symmetry, data-set layout."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from npc_gtv.phantoms import TISSUES, ensure_dataset, generate_dataset, make_phantom


def _reflect_index(ph, plane_normal, plane_point):
    """Voxel index of every voxel's mirror image across a world plane (nearest voxel)."""
    shape = ph.label.shape
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    p = ijk @ ph.affine[:3, :3].T + ph.affine[:3, 3]
    n = np.asarray(plane_normal)
    q = p - 2.0 * ((p - np.asarray(plane_point)) @ n)[:, None] * n[None]
    idx = np.rint((q - ph.affine[:3, 3]) @ np.linalg.inv(ph.affine[:3, :3]).T).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
    return idx, ok


def test_deterministic_for_a_seed():
    a, b = make_phantom(5), make_phantom(5)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.info == b.info
    assert not np.array_equal(a.image, make_phantom(6).image)


def test_ct_intensities_are_planning_ct_like():
    ph = make_phantom(1, pose="identity", noise_hu=0.0)
    t, img = ph.tissue, ph.image.astype(float)
    assert ph.image.dtype == np.int16
    interior = lambda name: np.median(img[t == TISSUES[name]])  # noqa: E731
    assert interior("air") <= -950
    assert -130 <= interior("fat") <= -70
    assert 30 <= interior("muscle") <= 60
    assert 400 <= interior("cortical") <= 1500
    assert img.max() <= 1500 and img.min() >= -1024


def test_full_size_grid_and_noise():
    ph = make_phantom(2, size="full", tumour=False)
    x, y, z = ph.label.shape
    assert (x, y) == (512, 512) and 100 <= z <= 150
    sx, sy, sz = ph.spacing
    assert 0.8 <= sx <= 1.1 and sx == sy and sz == 3.0
    np.testing.assert_allclose(np.abs(np.diag(ph.affine)[:3]), ph.spacing)
    assert ph.affine[0, 0] < 0 and ph.affine[1, 1] < 0 and ph.affine[2, 2] > 0  # LPS-like voxel axes
    air = ph.image[:20, :20, :].astype(float)
    assert 8 <= air.std() <= 16  # realistic noise


def test_healthy_head_is_mirror_symmetric_without_pose():
    ph = make_phantom(3, tumour=False, pose="identity", noise_hu=0.0)
    # identity pose: the mid-sagittal plane is the grid's central plane along the LR voxel axis (axis 0)
    same = np.mean(ph.tissue == ph.tissue[::-1])
    assert same > 0.9999


@pytest.mark.parametrize("seed", [10, 11])
def test_pose_ground_truth_plane_is_the_symmetry_plane(seed):
    ph = make_phantom(seed, tumour=False, noise_hu=0.0)
    info = ph.info
    assert abs(info["yaw_deg"]) <= 10 and abs(info["roll_deg"]) <= 10
    assert all(abs(v) <= 20 for v in info["translation_mm"])
    t = ph.tissue.reshape(-1)

    def agreement(normal, point):
        idx, ok = _reflect_index(ph, normal, point)
        head = ok & (t != TISSUES["air"]) & (t != TISSUES["couch"])
        return np.mean(ph.tissue[idx[head, 0], idx[head, 1], idx[head, 2]] == t[head])

    n, q = np.array(info["plane_normal"]), np.array(info["plane_point"])
    a = np.radians(3.0)
    turned = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ n
    grid_centre = ph.affine[:3, :3] @ ((np.array(ph.label.shape) - 1) / 2) + ph.affine[:3, 3]
    agree_true = agreement(n, q)
    assert agree_true > 0.9  # nearest-voxel mirroring on a 2.4 x 2.4 x 3 mm grid
    assert agreement(turned, q) < agree_true - 0.05  # a plane 3 deg off is clearly worse
    assert agreement(n, q + 3.0 * n) < agree_true - 0.1  # so is one 3 mm off
    # the grid's own central plane is NOT the symmetry plane of a posed head
    assert agreement(np.array([1.0, 0.0, 0.0]), grid_centre) < agree_true - 0.2


def test_tumour_label_and_asymmetry_info():
    ph = make_phantom(21, crossing=False, tumour_contrast_hu=8.0, noise_hu=0.0)
    lab = ph.label
    assert set(np.unique(lab)) == {0, 1}
    assert not np.any(np.isin(ph.tissue[lab == 1], [TISSUES["cortical"], TISSUES["cancellous"], TISSUES["brain"]]))
    vol_ml = lab.sum() * np.prod(ph.spacing) / 1000
    assert ph.info["tumour_volume_ml"] == pytest.approx(vol_ml, rel=1e-3)
    assert ph.info["crosses_midline"] is False
    # asymmetric fraction recomputed by mirroring the label across the true plane
    idx, ok = _reflect_index(ph, ph.info["plane_normal"], ph.info["plane_point"])
    flat = lab.reshape(-1)
    s = (flat == 1) & ok
    mirrored = np.zeros_like(flat)
    mirrored[s] = 0
    mirror_mask = np.zeros(lab.shape, bool)
    mirror_mask[idx[s, 0], idx[s, 1], idx[s, 2]] = True  # s' = mirror of s
    frac = np.sum((flat == 1) & ~mirror_mask.reshape(-1)) / flat.sum()
    assert frac == pytest.approx(ph.info["asymmetric_fraction"], abs=0.1)
    # tumour is low contrast: its mean differs from muscle by the requested HU (noise-free)
    assert ph.image[lab == 1].mean() - np.median(ph.image[ph.tissue == TISSUES["muscle"]]) == pytest.approx(8, abs=4)


def test_crossing_tumour_reaches_both_sides():
    ph = make_phantom(22, crossing=True)
    assert ph.info["crosses_midline"] is True
    assert ph.info["asymmetric_fraction"] < 1.0


def test_mri_sequences():
    ph = make_phantom(4, modality="mri")
    assert set(ph.image) == {"t1", "t2", "cet1"}
    t = ph.tissue
    # T1 fat bright, T2 fluid bright, CE-T1 tumour enhancing
    assert ph.image["t1"][t == TISSUES["fat"]].mean() > ph.image["t1"][t == TISSUES["muscle"]].mean()
    assert ph.image["t2"][t == TISSUES["fluid"]].mean() > ph.image["t2"][t == TISSUES["brain"]].mean()
    assert ph.image["cet1"][t == TISSUES["tumour"]].mean() > 1.5 * ph.image["t1"][t == TISSUES["tumour"]].mean()


def test_generate_dataset_layout(tmp_path):
    from monai.data import load_decathlon_datalist

    ds = generate_dataset(tmp_path / "ct", cases=4, seed=1, size="small")
    meta = json.loads(ds.read_text())
    assert meta["labels"] == {"0": "background", "1": "GTVp"}
    assert meta["numTraining"] == 3 and meta["numTest"] == 1
    train = load_decathlon_datalist(str(ds), data_list_key="training")
    test = load_decathlon_datalist(str(ds), data_list_key="test")
    assert len(train) == 3 and len(test) == 1
    img = nib.load(train[0]["image"])
    lab = nib.load(train[0]["label"])
    assert img.get_data_dtype() == np.int16 and lab.shape == img.shape
    np.testing.assert_allclose(img.affine, lab.affine)
    assert (tmp_path / "ct" / "cases.csv").read_text().count("\n") == 5
    assert set(meta["case_info"]) == {"npc_000", "npc_001", "npc_002", "npc_003"}
    assert "asymmetric_fraction" in meta["case_info"]["npc_000"]
    # never written over
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path / "ct", cases=2, seed=1, size="small")


def test_generated_files_follow_the_umask(tmp_path):
    """The data-set folder was 0700 and its files 0600 (mkdtemp / mkstemp); a shared workstation could not read them."""
    import os

    old = os.umask(0o022)
    try:
        ds = generate_dataset(tmp_path / "ct", cases=2, seed=1, size="small")
    finally:
        os.umask(old)
    root = ds.parent
    assert root.stat().st_mode & 0o777 == 0o755
    assert (root / "imagesTr").stat().st_mode & 0o777 == 0o755
    for f in [ds, root / "cases.csv", *root.glob("*/*.nii.gz")]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not [p for p in root.rglob(".*")]  # no temporary files left


def test_generate_mri_and_healthy_sets(tmp_path):
    ds = generate_dataset(tmp_path / "mri", cases=2, seed=1, size="small", modality="mri")
    entry = json.loads(ds.read_text())["training"][0]
    assert [p.rsplit("_", 1)[1] for p in entry["image"]] == ["t1.nii.gz", "t2.nii.gz", "cet1.nii.gz"]
    ds = generate_dataset(tmp_path / "healthy", cases=2, seed=1, size="small", tumour=False)
    entry = json.loads(ds.read_text())["training"][0]
    assert nib.load(str(tmp_path / "healthy" / entry["label"])).get_fdata().sum() == 0


def test_ensure_dataset(tmp_path):
    target = tmp_path / "default"
    ds = ensure_dataset(target, size="small", cases=2)
    before = ds.stat().st_mtime_ns
    assert ensure_dataset(target, size="small", cases=2) == ds and ds.stat().st_mtime_ns == before
    other = tmp_path / "user_data"
    other.mkdir()
    (other / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        ensure_dataset(other, size="small")
    assert (other / "scan.nii.gz").read_bytes() == b"x"


def test_phantoms_command(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "npc_gtv.cli", "phantoms", "--out", str(out), "--cases", "2",
                           "--size", "small", "--seed", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "dataset.json").is_file() and len(list((out / "imagesTr").glob("*.nii.gz"))) == 1
