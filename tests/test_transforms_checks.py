"""Bad input gives an InputError naming the file and the problem (pipeline checks and loading)."""

import gzip
import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from shared_transforms.checks import CheckImage, CheckImaged, SafeLoadImaged, input_error_from, set_input_modality
from shared_transforms.io import InputError, load_nifti, save_nifti

AFF = np.diag([-1.0, -1.0, 3.0, 1.0])
SHAPE = (10, 9, 4)


def _case(tmp_path, image=None, label=None, image_affine=AFF, label_affine=AFF, name="case"):
    img = np.full(SHAPE, 40, np.int16) if image is None else image
    lab = np.zeros(SHAPE, np.uint8) if label is None else label
    if label is None:
        lab[3:5, 3:5, 1:3] = 1
    ip, lp = tmp_path / f"{name}_img.nii.gz", tmp_path / f"{name}_lab.nii.gz"
    save_nifti(img, image_affine, ip)
    save_nifti(lab, label_affine, lp)
    return {"image": str(ip), "label": str(lp)}


def _fails(fn, data, pattern):
    """Run ``fn(data)`` (a transform or a MONAI Compose) and check the InputError behind the failure."""
    with pytest.raises(Exception) as info:
        fn(data)
    err = input_error_from(info.value)
    assert err is not None, f"no InputError behind {info.value!r}"
    assert re.search(pattern, str(err)), f"{pattern!r} not in {str(err)!r}"
    return err


def _pipeline(**kwargs):
    keys = ["image", "label"]
    return Compose([SafeLoadImaged(keys), EnsureChannelFirstd(keys), CheckImaged("image", "label", **kwargs)])


def test_good_case_passes_unchanged(tmp_path):
    out = _pipeline()(_case(tmp_path))
    assert tuple(out["image"].shape) == (1,) + SHAPE and int(out["label"].sum()) == 8
    # the check also works before EnsureChannelFirstd and on plain arrays
    loaded = LoadImaged(["image", "label"])(_case(tmp_path, name="b"))
    assert CheckImaged()(loaded)["image"] is loaded["image"]
    arr = np.zeros((1,) + SHAPE, np.float32)
    assert CheckImage()(arr) is arr


def test_nan_voxels(tmp_path):
    img = np.zeros(SHAPE, np.float32)
    img[2, 3, 1] = np.nan
    img[4, 4, 2] = np.inf
    data = _case(tmp_path, image=img)
    _fails(_pipeline(), data, r"case_img\.nii\.gz: image has 2 NaN/inf voxel\(s\), first at index \(0, 2, 3, 1\)")
    assert _pipeline(allow_nan=True)(data)["image"].isnan().sum() == 1


def test_2d_and_4d_images(tmp_path):
    two = tmp_path / "slice.nii.gz"
    save_nifti(np.zeros((10, 9), np.int16), AFF, two)
    pipe = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image"), CheckImaged("image", None)])
    _fails(pipe, {"image": str(two)}, r"slice\.nii\.gz: image is 2D \(spatial shape \(10, 9\)\); a 3D volume is expected")
    four = tmp_path / "series.nii.gz"
    save_nifti(np.zeros(SHAPE + (2,), np.int16), AFF, four)
    _fails(pipe, {"image": str(four)}, r"series\.nii\.gz: image holds 2 volumes \(4D data")
    # also caught without EnsureChannelFirstd (channel-last as loaded)
    with pytest.raises(InputError, match="holds 2 volumes"):
        CheckImaged("image", None)(LoadImaged("image")({"image": str(four)}))
    # a trailing singleton 4th axis is a 3D volume
    single = tmp_path / "single.nii.gz"
    save_nifti(np.zeros(SHAPE + (1,), np.int16), AFF, single)
    assert tuple(pipe({"image": str(single)})["image"].shape) == (1,) + SHAPE
    # plain arrays: dimensionality from the shape
    _fails(CheckImage(name="scan"), np.zeros((4, 4)), r"scan: image is 2D")


