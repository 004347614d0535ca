"""The shared transforms on small phantoms: ground-truth asymmetry and a full invertible pipeline."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd

from npc_gtv.phantoms import make_phantom
from shared_transforms.checks import CheckImaged, SafeLoadImaged
from shared_transforms.flip import LRFlipPaird, asymmetric_mask, flip_lr, lr_axis
from shared_transforms.intensity import HUWindowd
from shared_transforms.io import save_nifti
from shared_transforms.postprocess import LargestComponentd
from shared_transforms.spatial import BodyCropd, ResampleToSpacingd


@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_fraction_matches_phantom_ground_truth(seed):
    # with the identity pose the mid-sagittal plane is the grid's central sagittal plane
    p = make_phantom(seed, size="small", pose="identity")
    assert lr_axis(p.affine) == 0 and p.affine[0, 0] < 0  # LPS-like phantom grid
    m = asymmetric_mask(p.label, flip_lr(p.label, p.affine))
    assert m.sum() / p.label.sum() == pytest.approx(p.info["asymmetric_fraction"], abs=1e-3)


def test_healthy_phantom_is_mirror_symmetric_only_when_straight():
    healthy = make_phantom(5, size="small", pose="identity", tumour=False)
    straight = healthy.image.astype(np.float32)
    posed = make_phantom(5, size="small", pose={"yaw_deg": 8.0, "translation_mm": [15.0, 0.0, 0.0]}, tumour=False)
    diff_straight = np.abs(straight - flip_lr(straight, healthy.affine)).mean()
    diff_posed = np.abs(posed.image.astype(np.float32) - flip_lr(posed.image.astype(np.float32), posed.affine)).mean()
    # two independent noise fields (sd 12 HU): mean |difference| = 2 * 12 / sqrt(pi) = 13.5 HU
    assert diff_straight < 16.0
    assert diff_posed > 5 * diff_straight


def test_full_pipeline_on_phantom_inverts_to_the_exact_grid(tmp_path):
    p = make_phantom(2, size="small")
    save_nifti(p.image, p.affine, tmp_path / "ct.nii.gz")
    save_nifti(p.label, p.affine, tmp_path / "gtv.nii.gz")
    keys = ["image", "label"]
    pre = Compose(
        [
            SafeLoadImaged(keys),
            EnsureChannelFirstd(keys),
            CheckImaged("image", "label"),
            ResampleToSpacingd(keys),
            BodyCropd(keys, margin=2),
            HUWindowd("image"),
            LRFlipPaird(keys),
        ]
    )
    out = pre({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "gtv.nii.gz")})
    img = out["image"]
    np.testing.assert_allclose(img.pixdim.numpy(), [1.0, 1.0, 3.0], atol=1e-6)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and img.meta["hu_window"] == [-150.0, 500.0]
    assert img.shape[1] < round(96 * 2.4) and img.shape[2] < round(96 * 2.4)  # the air around the head is cropped
    assert set(out) >= {"image_flipped", "label_flipped", "asym_mask"}
    assert 0 < float(out["asym_mask"].sum()) <= float(out["label"].sum())
    # a prediction made on the preprocessed grid returns to the input grid: 2.4 mm -> 1 mm nearest and
    # back hits every original voxel centre again, so the label comes back voxel-exact
    out["pred"] = LargestComponentd("pred")({"pred": out["label"].clone()})["pred"]
    # inverted with the label's trace (training) or the image's trace (inference: no label), same result
    for orig in ("label", "image"):
        inv = Invertd("pred", pre, orig_keys=orig, nearest_interp=True)(dict(out, pred=out["pred"].clone()))
        assert tuple(inv["pred"].shape) == (1,) + p.label.shape
        np.testing.assert_allclose(inv["pred"].affine.numpy(), p.affine, atol=1e-5)
        np.testing.assert_array_equal(inv["pred"].numpy()[0].astype(np.uint8), p.label)
        assert isinstance(inv["pred"], torch.Tensor)
