"""Multi-scale GTV crops and the random axis transposition of the UNet-2.5D bundle.

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

from shared_transforms.checks import setting_choice

__all__ = [
    "SCALES",
    "scale_index",
    "scale_fractions",
    "scale_crop_size",
    "RandScaleCrop",
    "RandScaleCropd",
    "RandScaleCropSamplesd",
    "SCALE_INPUTS",
    "scale_input_mode",
    "RandTransposeAxes",
    "RandTransposeAxesd",
    "EnsembleOutput",
    "EnsembleOutputd",
]

#: what a scale model is fed: ``crop`` (the scale crop itself, padded to the network's divisor; the
#: paper's text) or ``patch`` (fixed-size random patches from inside the scale crop; memory-bound)
SCALE_INPUTS = ("crop", "patch")

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


def scale_input_mode(value: str) -> str:
    """Check ``scale_input`` (one of :data:`SCALE_INPUTS`) and return it in lower case."""
    return setting_choice(value, SCALE_INPUTS, "scale_input")


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


class RandScaleCropSamplesd(RandScaleCropd):
    """``num_samples`` random scale crops of one volume, each the network input itself
    (``scale_input: crop``, the paper's section 2.2: the scale crop is what the model is fed).

    Every crop keeps the GTV inside (as :class:`RandScaleCropd`) at its own random position; the
    crops of one volume have one size (the scale's fractions of that volume), so they stack into a
    batch. Returns a list of ``num_samples`` dictionaries.

    Args:
        keys, label_key, scale: as :class:`RandScaleCropd`.
        num_samples: crops per volume.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", scale: str | int = "medium", num_samples: int = 1,
                 allow_missing_keys: bool = False):
        super().__init__(keys, label_key, scale, allow_missing_keys)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        return [super(RandScaleCropSamplesd, self).__call__(data) for _ in range(self.num_samples)]


class RandTransposeAxes(Randomizable, Transform):
    """With probability ``prob`` permute spatial axes of ``(C, X, Y, Z)`` (the paper's "transposing
    ... across the x, y, z dimension").

    A random non-identity permutation of the spatial ``axes`` is drawn among those that keep the
    array's shape (``keep_shape``), so that the patches of one batch still stack: with the default
    anisotropic patch ``128 x 128 x 16`` only ``X <-> Y`` qualifies, with a cubic patch every one of
    the five non-identity permutations of ``X, Y, Z`` does (each equally likely). On a grid whose
    spacing differs between the permuted axes (1 x 1 x 3 mm) a permutation with ``Z`` also rescales
    the anatomy, as transposing any voxel array does. Training augmentation only.

    Args:
        axes: spatial axes (0 = X, 1 = Y, 2 = Z) that may be permuted, at least two.
        prob: probability of permuting.
        keep_shape: only permutations that keep the shape (``False``: any permutation of ``axes``).
    """

    def __init__(self, axes: Sequence[int] = (0, 1, 2), prob: float = 0.5, keep_shape: bool = True):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        axes = tuple(int(a) for a in axes)
        if len(axes) < 2 or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ValueError(f"axes must be two or three distinct spatial axes of 0, 1, 2; got {axes}")
        self.axes, self.prob, self.keep_shape = axes, float(prob), bool(keep_shape)
        self._do, self._u = False, 0.0

    def randomize(self, data=None) -> None:
        self._do = self.R.rand() < self.prob
        self._u = self.R.rand()

    def permutation(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial permutation (of ``0, 1, 2``) of the last :meth:`randomize` for spatial ``shape``
        (output axis ``i`` is input axis ``perm[i]``; the identity when nothing is permuted)."""
        import itertools

        shape = tuple(shape)
        choices = []
        for perm in itertools.permutations(self.axes):
            full = list(range(3))
            for a, b in zip(self.axes, perm):
                full[a] = b
            full = tuple(full)
            if full != (0, 1, 2) and (not self.keep_shape or tuple(shape[i] for i in full) == shape):
                choices.append(full)
        if not self._do or not choices:
            return (0, 1, 2)
        return choices[min(int(self._u * len(choices)), len(choices) - 1)]

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        perm = self.permutation(img.shape[1:])
        if perm == (0, 1, 2):
            return img
        dims = (0,) + tuple(p + 1 for p in perm)
        if isinstance(img, torch.Tensor):
            return img.permute(*dims).contiguous()
        return np.ascontiguousarray(np.transpose(img, dims))


class RandTransposeAxesd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandTransposeAxes` (one decision for every key)."""

    def __init__(self, keys: KeysCollection, axes: Sequence[int] = (0, 1, 2), prob: float = 0.5, keep_shape: bool = True,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transposer = RandTransposeAxes(axes, prob, keep_shape)

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
