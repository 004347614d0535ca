"""RTSTRUCT and DICOM SEG export: contours, references, round trips, dciodvfy, the CLI and inference path."""

from __future__ import annotations

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from npc_gtv.dicom.commands import dice
from npc_gtv.dicom.rtstruct import export_rtstruct, mask_slice_contours, rasterize_rtstruct, write_rtstruct
from npc_gtv.dicom.seg import read_seg, write_seg
from npc_gtv.dicom.series import write_dicom_series
from rtstruct_checks import assert_references_ct
from shared_transforms.dicom import read_dicom_series
from shared_transforms.io import InputError, save_nifti

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shoelace(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two small phantom CTs as DICOM folders with their GTVp masks (NIfTI, same grid)."""
    from npc_gtv.phantoms import make_phantom

    root = tmp_path_factory.mktemp("rt")
    out = []
    for seed in (5, 6):
        ph = make_phantom(seed, size="small")
        ct_dir = root / f"case{seed}" / "CT"
        write_dicom_series(ph.image, ph.affine, ct_dir, patient_id=f"PID{seed}", patient_name="Doe^Jane")
        mask_path = save_nifti(ph.label, ph.affine, root / f"case{seed}" / "gtv.nii.gz")
        out.append((ph, ct_dir, mask_path))
    return out


def test_slice_contours_islands_holes_hand_computed():
    m = np.zeros((12, 12), np.uint8)
    m[1:6, 1:6] = 1  # 5x5 square
    m[8:10, 8:11] = 1  # 2x3 island
    polys = mask_slice_contours(m)
    assert len(polys) == 2
    # straight runs are merged: each outline is an octagon (4 edges + 4 cut corners)
    assert sorted(len(p) for p in polys) == [8, 8]
    # marching squares at 0.5 cuts each convex corner by a triangle of area 1/8: 25 - 4/8, 6 - 4/8
    assert sorted(_shoelace(p) for p in polys) == pytest.approx([5.5, 24.5])
    m[3, 3] = 0  # one-pixel hole inside the square: its outline is a diamond of area 1/2
    polys = mask_slice_contours(m)
    assert len(polys) == 3
    assert sorted(_shoelace(p) for p in polys) == pytest.approx([0.5, 5.5, 24.5])
    # an island touching the border is still closed
    b = np.zeros((6, 6), np.uint8)
    b[0:3, 0:2] = 1
    (p,) = mask_slice_contours(b)
    assert _shoelace(p) == pytest.approx(6 - 0.5)


def test_rtstruct_references_and_dice_on_phantoms(cases, tmp_path):
    for ph, ct_dir, mask_path in cases:
        out = export_rtstruct(ct_dir, mask_path, tmp_path / f"{ct_dir.parent.name}_RS.dcm")
        ct = read_dicom_series(ct_dir)
        back = rasterize_rtstruct(out, ct)
        assert ph.label.sum() > 50
        assert dice(back, ph.label) >= 0.97

        rs = pydicom.dcmread(out)
        assert_references_ct(rs, ct)
        roi = rs.StructureSetROISequence[0]
        assert roi.ROIName == "GTVp" and roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName == "NPC GTV toolkit"
        assert list(rs.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]
        assert rs.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
        # every contour is closed planar, lies in its referenced slice's plane, and slices match the mask
        z_of = {h.SOPInstanceUID: float(h.ImagePositionPatient[2]) for h in ct.headers}
        contoured = set()
        for c in rs.ROIContourSequence[0].ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            pts = np.asarray(c.ContourData, float).reshape(-1, 3)
            assert len(pts) == c.NumberOfContourPoints
            uid = c.ContourImageSequence[0].ReferencedSOPInstanceUID
            np.testing.assert_allclose(pts[:, 2], z_of[uid], atol=1e-3)
            contoured.add(uid)
        k_with_tumour = np.flatnonzero(ph.label.any(axis=(0, 1)))
        assert contoured == {ct.headers[k].SOPInstanceUID for k in k_with_tumour}


def test_rtstruct_holes_and_islands_rasterise_exactly(cases, tmp_path):
    ph, ct_dir, _ = cases[0]
    ct = read_dicom_series(ct_dir)
    m = np.zeros(ct.array.shape, np.uint8)
    m[20:50, 30:60, 10:14] = 1
    m[30:36, 40:45, 11:13] = 0  # holes on two slices
    m[70:80, 10:15, 12] = 1  # second island
    m[60, 60, 13] = 1  # single voxel
    out = write_rtstruct(ct, m, tmp_path / "RS.dcm", roi_name="GTVp_test", color=(0, 255, 0))
    rs = pydicom.dcmread(out)
    n_contours = len(rs.ROIContourSequence[0].ContourSequence)
    assert n_contours == 4 + 2 + 1 + 1  # 4 outer outlines, 2 holes, 1 island, 1 single voxel
    np.testing.assert_array_equal(rasterize_rtstruct(out, ct, "GTVp_test"), m)


def test_mask_on_other_grid_is_brought_back_to_ct(cases, tmp_path):
    ph, ct_dir, mask_path = cases[1]
    # the same mask saved in RAS orientation (as after Orientationd + SaveImage): different grid
    canon = nib.as_closest_canonical(nib.load(str(mask_path)))
    assert not np.allclose(canon.affine, ph.affine)
    ras_path = tmp_path / "gtv_ras.nii.gz"
    nib.save(canon, str(ras_path))
    out = export_rtstruct(ct_dir, ras_path, tmp_path / "RS.dcm")
    np.testing.assert_array_equal(rasterize_rtstruct(out, read_dicom_series(ct_dir)), ph.label)


def test_mask_not_matching_ct_is_an_error(cases, tmp_path):
    ph, ct_dir, _ = cases[0]
    shifted = ph.affine.copy()
    shifted[:3, 3] += 500.0
    far = save_nifti(ph.label, shifted, tmp_path / "far.nii.gz")
    with pytest.raises(InputError, match="is not on the voxel grid of .* would resample .* --resample"):
        export_rtstruct(ct_dir, far, tmp_path / "RS.dcm")
    with pytest.raises(InputError, match="does not overlap"):
        export_rtstruct(ct_dir, far, tmp_path / "RS.dcm", resample=True)
    nonbinary = save_nifti(ph.label * 2, ph.affine, tmp_path / "two.nii.gz")
    with pytest.raises(InputError, match="binary"):
        export_rtstruct(ct_dir, nonbinary, tmp_path / "RS.dcm")
    assert not (tmp_path / "RS.dcm").exists()


def test_seg_round_trip_exact(cases, tmp_path):
    import highdicom as hd

    for ph, ct_dir, _ in cases:
        ct = read_dicom_series(ct_dir)
        out = write_seg(ct, ph.label, tmp_path / f"{ct_dir.parent.name}_seg.dcm")
        np.testing.assert_array_equal(read_seg(out, ct), ph.label)
        seg = hd.seg.segread(str(out))
        first = ct.headers[0]
        assert seg.PatientID == first.PatientID and seg.StudyInstanceUID == first.StudyInstanceUID
        assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
        assert seg.SegmentSequence[0].SegmentLabel == "GTVp"
        assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
        # empty frames are omitted: one frame per CT slice holding tumour
        assert int(seg.NumberOfFrames) == int(ph.label.any(axis=(0, 1)).sum())


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed: apt-get install -y dicom3tools")
def test_dciodvfy_reports_no_errors(cases, tmp_path):
    ph, ct_dir, mask_path = cases[0]
    ct = read_dicom_series(ct_dir)
    for path in (write_rtstruct(ct, ph.label, tmp_path / "RS.dcm"), write_seg(ct, ph.label, tmp_path / "SEG.dcm")):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n{report}"
        assert ("RTStructureSet" if path.name == "RS.dcm" else "Segmentation") in report


def test_commands_end_to_end_and_input_safety(cases, tmp_path, capsys, caplog):
    import logging

    from npc_gtv.cli import main

    caplog.set_level(logging.DEBUG)

    ph, ct_dir, mask_path = cases[0]
    # DICOM CT -> NIfTI; a mask on that NIfTI's grid -> RTSTRUCT and SEG
    main(["dicom2nifti", str(ct_dir), str(tmp_path / "ct.nii.gz")])
    main(["rtstruct", "--ct", str(ct_dir), "--mask", str(mask_path), "--out", str(tmp_path / "RS.dcm"), "--roi_name", "GTV_auto", "--color", "0,128,255"])
    main(["dicomseg", "--ct", str(ct_dir), "--mask", str(mask_path), "--out", str(tmp_path / "SEG.dcm")])
    printed = capsys.readouterr().out
    assert "re-rasterised Dice 1.0000" in printed and "read back exactly" in printed
    assert "Doe" not in printed and "Jane" not in printed
    assert "RTSTRUCT" in caplog.text and "Doe" not in caplog.text and "Jane" not in caplog.text
    rs = pydicom.dcmread(tmp_path / "RS.dcm")
    assert rs.StructureSetROISequence[0].ROIName == "GTV_auto"
    assert list(rs.ROIContourSequence[0].ROIDisplayColor) == [0, 128, 255]
    # outputs never replace inputs, existing outputs are kept unless --overwrite
    before = mask_path.read_bytes()
    _expect_cli_error(capsys, lambda: main(["rtstruct", "--ct", str(ct_dir), "--mask", str(mask_path), "--out", str(mask_path), "--overwrite"]), "input")
    assert mask_path.read_bytes() == before
    ct_file = sorted(ct_dir.iterdir())[0]
    _expect_cli_error(capsys, lambda: main(["dicomseg", "--ct", str(ct_dir), "--mask", str(mask_path), "--out", str(ct_file), "--overwrite"]), "input")
    _expect_cli_error(capsys, lambda: main(["rtstruct", "--ct", str(ct_dir), "--mask", str(mask_path), "--out", str(tmp_path / "RS.dcm")]), "already exists")


def test_inference_pipeline_dicom_in_rtstruct_out(cases, tmp_path):
    """DICOM folder through a bundle-like pre-processing, inverted back, written as RTSTRUCT + SEG."""
    from monai.transforms import Compose, CopyItemsd, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd

    from npc_gtv.dicom.transforms import SaveDicomRTd
    from shared_transforms.dicom import DicomSeriesReader

    ph, ct_dir, mask_path = cases[1]
    pre = Compose(
        [
            LoadImaged(keys=["image", "label"], reader=DicomSeriesReader),
            EnsureChannelFirstd(keys=["image", "label"]),
            Orientationd(keys=["image", "label"], axcodes="RAS"),
        ]
    )
    data = pre({"image": str(ct_dir), "label": str(mask_path)})
    assert tuple(data["image"].shape) == (1, 96, 96, 32)
    # stand-in for the network output: the reference mask in the network's (RAS) space
    data = CopyItemsd(keys="label", names="pred")(data)
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
            SaveDicomRTd(keys="pred", output_dir=tmp_path, write_seg=True),
        ]
    )
    post(data)
    ct = read_dicom_series(ct_dir)
    np.testing.assert_array_equal(rasterize_rtstruct(tmp_path / "CT_rtstruct.dcm", ct), ph.label)
    np.testing.assert_array_equal(read_seg(tmp_path / "CT_seg.dcm", ct), ph.label)


def test_save_dicom_rt_same_folder_names_need_case_ids(cases, tmp_path):
    """Two patients' folders both called CT: the second is refused (no silent suffix that the NIfTI name lacks);
    with a case_id per entry each gets the name the NIfTI prediction beside it gets."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from npc_gtv.dicom.transforms import SaveDicomRTd
    from shared_transforms.dicom import DicomSeriesReader

    load = LoadImaged(keys="pred", reader=DicomSeriesReader, ensure_channel_first=True)

    def data(ph, ct_dir, case_id=None):
        d = load({"pred": str(ct_dir)})
        d["pred"] = d["pred"] * 0 + torch.as_tensor(ph.label[None].astype(np.float32))
        if case_id:
            d["case_id"] = case_id
        return d

    saver = SaveDicomRTd(keys="pred", output_dir=tmp_path / "a")
    (ph1, ct1, _), (ph2, ct2, _) = cases[:2]  # both case folders are called "CT"
    saver(data(ph1, ct1))
    with pytest.raises(InputError, match=r"maps to the output name 'CT', already written in this run for .*distinct 'case_id'"):
        saver(data(ph2, ct2))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["CT_rtstruct.dcm"]
    saver = SaveDicomRTd(keys="pred", output_dir=tmp_path / "b")
    for ph, ct_dir, cid in ((ph1, ct1, "patient1"), (ph2, ct2, "patient2")):
        saver(data(ph, ct_dir, cid))
        np.testing.assert_array_equal(rasterize_rtstruct(tmp_path / "b" / f"{cid}_rtstruct.dcm", read_dicom_series(ct_dir)), ph.label)
    with pytest.raises(InputError, match="patient1_rtstruct.dcm: already exists"):  # a rerun refuses, unless overwrite
        SaveDicomRTd(keys="pred", output_dir=tmp_path / "b")(data(ph1, ct1, "patient1"))
    SaveDicomRTd(keys="pred", output_dir=tmp_path / "b", overwrite=True)(data(ph1, ct1, "patient1"))
    with pytest.raises(ValueError, match="at least one"):
        SaveDicomRTd(keys="pred", write_rtstruct=False, write_seg=False)


def _expect_cli_error(capsys, call, match):
    """The CLI turns bad input into exit code 2 and a one-line message naming the file."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    assert match in capsys.readouterr().err


def test_shifted_mask_is_not_resampled_silently(cases, tmp_path):
    """rtstruct resampled a half-voxel-shifted mask silently and printed Dice 1.0 against the resampled mask."""
    import subprocess
    import sys

    ph, ct_dir, _ = cases[0]
    shifted = ph.affine.copy()
    shifted[:3, 3] += 0.5 * ph.affine[:3, 0]  # half a voxel along the first array axis
    half = save_nifti(ph.label, shifted, tmp_path / "half.nii.gz")
    cmd = [sys.executable, "-m", "npc_gtv.cli", "rtstruct", "--ct", str(ct_dir), "--mask", str(half), "--out"]
    proc = subprocess.run(cmd + [str(tmp_path / "RS.dcm")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "half.nii.gz: is not on the voxel grid" in proc.stderr and "--resample" in proc.stderr
    assert not (tmp_path / "RS.dcm").exists()
    proc = subprocess.run(cmd + [str(tmp_path / "RS.dcm"), "--resample"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "against the mask as resampled onto the CT grid" in proc.stdout and "resampled by nearest neighbour" in proc.stdout
