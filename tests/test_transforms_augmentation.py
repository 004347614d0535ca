"""nnU-Net's training augmentation from MONAI transforms (shared_transforms.augmentation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared_transforms.augmentation import (
    NNUNetAugmentd,
    RandNNUNetSpatial,
    RandNNUNetSpatiald,
    augmented_crop_size,
    coarse_axis_of,
    initial_patch_size,
    nnunet_rotation,
)

LPS = np.diag([-0.9, -0.9, 3.0, 1.0])


@pytest.mark.parametrize(
    "patch, coarse, expected",
    [
        # nnU-Net 2.8.1's get_patch_size in its axis order (coarse first): (56, 192, 192) -> (56, 225, 225) in
        # dummy-2D mode; (32, 48, 48) -> (60, 77, 67) and (32, 96, 96) -> (89, 154, 116) with +-30 degrees
        ([192, 192, 56], 2, [225, 225, 56]),
        ([48, 48, 32], 2, [77, 67, 60]),
        ([96, 96, 32], 2, [154, 116, 89]),
        ([192, 56, 192], 1, [225, 56, 225]),
    ],
)
def test_initial_patch_size_is_nnunets(patch, coarse, expected):
    assert initial_patch_size(patch, coarse) == expected


def test_initial_patch_size_against_nnunet_when_installed():
    mod = pytest.importorskip("nnunetv2.training.data_augmentation.compute_initial_patch_size")
    for patch in ([20, 64, 80], [40, 40, 40], [24, 128, 112]):
        dummy, angle = nnunet_rotation(patch, 0)
        ref = mod.get_patch_size(patch, (-angle, angle), (-angle, angle), (-angle, angle), (0.85, 1.25))
        if dummy:
            ref[0] = patch[0]
        assert initial_patch_size(patch, 0) == [int(v) for v in ref], patch


def test_rotation_setting_and_crop_size():
    assert nnunet_rotation([192, 192, 56], 2) == (True, np.pi)  # 192 / 56 > 3: in-plane only, +-180 degrees
    assert nnunet_rotation([48, 48, 32], 2) == (False, np.pi / 6)
    assert coarse_axis_of([1.0, 1.0, 3.0]) == 2 and coarse_axis_of([3.0, 0.8, 0.8]) == 0
    assert augmented_crop_size([48, 48, 32], [2.4, 2.4, 3.0], "none") == [48, 48, 32]
    assert augmented_crop_size([48, 48, 32], [2.4, 2.4, 3.0], "nnunet") == [77, 67, 60]
    with pytest.raises(ValueError, match="augmentation must be"):
        augmented_crop_size([48, 48, 32], [1, 1, 1], "strong")
    with pytest.raises(ValueError, match="patch_size"):
        initial_patch_size([48, 48], 2)


def test_no_draw_is_the_exact_central_patch():
    x = torch.randn(2, 15, 12, 9)
    sp = RandNNUNetSpatial([8, 6, 5], 2, p_rotation=0.0, p_scaling=0.0)
    assert torch.equal(sp(x), x[:, 3:11, 3:9, 2:7])
    with pytest.raises(ValueError, match="smaller than the patch"):
        sp(torch.zeros(1, 7, 12, 9))


def test_quarter_turn_about_the_coarse_axis_is_rot90():
    x = torch.randn(1, 11, 11, 5)
    sp = RandNNUNetSpatial([7, 7, 5], 2, p_rotation=1.0, p_scaling=0.0)
    sp.randomize()
    sp.angles = [0.0, 0.0, np.pi / 2]
    y = sp(x, randomize=False)
    centre = x[:, 2:9, 2:9, :]
    turns = [torch.rot90(centre, k, dims=(1, 2)) for k in (1, -1)]
    err = min(float((y - t).abs().max()) for t in turns)
    assert err < 1e-4, err


def test_dummy_2d_draws_keep_the_coarse_axis():
    """In dummy-2D mode rotation is about the coarse axis and the scale leaves it at 1; in 3-D mode all angles vary."""
    sp = RandNNUNetSpatial([64, 64, 16], 2, p_rotation=1.0, p_scaling=1.0)
    sp.set_random_state(0)
    for _ in range(20):
        sp.randomize()
        assert sp.angles[0] == sp.angles[1] == 0.0 and -np.pi <= sp.angles[2] <= np.pi
        assert sp.scales[2] == 1.0 and sp.scales[0] == sp.scales[1] and 0.7 <= sp.scales[0] <= 1.4
    # a volume that varies only along the coarse axis is unchanged by in-plane rotation and scaling (interior)
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16).expand(1, 90, 90, 16).clone()
    y = sp(x)
    assert torch.allclose(y[0, 20:44, 20:44], x[0, :24, :24], atol=1e-4)
    sp3 = RandNNUNetSpatial([48, 48, 32], 2, p_rotation=1.0, p_scaling=1.0)
    sp3.set_random_state(1)
    sp3.randomize()
    assert all(a != 0.0 and abs(a) <= np.pi / 6 for a in sp3.angles) and len(set(sp3.scales)) == 1


def test_draw_frequencies_follow_nnunet():
    sp = RandNNUNetSpatial([48, 48, 32], 2)
    sp.set_random_state(3)
    rot = scl = 0
    for _ in range(4000):
        sp.randomize()
        rot += sp.angles is not None
        scl += sp.scales is not None
    assert abs(rot / 4000 - 0.2) < 0.03 and abs(scl / 4000 - 0.2) < 0.03


def test_same_draw_keeps_mirror_pairs_voxel_by_voxel():
    """Voxel v of the augmented image and of its augmented mirror still show mirrored anatomy: the image holds
    each voxel's own index, the mirror the index of its mirrored voxel, both interpolated by nearest neighbour."""
    from shared_transforms.flip import LRFlipPaird

    shape = (30, 26, 12)
    idx = torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape)
    d = LRFlipPaird(["image"], label_key=None)({"image": MetaTensor(idx, affine=torch.as_tensor(LPS))})
    t = RandNNUNetSpatiald(["image", "image_flipped"], [16, 16, 8], coarse_axis=2, p_rotation=1.0, p_scaling=1.0, mode="nearest")
    t.set_random_state(7)
    for _ in range(5):
        out = t({k: d[k][:, 2:28, :, :] for k in ("image", "image_flipped")})  # an off-centre box
        a = out["image"][0].as_tensor().long().flatten()
        b = out["image_flipped"][0].as_tensor().long().flatten()
        inside = (a > 0) & (b > 0)  # zero padding where the rotation left the crop
        assert inside.float().mean() > 0.5
        x, rest = a[inside] // (shape[1] * shape[2]), a[inside] % (shape[1] * shape[2])
        mirror = (shape[0] - 1 - x) * (shape[1] * shape[2]) + rest
        assert torch.equal(b[inside], mirror)


