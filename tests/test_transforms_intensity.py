"""HU windowing and per-channel normalisation: hand-computed values."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from shared_transforms.intensity import ChannelNormalize, ChannelNormalized, HUWindow, HUWindowd

HU = np.array([-1000, -150, 0, 175, 500, 1200], dtype=np.int16).reshape(1, 6, 1, 1)


def test_huwindow_clip_default_window():
    out = HUWindow()(HU)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == HU.shape
    # (x + 150) / 650, clipped
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 150 / 650, 325 / 650, 1.0, 1.0], atol=1e-6)


def test_huwindow_outside_zero_variants():
    zero = HUWindow(outside="zero")(torch.as_tensor(HU))
    assert isinstance(zero, torch.Tensor)
    np.testing.assert_allclose(zero.numpy().ravel(), [0.0, 0.0, 150 / 650, 325 / 650, 1.0, 0.0], atol=1e-6)
    zero_hu = HUWindow(outside="zero_hu")(HU)
    np.testing.assert_allclose(zero_hu.ravel(), [150 / 650, 0.0, 150 / 650, 325 / 650, 1.0, 150 / 650], atol=1e-6)
    custom = HUWindow(a_min=-1000, a_max=1000)(HU)
    np.testing.assert_allclose(custom.ravel(), [0.0, 0.425, 0.5, 0.5875, 0.75, 1.0], atol=1e-6)


def test_huwindow_records_window_in_meta_and_dict_wrapper():
    img = MetaTensor(torch.as_tensor(HU), affine=torch.diag(torch.tensor([-1.0, -1.0, 3.0, 1.0])), meta={"filename_or_obj": "ct.nii.gz"})
    out = HUWindowd("image", a_min=-100, a_max=300, outside="zero")({"image": img, "other": 1})
    res = out["image"]
    assert isinstance(res, MetaTensor) and res.dtype == torch.float32
    assert res.meta["hu_window"] == [-100.0, 300.0] and res.meta["hu_window_outside"] == "zero"
    assert res.meta["filename_or_obj"] == "ct.nii.gz"
    np.testing.assert_allclose(res.affine.numpy(), np.diag([-1.0, -1.0, 3.0, 1.0]))
    np.testing.assert_allclose(res.numpy().ravel(), [0.0, 0.0, 0.25, 0.6875, 0.0, 0.0], atol=1e-6)
    assert out["other"] == 1


def test_huwindow_selected_channels_and_errors():
    two = np.concatenate([HU, HU], 0).astype(np.float32)
    out = HUWindow(channels=0)(two)
    np.testing.assert_allclose(out[1], two[1])  # untouched
    assert out[0].max() == 1.0 and out[0].min() == 0.0
    with pytest.raises(ValueError, match="a_max > a_min"):
        HUWindow(a_min=500, a_max=-150)
    with pytest.raises(ValueError, match="outside"):
        HUWindow(outside="nan")
    with pytest.raises(ValueError, match="channel 3"):
        HUWindow(channels=[3])(two)


def test_channel_normalize_zscore_and_percentile():
    x = np.zeros((2, 4, 1, 1), np.float32)
    x[0, :, 0, 0] = [1, 2, 3, 4]
    x[1, :, 0, 0] = [0, 10, 20, 30]
    z = ChannelNormalize("zscore")(x)
    std0 = np.std([1, 2, 3, 4])
    np.testing.assert_allclose(z[0].ravel(), (np.array([1, 2, 3, 4]) - 2.5) / std0, atol=1e-6)
    np.testing.assert_allclose(z[1].ravel(), (np.array([0, 10, 20, 30]) - 15) / np.std([0, 10, 20, 30]), atol=1e-6)
    # non-zero statistics keep zeros at zero: channel 1 stats over 10, 20, 30
    zn = ChannelNormalize("zscore", nonzero=True)(x)
    np.testing.assert_allclose(zn[1].ravel(), [0.0, -1 / np.std([10, 20, 30]) * 10, 0.0, 10 / np.std([10, 20, 30])], atol=1e-6)
    p = ChannelNormalize("percentile", lower=0, upper=100)(x)
    np.testing.assert_allclose(p[0].ravel(), [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    out = ChannelNormalized("img", mode="percentile", lower=0, upper=100)({"img": torch.as_tensor(x)})
    np.testing.assert_allclose(out["img"][1].numpy().ravel(), [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    const = ChannelNormalize()(np.full((1, 3, 1, 1), 7.0))
    np.testing.assert_array_equal(const, 0.0)
    with pytest.raises(ValueError, match="mode"):
        ChannelNormalize("minmax")
    with pytest.raises(ValueError, match="percentiles"):
        ChannelNormalize("percentile", lower=90, upper=10)
