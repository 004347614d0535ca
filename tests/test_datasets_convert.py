"""Data-set converters on small fake trees: SegRap2023, StructSeg2019, NPC MRI (DICOM), glob templates."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from npc_gtv.datasets import convert_glob, convert_npc_mri, convert_segrap2023, convert_structseg2019, template_cases
from npc_gtv.dicom.series import write_dicom_series
from shared_transforms.io import InputError, load_nifti, save_nifti

os.environ.setdefault("OMP_NUM_THREADS", "1")

SHAPE = (16, 14, 5)


def _aff(spacing=(1.0, 1.0, 3.0)):
    a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    a[:3, 3] = [8.0, 7.0, -6.0]
    return a


def _img(seed):
    return np.random.default_rng(seed).integers(-200, 300, SHAPE).astype(np.int16)


def _lab(seed):
    m = np.zeros(SHAPE, np.uint8)
    m[4 + seed % 3 : 9, 3:8, 1:4] = 1
    return m


def _segrap_tree(root, n=3):
    for i in range(n):
        case = f"segrap_{i:04d}"
        save_nifti(_img(i), _aff(), root / "SegRap2023_Training_Set_120cases" / case / "image.nii.gz")
        save_nifti(_img(i + 10), _aff(), root / "SegRap2023_Training_Set_120cases" / case / "image_contrast.nii.gz")
        save_nifti(_lab(i), _aff(), root / "SegRap2023_Training_Set_120cases_OneHot_Labels" / "Task002" / case / "GTVp.nii.gz")
        save_nifti(_lab(i + 1), _aff(), root / "SegRap2023_Training_Set_120cases_OneHot_Labels" / "Task002" / case / "GTVnd.nii.gz")


def test_segrap2023_two_channels_and_monai_datalist(tmp_path):
    from monai.data import load_decathlon_datalist

    src, out = tmp_path / "segrap", tmp_path / "out"
    _segrap_tree(src)
    path = convert_segrap2023(src, out, test_fraction=0.34, seed=1)
    ds = json.loads(path.read_text())
    assert ds["labels"] == {"0": "background", "1": "GTVp"}
    assert ds["modality"] == {"0": "CT", "1": "CT contrast-enhanced"}
    assert ds["numTraining"] == 2 and ds["numTest"] == 1
    all_cases = sorted(e["case_id"] for e in ds["training"] + ds["test"])
    assert all_cases == ["segrap_0000", "segrap_0001", "segrap_0002"]
    entry = next(e for e in ds["training"] + ds["test"] if e["case_id"] == "segrap_0001")
    assert entry["image"][0].endswith("segrap_0001/image.nii.gz") and entry["image"][1].endswith("image_contrast.nii.gz")
    assert entry["label"].endswith("Task002/segrap_0001/GTVp.nii.gz")
    items = load_decathlon_datalist(str(path), data_list_key="training", base_dir=str(out))
    assert len(items) == 2 and all(os.path.exists(p) for it in items for p in it["image"])
    # single channel variant
    ds = json.loads(convert_segrap2023(src, tmp_path / "nc", channels="noncontrast", test_fraction=0).read_text())
    assert ds["modality"] == {"0": "CT"} and isinstance(ds["training"][0]["image"], str)


def test_segrap2023_bad_cases_are_named(tmp_path):
    src = tmp_path / "segrap"
    _segrap_tree(src)
    (src / "SegRap2023_Training_Set_120cases" / "segrap_0001" / "image_contrast.nii.gz").unlink()
    with pytest.raises(InputError, match="case segrap_0001: channel file is missing"):
        convert_segrap2023(src, tmp_path / "o1")
    _segrap_tree(src)
    bad = src / "SegRap2023_Training_Set_120cases_OneHot_Labels" / "Task002" / "segrap_0002" / "GTVp.nii.gz"
    save_nifti(_lab(2)[:, :, :4], _aff(), bad, overwrite=True)
    with pytest.raises(InputError, match="case segrap_0002: label shape"):
        convert_segrap2023(src, tmp_path / "o2")
    save_nifti(_lab(2) * 3, _aff(), bad, overwrite=True)
    with pytest.raises(InputError, match="binary"):
        convert_segrap2023(src, tmp_path / "o3")
    # a multi-structure label file: keep one value, written binarised to OUT/labelsTr
    path = convert_segrap2023(src, tmp_path / "o4", label_value=3, test_fraction=0)
    ds = json.loads(path.read_text())
    e = next(e for e in ds["training"] if e["case_id"] == "segrap_0002")
    assert e["label"] == "./labelsTr/segrap_0002.nii.gz"
    np.testing.assert_array_equal(load_nifti(tmp_path / "o4" / "labelsTr" / "segrap_0002.nii.gz")[0], _lab(2))


def test_structseg2019_numeric_cases_and_copy(tmp_path, capsys):
    from npc_gtv.cli import main

    src, out = tmp_path / "HaN_GTV", tmp_path / "out"
    for case in ("1", "2", "10"):
        save_nifti(_img(int(case)), _aff(), src / case / "data.nii.gz")
        save_nifti(_lab(int(case)), _aff(), src / case / "label.nii.gz")
    assert list(template_cases(src, "{case}/data.nii.gz")) == ["1", "2", "10"]
    main(["convert", "structseg2019", str(src), str(out), "--test_fraction", "0", "--copy"])
    assert "3 training and 0 test" in capsys.readouterr().out
    ds = json.loads((out / "dataset.json").read_text())
    assert [e["case_id"] for e in ds["training"]] == ["1", "2", "10"]
    assert ds["training"][2] == {"image": "./imagesTr/10.nii.gz", "case_id": "10", "label": "./labelsTr/10.nii.gz"}
    np.testing.assert_array_equal(load_nifti(out / "imagesTr" / "10.nii.gz")[0], _img(10))
    with pytest.raises(SystemExit) as stop:  # the CLI reports bad input as exit code 2 + message
        main(["convert", "structseg2019", str(src), str(out), "--test_fraction", "0"])
    assert stop.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(InputError, match="data-set root"):
        convert_structseg2019(src, src)


def test_glob_templates_multichannel_and_unlabelled(tmp_path):
    src = tmp_path / "nnunet"
    for case in ("npc_001", "npc_002"):
        save_nifti(_img(1), _aff(), src / "imagesTr" / f"{case}_0000.nii.gz")
        save_nifti(_img(2), _aff(), src / "imagesTr" / f"{case}_0001.nii.gz")
    save_nifti(_lab(0), _aff(), src / "labelsTr" / "npc_001.nii.gz")
    with pytest.raises(InputError, match="case npc_002: label file is missing"):
        convert_glob(src, tmp_path / "o", ["imagesTr/{case}_0000.nii.gz", "imagesTr/{case}_0001.nii.gz"], "labelsTr/{case}.nii.gz", modality=["CT", "CT"])
    path = convert_glob(
        src, tmp_path / "o", ["imagesTr/{case}_0000.nii.gz", "imagesTr/{case}_0001.nii.gz"], "labelsTr/{case}.nii.gz",
        modality=["CT", "CT contrast"], allow_unlabelled=True, test_fraction=0,
    )
    ds = json.loads(path.read_text())
    assert [e["case_id"] for e in ds["training"]] == ["npc_001"] and [e["case_id"] for e in ds["test"]] == ["npc_002"]
    assert "label" not in ds["test"][0] and len(ds["test"][0]["image"]) == 2
    with pytest.raises(ValueError, match="exactly one"):
        convert_glob(src, tmp_path / "p", "imagesTr/*.nii.gz")
    with pytest.raises(InputError, match="no case matches"):
        convert_glob(src, tmp_path / "p", "nothere/{case}.nii.gz")


def _npc_mri_tree(root, patients=("1", "2")):
    rng = np.random.default_rng(0)
    grids = {"t1": _aff((1.0, 1.0, 3.0)), "t2": _aff((1.0, 1.0, 3.0)), "cet1": _aff((1.0, 1.0, 3.0))}
    grids["t2"][:3, 3] += [0.0, 0.0, 1.5]  # T2 acquired on shifted slices
    folders = {"t1": "T1WI", "t2": "T2WI", "cet1": "CE-T1WI"}
    masks = {"t1": "ROI-T1.nii.gz", "t2": "ROI-T2.nii.gz", "cet1": "ROI-CE-T1.nii"}
    arrays = {}
    for p in patients:
        for k, seq in enumerate(folders):
            arr = rng.integers(0, 1500, SHAPE).astype(np.int16)
            arrays[(p, seq)] = arr
            write_dicom_series(arr, grids[seq], root / "MRI-Segments" / p / folders[seq], modality="MR", patient_id=p)
            save_nifti(_lab(k), grids[seq], root / "MRI-Segments" / p / masks[seq])
    (root / "info_diagnoses.csv").write_text("id,stage\n1,III\n2,IVa\n")
    (root / "meta_data.csv").write_text("id,machine\n1,Achieva\n2,Signa HDxt\n")
    return arrays


def test_npc_mri_dicom_sequences_masks_and_side_info(tmp_path, capsys):
    from monai.transforms import LoadImaged

    from shared_transforms.mri import StackSequencesd

    src, out = tmp_path / "primary_data", tmp_path / "out"
    arrays = _npc_mri_tree(src)
    path = convert_npc_mri(src, out, test_fraction=0)
    assert "morphological_parameters.csv not found" in capsys.readouterr().out
    ds = json.loads(path.read_text())
    assert ds["modality"] == {"0": "T1", "1": "T2", "2": "CE-T1"} and ds["reference_sequence"] == "cet1"
    e = ds["training"][1]
    assert e["case_id"] == "2"
    assert e["image"] == ["./imagesTr/2_t1.nii.gz", "./imagesTr/2_t2.nii.gz", "./imagesTr/2_cet1.nii.gz"]
    assert e["label"] == "./labelsTr/2.nii.gz" and e["label_t2"] == "./labelsTr/2_t2.nii.gz"
    arr, aff = load_nifti(out / "imagesTr" / "2_t2.nii.gz")
    np.testing.assert_array_equal(arr, arrays[("2", "t2")])
    assert aff[2, 3] == pytest.approx(-4.5)
    np.testing.assert_array_equal(load_nifti(out / "labelsTr" / "2.nii.gz")[0], _lab(2))
    assert ds["side_information"] == [
        {"file": "./side_info/info_diagnoses.csv", "rows": 2},
        {"file": "./side_info/meta_data.csv", "rows": 2},
    ]
    # the entry feeds the 3-channel MRI pipeline: sequences stacked on the label's (CE-T1) grid
    item = {"image": [str(out / p) for p in e["image"]], "label": str(out / e["label"])}
    item = StackSequencesd(keys="image", normalize=None)(item)
    item = LoadImaged(keys="label", ensure_channel_first=True)(item)
    assert tuple(item["image"].shape) == (3, *SHAPE) and tuple(item["label"].shape) == (1, *SHAPE)
    np.testing.assert_allclose(item["image"].affine.numpy(), item["label"].affine.numpy(), atol=1e-4)


def test_npc_mri_errors(tmp_path):
    src = tmp_path / "primary_data"
    _npc_mri_tree(src, patients=("1",))
    # a mask from another grid
    save_nifti(_lab(0), _aff((2.0, 2.0, 3.0)), src / "MRI-Segments" / "1" / "ROI-T1.nii.gz", overwrite=True)
    with pytest.raises(InputError, match="case 1: mask grid"):
        convert_npc_mri(src, tmp_path / "o1")
    (src / "MRI-Segments" / "1" / "ROI-T1.nii.gz").unlink()
    with pytest.raises(InputError, match="mask of sequence t1 is missing"):
        convert_npc_mri(src, tmp_path / "o2")
    with pytest.raises(InputError, match="patient folder root"):
        convert_npc_mri(src, tmp_path / "o3", cases_dir="nothere")


def test_convert_checks_every_image_and_copies_no_broken_file(tmp_path):
    """A truncated image and one with NaN voxels were listed in dataset.json; --copy copied the truncated bytes."""
    import gzip

    src = tmp_path / "src"
    for case in ("1", "2", "3"):
        save_nifti(_img(int(case)), _aff(), src / case / "data.nii.gz")
        save_nifti(_lab(int(case)), _aff(), src / case / "label.nii.gz")
    good = (src / "2" / "data.nii.gz").read_bytes()
    raw = gzip.decompress(good)
    (src / "2" / "data.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 200]))  # header intact, voxels cut
    nan = _img(3).astype(np.float32)
    nan[2, 3, 1] = np.nan
    save_nifti(nan, _aff(), src / "3" / "data.nii.gz", overwrite=True)
    with pytest.raises(InputError) as err:
        convert_structseg2019(src, tmp_path / "out", copy=True)
    text = str(err.value)
    assert text.startswith(f"{src / '2' / 'data.nii.gz'}: cannot be read completely")
    assert f"and 1 more broken file(s): {src / '3' / 'data.nii.gz'}" in text and "nothing was written" in text
    assert not (tmp_path / "out").exists()  # neither dataset.json nor a copied file
    save_nifti(_img(2), _aff(), src / "2" / "data.nii.gz", overwrite=True)
    with pytest.raises(InputError, match=r"3/data.nii.gz: 1 NaN/inf voxel\(s\); nothing was written"):
        convert_structseg2019(src, tmp_path / "out", copy=True)
    save_nifti(_img(3), _aff(), src / "3" / "data.nii.gz", overwrite=True)
    ds = convert_structseg2019(src, tmp_path / "out", copy=True)
    assert json.loads(ds.read_text())["numTraining"] + json.loads(ds.read_text())["numTest"] == 3
    for f in (tmp_path / "out" / "imagesTr").iterdir():
        load_nifti(f)  # every copied file is complete