def test_stacked_mri_channels(tmp_path):
    paths = []
    for seq in ("t1", "t2", "cet1"):
        p = tmp_path / f"mri_{seq}.nii.gz"
        save_nifti(np.ones(SHAPE, np.float32), AFF, p)
        paths.append(str(p))
    loaded = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image")])({"image": paths})
    assert tuple(loaded["image"].shape) == (3,) + SHAPE
    assert CheckImaged("image", None, channels=3)(loaded)["image"].shape[0] == 3
    with pytest.raises(InputError, match="image holds 3 volumes"):
        CheckImaged("image", None)(loaded)  # default: one CT volume expected
    _fails(CheckImaged("image", None, channels=2), loaded, "has 3 channels .* 2 are expected")


def test_non_binary_label(tmp_path):
    lab = np.zeros(SHAPE, np.uint8)
    lab[1, 1, 1] = 2
    lab[2, 2, 2] = 1
    _fails(_pipeline(), _case(tmp_path, label=lab), r"case_lab\.nii\.gz: label must be binary \(0/1\) but contains 2")
    nan_lab = MetaTensor(torch.tensor([[[[0.0, float("nan")]]]]), meta={"filename_or_obj": "x_lab.nii.gz"})
    _fails(CheckImage(label=True), nan_lab, r"x_lab\.nii\.gz: label has 1 NaN")


def test_label_grid_mismatch(tmp_path):
    small = np.zeros((10, 9, 3), np.uint8)
    _fails(
        _pipeline(),
        _case(tmp_path, label=small),
        r"case_lab\.nii\.gz: label grid shape \(10, 9, 3\) does not match image .*case_img\.nii\.gz shape \(10, 9, 4\)",
    )
    shifted = AFF.copy()
    shifted[0, 3] = 5.0
    _fails(_pipeline(), _case(tmp_path, label_affine=shifted), r"case_lab\.nii\.gz: affine differs from .*case_img\.nii\.gz by up to 5")
    # switched off on request
    assert _pipeline(check_grid=False)(_case(tmp_path, label_affine=shifted))["label"].sum() == 8


def _truncated(tmp_path):
    good = tmp_path / "good.nii.gz"
    save_nifti(np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.int16), AFF, good)
    raw = gzip.decompress(good.read_bytes())
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # header intact, half of the voxels missing
    cut = tmp_path / "cut.nii.gz"
    blob = good.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])  # gzip stream cut in the middle
    return bad, cut


def test_corrupt_file_through_io_and_monai(tmp_path):
    bad, cut = _truncated(tmp_path)
    for path in (bad, cut):
        with pytest.raises(InputError, match=rf"{path.name}: cannot be read as NIfTI"):
            load_nifti(path)
        # plain MONAI fails with its reader's own exception
        with pytest.raises(Exception) as info:
            LoadImaged("image")({"image": str(path)})
        assert not isinstance(info.value, InputError)
        # the safe loader names the file and says what is wrong
        pipe = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image")])
        _fails(pipe, {"image": str(path)}, rf"{path.name}: cannot be read as NIfTI .*\(truncated or corrupt file\?\)")


def test_missing_file_and_not_an_image(tmp_path):
    _fails(SafeLoadImaged("image"), {"image": str(tmp_path / "nothere.nii.gz")}, r"nothere\.nii\.gz: file does not exist")
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    _fails(SafeLoadImaged("image"), {"image": str(txt)}, r"notes\.txt: cannot be loaded")
    # inference data without a label
    case = _case(tmp_path)
    out = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image"), CheckImaged("image", "label", allow_missing_keys=True)])(
        {"image": case["image"]}
    )
    assert "label" not in out


def _ct(shape=SHAPE):
    """A CT-like volume in HU: air around a water-like body."""
    img = np.full(shape, -1000, np.int16)
    img[2:-2, 2:-2, :] = 40
    return img