def _pair(rng):
    img = MetaTensor(torch.as_tensor(rng.normal(size=(1, 77, 67, 60)), dtype=torch.float32), affine=torch.as_tensor(LPS))
    lab = MetaTensor(torch.zeros(1, 77, 67, 60), affine=torch.as_tensor(LPS))
    lab[:, 30:45, 25:40, 25:35] = 1
    return {"image": img, "label": lab, "image_flipped": img.clone(), "label_flipped": lab.clone(), "asym_mask": lab.clone()}


def test_augmentation_applies_one_draw_to_every_key_and_keeps_labels_binary():
    keys = ["image", "label", "image_flipped", "label_flipped", "asym_mask"]
    aug = NNUNetAugmentd(keys, ["image", "image_flipped"], [48, 48, 32], [2.4, 2.4, 3.0])
    aug.set_random_state(0)
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(12):
        d = _pair(rng)
        ref = d["image"][:, 14:62, 9:57, 14:46].clone()
        out = aug(d)
        for k in keys:
            assert tuple(out[k].shape) == (1, 48, 48, 32), k
        assert torch.equal(out["image"].as_tensor(), out["image_flipped"].as_tensor())
        for k in ("label", "label_flipped", "asym_mask"):
            assert set(torch.unique(out[k]).tolist()) <= {0.0, 1.0}
            assert torch.equal(out[k].as_tensor(), out["label"].as_tensor())
        changed += not torch.allclose(out["image"].as_tensor(), ref.as_tensor())
    assert changed >= 6  # most samples get at least one of the (mostly independent) augmentations
    with pytest.raises(ValueError, match="image_keys"):
        NNUNetAugmentd(["image"], ["ct"], [8, 8, 8], [1, 1, 1])
