"""Unit tests of the HCF / SANet bundle's networks, CR loss and Balance-Sampling (fast, no data)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bundle_scripts

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets():
    return bundle_scripts("hcf_sanet", "networks")


@pytest.fixture(scope="module")
def losses():
    return bundle_scripts("hcf_sanet", "losses")


@pytest.fixture(scope="module")
def sampler_mod():
    return bundle_scripts("hcf_sanet", "sampler")


# ---------------------------------------------------------------- networks


def test_classifier_parameter_count_and_shape(nets):
    net = nets.slice_classifier(1, 2)
    # ImageNet ResNet18 (11,689,512) - 3-channel stem (9,408) + 1-channel stem (3,136)
    # - 1000-class fc (513,000) + 2-class fc (1,026) = 11,171,266 -> the paper's 11.17 M
    assert nets.count_parameters(net) == 11_171_266
    out = net(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 2)


def test_sanet_parameter_count_breakdown(nets):
    net = nets.SANet()
    total = nets.count_parameters(net)
    assert total == 12_793_538  # documented in docs/README.md; paper: 12.82 M
    encoder = sum(nets.count_parameters(m) for m in (net.stem, net.layer1, net.layer2, net.layer3, net.layer4))
    assert encoder == 11_170_240  # ResNet18 minus fc, 1 input channel
    assert nets.count_parameters(net.ppm) == 4 * (512 * 128 + 256) + (1024 * 128 * 9 + 256)
    assert nets.count_parameters(net.sams) == 3 * (2 * 128 * 64 + 128 * 2 * 9)
    assert nets.count_parameters(net.skips) == (256 + 128 + 64) * 128 + 3 * 256
    assert abs(total / 1e6 - 12.82) < 0.05


def test_sanet_encoder_strides_and_output_shape(nets):
    net = nets.SANet().eval()
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        s1 = net.layer1(net.stem(x))
        s4 = net.layer4(net.layer3(net.layer2(s1)))
        y = net(x)
    assert s1.shape[-2:] == (16, 24)
    assert s4.shape[-2:] == (4, 6)  # output stride 16: the last stage is dilated, not strided
    assert net.layer4[0].conv1.dilation == (2, 2) and net.layer4[0].conv1.stride == (1, 1)
    assert y.shape == (1, 2, 64, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.zeros(1, 1, 40, 64))


def test_sam_zero_offset_is_bilinear_upsampling(nets):
    torch.manual_seed(0)
    sam = nets.SpatialAlignmentModule(8)
    fine = torch.randn(2, 8, 12, 20)
    coarse = torch.randn(2, 8, 6, 10)
    out = sam(fine, coarse)  # offset conv initialised to zero
    ref = F.interpolate(coarse, size=(12, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-6)
    # same-resolution alignment with zero offset is the identity
    assert torch.allclose(sam.warp(fine, torch.zeros(2, 2, 12, 20)), fine, atol=1e-6)


def test_sam_pixel_offsets_move_by_whole_fine_pixels(nets):
    # a ramp along x (width) and a different ramp along y: a +1 pixel offset in channel 0 must
    # shift the up-sampled map by exactly one fine pixel along the width only.
    h, w = 6, 10
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    coarse = (3.0 * xx + 100.0 * yy)[None, None]
    up = F.interpolate(coarse, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
    off = torch.zeros(1, 2, 2 * h, 2 * w, dtype=torch.float64)
    off[:, 0] = 1.0
    shifted = nets.SpatialAlignmentModule.warp(coarse, off)
    # interior (away from clamped borders): value at k equals the plain up-sampling at k + 1
    assert torch.allclose(shifted[..., 2:-2, 2:-3], up[..., 2:-2, 3:-2], atol=1e-9)
    off[:, 0] = 0.0
    off[:, 1] = -2.0
    shifted = nets.SpatialAlignmentModule.warp(coarse, off)
    assert torch.allclose(shifted[..., 4:-2, 2:-2], up[..., 2:-4, 2:-2], atol=1e-9)


def test_sanet_sam_learns_offsets_and_ablation_switches(nets):
    net = nets.SANet()
    x = torch.randn(2, 1, 64, 64)  # 1/16 maps of 4 x 4 (at 2 x 2 every sample sits on the clamped border)
    loss = net(x).square().mean()
    loss.backward()
    for sam in net.sams:  # zero-initialised offsets still receive gradient
        assert sam.offset.weight.grad is not None and sam.offset.weight.grad.abs().sum() > 0
    plain = nets.SANet(use_sam=False, use_ppm=False)
    assert len(plain.sams) == 0
    assert plain(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_sanet_torchscript(nets):
    net = nets.SANet().eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


# ---------------------------------------------------------------- CR loss


def _logits_example():
    # one image, two pixels: pixel 0 p = (3/4, 1/4), pixel 1 p = (1/2, 1/2); target (0, 1)
    logits = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[0, 1]]]])  # (1, 1, 1, 2)
    return logits, target


def test_cr_loss_hand_computed(losses):
    logits, target = _logits_example()
    terms = losses.CRLoss(alpha=0.1, smooth=0.0).compute_terms(logits, target)
    dice_bg = 2 * 0.75 / (1.25 + 1.0)
    dice_fg = 2 * 0.5 / (0.75 + 1.0)
    dice = 1 - (dice_bg + dice_fg) / 2
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    eps = (-math.log(0.75) - math.log(0.25) - 2 * math.log(0.5)) / 4
    assert terms["dice"].item() == pytest.approx(dice, abs=1e-6)  # 0.380952
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-6)  # 0.490415
    assert terms["epsilon"].item() == pytest.approx(eps, abs=1e-6)  # 0.765068
    assert terms["loss"].item() == pytest.approx(dice + 0.9 * ce + 0.1 * eps, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(0.898832, abs=1e-5)
    # paper eq. 7 literally divides the cross-entropy by K
    eq7 = losses.CRLoss(alpha=0.1, smooth=0.0, ce_normalisation="eq7").compute_terms(logits, target)
    assert eq7["ce"].item() == pytest.approx(ce / 2, abs=1e-6)
    # alpha = 0 is Dice + CE
    assert losses.DiceCELoss2d(smooth=0.0)(logits, target).item() == pytest.approx(dice + ce, abs=1e-6)


def test_cr_loss_uniform_prediction_and_onehot_target(losses):
    logits = torch.zeros(2, 2, 3, 3)
    target = torch.zeros(2, 1, 3, 3)
    target[0, 0, 1, 1] = 1
    loss = losses.CRLoss(alpha=0.1, smooth=0.0)
    # uniform p: CE = epsilon = log 2 whatever the target
    t = loss.compute_terms(logits, target)
    assert t["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert t["epsilon"].item() == pytest.approx(math.log(2), abs=1e-6)
    onehot = torch.cat([1 - target, target], dim=1)
    assert loss(logits, onehot).item() == pytest.approx(loss(logits, target).item(), abs=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        losses.CRLoss(alpha=1.5)
    with pytest.raises(ValueError, match="target values"):
        loss(logits, target + 2)


def test_cr_loss_gradient_pulls_towards_uniform(losses):
    # with alpha = 1 and no Dice the loss is epsilon only, minimised by the uniform distribution
    logits = torch.tensor([[[[2.0]], [[-1.0]]]], requires_grad=True)
    loss = losses.CRLoss(alpha=1.0, use_dice=False)(logits, torch.zeros(1, 1, 1, 1))
    loss.backward()
    assert logits.grad[0, 0].item() > 0 > logits.grad[0, 1].item()


# ---------------------------------------------------------------- balance sampling


@pytest.mark.parametrize("ratio,expected_neg", [("theta_0", 0), ("theta_1", 10), ("theta_2", 20), ("theta_4", 40), ("theta_n", 90), (4, 40)])
def test_balance_sampler_ratios(sampler_mod, ratio, expected_neg):
    flags = [1] * 10 + [0] * 90
    s = sampler_mod.BalanceSampler(flags, ratio=ratio, seed=3, num_replicas=1, rank=0)
    idx = list(iter(s))
    assert len(idx) == len(s) == 10 + expected_neg
    assert len(set(idx)) == len(idx)  # without replacement
    chosen = np.asarray(flags)[idx]
    assert chosen.sum() == 10  # every tumour slice is kept
    assert (chosen == 0).sum() == expected_neg


def test_balance_sampler_redraws_each_epoch_and_shards(sampler_mod):
    flags = [1] * 5 + [0] * 50
    s = sampler_mod.BalanceSampler(flags, ratio="theta_2", seed=0, num_replicas=1, rank=0)
    s.set_epoch(0)
    e0 = set(iter(s))
    s.set_epoch(1)
    e1 = set(iter(s))
    assert e0 != e1 and {0, 1, 2, 3, 4} <= e0 & e1
    s.set_epoch(0)
    assert set(iter(s)) == e0  # reproducible
    # two ranks split the same draw into disjoint equal halves
    ranks = [sampler_mod.BalanceSampler(flags, ratio="theta_2", seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    parts = [list(iter(r)) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 8
    assert set(parts[0]) | set(parts[1]) == e0


def test_balance_sampler_bad_input(sampler_mod):
    with pytest.raises(ValueError, match="no slice contains GTV"):
        sampler_mod.BalanceSampler([0, 0, 0], ratio="theta_1", num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="unknown sampling ratio"):
        sampler_mod.BalanceSampler([1, 0], ratio="theta_x", num_replicas=1, rank=0)
    assert len(sampler_mod.BalanceSampler([0, 0, 0], ratio="theta_n", num_replicas=1, rank=0)) == 3
    # fewer normal slices than asked: all of them are used
    assert len(sampler_mod.BalanceSampler([1, 1, 0], ratio="theta_4", num_replicas=1, rank=0)) == 3


# ---------------------------------------------------------------- gate threshold


class _ScoreNet(torch.nn.Module):
    """A 'classifier' whose logit of "contains GTV" is the mean of its input slice (one weight, one bias)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        s = self.scale * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(s), s], 1)


