"""Unit tests of the SATS bundle scripts: network size, projection head, margin loss, sampling, trainer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from conftest import BUNDLES_DIR, bundle_scripts

LPS = np.diag([-0.9, -0.9, 3.0, 1.0])  # DICOM-like: LR is array axis 0
PERMUTED = np.array([[0, 0, -1.0, 0], [-0.9, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # LR is array axis 2


@pytest.fixture(scope="module")
def net_mod():
    return bundle_scripts("sats_npc", "network")


@pytest.fixture(scope="module")
def loss_mod():
    return bundle_scripts("sats_npc", "losses")


@pytest.fixture(scope="module")
def samp_mod():
    return bundle_scripts("sats_npc", "sampling")


def test_default_network_is_nnunet_plain_unet_with_the_papers_count(net_mod):
    net = net_mod.SATSUNet()  # the default configuration = configs/train.yaml network_def
    # nnU-Net's PlainConvUNet for a 56x192x192 patch at 3 mm slices, 2 classes, deep-supervision heads
    assert net_mod.count_parameters(net) == 30_703_498
    assert net.feature_channels == 32 and len(net.output_layers) == 5
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert all(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    # only the U-Net module of dynamic-network-architectures is imported: no timm, no torchvision
    # (in a fresh process: other tests of this worker may import them)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import scripts.network as n; n.SATSUNet(); "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(BUNDLES_DIR / "sats_npc")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_residual_option_keeps_its_count(net_mod):
    # the papers' text reading (residual blocks), five down-samplings, two output classes
    assert net_mod.count_parameters(net_mod.SATSNet()) == 30_972_257 + 33
    # four down-samplings (configs/backbone_residual4.yaml)
    four = net_mod.SATSNet(kernel_size=[[3, 3, 1]] + [[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 1]] + [[2, 2, 2]] * 3,
                           upsample_kernel_size=[[2, 2, 1]] + [[2, 2, 2]] * 3, filters=[32, 64, 128, 256, 320])
    assert net_mod.count_parameters(four) == 16_636_290


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_plain_unet_forward_one_tensor_and_deep_supervision_features(net_mod, deep_supervision):
    torch.manual_seed(0)
    net = net_mod.SATSUNet(features=[4, 8, 16], kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3]],
                           strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]], deep_supervision=deep_supervision)
    x = torch.randn(2, 1, 16, 16, 8)
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 16, 16, 8)
    logits, feats = net.forward_features(x)
    assert feats.shape == (2, 4, 16, 16, 8)
    assert torch.allclose(logits[0], out)
    assert [tuple(o.shape[2:]) for o in logits] == ([(16, 16, 8), (8, 8, 8)] if deep_supervision else [(16, 16, 8)])
    with pytest.raises(ValueError, match="per stage"):
        net_mod.SATSUNet(features=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1]] * 3)


def test_residual_network_forward_one_tensor_and_features(net_mod):
    torch.manual_seed(0)
    net = net_mod.SATSNet(kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16])
    x = torch.randn(2, 1, 16, 16, 8)
    out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 16, 16, 8)
    logits, feats = net.forward_features(x)
    assert feats.shape == (2, 4, 16, 16, 8)
    assert len(logits) == 1 and torch.allclose(logits[0], out)
    with pytest.raises(ValueError, match="levels"):
        net_mod.SATSNet(kernel_size=[3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16])


def test_projection_head_shape_unit_norm_and_params(net_mod):
    torch.manual_seed(0)
    head = net_mod.ProjectionHead(in_channels=32, channels=16)
    # three 1x1x1 convs: 32*16+16, 16*16+16, 16*16+16
    assert net_mod.count_parameters(head) == (32 * 16 + 16) + 2 * (16 * 16 + 16)
    relus = [m for m in head.layers if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 2 and isinstance(head.layers[-1], torch.nn.Conv3d)
    e = head(torch.randn(2, 32, 6, 5, 4))
    assert e.shape == (2, 16, 6, 5, 4)
    np.testing.assert_allclose(e.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_siamese_shares_weights_and_splits_outputs(net_mod):
    torch.manual_seed(0)
    bb = net_mod.SATSNet(kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16])
    sia = net_mod.SATSSiamese(bb, net_mod.ProjectionHead(4, 16))
    x = torch.randn(1, 1, 16, 16, 8)
    xf = torch.flip(x, dims=(2,))
    lo, lof, e, ef = sia(x, xf)
    assert torch.allclose(lo[0], bb(x), atol=1e-5) and torch.allclose(lof[0], bb(xf), atol=1e-5)
    assert e.shape == (1, 16, 16, 16, 8)
    _, _, e2, _ = net_mod.SATSSiamese(bb, None, embed="features")(x, xf)
    assert e2.shape == (1, 4, 16, 16, 8)
    np.testing.assert_allclose(e2.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    assert net_mod.SATSSiamese(bb, None, embed="none")(x, xf)[2] is None
    with pytest.raises(ValueError):
        net_mod.SATSSiamese(bb, None, embed="head")


def _features():
    """Hand-made 2-channel features on a 1x1x2x1x1 grid: voxel 0 has d2 = 0, voxel 1 has d2 = 4."""
    e = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)  # voxel0=(1,0), voxel1=(1,0)
    ef = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)  # voxel0=(1,0), voxel1=(-1,0)
    return e, ef


def test_margin_loss_hand_values_intent(loss_mod):
    e, ef = _features()  # d2 = [0, 4]
    m_none = torch.zeros(1, 1, 2, 1, 1)
    m_v1 = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1, 1)
    m_v0 = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    ml = loss_mod.MarginLoss(margin=20.0)
    # all m=0: pull only, mean of d2 = (0 + 4) / 2
    assert ml(e, ef, m_none).item() == pytest.approx(2.0)
    # voxel 1 asymmetric (d2 = 4): push = 20 - 4 = 16; voxel 0 pull = 0 -> balanced 0 + 16
    assert ml(e, ef, m_v1).item() == pytest.approx(16.0)
    # voxel 0 asymmetric (d2 = 0): push = 20; voxel 1 pull = 4
    assert ml(e, ef, m_v0).item() == pytest.approx(24.0)
    # a true hinge (t = 3): d2 = 4 >= t -> push 0
    assert loss_mod.MarginLoss(margin=3.0)(e, ef, m_v1).item() == pytest.approx(0.0)
    # reductions: mean = (0 + 16) / 2 voxels, sum = 16
    assert loss_mod.MarginLoss(20.0, reduction="mean")(e, ef, m_v1).item() == pytest.approx(8.0)
    assert loss_mod.MarginLoss(20.0, reduction="sum")(e, ef, m_v0).item() == pytest.approx(24.0)


def test_margin_loss_printed_form_swaps_terms(loss_mod):
    e, ef = _features()
    m_v1 = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1, 1)
    # printed eq.: pull where m=1 (voxel 1: d2 = 4), push where m!=1 (voxel 0: 20 - 0)
    assert loss_mod.MarginLoss(20.0, form="printed")(e, ef, m_v1).item() == pytest.approx(24.0)
    with pytest.raises(ValueError):
        loss_mod.MarginLoss(form="eq1")
    with pytest.raises(ValueError):
        loss_mod.MarginLoss(reduction="max")


def test_margin_loss_gradient_pushes_asymmetric_apart(loss_mod):
    e, ef = _features()
    e = e.clone().requires_grad_(True)
    m = torch.tensor([0.0, 1.0]).reshape(1, 1, 2, 1, 1)
    loss_mod.MarginLoss(20.0)(e, ef, m).backward()
    # push term at voxel 1: d(20 - d2)/dE = -2 (E - E') = -2 * (2, 0)
    np.testing.assert_allclose(e.grad[0, :, 1, 0, 0].numpy(), [-4.0, 0.0])
    np.testing.assert_allclose(e.grad[0, :, 0, 0, 0].numpy(), [0.0, 0.0])


def _soft_dice_ce(logits, label):
    """Independent nnU-Net-style reference: batch soft Dice of the foreground class + softmax CE."""
    p = torch.softmax(logits, 1)[:, 1]
    y = label[:, 0]
    dice = 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0].long())
    return dice, ce


def test_total_loss_is_dice_ce_plus_beta_margin(loss_mod):
    torch.manual_seed(0)
    lo, lof = torch.randn(2, 2, 4, 4, 2), torch.randn(2, 2, 4, 4, 2)
    s = (torch.rand(2, 1, 4, 4, 2) > 0.7).float()
    sf = torch.flip(s, dims=(2,))
    e = torch.nn.functional.normalize(torch.randn(2, 16, 4, 4, 2), dim=1)
    ef = torch.nn.functional.normalize(torch.randn(2, 16, 4, 4, 2), dim=1)
    m = ((s > 0) & (sf == 0)).float()
    loss = loss_mod.SATSLoss(beta=1.0)
    out = loss(lo, lof, s, sf, e, ef, m)
    (d1, c1), (d2, c2) = _soft_dice_ce(lo, s), _soft_dice_ce(lof, sf)
    dice, ce = 0.5 * (d1 + d2), 0.5 * (c1 + c2)
    margin = loss_mod.MarginLoss(20.0)(e, ef, m)
    assert out["loss"].item() == pytest.approx((dice + ce + margin).item(), rel=1e-5)
    # the terms are returned and recorded for the stats handlers
    assert out["dice"].item() == pytest.approx(dice.item(), rel=1e-5) and out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.terms == pytest.approx({"dice": dice.item(), "ce": ce.item(), "margin": margin.item()}, rel=1e-5)
    out0 = loss_mod.SATSLoss(beta=1.0)(lo, lof, s, sf)  # stage 1: no embeddings
    assert out0["loss"].item() == pytest.approx((dice + ce).item(), rel=1e-5) and out0["margin"].item() == 0.0


def test_deep_supervision_weights_and_downsampled_targets(loss_mod):
    w = loss_mod.deep_supervision_weights(5)
    # nnU-Net: 1/2^i, the lowest resolution 0, normalised
    np.testing.assert_allclose(w, np.array([1, 0.5, 0.25, 0.125, 0]) / 1.875)
    assert loss_mod.deep_supervision_weights(3, "none") == [1.0, 0.0, 0.0]
    torch.manual_seed(0)
    full, half = torch.randn(1, 2, 8, 8, 4), torch.randn(1, 2, 4, 4, 4)
    s = torch.zeros(1, 1, 8, 8, 4)
    s[0, 0, 2:6, 2:6, 1:3] = 1
    out = loss_mod.SATSLoss(beta=0.0)([full, half], [full, half], s, s)
    # two outputs: weights [1, 0] (the lowest one is 0): only the full-resolution output counts
    d, c = _soft_dice_ce(full, s)
    assert out["loss"].item() == pytest.approx((d + c).item(), rel=1e-5)
    quarter = torch.randn(1, 2, 2, 2, 4)
    out3 = loss_mod.SATSLoss(beta=0.0)([full, half, quarter], [full, half, quarter], s, s)
    d2, c2 = _soft_dice_ce(half, torch.nn.functional.interpolate(s, size=(4, 4, 4), mode="nearest-exact"))
    assert out3["loss"].item() == pytest.approx(((d + c) * 2 / 3 + (d2 + c2) / 3).item(), rel=1e-5)


@pytest.mark.parametrize("affine", [LPS, PERMUTED])
@pytest.mark.parametrize("lr_size", [20, 21])
def test_mirror_consistent_patch(samp_mod, affine, lr_size):
    from shared_transforms.flip import LRFlipPaird, flip_lr, lr_axis

    rng = np.random.default_rng(0)
    lr = lr_axis(affine)
    shape = [14, 12, 10]
    shape[lr] = lr_size
    vol = MetaTensor(torch.as_tensor(rng.normal(size=(1, *shape)), dtype=torch.float32), affine=torch.as_tensor(affine))
    lab = MetaTensor((torch.rand(1, *shape, generator=torch.Generator().manual_seed(1)) > 0.9).float(), affine=torch.as_tensor(affine))
    d = LRFlipPaird(["image", "label"])({"image": vol, "label": lab})
    roi = [8, 6, 4]
    roi[lr] = 10
    crop = samp_mod.MirrorConsistentCropd(["image", "label", "image_flipped", "label_flipped", "asym_mask"], roi, num_samples=5, lr_jitter=0)
    crop.set_random_state(3)
    starts = set()
    for p in crop(d):
        box = [(int(s.start), int(s.stop)) for s in samp_mod.mirror_consistent_box(shape, roi, lr, [0, 0, 0])]
        # find this patch's box: search the start indices that reproduce it
        found = None
        for a0 in range(shape[0] - roi[0] + 1):
            for a1 in range(shape[1] - roi[1] + 1):
                for a2 in range(shape[2] - roi[2] + 1):
                    if torch.equal(vol[0, a0:a0 + roi[0], a1:a1 + roi[1], a2:a2 + roi[2]], p["image"][0].as_tensor()):
                        found = (a0, a1, a2)
        assert found is not None
        a = found[lr]
        assert a == (lr_size - roi[lr]) // 2 == box[lr][0]  # LR centred on the grid centre
        starts.add(tuple(found[i] for i in range(3) if i != lr))
        # flip(patch) == crop of the flipped volume at the mirrored place a' = n - a - p
        mirrored = [slice(f, f + r) for f, r in zip(found, roi)]
        mirrored[lr] = slice(lr_size - a - roi[lr], lr_size - a)
        flipped_volume = flip_lr(vol)
        assert torch.equal(flip_lr(p["image"]).as_tensor(), flipped_volume[(slice(None), *mirrored)].as_tensor())
        if (lr_size - roi[lr]) % 2 == 0:  # exact: the mirrored place is the patch's own place
            assert torch.equal(p["image_flipped"].as_tensor(), flip_lr(p["image"]).as_tensor())
            assert torch.equal(p["label_flipped"].as_tensor(), flip_lr(p["label"]).as_tensor())
        # asymmetric mask of the patch = s - (s AND s') of the patch's own pair
        s, sf = p["label"].as_tensor(), p["label_flipped"].as_tensor()
        assert torch.equal(p["asym_mask"].as_tensor(), ((s > 0) & ~(sf > 0)).float())
    assert len(starts) > 1  # random in the other two axes


def test_mirror_crop_anywhere_keeps_the_pairing(samp_mod):
    """lr_jitter=None (the default): the left-right position varies and voxel v of the mirrored patch is the
    mirror of voxel v of the patch."""
    from shared_transforms.flip import LRFlipPaird, flip_lr

    rng = np.random.default_rng(0)
    vol = MetaTensor(torch.as_tensor(rng.normal(size=(1, 30, 12, 10)), dtype=torch.float32), affine=torch.as_tensor(LPS))
    lab = MetaTensor((torch.rand(1, 30, 12, 10, generator=torch.Generator().manual_seed(1)) > 0.9).float(), affine=torch.as_tensor(LPS))
    d = LRFlipPaird(["image", "label"])({"image": vol, "label": lab})
    crop = samp_mod.MirrorConsistentCropd(["image", "label", "image_flipped", "label_flipped", "asym_mask"], [8, 6, 4], num_samples=12)
    crop.set_random_state(5)
    starts = set()
    flipped = flip_lr(vol)
    for p in crop(d):
        found = [(a0, a1, a2) for a0 in range(23) for a1 in range(7) for a2 in range(7)
                 if torch.equal(vol[0, a0:a0 + 8, a1:a1 + 6, a2:a2 + 4], p["image"][0].as_tensor())]
        assert len(found) == 1
        a = found[0]
        starts.add(a[0])
        # I'[a + v] = I[n - 1 - a - v]: the flipped volume cropped with the same box
        assert torch.equal(p["image_flipped"].as_tensor(), flipped[:, a[0]:a[0] + 8, a[1]:a[1] + 6, a[2]:a[2] + 4].as_tensor())
    assert len(starts) > 2


def test_mirror_crop_rejects_small_volume(samp_mod):
    with pytest.raises(ValueError, match="larger than the volume"):
        samp_mod.mirror_consistent_box([10, 10, 4], [8, 8, 8], 0, [0, 0, 0])


def _train_parser(tmp_path, align: bool, override: str = "quick.yaml", **updates):
    """train.yaml + ``override`` parsed (this bundle's ``scripts`` on sys.path for the _target_s)."""
    from monai.bundle import ConfigParser

    bundle_scripts("sats_npc")
    cfg = BUNDLES_DIR / "sats_npc" / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / "train.yaml"), str(cfg / override)])
    # the HU window keeps these tests free of a fingerprint file
    parser.update({"symmetric_align": align, "dataset_dir": str(tmp_path), "normalization": "window", **updates})
    return parser