def test_ct_intensities_and_the_modality_switch(tmp_path):
    """A 0..1 float or MR-like image went through the CT bundles (one prediction marked 29 % of the volume)."""
    ct = _case(tmp_path, image=_ct(), name="ct")
    assert _pipeline(modality="CT")(ct)["image"].min() == -1000
    norm = _case(tmp_path, image=(_ct().astype(np.float32) + 1000) / 1040, name="norm")
    _fails(_pipeline(modality="CT"), norm,
           r"norm_img\.nii\.gz: intensities do not look like a CT in Hounsfield units \(0\.5th-99\.5th percentile 0 to 1; .*"
           r"--input_modality MR")
    mr = _case(tmp_path, image=np.random.default_rng(0).uniform(0, 800, SHAPE).astype(np.float32), name="mr")
    _fails(_pipeline(modality="CT"), mr, "intensities do not look like a CT")
    assert _pipeline(modality="MR")(mr)["image"].shape[0] == 1  # deliberate MR input
    assert _pipeline()(mr)["image"].shape[0] == 1  # no intensity check unless asked for
    # the switch on a pre-processing built elsewhere (HCF's scripts.data.volume_transforms)
    pipe = set_input_modality(_pipeline(), "CT")
    _fails(pipe, norm, "intensities do not look like a CT")
    assert set_input_modality(pipe, "any")(norm)["image"].max() == 1
    with pytest.raises(ValueError, match="modality must be one of"):
        CheckImaged(modality="PET")


def test_geometry_checks_of_the_pipeline(tmp_path):
    """Zero, non-finite and implausible spacings and singular affines are refused as in the CLI."""
    import struct

    import nibabel as nib

    zero = tmp_path / "zero_img.nii"
    img = nib.Nifti1Image(_ct(), AFF)
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, str(zero))
    raw = bytearray(zero.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    zero.write_bytes(bytes(raw))
    _fails(Compose([SafeLoadImaged("image")]), {"image": str(zero)}, r"zero_img\.nii: header voxel size \(pixdim\) is 0 x 0 x 0 mm")
    far = _case(tmp_path, image=_ct(), image_affine=np.diag([50.0, 50.0, 50.0, 1.0]), label_affine=np.diag([50.0, 50.0, 50.0, 1.0]), name="far")
    _fails(_pipeline(), far, r"far_img\.nii\.gz: implausible voxel spacing 50 x 50 x 50 mm")
    singular = np.diag([1.0, 1.0, 1e-9, 1.0])
    sing = tmp_path / "sing_img.nii.gz"
    img = nib.Nifti1Image(_ct(), singular)
    img.set_qform(None, code=0)
    img.set_sform(singular, code=1)
    nib.save(img, str(sing))
    pipe = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image"), CheckImaged("image", None)])
    _fails(pipe, {"image": str(sing)}, r"sing_img\.nii\.gz: has a singular affine")
    assert CheckImaged("image", None, spacing_range=None)(LoadImaged("image")({"image": far["image"]}))


def test_resampling_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    """A 50 mm spacing made inference try to allocate 65 GB (traceback in the middle of the resampling)."""
    import shared_transforms.spatial as spatial

    loaded = Compose([SafeLoadImaged("image"), EnsureChannelFirstd("image")])(_case(tmp_path, image=_ct(), name="big"))
    monkeypatch.setattr(spatial, "available_memory", lambda device=None: 2**20)  # 1 MiB free
    with pytest.raises(InputError, match=r"big_img\.nii\.gz: resampling from 1 x 1 x 3 mm to 0\.1 x 0\.1 x 0\.1 mm gives a "
                                         r"100 x 90 x 120 volume needing about 20\.6 MiB, but only 1\.0 MiB of memory are available \(is the input spacing right\?\)"):
        spatial.ResampleToSpacing(pixdim=(0.1, 0.1, 0.1))(loaded["image"])
    monkeypatch.setattr(spatial, "available_memory", lambda device=None: 2**34)
    assert tuple(spatial.ResampleToSpacing(pixdim=(2.0, 2.0, 3.0))(loaded["image"]).shape) == (1, 6, 5, 4)
