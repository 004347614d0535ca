"""Multi-scale GTV crops and the random in-plane transposition of the UNet-2.5D bundle.

Multi-scale data (paper section 2.2): five crop scales around the GTV. Along ``Z`` (slices) the
crop keeps 90 % of the volume for the extra-large scale and 10 % less for every smaller scale
(90, 80, 70, 60, 50 %); in plane it keeps 100 % for extra-large and 15 % less per scale
(100, 85, 70, 55, 40 %). The crop position is random, constrained so that the whole GTV bounding
box lies inside the crop whenever it fits.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = [
    "SCALES",
    "scale_index",
    "scale_fractions",
    "scale_crop_size",
    "RandScaleCrop",
    "RandScaleCropd",
    "RandTransposeInPlane",
    "RandTransposeInPlaned",
    "EnsembleOutput",
    "EnsembleOutputd",
]

# largest first; index i shrinks z by 10 % and x/y by 15 % per step
SCALES = ("extra_large", "large", "medium", "small", "extra_small")
Z_START, Z_STEP = 0.90, 0.10
XY_START, XY_STEP = 1.00, 0.15


def scale_index(scale: str | int) -> int:
    """Index 0 (extra-large) .. 4 (extra-small) of a scale name or index."""
    if isinstance(scale, (int, np.integer)) and not isinstance(scale, bool):
        idx = int(scale)
    else:
        name = str(scale).strip().lower().replace("-", "_").replace(" ", "_")
        aliases = {"xl": "extra_large", "l": "large", "m": "medium", "s": "small", "xs": "extra_small"}
        name = aliases.get(name, name)
        if name not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; use one of {SCALES} (or 0-4)")
        idx = SCALES.index(name)
    if not 0 <= idx < len(SCALES):
        raise ValueError(f"scale index must be 0-4, got {idx}")
    return idx


def scale_fractions(scale: str | int) -> tuple[float, float, float]:
    """Crop fractions ``(fx, fy, fz)`` of a scale, e.g. medium -> ``(0.70, 0.70, 0.70)``."""
    i = scale_index(scale)
    fxy = round(XY_START - XY_STEP * i, 6)
    fz = round(Z_START - Z_STEP * i, 6)
    return fxy, fxy, fz


def scale_crop_size(shape: Sequence[int], scale: str | int) -> tuple[int, int, int]:
    """Crop size in voxels of a scale for a volume of spatial ``shape`` ``(X, Y, Z)`` (at least 1)."""
    if len(shape) != 3:
        raise ValueError(f"shape must be (X, Y, Z), got {tuple(shape)}")
    return tuple(max(1, int(round(f * s))) for f, s in zip(scale_fractions(scale), shape))


def _crop_starts(shape, size, box_lo, box_hi, rng: np.random.RandomState) -> list[int]:
    starts = []
    for n, s, lo, hi in zip(shape, size, box_lo, box_hi):
        if lo is None:  # no GTV: anywhere
            a, b = 0, n - s
        elif hi - lo + 1 <= s:  # the box fits: every start that keeps it inside
            a, b = max(0, hi - s + 1), min(lo, n - s)
        else:  # box larger than the crop: centre the crop on the box
            c = (lo + hi) // 2 - s // 2
            a = b = int(np.clip(c, 0, n - s))
        starts.append(int(rng.randint(a, b + 1)) if b > a else int(a))
    return starts


class RandScaleCrop(Randomizable, Transform):
    """Random crop of one of the five scales, keeping the GTV inside.

    Args:
        scale: scale name (``extra_large, large, medium, small, extra_small``; ``xl .. xs``) or index 0-4.

    ``__call__(img, label=None)``: ``img`` ``(C, X, Y, Z)``, ``label`` ``(1, X, Y, Z)`` (or None: random
    position). Returns ``(cropped_img, slices)`` where ``slices`` are the three spatial slices
    (apply them to other arrays of the same grid).
    """

    def __init__(self, scale: str | int = "medium"):
        self.scale = scale_index(scale)
        self._starts: list[int] | None = None

    def randomize(self, shape, label=None) -> None:
        size = scale_crop_size(shape, self.scale)
        if label is not None and np.asarray(label).any():
            idx = np.argwhere(np.asarray(label).reshape(np.asarray(label).shape[-3:]) > 0)
            lo, hi = idx.min(0), idx.max(0)
        else:
            lo = hi = [None] * 3
        self._starts = _crop_starts(shape, size, lo, hi, self.R)
        self._size = size

    def __call__(self, img, label=None, randomize: bool = True):
        shape = tuple(img.shape[1:])
        if randomize or self._starts is None:
            lbl = None if label is None else (label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label))
            self.randomize(shape, lbl)
        slices = tuple(slice(s, s + n) for s, n in zip(self._starts, self._size))
        return img[(slice(None),) + slices], slices


class RandScaleCropd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandScaleCrop`: one random scale crop applied to all ``keys``.

    Args:
        keys: arrays ``(C, X, Y, Z)`` on the same grid (image and label).
        label_key: the GTV mask that must stay inside the crop.
        scale: scale name or index.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", scale: str | int = "medium", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.label_key = label_key
        self.cropper = RandScaleCrop(scale)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first = next(iter(self.key_iterator(d)))
        _, slices = self.cropper(d[first], d.get(self.label_key))
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None),) + slices]
        return d


class RandTransposeInPlane(Randomizable, Transform):
    """With probability ``prob`` swap the two in-plane axes (``X <-> Y``) of ``(C, X, Y, Z)``.

    Training augmentation only (the paper's "transposing"); ``Z`` is never swapped because its
    spacing (3 mm) differs from the in-plane 1 mm.
    """

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = prob
        self._do = False

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._do:
            return img
        out = img.transpose(1, 2) if isinstance(img, torch.Tensor) else np.swapaxes(img, 1, 2)
        return out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)


class RandTransposeInPlaned(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandTransposeInPlane` (same decision for every key)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transposer = RandTransposeInPlane(prob)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transposer.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self.transposer.randomize()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            d[key] = self.transposer(d[key], randomize=False)
        return d


class EnsembleOutput(Transform):
    """Turn the ensemble's output into a mask (and an optional uncertainty map).

    Args:
        threshold: foreground when the mean foreground probability ``>= threshold``.
        foreground_channel: channel of the mean foreground probability; the channel after it, when
            present, is the members' spread (1 for the network's ``(2 or 3, X, Y, Z)`` output, 0 when
            the background channel was dropped before inverting, as ``inference.yaml`` does).

    ``__call__(prob)`` with ``prob`` ``(C, X, Y, Z)`` returns ``(mask (1, X, Y, Z) uint8,
    spread (1, X, Y, Z) or None)``; MetaTensor meta data is kept.
    """

    def __init__(self, threshold: float = 0.5, foreground_channel: int = 1):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if foreground_channel < 0:
            raise ValueError(f"foreground_channel must be >= 0, got {foreground_channel}")
        self.threshold = float(threshold)
        self.fg = int(foreground_channel)

    def __call__(self, prob):
        if prob.ndim != 4 or prob.shape[0] not in (self.fg + 1, self.fg + 2):
            raise ValueError(
                f"expected a ({self.fg + 1} or {self.fg + 2}, X, Y, Z) probability map, got shape {tuple(prob.shape)}"
            )
        fg = prob[self.fg : self.fg + 1]
        mask = (fg >= self.threshold).to(torch.uint8) if isinstance(prob, torch.Tensor) else (fg >= self.threshold).astype(np.uint8)
        spread = prob[self.fg + 1 : self.fg + 2] if prob.shape[0] == self.fg + 2 else None
        return mask, spread


class EnsembleOutputd(MapTransform):
    """Dictionary wrapper of :class:`EnsembleOutput`: ``pred`` becomes the mask, the spread goes to ``uncertainty_key``."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        threshold: float = 0.5,
        uncertainty_key: str = "uncertainty",
        foreground_channel: int = 1,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsembleOutput(threshold, foreground_channel)
        self.uncertainty_key = uncertainty_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], spread = self.converter(d[key])
            if spread is not None:
                d[self.uncertainty_key] = spread
        return d
