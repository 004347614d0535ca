"""nnU-Net's default training augmentation, built from MONAI transforms.

The SATS papers train on nnU-Net and name no augmentation, so they inherit nnU-Net v2's
(``nnUNetTrainer.get_training_transforms``, nnunetv2 2.8.1). This module reproduces its
parameters with MONAI's transforms, in nnU-Net's order:

==========================  ====================================  =====================================
nnU-Net transform           nnU-Net setting                       here
==========================  ====================================  =====================================
spatial: rotation           p 0.2; +-30 deg about each axis, or   :class:`RandNNUNetSpatial` (one
                            +-180 deg in-plane only for an        resampling with MONAI ``Affine``)
                            anisotropic patch ("dummy 2D")
spatial: scaling            p 0.2; (0.7, 1.4), the same on every  idem (in-plane only in dummy 2D)
                            axis
Gaussian noise              p 0.1; variance U(0, 0.1)             ``RandGaussianNoised`` p 0.1, std
                                                                  U(0, sqrt(0.1))
Gaussian blur               p 0.2 x 0.5 per channel; sigma        ``RandGaussianSmoothd`` p 0.1, sigma
                            U(0.5, 1) per axis                    U(0.5, 1) per axis
brightness (multiplicative) p 0.15; factor (0.75, 1.25)           ``RandScaleIntensityd`` p 0.15
contrast                    p 0.15; (0.75, 1.25), mean and range  ``RandScaleIntensityFixedMeand`` p
                            kept                                  0.15, preserve_range
low-resolution simulation   p 0.25 x 0.5 per channel; zoom        ``RandSimulateLowResolutiond`` p
                            (0.5, 1)                              0.125
gamma, inverted image       p 0.1; (0.7, 1.5), stats retained     ``RandAdjustContrastd`` p 0.1
gamma                       p 0.3; (0.7, 1.5), stats retained     ``RandAdjustContrastd`` p 0.3
mirroring                   each axis p 0.5                       ``RandFlipd`` per axis p 0.5
==========================  ====================================  =====================================

Known differences (MONAI's transforms draw differently): the noise draws its standard deviation
uniformly instead of its variance; the gamma and the multiplicative factors are uniform over their
range (nnU-Net picks below or above 1 with equal probability, then uniformly); blur and
low-resolution simulation act on all channels together (nnU-Net decides per channel); in dummy-2D
mode the low-resolution simulation also acts along the coarse axis (nnU-Net leaves it out), and one
zoom factor serves all keys (MONAI's dictionary transform draws one per key); labels
outside the image after rotation are background (nnU-Net marks them ignore, then background).

nnU-Net crops a larger patch first (:func:`initial_patch_size`, nnU-Net's rule) so that the rotated
and scaled patch has image content in its corners; the spatial transform then samples the final
patch around the centre of that crop.

Every random parameter is drawn once per sample and applied to every key, so keys that correspond
voxel by voxel (SATS's image and its mirror cropped with the same box) still correspond after the
augmentation. Images are interpolated bilinearly, labels by nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Affine,
    CenterSpatialCrop,
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
)

__all__ = [
    "ANISO_THRESHOLD",
    "coarse_axis_of",
    "nnunet_rotation",
    "initial_patch_size",
    "RandNNUNetSpatial",
    "RandNNUNetSpatiald",
    "NNUNetAugmentd",
    "augmented_crop_size",
]

ANISO_THRESHOLD = 3.0  # nnU-Net: a patch whose largest side exceeds 3x its coarse-axis side is augmented in 2D


def _check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    if len(patch_size) != 3 or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
    return tuple(int(p) for p in patch_size)  # type: ignore[return-value]


def _check_axis(coarse_axis: int) -> int:
    if coarse_axis not in (0, 1, 2):
        raise ValueError(f"coarse_axis must be 0, 1 or 2, got {coarse_axis}")
    return int(coarse_axis)


def coarse_axis_of(pixdim: Sequence[float]) -> int:
    """The spatial axis with the largest spacing (nnU-Net's first axis after its transpose); ties: the last."""
    if len(pixdim) != 3 or any(float(s) <= 0 for s in pixdim):
        raise ValueError(f"pixdim must be 3 positive spacings, got {pixdim}")
    s = [float(v) for v in pixdim]
    return max(range(3), key=lambda i: (s[i], i))


def nnunet_rotation(patch_size: Sequence[int], coarse_axis: int) -> tuple[bool, float]:
    """nnU-Net's rotation setting for a 3-D patch.

    Args:
        patch_size: final patch size (3 voxels counts, grid order).
        coarse_axis: the axis with the largest spacing.

    Returns:
        ``(dummy_2d, max_angle)``: whether the augmentation is in-plane only (largest side > 3x the coarse
        side) and the largest rotation angle in radians (pi in dummy 2D, pi / 6 otherwise).
    """
    p = _check_patch(patch_size)
    dummy_2d = max(p) / p[_check_axis(coarse_axis)] > ANISO_THRESHOLD
    return dummy_2d, (np.pi if dummy_2d else np.pi / 6)


def _rotation_matrices(angle: float) -> list[np.ndarray]:
    """nnU-Net's (batchgenerators') rotation matrices about axes 0, 1, 2 for one angle (their sign convention)."""
    c, s = np.cos(angle), np.sin(angle)
    return [
        np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    ]


def initial_patch_size(patch_size: Sequence[int], coarse_axis: int, min_scale: float = 0.85) -> list[int]:
    """Size of the crop that nnU-Net's spatial augmentation starts from (its ``get_patch_size`` rule).

    nnU-Net rotates the patch's extent vector by the largest angle (capped at 90 degrees) about each
    axis in turn, keeps the largest absolute extent per axis and divides by the smallest scale
    (0.85, the old nnU-Net's range, kept by nnU-Net v2); in dummy-2D mode the coarse axis keeps its
    size. The computation runs in nnU-Net's axis order (coarse axis first, the others in grid order).

    Args:
        patch_size: final patch size (grid order).
        coarse_axis: the axis with the largest spacing.
        min_scale: the smallest scale of the rule.

    Returns:
        the crop size in grid order, each >= ``patch_size``.

    Example: ``initial_patch_size([192, 192, 56], 2) == [225, 225, 56]`` (nnU-Net: (56, 225, 225)).
    """
    p = _check_patch(patch_size)
    axis = _check_axis(coarse_axis)
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    dummy_2d, angle = nnunet_rotation(p, axis)
    order = [axis] + [i for i in range(3) if i != axis]
    coords = np.array([p[i] for i in order], dtype=float)
    final = coords.copy()
    for rot in _rotation_matrices(min(angle, np.pi / 2)):
        final = np.maximum(final, np.abs(coords @ rot))
    final = (final / min_scale).astype(int)
    if dummy_2d:
        final[0] = coords[0]
    out = [0, 0, 0]
    for pos, i in enumerate(order):
        out[i] = max(int(final[pos]), p[i])
    return out


def augmented_crop_size(patch_size: Sequence[int], pixdim: Sequence[float], augmentation: str) -> list[int]:
    """Crop size a bundle's sampler draws before the augmentation: nnU-Net's initial size, or the patch itself.

    Args:
        patch_size: final patch size (grid order).
        pixdim: voxel spacing (grid order), for the coarse axis.
        augmentation: ``"nnunet"`` or ``"none"``.
    """
    if augmentation not in ("nnunet", "none"):
        raise ValueError(f"augmentation must be 'nnunet' or 'none', got {augmentation!r}")
    if augmentation == "none":
        return list(_check_patch(patch_size))
    return initial_patch_size(patch_size, coarse_axis_of(pixdim))


class _SyncedLowResolutiond(RandSimulateLowResolutiond):
    """``RandSimulateLowResolutiond`` with one zoom factor for every key (MONAI 1.6 draws one per key)."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.sim_lowres_tfm.randomize(None)
        for key in self.key_iterator(d):
            d[key] = self.sim_lowres_tfm(d[key], randomize=False)
        return d


class RandNNUNetSpatial(Randomizable):
    """nnU-Net's spatial augmentation: random rotation and isotropic scaling, then the central patch.

    Rotation (probability ``p_rotation``) and scaling (probability ``p_scaling``) are drawn
    independently and applied in one resampling with MONAI's :class:`~monai.transforms.Affine` about
    the centre of the input; the output is the central ``patch_size`` region. Without either, the
    central patch is cut out exactly (no interpolation).

    Args:
        patch_size: output spatial size (grid order).
        coarse_axis: the axis with the largest spacing; in dummy-2D mode (:func:`nnunet_rotation`) the
            rotation is about this axis only and the scaling leaves it alone.
        p_rotation: probability of a rotation (nnU-Net 0.2).
        p_scaling: probability of a scaling (nnU-Net 0.2).
        scale_range: scale of the sampling grid (nnU-Net (0.7, 1.4); > 1 shows a larger region, zooming out).
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        coarse_axis: int = 2,
        p_rotation: float = 0.2,
        p_scaling: float = 0.2,
        scale_range: tuple[float, float] = (0.7, 1.4),
    ) -> None:
        self.patch_size = _check_patch(patch_size)
        self.coarse_axis = _check_axis(coarse_axis)
        for name, p in (("p_rotation", p_rotation), ("p_scaling", p_scaling)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.p_rotation, self.p_scaling, self.scale_range = float(p_rotation), float(p_scaling), tuple(scale_range)
        self.dummy_2d, self.max_angle = nnunet_rotation(self.patch_size, self.coarse_axis)
        self.angles: list[float] | None = None
        self.scales: list[float] | None = None

    def randomize(self, data=None) -> None:
        self.angles = self.scales = None
        if self.R.uniform() < self.p_rotation:
            if self.dummy_2d:
                self.angles = [0.0, 0.0, 0.0]
                self.angles[self.coarse_axis] = float(self.R.uniform(-self.max_angle, self.max_angle))
            else:
                self.angles = [float(self.R.uniform(-self.max_angle, self.max_angle)) for _ in range(3)]
        if self.R.uniform() < self.p_scaling:
            s = float(self.R.uniform(*self.scale_range))
            self.scales = [s, s, s]
            if self.dummy_2d:
                self.scales[self.coarse_axis] = 1.0

    def __call__(self, img: torch.Tensor, mode: str = "bilinear", randomize: bool = True) -> torch.Tensor:
        """Args:
            img: ``(C, X, Y, Z)`` tensor, each spatial size >= ``patch_size``.
            mode: interpolation (``"bilinear"`` for images, ``"nearest"`` for labels).
            randomize: draw new parameters first (False: reuse the last draw, for further keys).

        Returns:
            ``(C, *patch_size)``.
        """
        if img.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) tensor, got shape {tuple(img.shape)}")
        if any(s < p for s, p in zip(img.shape[1:], self.patch_size)):
            raise ValueError(f"input {tuple(img.shape[1:])} is smaller than the patch {self.patch_size}; crop a larger region")
        if randomize:
            self.randomize()
        if self.angles is None and self.scales is None:
            return CenterSpatialCrop(self.patch_size)(img)
        affine = Affine(
            rotate_params=self.angles, scale_params=self.scales, spatial_size=self.patch_size,
            mode=mode, padding_mode="zeros", image_only=True,
        )
        return affine(img)


