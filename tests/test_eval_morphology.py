"""Marching-cubes morphology (data-set paper 002) on spheres and boxes with known answers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from shared_transforms.io import save_nifti

from npc_gtv.evaluation.morphology import (
    mask_morphology,
    max_diameter,
    mesh_area,
    mesh_volume,
    surface_regularity,
)


def _sphere(radius_mm, spacing):
    n = [int(2 * radius_mm / s) + 8 for s in spacing]
    axes = [(np.arange(k) - k / 2 + 0.5) * s for k, s in zip(n, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x**2 + y**2 + z**2 <= radius_mm**2


@pytest.mark.parametrize("radius, spacing", [(20.0, (1.0, 1.0, 1.0)), (25.0, (0.5, 0.5, 1.0))])
def test_sphere_within_two_percent(radius, spacing):
    m = mask_morphology(_sphere(radius, spacing), spacing)
    assert m["volume_cm3"] == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.02)
    assert m["surface_area_cm2"] == pytest.approx(4 * math.pi * radius**2 / 100, rel=0.02)
    assert m["max_diameter_cm"] == pytest.approx(2 * radius / 10, rel=0.02)
    assert m["surface_regularity"] == pytest.approx(1.0, rel=0.03)
    assert m["n_components"] == 1


def test_sphere_on_thick_ct_slices():
    """3 mm slices: volume and area still close; the diameter may exceed 2R by up to one slice,
    because the mask itself reaches half a slice beyond the last slice centre inside the sphere."""
    sp = (1.0, 1.0, 3.0)
    m = mask_morphology(_sphere(25.0, sp), sp)
    assert m["volume_cm3"] == pytest.approx(4 / 3 * math.pi * 25.0**3 / 1000, rel=0.01)
    assert m["surface_area_cm2"] == pytest.approx(4 * math.pi * 25.0**2 / 100, rel=0.025)
    assert 50.0 <= m["max_diameter_cm"] * 10 <= 50.0 + sp[2]


def test_raw_marching_cubes_overestimates_sphere_area():
    """The documented reason for the default smoothing: the raw staircase mesh is ~9 % too large."""
    raw = mask_morphology(_sphere(20.0, (1, 1, 1)), (1, 1, 1), smoothing="none")
    area = 4 * math.pi * 20.0**2 / 100
    assert 1.06 < raw["surface_area_cm2"] / area < 1.12
    assert raw["volume_cm3"] == pytest.approx(4 / 3 * math.pi * 20.0**3 / 1000, rel=0.01)
    assert raw["surface_regularity"] < 0.92


def test_box_volume_area_diameter():
    sp = (1.0, 1.0, 2.0)
    m = np.zeros((90, 70, 28), dtype=bool)
    m[5:85, 5:65, 4:24] = True  # 80 x 60 x 40 mm
    v, a, d = 80 * 60 * 40, 2 * (80 * 60 + 80 * 40 + 60 * 40), math.sqrt(80**2 + 60**2 + 40**2)
    raw = mask_morphology(m, sp, smoothing="none")
    assert raw["volume_cm3"] == pytest.approx(v / 1000, rel=0.02)
    assert raw["surface_area_cm2"] == pytest.approx(a / 100, rel=0.02)
    assert raw["max_diameter_cm"] == pytest.approx(d / 10, rel=0.02)
    smooth = mask_morphology(m, sp)  # default Taubin smoothing: edges slightly rounded
    assert smooth["volume_cm3"] == pytest.approx(v / 1000, rel=0.02)
    assert smooth["surface_area_cm2"] == pytest.approx(a / 100, rel=0.02)
    assert smooth["max_diameter_cm"] == pytest.approx(d / 10, rel=0.02)
    blurred = mask_morphology(m, sp, smoothing="gaussian")  # blur rounds the edges more
    assert blurred["volume_cm3"] == pytest.approx(v / 1000, rel=0.02)
    assert blurred["surface_area_cm2"] == pytest.approx(a / 100, rel=0.04)
    # regularity of a box is the sphere-relative volume for its area: (80*60*40)/(4/3 pi R^3)
    r = math.sqrt(a / (4 * math.pi))
    assert raw["surface_regularity"] == pytest.approx(v / (4 / 3 * math.pi * r**3), rel=0.04)
    assert raw["voxel_volume_cm3"] == pytest.approx(v / 1000)


def test_gaussian_option_on_a_sphere_and_small_irregular_volume():
    g = mask_morphology(_sphere(20.0, (1, 1, 1)), (1, 1, 1), smoothing="gaussian")
    assert g["volume_cm3"] == pytest.approx(4 / 3 * math.pi * 20.0**3 / 1000, rel=0.02)
    assert g["surface_area_cm2"] == pytest.approx(4 * math.pi * 20.0**2 / 100, rel=0.02)
    # small lumpy objects (~565 voxels in 11 blobs on a coarse grid): Taubin smoothing keeps the
    # raw mesh's volume, the Gaussian blur shrinks them (why it is not the default)
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    blob = gaussian_filter(rng.standard_normal((24, 24, 14)), 2.0)
    m = blob > np.percentile(blob, 93)
    sp = (2.4, 2.4, 3.0)
    raw = mask_morphology(m, sp, smoothing="none")
    t = mask_morphology(m, sp)
    g = mask_morphology(m, sp, smoothing="gaussian")
    assert t["volume_cm3"] == pytest.approx(raw["volume_cm3"], rel=0.02)
    assert g["volume_cm3"] < 0.8 * raw["volume_cm3"]
    assert t["n_components"] == 11
    with pytest.raises(ValueError, match="smoothing"):
        mask_morphology(m, sp, smoothing="laplace")


def test_taubin_does_not_shrink_a_sphere_mesh():
    from npc_gtv.evaluation.morphology import surface_mesh, taubin_smooth

    verts, faces = surface_mesh(_sphere(15.0, (1, 1, 1)), (1, 1, 1), smoothing="none")
    centre = verts.mean(axis=0)
    smooth = taubin_smooth(verts, faces, 30)
    r_raw = np.linalg.norm(verts - centre, axis=1)
    r_smooth = np.linalg.norm(smooth - centre, axis=1)
    assert r_smooth.mean() == pytest.approx(r_raw.mean(), rel=0.01)  # no shrinkage
    assert r_smooth.std() < 0.5 * r_raw.std()  # staircase removed
    with pytest.raises(ValueError):
        taubin_smooth(verts, faces, 5, lam=0.5, mu=-0.4)


def test_mesh_formulas_on_a_tetrahedron_and_cube():
    verts = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0], [0, 0, 5]], dtype=float)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    assert mesh_volume(verts, faces) == pytest.approx(3 * 4 * 5 / 6)
    area = 0.5 * (12 + 15 + 20) + 0.5 * np.linalg.norm(np.cross([-3, 4, 0], [-3, 0, 5]))
    assert mesh_area(verts, faces) == pytest.approx(area)
    assert max_diameter(verts) == pytest.approx(math.sqrt(41))
    assert surface_regularity(4 / 3 * math.pi * 8, 4 * math.pi * 4) == pytest.approx(1.0)


def test_empty_mask_and_two_components():
    e = mask_morphology(np.zeros((8, 8, 8), bool), (1, 1, 1))
    assert e["volume_cm3"] == 0.0 and math.isnan(e["surface_regularity"])
    m = np.zeros((40, 20, 20), bool)
    m[2:8, 2:8, 2:8] = True
    m[30:36, 2:8, 2:8] = True
    r = mask_morphology(m, (1, 1, 1), smoothing="none")
    assert r["n_components"] == 2
    assert r["max_diameter_cm"] * 10 == pytest.approx(math.sqrt(33**2 + 5**2 + 5**2), rel=0.03)


def test_morphology_command_csv(tmp_path, capsys):
    from npc_gtv.cli import main

    sp = (0.8, 0.8, 2.0)
    mask = _sphere(15.0, sp).astype(np.uint8)
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    save_nifti(mask, aff, tmp_path / "masks" / "t1" / "p1_seg.nii.gz")
    save_nifti(mask[::-1].copy(), aff, tmp_path / "masks" / "p2.nii.gz")
    out = tmp_path / "morph.csv"
    main(["morphology", str(tmp_path / "masks"), "--out", str(out), "--progress", "False"])
    printed = capsys.readouterr().out
    assert "wrote" in printed and "median (min - max)" in printed
    rows = {r["case_id"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"p1", "p2"}
    v = 4 / 3 * math.pi * 15.0**3 / 1000
    for r in rows.values():
        assert float(r["volume_cm3"]) == pytest.approx(v, rel=0.03)
        assert 3.0 <= float(r["max_diameter_cm"]) <= 3.0 + sp[2] / 10  # within one slice
    with pytest.raises(SystemExit, match="does not exist"):
        main(["morphology", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "x.csv")])


def test_morphology_refuses_overwrite_and_unusable_spacing(tmp_path, capsys):
    """`morphology --out` replaced files silently; a zero voxel size gave 0.30 cm^3 for 5.18, 50 mm a 37-litre tumour."""
    import struct

    import nibabel as nib

    from npc_gtv.cli import main

    mask = _sphere(8.0, (1.0, 1.0, 1.0)).astype(np.uint8)
    save_nifti(mask, np.eye(4), tmp_path / "a.nii.gz")
    out = tmp_path / "morph.csv"
    out.write_text("earlier results\n")
    with pytest.raises(SystemExit, match="morph.csv: already exists; refusing to overwrite"):
        main(["morphology", str(tmp_path / "a.nii.gz"), "--out", str(out), "--progress", "False"])
    assert out.read_text() == "earlier results\n"
    main(["morphology", str(tmp_path / "a.nii.gz"), "--out", str(out), "--progress", "False", "--overwrite"])
    assert out.read_text().startswith("case_id,")
    # zero voxel size in the header (nibabel would use 1 mm) and an implausible 50 mm spacing
    zero = tmp_path / "zero.nii"
    img = nib.Nifti1Image(mask, np.diag([1.0, 1.0, 3.0, 1.0]))
    img.set_sform(None, code=0)
    nib.save(img, str(zero))
    raw = bytearray(zero.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    zero.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match=r"zero.nii: header voxel size \(pixdim\) is 0 x 0 x 0 mm"):
        main(["morphology", str(zero), "--out", str(tmp_path / "z.csv"), "--progress", "False"])
    save_nifti(mask, np.diag([50.0, 50.0, 50.0, 1.0]), tmp_path / "far.nii.gz")
    with pytest.raises(SystemExit, match=r"far.nii.gz: implausible voxel spacing 50 x 50 x 50 mm"):
        main(["morphology", str(tmp_path / "far.nii.gz"), "--out", str(tmp_path / "f.csv"), "--progress", "False"])
    assert not (tmp_path / "z.csv").exists() and not (tmp_path / "f.csv").exists()
