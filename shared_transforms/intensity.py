"""Intensity transforms: CT Hounsfield-unit windowing and per-channel MRI normalisation.

``HUWindow`` maps a CT window ``[a_min, a_max]`` (default ``[-150, 500]`` HU, the UNet-2.5D
paper's window) linearly onto ``[0, 1]``. What happens to voxels outside the window is an option,
because the UNet-2.5D paper describes it in two ways: it says the values are "truncated"
(clipping, ``outside="clip"``, the usual MONAI ``ScaleIntensityRange(clip=True)`` behaviour) and
that values outside the range "are all automatically set to zero" before the [0, 1] scaling.
``outside="zero"`` implements the stated intent (voxels outside the window get 0 in the output,
so bone above 500 HU looks like air rather than bright); ``outside="zero_hu"`` is the literal
reading (outside voxels become 0 HU, i.e. ``150 / 650 = 0.2308`` after scaling with the default
window). The window and the option are written to a MetaTensor's meta data
(``meta["hu_window"] = [a_min, a_max]``, ``meta["hu_window_outside"]``).

``ChannelNormalize`` normalises each channel of a multi-sequence MRI stack on its own: z-score
(mean 0, std 1, optionally over non-zero voxels only) or percentile scaling onto [0, 1].
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

__all__ = ["HUWindow", "HUWindowd", "ChannelNormalize", "ChannelNormalized"]

_OUTSIDE = ("clip", "zero", "zero_hu")


class HUWindow(Transform):
    """Clip a CT image to a Hounsfield window and scale it to [0, 1].

    Args:
        a_min: lower window bound in HU (maps to 0).
        a_max: upper window bound in HU (maps to 1).
        outside: ``"clip"``: values below/above the window become 0/1; ``"zero"``: values outside
            the window become 0 in the output; ``"zero_hu"``: values outside the window are set to
            0 HU before scaling (the literal reading of the UNet-2.5D paper, see module doc).
        channels: channel indices to window (None: all channels), for stacks whose other
            channels are not CT.
        dtype: output dtype (float).

    Raises:
        ValueError: ``a_max <= a_min`` or an unknown ``outside``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        a_min: float = -150.0,
        a_max: float = 500.0,
        outside: str = "clip",
        channels: Sequence[int] | int | None = None,
        dtype=torch.float32,
    ) -> None:
        if not a_max > a_min:
            raise ValueError(f"HU window needs a_max > a_min, got [{a_min}, {a_max}]")
        if outside not in _OUTSIDE:
            raise ValueError(f"outside must be one of {_OUTSIDE}, got {outside!r}")
        self.a_min = float(a_min)
        self.a_max = float(a_max)
        self.outside = outside
        self.channels = [channels] if isinstance(channels, int) else (None if channels is None else list(channels))
        self.dtype = dtype

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.a_min, self.a_max
        out_of_window = (x < lo) | (x > hi)
        if self.outside == "zero_hu":
            x = torch.where(out_of_window, torch.zeros_like(x), x)
        y = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
        if self.outside == "zero":
            y = torch.where(out_of_window, torch.zeros_like(y), y)
        return y

    def __call__(self, img):
        """Args:
            img: ``(C, X, Y, Z)`` CT in HU (numpy, torch or MetaTensor; any shape when ``channels`` is None).

        Returns:
            windowed image of the same type and shape, float, values in [0, 1].
        """
        t = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img).to(torch.float64)
        if self.channels is None:
            out = self._window(t)
        else:
            out = t.clone()
            for c in self.channels:
                if not -t.shape[0] <= c < t.shape[0]:
                    raise ValueError(f"channel {c} out of range for an image with {t.shape[0]} channels")
                out[c] = self._window(t[c])
        out = out.to(self.dtype)
        result = convert_to_dst_type(out, img, dtype=self.dtype)[0]
        if isinstance(result, MetaTensor):
            result.meta["hu_window"] = [self.a_min, self.a_max]
            result.meta["hu_window_outside"] = self.outside
        return result


class HUWindowd(MapTransform):
    """Dictionary wrapper of :class:`HUWindow` (same arguments), applied to each key in ``keys``."""

    backend = HUWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        a_min: float = -150.0,
        a_max: float = 500.0,
        outside: str = "clip",
        channels: Sequence[int] | int | None = None,
        dtype=torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windower = HUWindow(a_min, a_max, outside, channels, dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d


class ChannelNormalize(Transform):
    """Normalise each channel of ``(C, X, Y, Z)`` independently (multi-sequence MRI).

    Args:
        mode: ``"zscore"``: ``(x - mean) / std`` per channel; ``"percentile"``: map the
            ``lower``/``upper`` percentiles of each channel to 0/1 and clip to [0, 1].
        nonzero: compute the statistics over non-zero voxels only and leave zero voxels (outside
            the field of view) at 0.
        lower: lower percentile for ``"percentile"`` (0-100).
        upper: upper percentile for ``"percentile"`` (0-100).
        eps: floor of the standard deviation / percentile range (a constant channel maps to 0).

    Raises:
        ValueError: unknown mode or ``not 0 <= lower < upper <= 100``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mode: str = "zscore", nonzero: bool = False, lower: float = 0.5, upper: float = 99.5, eps: float = 1e-8) -> None:
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.mode, self.nonzero, self.lower, self.upper, self.eps = mode, nonzero, float(lower), float(upper), float(eps)

    def __call__(self, img):
        """Args:
            img: ``(C, X, Y, Z)`` (numpy, torch or MetaTensor).

        Returns:
            float32 array of the same type and shape.
        """
        t = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img).to(torch.float64)
        if t.ndim < 2:
            raise ValueError(f"ChannelNormalize expects channel-first (C, X, Y, Z) data, got shape {tuple(t.shape)}")
        out = torch.zeros_like(t)
        for c in range(t.shape[0]):
            x = t[c]
            sel = x != 0 if self.nonzero else torch.ones_like(x, dtype=torch.bool)
            vals = x[sel]
            if vals.numel() == 0:
                continue
            if self.mode == "zscore":
                mean, std = vals.mean(), vals.std(unbiased=False)
                y = (x - mean) / max(float(std), self.eps)
            else:
                lo, hi = (float(v) for v in np.percentile(vals.cpu().numpy(), [self.lower, self.upper]))
                y = ((x - lo) / max(hi - lo, self.eps)).clamp(0.0, 1.0)
            out[c] = torch.where(sel, y, torch.zeros_like(y))
        result = convert_to_dst_type(out.to(torch.float32), img, dtype=torch.float32)[0]
        if isinstance(result, MetaTensor):
            result.meta["channel_normalize"] = self.mode
        return result


class ChannelNormalized(MapTransform):
    """Dictionary wrapper of :class:`ChannelNormalize` (same arguments)."""

    backend = ChannelNormalize.backend

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "zscore",
        nonzero: bool = False,
        lower: float = 0.5,
        upper: float = 99.5,
        eps: float = 1e-8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = ChannelNormalize(mode, nonzero, lower, upper, eps)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d