def test_gate_threshold_calibration_keeps_target_recall(tmp_path):
    import json

    cascade = bundle_scripts("hcf_sanet", "cascade")
    torch.save(_ScoreNet().state_dict(), tmp_path / "classifier.pt")
    # ten GTV slices with logits -4.5..0 (p 0.011..0.5), ten empty ones with logits -9..-5
    logits = torch.tensor([-4.5 + 0.5 * i for i in range(10)] + [-9.0 + 0.4 * i for i in range(10)])
    flags = torch.tensor([1] * 10 + [0] * 10)
    loader = [{"image": logits[i:i + 5].reshape(5, 1, 1, 1).expand(5, 1, 4, 4), "has_gtv": flags[i:i + 5]} for i in range(0, 20, 5)]
    res = cascade.calibrate_threshold(_ScoreNet(), tmp_path / "classifier.pt", loader, tmp_path / "t.json", target_recall=0.9)
    # 9 of the 10 positives must pass: the threshold sits just below the 9th highest positive, sigmoid(-4.0)
    assert res["threshold"] == pytest.approx(float(torch.sigmoid(torch.tensor(-4.0))), abs=1e-5)
    assert res["recall"] == pytest.approx(0.9) and res["precision"] == pytest.approx(1.0)
    assert (res["positives"], res["slices"]) == (10, 20)
    assert json.loads((tmp_path / "t.json").read_text()) == res
    # at the fixed 0.5 this classifier would have passed no GTV slice at all
    assert not bool((torch.sigmoid(logits[:10]) > 0.5).any())
    assert cascade.gate_threshold("auto", tmp_path / "t.json") == res["threshold"]
    assert cascade.gate_threshold("auto", tmp_path / "missing.json") == 0.5
    assert cascade.gate_threshold(0.3, tmp_path / "t.json") == 0.3
    with pytest.raises(ValueError, match="cls_threshold"):
        cascade.gate_threshold(1.5, tmp_path / "t.json")
    with pytest.raises(ValueError, match="target_recall"):
        cascade.calibrate_threshold(_ScoreNet(), tmp_path / "classifier.pt", loader, tmp_path / "u.json", target_recall=0)
