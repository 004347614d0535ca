"""DICOM CT series reading: order, orientation (LPS -> RAS), rescale, series choice, bad input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest

from npc_gtv.dicom.series import write_dicom_series
from shared_transforms.dicom import DicomSeriesReader, list_series, read_dicom_series
from shared_transforms.io import InputError, load_nifti, save_nifti

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _volume(shape=(20, 16, 6), seed=0):
    return np.random.default_rng(seed).integers(-1000, 2000, shape).astype(np.int16)


def _affine(spacing=(0.8, 0.9, 2.5), origin=(10.0, 20.0, -30.0)):
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return aff


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    from npc_gtv.phantoms import make_phantom

    ph = make_phantom(3, size="small")
    folder = tmp_path_factory.mktemp("ct") / "case"
    write_dicom_series(ph.image, ph.affine, folder, slice_order="shuffled")
    return ph, folder


def test_phantom_round_trip_exact_with_shuffled_files(phantom_ct):
    ph, folder = phantom_ct
    vol = read_dicom_series(folder)
    assert vol.array.shape == ph.image.shape == (96, 96, 32)
    np.testing.assert_array_equal(vol.array, ph.image.astype(np.float32))
    np.testing.assert_allclose(vol.affine, ph.affine, atol=1e-4)
    assert vol.spacing == pytest.approx((2.4, 2.4, 3.0), abs=1e-5)
    # slices come back in increasing position along the normal, whatever the file names
    z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
    assert np.all(np.diff(z) == pytest.approx(3.0, abs=1e-4))


def test_orientation_matches_itk_reader(phantom_ct):
    """An independent DICOM reader (ITK/GDCM through MONAI) gives the same voxels and RAS affine."""
    from monai.data import ITKReader

    ph, folder = phantom_ct
    reader = ITKReader(affine_lps_to_ras=True)
    arr, meta = reader.get_data(reader.read(str(folder)))
    vol = read_dicom_series(folder)
    np.testing.assert_allclose(np.asarray(meta["affine"]), vol.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(arr), vol.array)


def test_oblique_and_reversed_slices_keep_world_coordinates(tmp_path):
    vol0 = _volume()
    a = np.deg2rad(12.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = _affine()
    aff[:3, :3] = rot @ aff[:3, :3]
    write_dicom_series(vol0, aff, tmp_path / "oblique")
    got = read_dicom_series(tmp_path / "oblique")
    np.testing.assert_allclose(got.affine, aff, atol=1e-4)
    np.testing.assert_array_equal(got.array, vol0)

    # gantry tilt: slice positions step along a direction 15 degrees off the normal; kept exactly
    tilt = _affine()
    t = np.deg2rad(15.0)
    tilt[:3, 2] = [0.0, 2.5 * np.sin(t), 2.5 * np.cos(t)]
    write_dicom_series(vol0, tilt, tmp_path / "tilt")
    got = read_dicom_series(tmp_path / "tilt")
    np.testing.assert_allclose(got.affine, tilt, atol=1e-4)
    assert got.spacing[2] == pytest.approx(2.5, abs=1e-4)

    # slices written head-to-feet: the reader sorts them feet-to-head and flips the array to match
    down = _affine()
    down[:3, 2] *= -1
    write_dicom_series(vol0, down, tmp_path / "down")
    got = read_dicom_series(tmp_path / "down")
    np.testing.assert_array_equal(got.array, vol0[:, :, ::-1])
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, vol0.shape[2] - 1
    np.testing.assert_allclose(got.affine, down @ flip, atol=1e-4)


def test_first_voxel_is_first_slice_position_in_ras(tmp_path):
    """Hand check of LPS -> RAS: voxel (0,0,0) is the lowest slice's ImagePositionPatient with x, y negated."""
    write_dicom_series(_volume(), _affine(origin=(12.5, -7.0, 40.0)), tmp_path / "s")
    ds = pydicom.dcmread(tmp_path / "s" / "IM0001.dcm")
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-12.5, 7.0, 40.0])
    assert [float(v) for v in ds.ImageOrientationPatient] == pytest.approx([1, 0, 0, 0, 1, 0])
    got = read_dicom_series(tmp_path / "s")
    assert got.affine[:3, 3] == pytest.approx([12.5, -7.0, 40.0])
    # pixel (row 3, column 5) of slice 0 is array element [5, 3, 0]
    assert got.array[5, 3, 0] == pytest.approx(float(ds.pixel_array[3, 5]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def test_rescale_slope_and_intercept_to_hu(tmp_path):
    vol0 = (_volume() // 2) * 2  # even values: exact with slope 2
    write_dicom_series(vol0, _affine(), tmp_path / "s", rescale_slope=2.0, rescale_intercept=-1000.0)
    ds = pydicom.dcmread(tmp_path / "s" / "IM0001.dcm")
    assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -1000.0
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").array, vol0)
    # a slice with its own intercept: stored values shifted, HU unchanged
    path = tmp_path / "s" / "IM0003.dcm"
    ds = pydicom.dcmread(path)
    ds.RescaleIntercept = "-900"
    px = ds.pixel_array.astype(np.int32) - 50
    ds.PixelData = px.astype(np.int16).tobytes()
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").array, vol0)


def test_multi_series_folder(tmp_path):
    folder = tmp_path / "mixed"
    a, b = _volume(seed=1), _volume(seed=2)
    write_dicom_series(a, _affine(), folder / "one", series_description="plain")
    files_b = write_dicom_series(b, _affine(), folder / "two", series_description="contrast")
    uid_b = str(pydicom.dcmread(files_b[0]).SeriesInstanceUID)
    assert len(list_series(folder)) == 2
    with pytest.raises(InputError, match="2 series found") as err:
        read_dicom_series(folder)
    assert uid_b in str(err.value) and "contrast" in str(err.value)
    np.testing.assert_array_equal(read_dicom_series(folder, uid_b).array, b)
    # one file of a series selects that series
    np.testing.assert_array_equal(read_dicom_series(files_b[2]).array, b)
    with pytest.raises(InputError, match="not in this folder"):
        read_dicom_series(folder, "1.2.3.4")


def test_ct_chosen_among_other_modalities_and_non_ct_error(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(_volume(seed=1), _affine(), folder / "ct")
    write_dicom_series(_volume(seed=2), _affine(), folder / "mr", modality="MR")
    np.testing.assert_array_equal(read_dicom_series(folder).array, _volume(seed=1))
    with pytest.raises(InputError, match="no CT series"):
        read_dicom_series(folder / "mr")
    got = read_dicom_series(folder / "mr", modality="MR")
    np.testing.assert_array_equal(got.array, _volume(seed=2))


def test_missing_slice_duplicate_and_nonuniform_spacing(tmp_path):
    folder = tmp_path / "s"
    files = write_dicom_series(_volume(shape=(12, 10, 8)), _affine(), folder)
    files[3].unlink()
    with pytest.raises(InputError, match="1 missing slice"):
        read_dicom_series(folder)

    folder2 = tmp_path / "t"
    files = write_dicom_series(_volume(shape=(12, 10, 8)), _affine(), folder2)
    ds = pydicom.dcmread(files[4])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.0  # 2.5 mm step becomes 3.5 / 1.5
    ds.save_as(files[4])
    with pytest.raises(InputError, match="non-uniform slice spacing"):
        read_dicom_series(folder2)

    folder3 = tmp_path / "u"
    files = write_dicom_series(_volume(shape=(12, 10, 4)), _affine(), folder3)
    shutil.copy(files[1], folder3 / "copy.dcm")
    with pytest.raises(InputError, match="duplicate slice position"):
        read_dicom_series(folder3)


def test_folder_without_images_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError, match="no DICOM image files found"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        read_dicom_series(tmp_path / "nothere")


def test_loadimaged_reads_dicom_folders_and_nifti(phantom_ct, tmp_path):
    from monai.transforms import LoadImaged

    ph, folder = phantom_ct
    nii = save_nifti(ph.image, ph.affine, tmp_path / "ct.nii.gz")
    load = LoadImaged(keys="image", reader=DicomSeriesReader)
    a = load({"image": str(folder)})["image"]
    b = load({"image": str(nii)})["image"]
    assert tuple(a.shape) == tuple(b.shape) == (96, 96, 32)
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.meta["dicom_dir"] == str(folder) and a.meta["Modality"] == "CT"
    assert "PatientName" not in a.meta
    # the dotted name works in bundle configs too
    c = LoadImaged(keys="image", reader="shared_transforms.dicom.DicomSeriesReader")({"image": str(folder)})["image"]
    np.testing.assert_array_equal(c.numpy(), a.numpy())


def test_loadimaged_reports_bad_series_instead_of_falling_back(tmp_path):
    from monai.transforms import LoadImaged

    files = write_dicom_series(_volume(shape=(12, 10, 8)), _affine(), tmp_path / "s")
    files[4].unlink()
    with pytest.raises(InputError, match="missing slice"):
        LoadImaged(keys="image", reader=DicomSeriesReader)({"image": str(tmp_path / "s")})


def test_plain_loadimaged_picks_the_dicom_reader_for_folders(phantom_ct, tmp_path):
    """Without a reader argument, LoadImaged uses DicomSeriesReader for folders, nibabel for NIfTI."""
    from monai.transforms import LoadImaged

    import shared_transforms.dicom  # noqa: F401  (registers the reader)

    ph, folder = phantom_ct
    img = LoadImaged(keys="image")({"image": str(folder)})["image"]
    assert img.meta["dicom_dir"] == str(folder)
    np.testing.assert_array_equal(img.numpy(), ph.image)
    nii = save_nifti(ph.image, ph.affine, tmp_path / "ct.nii.gz")
    img = LoadImaged(keys="image")({"image": str(nii)})["image"]
    assert "dicom_dir" not in img.meta and tuple(img.shape) == (96, 96, 32)
    files = write_dicom_series(_volume(shape=(12, 10, 8)), _affine(), tmp_path / "gap")
    files[4].unlink()
    with pytest.raises(InputError, match="missing slice"):
        LoadImaged(keys="image")({"image": str(tmp_path / "gap")})


def test_load_volume_accepts_dicom_and_nifti(phantom_ct, tmp_path):
    from shared_transforms.dicom import load_volume

    ph, folder = phantom_ct
    nii = save_nifti(ph.image, ph.affine, tmp_path / "ct.nii.gz")
    (a, aa), (b, ba) = load_volume(folder), load_volume(nii)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(aa, ba, atol=1e-4)
    with pytest.raises(InputError, match="no DICOM image"):
        load_volume(tmp_path)


def test_dicom2nifti_command(phantom_ct, tmp_path, capsys):
    from npc_gtv.cli import main

    ph, folder = phantom_ct
    out = tmp_path / "ct.nii.gz"
    main(["dicom2nifti", str(folder), str(out)])
    arr, aff = load_nifti(out)
    assert arr.dtype == np.int16
    np.testing.assert_array_equal(arr, ph.image)
    np.testing.assert_allclose(aff, ph.affine, atol=1e-4)
    printed = capsys.readouterr().out
    assert "shape (96, 96, 32)" in printed and "Phantom" not in printed
    with pytest.raises(SystemExit) as stop:  # the CLI prints the file and the problem, no traceback
        main(["dicom2nifti", str(folder), str(out)])
    assert stop.value.code == 2
    assert "already exists" in capsys.readouterr().err
