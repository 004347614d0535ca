"""Bad input gives an InputError naming the file and the problem (pipeline checks and loading)."""

import gzip
import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from shared_transforms.checks import CheckImage, CheckImaged, SafeLoadImaged, input_error_from
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
