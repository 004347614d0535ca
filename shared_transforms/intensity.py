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

``CTNormalize`` is nnU-Net's ``CTNormalization``: clip to the 0.5 and 99.5 percentiles of the
*foreground* intensities of the training set, then z-score with the foreground mean and standard
deviation. The numbers come from a data-set fingerprint (:func:`intensity_fingerprint`, nnU-Net's
sampling: up to 10,000 random label voxels per case, seed 1234), computed once from the training
cases and stored as JSON beside the trained weights (:func:`ensure_fingerprint`), so that
inference normalises exactly as training did. With a tumour a few HU above muscle, the clip range
is narrow (tens of HU) and the tumour contrast becomes a large fraction of the network's input
range, where a fixed [-150, 350] HU window leaves it at about 1.6 %.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from shared_transforms.checks import setting_choice

__all__ = [
    "HUWindow",
    "HUWindowd",
    "ChannelNormalize",
    "ChannelNormalized",
    "FINGERPRINT_KEYS",
    "intensity_fingerprint",
    "ensure_fingerprint",
    "load_fingerprint",
    "CTNormalize",
    "CTNormalized",
    "NORMALIZATION_MODES",
    "normalization_mode",
]

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


# ----------------------------------------------------------------------------------------------- CT
#: the intensity normalisations a CT bundle offers: nnU-Net's fingerprint-based one, or a fixed HU window
NORMALIZATION_MODES = ("ct", "window")


def normalization_mode(mode: str) -> str:
    """Check a bundle's ``normalization`` setting (``"ct"`` or ``"window"``) and return it."""
    return setting_choice(mode, NORMALIZATION_MODES, "normalization")


FINGERPRINT_KEYS = ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")


def intensity_fingerprint(
    cases: Iterable[Mapping],
    image_key: str = "image",
    label_key: str = "label",
    samples_per_case: int = 10000,
    seed: int = 1234,
    base_dir=None,
) -> dict:
    """Foreground intensity statistics of a training set (nnU-Net's data-set fingerprint, CT part).

    For every case, ``samples_per_case`` voxels are drawn with replacement (``RandomState(seed)``)
    from the voxels where the label is > 0; the statistics are taken over all draws together.

    Args:
        cases: data-list entries with an image file and a label file (paths, relative to
            ``base_dir`` if not absolute).
        image_key, label_key: keys of the image and label paths.
        samples_per_case: draws per case.
        seed: seed of the draws.
        base_dir: folder that relative paths are relative to.

    Returns:
        ``{"mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5",
        "num_cases", "num_samples", "samples_per_case", "seed"}`` (floats in the image's units).

    Raises:
        InputError: a missing or unreadable file, or a label on another grid.
        ValueError: no case with foreground.
    """
    from .io import load_label, load_nifti

    rs = np.random.RandomState(seed)
    draws = []
    n_cases = 0
    for entry in cases:
        paths = []
        for key in (image_key, label_key):
            if key not in entry:
                raise ValueError(f"data-list entry {dict(entry)} has no {key!r}")
            path = Path(entry[key])
            paths.append(path if path.is_absolute() or base_dir is None else Path(base_dir) / path)
        image, affine = load_nifti(paths[0])
        label, _ = load_label(paths[1], reference_affine=affine, reference_shape=image.shape)
        fg = image[label > 0]
        if fg.size:
            draws.append(rs.choice(fg.astype(np.float64), samples_per_case, replace=True))
            n_cases += 1
    if not draws:
        raise ValueError("no training case has foreground voxels: cannot compute the intensity fingerprint")
    v = np.concatenate(draws)
    out = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(np.percentile(v, 0.5)),
        "percentile_99_5": float(np.percentile(v, 99.5)),
    }
    out.update({"num_cases": n_cases, "num_samples": int(v.size), "samples_per_case": int(samples_per_case), "seed": int(seed)})
    return out


def load_fingerprint(path) -> dict:
    """Read a fingerprint JSON written by :func:`ensure_fingerprint` and check its fields."""
    from .io import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "intensity fingerprint not found: train the bundle first (it is written at the start of "
                               "training, beside the weights), or choose the HU-window normalisation")
    try:
        fp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"intensity fingerprint is not readable JSON ({exc})") from exc
    missing = [k for k in FINGERPRINT_KEYS if not isinstance(fp.get(k), (int, float))]
    if missing:
        raise InputError(path, f"intensity fingerprint lacks the numbers {missing}")
    return fp


