"""``npc-gtv symmetrize`` / ``npc-gtv make-atlas`` on small phantom NIfTI files, run through the CLI entry point."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from npc_gtv.cli import main
from npc_gtv.phantoms import make_phantom
from shared_transforms.io import save_nifti
from shared_transforms.symmetry import plane_angle_error_deg


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sym_cli")
    ph = make_phantom(31, size="small", tumour=True, pose={"yaw_deg": 8.0, "roll_deg": -6.0, "translation_mm": [10.0, -5.0, 0.0]})
    save_nifti(ph.image, ph.affine, d / "ct.nii.gz")
    save_nifti(ph.label, ph.affine, d / "gtv.nii.gz")
    ref = make_phantom(32, size="small", tumour=False, pose={"yaw_deg": -3.0, "translation_mm": [5.0, 0, 0]})
    save_nifti(ref.image, ref.affine, d / "ref.nii.gz")
    return d, ph


def test_symmetrize_atlas_free_writes_volume_label_and_report(posed, capsys):
    d, ph = posed
    main(["symmetrize", str(d / "ct.nii.gz"), str(d / "ct_sym.nii.gz"), "--report", str(d / "rep.json"),
          "--label", str(d / "gtv.nii.gz"), "--label_output", str(d / "gtv_sym.nii.gz")])
    out = capsys.readouterr().out
    assert "atlas-free" in out and "OK" in out
    img = nib.load(str(d / "ct_sym.nii.gz"))
    assert img.shape == ph.image.shape and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, ph.affine, atol=1e-5)
    lab = np.asarray(nib.load(str(d / "gtv_sym.nii.gz")).dataobj)
    assert set(np.unique(lab).tolist()) <= {0, 1}
    assert abs(int(lab.sum()) - int(ph.label.sum())) <= 0.05 * ph.label.sum()
    rep = json.loads((d / "rep.json").read_text())
    assert rep["ok"] is True and rep["mode"] == "atlas-free"
    assert plane_angle_error_deg(rep["plane_normal_ras"], ph.info["plane_normal"]) < 1.0
    assert rep["plane_yaw_deg"] == pytest.approx(8.0, abs=1.0)
    assert rep["asymmetry_after"] < rep["asymmetry_before"]
    for key in ("rotation_deg", "translation_mm", "final_metric", "asymmetry_ratio", "transform_out_to_in_ras"):
        assert key in rep


def test_make_atlas_then_atlas_mode(posed, capsys):
    d, ph = posed
    main(["make-atlas", str(d / "ref.nii.gz"), str(d / "atlas.nii.gz")])
    atlas = np.asarray(nib.load(str(d / "atlas.nii.gz")).dataobj)
    np.testing.assert_array_equal(atlas, atlas[::-1])  # exactly symmetric (axis 0 is left-right here)
    main(["symmetrize", str(d / "ct.nii.gz"), str(d / "ct_atlas.nii.gz"), "--atlas", str(d / "atlas.nii.gz"),
          "--report", str(d / "rep_atlas.json")])
    rep = json.loads((d / "rep_atlas.json").read_text())
    assert rep["ok"] is True and rep["mode"] == "atlas" and rep["metric"] == "mattes"
    assert plane_angle_error_deg(rep["plane_normal_ras"], ph.info["plane_normal"]) < 1.0
    assert nib.load(str(d / "ct_atlas.nii.gz")).shape == atlas.shape


def test_symmetrize_failures_exit_nonzero_and_name_the_file(posed, tmp_path, capsys):
    d, _ = posed
    # registration judged failed: report says so, no output volume
    with pytest.raises(SystemExit) as exc:
        main(["symmetrize", str(d / "ct.nii.gz"), str(tmp_path / "o.nii.gz"), "--report", str(tmp_path / "r.json"),
              "--max_angle_deg", "2"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "ct.nii.gz" in err and "tilted" in err
    assert not (tmp_path / "o.nii.gz").exists()
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False
    # a 2D image
    save_nifti(np.zeros((40, 40), np.int16), np.eye(4), tmp_path / "flat.nii.gz")
    with pytest.raises(SystemExit):
        main(["symmetrize", str(tmp_path / "flat.nii.gz"), str(tmp_path / "o2.nii.gz")])
    err = capsys.readouterr().err
    assert "flat.nii.gz" in err and "3D" in err
    # never over the input
    with pytest.raises(SystemExit):
        main(["symmetrize", str(d / "ct.nii.gz"), str(d / "ct.nii.gz")])
    assert "refusing to overwrite" in capsys.readouterr().err


def test_symmetrize_refuses_overwrite_and_implausible_spacing(posed, tmp_path, capsys):
    """symmetrize replaced existing files silently and called a registration at 50 mm spacing "OK"."""
    d, ph = posed
    out = tmp_path / "sym.nii.gz"
    out.write_bytes(b"earlier")
    with pytest.raises(SystemExit) as exc:
        main(["symmetrize", str(d / "ct.nii.gz"), str(out)])
    assert exc.value.code == 1
    assert "sym.nii.gz: already exists; refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier"
    far = tmp_path / "far.nii.gz"
    save_nifti(ph.image, np.diag([50.0, 50.0, 50.0, 1.0]), far)
    with pytest.raises(SystemExit):
        main(["symmetrize", str(far), str(tmp_path / "far_sym.nii.gz"), "--report", str(tmp_path / "far.json")])
    err = capsys.readouterr().err
    assert "far.nii.gz: implausible voxel spacing 50 x 50 x 50 mm" in err
    assert not (tmp_path / "far_sym.nii.gz").exists() and not (tmp_path / "far.json").exists()
    with pytest.raises(SystemExit):
        main(["make-atlas", str(d / "ref.nii.gz"), str(out)])
    assert "already exists; refusing to overwrite" in capsys.readouterr().err
