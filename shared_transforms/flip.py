"""Left-right flip pairing and the asymmetric tumour mask of the SATS papers.

The left-right axis is read from the affine, never assumed: :func:`lr_axis` returns the array
axis whose world direction is closest to the patient left-right (world x) axis. The flip is a
mirror of the array about the grid's central sagittal plane (array reversal along that axis);
the flipped volume keeps the grid (shape and affine) of the input, so that a voxel of the image
and the same voxel of the flipped image show mirrored anatomy. When the head is not centred and
straight in the grid (real patients, the random-pose phantoms), register it to a symmetric pose
first (``shared_transforms.symmetry``); the grid's central plane is then the mid-sagittal plane.

The asymmetric mask is ``m = s - (s AND s')`` (SATS, eq. 1): tumour voxels whose mirrored voxel is
not tumour.

Array layout: the last three dimensions are always the spatial ``(X, Y, Z)`` axes that the 4x4
affine describes; leading dimensions (channel, batch) are carried along unchanged. A 3D array is
``(X, Y, Z)``, a 4D one ``(C, X, Y, Z)``, a 5D one ``(B, C, X, Y, Z)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["lr_axis", "si_axis", "flip_lr", "asymmetric_mask", "LRFlipPair", "LRFlipPaird"]


def _world_axis(affine, world: int) -> int:
    """Spatial array axis (0..2) whose direction has the largest component along world axis ``world``."""
    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=float)
    if aff.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"expected a 4x4 (or 3x3) affine, got shape {aff.shape}")
    directions = aff[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    if not np.all(np.isfinite(directions)) or np.any(norms < 1e-12):
        raise ValueError(f"affine has a zero or non-finite column, no orientation can be read:\n{aff}")
    cosines = np.abs(directions[world] / norms)
    return int(np.argmax(cosines))


def lr_axis(affine) -> int:
    """Return the spatial array axis (0, 1 or 2) closest to the patient left-right direction.

    Args:
        affine: 4x4 voxel-to-world matrix (RAS as in nibabel/MONAI, or LPS: only the absolute
            direction cosines are used, so the sign convention does not matter).

    Returns:
        index of the spatial axis in ``(X, Y, Z)`` whose direction has the largest absolute cosine
        with world x (left-right).

    Raises:
        ValueError: affine of the wrong shape, or with a zero / non-finite column.
    """
    return _world_axis(affine, 0)


def si_axis(affine) -> int:
    """Return the spatial array axis (0, 1 or 2) closest to the superior-inferior (world z) direction."""
    return _world_axis(affine, 2)


def _affine_of(img, affine):
    if affine is not None:
        return affine
    if isinstance(img, MetaTensor):
        return img.affine
    raise ValueError("an affine is needed to find the left-right axis: pass `affine` or a MetaTensor")


def flip_lr(array, affine=None):
    """Mirror ``array`` about its grid's central sagittal plane.

    Args:
        array: numpy array or torch tensor (MetaTensor included) whose last three dimensions are
            ``(X, Y, Z)``: ``(X, Y, Z)``, ``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``.
        affine: 4x4 voxel-to-world matrix of the grid; defaults to ``array.affine`` for a MetaTensor.

    Returns:
        the mirrored array, same type, shape and dtype (a MetaTensor keeps its meta data and
        affine: the grid does not change, only the content is mirrored). Flipping twice gives the
        input back.

    Raises:
        ValueError: fewer than 3 dimensions, or no affine available.
    """
    if array.ndim < 3:
        raise ValueError(f"flip_lr needs an array whose last three dims are (X, Y, Z), got shape {tuple(array.shape)}")
    axis = array.ndim - 3 + lr_axis(_affine_of(array, affine))
    if isinstance(array, torch.Tensor):
        return torch.flip(array, dims=(axis,))
    return np.ascontiguousarray(np.flip(array, axis=axis))


def asymmetric_mask(s, s_flipped):
    """Asymmetric tumour mask ``m = s - (s AND s')``: foreground of ``s`` whose mirror is background.

    Args:
        s: binary mask (numpy or torch, any shape, values 0/1 or bool).
        s_flipped: the mirrored mask ``s'``, same shape.

    Returns:
        ``m`` with the type, shape and dtype of ``s`` (values 0/1).

    Raises:
        ValueError: shapes differ.
    """
    if tuple(s.shape) != tuple(s_flipped.shape):
        raise ValueError(f"s and s_flipped must have the same shape, got {tuple(s.shape)} and {tuple(s_flipped.shape)}")
    if isinstance(s, torch.Tensor):
        sf = torch.as_tensor(s_flipped, device=s.device) > 0
        m = (s > 0) & ~sf
        return m.to(s.dtype)
    m = (np.asarray(s) > 0) & ~(np.asarray(s_flipped) > 0)
    return m.astype(np.asarray(s).dtype)


class LRFlipPair(Transform):
    """Return the left-right mirror of an image (the partner of a flip pair).

    The mirror is taken about the grid's central sagittal plane along :func:`lr_axis`. A MetaTensor
    keeps its meta data (same grid); ``meta["lr_flipped"]`` is set to True and
    ``meta["lr_axis"]`` to the flipped spatial axis.

    Args:
        affine: fixed affine to use for plain arrays; a MetaTensor's own affine takes precedence
            unless ``affine`` is also given at call time.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, affine=None) -> None:
        self.affine = affine

    def __call__(self, img, affine=None):
        """Args:
            img: ``(C, X, Y, Z)`` (or any array whose last three dims are spatial).
            affine: overrides the MetaTensor / constructor affine.

        Returns:
            the mirrored array, same shape and type.
        """
        if affine is None and not isinstance(img, MetaTensor):
            affine = self.affine
        aff = _affine_of(img, affine)
        out = flip_lr(img, aff)
        if isinstance(out, MetaTensor):
            out.meta["lr_flipped"] = True
            out.meta["lr_axis"] = lr_axis(aff)
        return out