def ensure_fingerprint(path, cases: Iterable[Mapping], **kwargs) -> dict:
    """Load the fingerprint at ``path``, or compute it from ``cases`` and write it there (atomically).

    An existing file is reused as it is (a resumed or continued training normalises like the run that
    wrote it). Under ``torch.distributed`` only rank 0 computes and writes; the others wait and read.

    Args:
        path: JSON file (the bundle writes it to ``ckpt_dir/intensity_fingerprint.json``).
        cases: training data-list entries (see :func:`intensity_fingerprint`).
        kwargs: passed to :func:`intensity_fingerprint`.
    """
    from .io import atomic_write

    path = Path(path)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank0 = not distributed or torch.distributed.get_rank() == 0
    if rank0 and not path.is_file():
        fp = intensity_fingerprint(cases, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(json.dumps(fp, indent=2))
        print(f"intensity fingerprint of {fp['num_cases']} training cases written to {path}: clip "
              f"[{fp['percentile_00_5']:.1f}, {fp['percentile_99_5']:.1f}], mean {fp['mean']:.1f}, std {fp['std']:.1f}", flush=True)
    if distributed:
        torch.distributed.barrier()
    return load_fingerprint(path)


class CTNormalize(Transform):
    """nnU-Net's CT normalisation: clip to the foreground 0.5 / 99.5 percentiles, then z-score.

    ``y = (clip(x, p00_5, p99_5) - mean) / max(std, 1e-8)`` with the numbers of a data-set
    fingerprint (:func:`intensity_fingerprint`).

    Args:
        fingerprint: the fingerprint dict, or the path of its JSON file (read at the first call, so a
            training can create the file in its ``initialize`` step after the transform is built).
        channels: channel indices to normalise (None: all).
        dtype: output dtype.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, fingerprint: Mapping | str | os.PathLike, channels: Sequence[int] | int | None = None, dtype=torch.float32) -> None:
        if not isinstance(fingerprint, (Mapping, str, os.PathLike)):
            raise ValueError(f"fingerprint must be a dict or a JSON path, got {type(fingerprint).__name__}")
        self._source = fingerprint
        self._fp: dict | None = dict(fingerprint) if isinstance(fingerprint, Mapping) else None
        if self._fp is not None:
            missing = [k for k in ("mean", "std", "percentile_00_5", "percentile_99_5") if k not in self._fp]
            if missing:
                raise ValueError(f"fingerprint lacks {missing}")
        self.channels = [channels] if isinstance(channels, int) else (None if channels is None else list(channels))
        self.dtype = dtype

    @property
    def fingerprint(self) -> dict:
        if self._fp is None:
            self._fp = load_fingerprint(self._source)
        return self._fp

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        fp = self.fingerprint
        lo, hi = float(fp["percentile_00_5"]), float(fp["percentile_99_5"])
        return (x.clamp(lo, hi) - float(fp["mean"])) / max(float(fp["std"]), 1e-8)

    def __call__(self, img):
        """Args:
            img: ``(C, X, Y, Z)`` CT in HU (numpy, torch or MetaTensor).

        Returns:
            normalised float image of the same type and shape.
        """
        t = torch.as_tensor(img.as_tensor() if isinstance(img, MetaTensor) else img).to(torch.float32)
        if self.channels is None:
            out = self._normalise(t)
        else:
            out = t.clone()
            for c in self.channels:
                if not -t.shape[0] <= c < t.shape[0]:
                    raise ValueError(f"channel {c} out of range for an image with {t.shape[0]} channels")
                out[c] = self._normalise(t[c])
        result = convert_to_dst_type(out.to(self.dtype), img, dtype=self.dtype)[0]
        if isinstance(result, MetaTensor):
            fp = self.fingerprint
            result.meta["ct_normalization"] = [fp["percentile_00_5"], fp["percentile_99_5"], fp["mean"], fp["std"]]
        return result


class CTNormalized(MapTransform):
    """Dictionary wrapper of :class:`CTNormalize` (same arguments)."""

    backend = CTNormalize.backend

    def __init__(self, keys: KeysCollection, fingerprint, channels=None, dtype=torch.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = CTNormalize(fingerprint, channels, dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d