def _train_pipeline(parser, random: bool = False):
    """The training pre-processing of a parsed train config: deterministic part, and the random part if asked."""
    from monai.transforms import Compose

    parts = ["common_transforms", "train#deterministic_transforms"] + (["train#random_transforms"] if random else [])
    return Compose([t for part in parts for t in parser.get_parsed_content(part)])


def _phantom_item(tmp_path, ph) -> dict:
    from shared_transforms.io import save_nifti

    save_nifti(ph.image, ph.affine, tmp_path / "ct.nii.gz")
    save_nifti(ph.label, ph.affine, tmp_path / "gt.nii.gz")
    return {"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "gt.nii.gz")}


def test_train_patches_with_nnunet_augmentation(tmp_path):
    """train.yaml's default augmentation (nnU-Net's) on the quick size: the sampler crops nnU-Net's larger initial
    patch, the augmentation returns every key at patch_size, and the labels stay binary; demo.yaml
    turns it off (the crop is then the patch)."""
    from npc_gtv.phantoms import make_phantom

    item = _phantom_item(tmp_path, make_phantom(4, size="small"))
    for override, crop in (("quick.yaml", [75, 75, 16]), ("demo.yaml", [48, 48, 32])):
        parser = _train_parser(tmp_path, False, override, num_samples=3)
        assert parser.get_parsed_content("crop_size") == crop  # quick: 64 / 16 > 3, nnU-Net's in-plane (dummy 2D) mode
        pipeline = _train_pipeline(parser, random=True)
        pipeline.set_random_state(0)
        patch = parser.get_parsed_content("patch_size")
        for sample in pipeline(dict(item)):
            for key in ("image", "label", "image_flipped", "label_flipped", "asym_mask"):
                assert tuple(sample[key].shape[1:]) == tuple(patch), (override, key)
            for key in ("label", "label_flipped", "asym_mask"):
                assert set(torch.unique(sample[key]).tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_train_preprocessing_symmetric_alignment(tmp_path):
    """With the registration on, the mirror pairs healthy anatomy: the image/mirror difference drops and the
    asymmetric mask matches the phantom's true asymmetric tumour fraction."""
    pytest.importorskip("shared_transforms.symmetry")
    from npc_gtv.phantoms import make_phantom

    ph = make_phantom(3, size="small", pose={"yaw_deg": 8.0, "roll_deg": -4.0, "translation_mm": [7.0, 0.0, 0.0]}, crossing=False)
    item = _phantom_item(tmp_path, ph)
    out = {a: _train_pipeline(_train_parser(tmp_path, a))(dict(item)) for a in (False, True)}
    diffs = {}
    for a, d in out.items():
        img, flip, lab = d["image"][0].numpy(), d["image_flipped"][0].numpy(), d["label"][0].numpy()
        body = (img > 0.05) & (flip > 0.05) & (lab == 0) & (d["label_flipped"][0].numpy() == 0)
        diffs[a] = float(np.abs(img - flip)[body].mean())
        assert d["asym_mask"].shape == d["label"].shape
    assert diffs[True] < 0.7 * diffs[False], diffs
    d = out[True]
    frac = float(d["asym_mask"].sum() / max(float(d["label"].sum()), 1.0))
    assert abs(frac - ph.info["asymmetric_fraction"]) < 0.15, (frac, ph.info["asymmetric_fraction"])


def test_mirror_tta_inferer_flips_along_affine_lr_axis():
    from monai.inferers import SimpleInferer

    inf_mod = bundle_scripts("sats_npc", "inference")
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    x = MetaTensor(torch.randn(1, 1, 6, 5, 4), affine=torch.as_tensor(PERMUTED))  # LR = array axis 2 -> dim 4
    with torch.no_grad():
        out = inf_mod.MirrorTTAInferer(SimpleInferer(), mirror_tta=True)(x, net)
        ref = 0.5 * (torch.sigmoid(net(x.as_tensor())) + torch.flip(torch.sigmoid(net(torch.flip(x.as_tensor(), dims=(4,)))), dims=(4,)))
        wrong = 0.5 * (torch.sigmoid(net(x.as_tensor())) + torch.flip(torch.sigmoid(net(torch.flip(x.as_tensor(), dims=(2,)))), dims=(2,)))
        plain = inf_mod.MirrorTTAInferer(SimpleInferer(), mirror_tta=False)(x, net)
    torch.testing.assert_close(torch.as_tensor(out), ref)
    assert not torch.allclose(torch.as_tensor(out), wrong)
    torch.testing.assert_close(torch.as_tensor(plain), torch.sigmoid(net(x.as_tensor())).detach())
    with pytest.raises(ValueError):
        inf_mod.MirrorTTAInferer(SimpleInferer(), mirror_tta=True, output="logits")
    # two output channels: softmax probabilities, averaged over the image and its mirror
    net2 = torch.nn.Conv3d(1, 2, 3, padding=1)
    with torch.no_grad():
        out2 = inf_mod.MirrorTTAInferer(SimpleInferer(), mirror_tta=True)(x, net2)
        ref2 = 0.5 * (torch.softmax(net2(x.as_tensor()), 1) + torch.flip(torch.softmax(net2(torch.flip(x.as_tensor(), dims=(4,))), 1), dims=(4,)))
    torch.testing.assert_close(torch.as_tensor(out2), ref2)
    torch.testing.assert_close(torch.as_tensor(out2).sum(1), torch.ones(1, 6, 5, 4))


def test_split_datalist_reproducible_and_disjoint():
    data_mod = bundle_scripts("sats_npc", "data")
    items = [{"case_id": f"c{i:02d}", "image": f"i{i}", "label": f"l{i}"} for i in range(10)]
    train = data_mod.split_datalist(items, 0.2, seed=0, part="train")
    val = data_mod.split_datalist(list(reversed(items)), 0.2, seed=0, part="val")  # order of dataset.json does not matter
    assert len(train) == 8 and len(val) == 2
    assert {d["case_id"] for d in train}.isdisjoint({d["case_id"] for d in val})
    assert data_mod.split_datalist(items, 0.2, seed=0, part="val") == val
    assert data_mod.split_datalist(items, 0.2, seed=1, part="val") != val
    assert len(data_mod.split_datalist(items[:2], 0.2, part="val")) == 1  # at least one of each
    with pytest.raises(ValueError):
        data_mod.split_datalist(items, 1.0)


def test_publish_weights_atomic_copy_and_missing_source(tmp_path):
    from shared_transforms.io import InputError

    data_mod = bundle_scripts("sats_npc", "data")
    src = tmp_path / "stage" / "model.pt"
    src.parent.mkdir()
    torch.save({"w": torch.ones(2)}, src)
    dst = data_mod.publish_weights(src, tmp_path / "model.pt")
    assert torch.equal(torch.load(dst, weights_only=True)["w"], torch.ones(2))
    with pytest.raises(InputError, match="final weights not found"):
        data_mod.publish_weights(tmp_path / "nope.pt", tmp_path / "x.pt")