class RandNNUNetSpatiald(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandNNUNetSpatial`: one draw per sample for every key.

    Args:
        keys: keys to transform (all of the same spatial shape).
        patch_size, coarse_axis, p_rotation, p_scaling, scale_range: see :class:`RandNNUNetSpatial`.
        mode: interpolation per key (a string for all, or one per key).
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int],
        coarse_axis: int = 2,
        p_rotation: float = 0.2,
        p_scaling: float = 0.2,
        scale_range: tuple[float, float] = (0.7, 1.4),
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spatial = RandNNUNetSpatial(patch_size, coarse_axis, p_rotation, p_scaling, scale_range)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"mode needs one entry per key ({len(self.keys)}), got {mode}")
        self.mode = dict(zip(self.keys, modes))

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.spatial.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.spatial.randomize()
        for key in self.key_iterator(d):
            d[key] = self.spatial(d[key], mode=self.mode[key], randomize=False)
        return d


class NNUNetAugmentd(Randomizable, MapTransform):
    """nnU-Net's training augmentation (module docstring) for a dictionary sample.

    Expects every key cropped to :func:`initial_patch_size` (a bundle's sampler with
    :func:`augmented_crop_size`); returns them at ``patch_size``.

    Args:
        keys: every spatial key (images and labels) to transform together.
        image_keys: the subset that holds images (intensity transforms, bilinear interpolation); the
            rest are labels (nearest neighbour).
        patch_size: final patch size (grid order).
        pixdim: voxel spacing of the patch (grid order), for the coarse axis and dummy-2D mode.
        mirror_axes: spatial axes mirrored with probability 0.5 each (nnU-Net: all three).
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_keys: KeysCollection,
        patch_size: Sequence[int],
        pixdim: Sequence[float],
        mirror_axes: Sequence[int] = (0, 1, 2),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        images = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        if not images or any(k not in self.keys for k in images):
            raise ValueError(f"image_keys {images} must be a non-empty subset of keys {list(self.keys)}")
        if any(a not in (0, 1, 2) for a in mirror_axes):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1, 2, got {mirror_axes}")
        self.patch_size = list(_check_patch(patch_size))
        coarse = coarse_axis_of(pixdim)
        modes = ["bilinear" if k in images else "nearest" for k in self.keys]
        amk = allow_missing_keys
        self.transforms = Compose(
            [
                RandNNUNetSpatiald(self.keys, self.patch_size, coarse_axis=coarse, mode=modes, allow_missing_keys=amk),
                RandGaussianNoised(images, prob=0.1, mean=0.0, std=float(np.sqrt(0.1)), sample_std=True, allow_missing_keys=amk),
                RandGaussianSmoothd(images, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1,
                                    allow_missing_keys=amk),
                RandScaleIntensityd(images, factors=0.25, prob=0.15, allow_missing_keys=amk),
                RandScaleIntensityFixedMeand(images, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15,
                                             allow_missing_keys=amk),
                _SyncedLowResolutiond(images, prob=0.125, zoom_range=(0.5, 1.0), allow_missing_keys=amk),
                RandAdjustContrastd(images, prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True,
                                    allow_missing_keys=amk),
                RandAdjustContrastd(images, prob=0.3, gamma=(0.7, 1.5), invert_image=False, retain_stats=True,
                                    allow_missing_keys=amk),
                *[RandFlipd(self.keys, prob=0.5, spatial_axis=a, allow_missing_keys=amk) for a in mirror_axes],
            ]
        )

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transforms.set_random_state(state=self.R)
        return self

    def randomize(self, data=None) -> None:  # the member transforms draw their own parameters
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        return self.transforms(dict(data))