class LRFlipPaird(MapTransform):
    """Add the left-right mirrored copies of some keys and the asymmetric tumour mask.

    For each key ``k`` in ``keys`` the output gets ``k + flipped_suffix`` (e.g. ``image_flipped``,
    ``label_flipped``). When ``label_key`` is given, ``asym_key`` receives
    ``m = s - (s AND s')`` computed from the label and its mirror. The inputs are not changed.

    Apply it to whole volumes before any random crop: cropping the original and flipped keys with
    the same crop then keeps a voxel and its mirrored partner at the same patch position.

    Args:
        keys: keys to mirror, e.g. ``["image", "label"]``. Values are ``(C, X, Y, Z)`` MetaTensors
            (the affine is read from them) or arrays with ``affine_key`` set.
        label_key: key of the binary mask ``s`` used for the asymmetric mask (None: no mask).
        flipped_suffix: appended to a key for its mirrored copy.
        asym_key: output key of the asymmetric mask.
        affine_key: optional key holding a 4x4 affine for plain (non-MetaTensor) arrays.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: Hashable | None = "label",
        flipped_suffix: str = "_flipped",
        asym_key: Hashable = "asym_mask",
        affine_key: Hashable | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not flipped_suffix:
            raise ValueError("flipped_suffix must be a non-empty string (the mirrored copy must not replace its key)")
        self.label_key = label_key
        self.flipped_suffix = flipped_suffix
        self.asym_key = asym_key
        self.affine_key = affine_key
        self.flipper = LRFlipPair()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        affine = d[self.affine_key] if self.affine_key is not None else None
        flipped: dict = {}
        for key in self.key_iterator(d):
            flipped[key] = self.flipper(d[key], affine=affine)
            d[f"{key}{self.flipped_suffix}"] = flipped[key]
        if self.label_key is not None:
            if self.label_key not in d:
                if self.allow_missing_keys:
                    return d
                raise KeyError(f"label key {self.label_key!r} not found for the asymmetric mask")
            s = d[self.label_key]
            s_flipped = flipped[self.label_key] if self.label_key in flipped else self.flipper(s, affine=affine)
            d[self.asym_key] = asymmetric_mask(s, s_flipped)
        return d

