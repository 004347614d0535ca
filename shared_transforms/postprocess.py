"""Post-processing of binary tumour masks.

* :class:`LargestComponent`: keep the largest 3D connected component (the primary GTV is one mass).
* :class:`SliceLargestComponent`: in every slice along the superior-inferior axis (read from the
  affine, or given) keep only the largest 2D component, as the UNet-2.5D paper's contour search.
* :class:`BinaryOpening`: morphological opening (erosion then dilation) with a configurable
  structuring element, the UNet-2.5D paper's first post-processing step.

The UNet-2.5D order is opening, then per-slice largest component. All transforms take a binary
mask whose last three dimensions are ``(X, Y, Z)`` (``(X, Y, Z)``, ``(C, X, Y, Z)`` or
``(B, C, X, Y, Z)``; each leading index is processed on its own); voxels ``> 0`` are foreground.
They return the same type (numpy / torch / MetaTensor with its meta data), shape and dtype, with
values 0/1. They are not spatial (the grid never changes), so they need no inverse.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type
from scipy import ndimage

from shared_transforms.flip import si_axis

__all__ = [
    "largest_component",
    "slice_largest_component",
    "structuring_element",
    "binary_opening",
    "LargestComponent",
    "LargestComponentd",
    "SliceLargestComponent",
    "SliceLargestComponentd",
    "BinaryOpening",
    "BinaryOpeningd",
]


def largest_component(mask, connectivity: int | None = None) -> np.ndarray:
    """Keep the largest connected component of a mask (ties: the component met first in scan order).

    Args:
        mask: array of any dimension; non-zero is foreground.
        connectivity: 1 (faces) up to ``mask.ndim`` (corners); None: ``mask.ndim`` (26-connected in 3D,
            like MONAI's ``KeepLargestConnectedComponent``).

    Returns:
        boolean array of the same shape (all False for an empty mask).
    """
    mask = np.asarray(mask) > 0
    conn = mask.ndim if connectivity is None else int(connectivity)
    if not 1 <= conn <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{mask.ndim}, got {connectivity}")
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, conn))
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels[mask], minlength=n + 1)[1:]  # foreground only: far faster than the whole volume
    return labels == (int(np.argmax(sizes)) + 1)


def slice_largest_component(mask, slice_axis: int, connectivity: int | None = None) -> np.ndarray:
    """Keep the largest 2D component in every slice of a 3D mask.

    Args:
        mask: ``(X, Y, Z)`` array; non-zero is foreground.
        slice_axis: array axis (0, 1 or 2) across which slices are taken.
        connectivity: 2D connectivity, 1 (4-connected) or 2 (8-connected, default).

    Returns:
        boolean ``(X, Y, Z)`` array.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 3 or slice_axis not in (0, 1, 2):
        raise ValueError(f"need a 3D mask and slice_axis in 0..2, got shape {mask.shape} and axis {slice_axis}")
    moved = np.moveaxis(mask, slice_axis, 0)
    out = np.stack([largest_component(sl, connectivity) for sl in moved], axis=0)
    return np.moveaxis(out, 0, slice_axis)


def structuring_element(shape: str = "ball", radius: int = 1, in_plane_axis: int | None = None) -> np.ndarray:
    """Build a 3D structuring element.

    Args:
        shape: ``"ball"`` (voxels within Euclidean distance ``radius``), ``"cross"`` (6-connected
            element iterated ``radius`` times, i.e. L1 distance ``<= radius``) or ``"cube"``
            (``(2 radius + 1)^3``).
        radius: radius in voxels (>= 1).
        in_plane_axis: if given, flatten the element to the slice through its centre across this
            array axis (a 2D element applied slice by slice).

    Returns:
        boolean ``(2 r + 1, 2 r + 1, 2 r + 1)`` array.
    """
    if int(radius) < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    r = int(radius)
    grid = np.indices((2 * r + 1,) * 3) - r
    if shape == "ball":
        se = (grid**2).sum(0) <= r * r
    elif shape == "cross":
        se = np.abs(grid).sum(0) <= r
    elif shape == "cube":
        se = np.ones((2 * r + 1,) * 3, bool)
    else:
        raise ValueError(f"shape must be 'ball', 'cross' or 'cube', got {shape!r}")
    if in_plane_axis is not None:
        if in_plane_axis not in (0, 1, 2):
            raise ValueError(f"in_plane_axis must be 0, 1 or 2, got {in_plane_axis}")
        se = se & (np.moveaxis(grid, 0, -1)[..., in_plane_axis] == 0)
    return se


def binary_opening(mask, structure: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Morphological opening (erosion then dilation) of a 3D mask; outside the array counts as background."""
    mask = np.asarray(mask) > 0
    return ndimage.binary_opening(mask, structure=np.asarray(structure, bool), iterations=int(iterations))


def _apply(img, fn):
    """Run ``fn`` on every ``(X, Y, Z)`` block of ``img`` and return 0/1 in ``img``'s type and dtype."""
    if img.ndim < 3:
        raise ValueError(f"expected a mask whose last three dims are (X, Y, Z), got shape {tuple(img.shape)}")
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    flat = arr.reshape((-1,) + arr.shape[-3:])
    out = np.stack([fn(block) for block in flat], 0).reshape(arr.shape)
    return convert_to_dst_type(out.astype(arr.dtype if arr.dtype != bool else bool), img)[0]


def _affine(img, affine):
    if affine is not None:
        return affine
    if isinstance(img, MetaTensor):
        return img.affine
    return None


class LargestComponent(Transform):
    """Keep the largest 3D connected component of a binary mask.

    Args:
        connectivity: 1 (6-connected), 2 (18) or 3 / None (26-connected, default).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, connectivity: int | None = None) -> None:
        if connectivity is not None and connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2, 3 or None, got {connectivity}")
        self.connectivity = connectivity

    def __call__(self, img):
        """Args:
            img: mask ``(C, X, Y, Z)`` (or any shape whose last three dims are spatial).

        Returns:
            the mask with only its largest component, same type, shape and dtype.
        """
        return _apply(img, lambda m: largest_component(m, self.connectivity))


class SliceLargestComponent(Transform):
    """Keep the largest 2D connected component in every slice along the superior-inferior axis.

    Args:
        slice_axis: spatial axis (0, 1, 2 of ``(X, Y, Z)``) across which slices are taken; None:
            the axis closest to superior-inferior from the affine (MetaTensor or ``affine`` argument).
        connectivity: 2D connectivity, 1 (4-connected) or 2 / None (8-connected).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, slice_axis: int | None = None, connectivity: int | None = None) -> None:
        if slice_axis is not None and slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1, 2 or None, got {slice_axis}")
        if connectivity is not None and connectivity not in (1, 2):
            raise ValueError(f"2D connectivity must be 1, 2 or None, got {connectivity}")
        self.slice_axis = slice_axis
        self.connectivity = connectivity

    def __call__(self, img, affine=None):
        """Args:
            img: mask ``(C, X, Y, Z)`` (or any shape whose last three dims are spatial).
            affine: 4x4 affine used when ``slice_axis`` is None and ``img`` is not a MetaTensor.

        Returns:
            the filtered mask, same type, shape and dtype.
        """
        axis = self.slice_axis
        if axis is None:
            aff = _affine(img, affine)
            if aff is None:
                raise ValueError("slice_axis is None: pass a MetaTensor or an affine to find the superior-inferior axis")
            axis = si_axis(aff)
        return _apply(img, lambda m: slice_largest_component(m, axis, self.connectivity))


class BinaryOpening(Transform):
    """Morphological opening (erosion then dilation) of a binary mask.

    Args:
        structure: ``"ball"``, ``"cross"`` or ``"cube"`` (see :func:`structuring_element`) or an
            explicit 3D boolean array.
        radius: radius of a named element in voxels.
        iterations: number of erosions followed by as many dilations.
        in_plane: use a 2D element in the plane orthogonal to the superior-inferior axis (from
            the affine, or ``slice_axis``), i.e. a per-slice opening that leaves thin structures
            across slices (3 mm) alone.
        slice_axis: explicit slice axis for ``in_plane`` (None: from the affine).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, structure="ball", radius: int = 1, iterations: int = 1, in_plane: bool = False, slice_axis: int | None = None) -> None:
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if isinstance(structure, str):
            structuring_element(structure, radius)  # validates the name and radius
        else:
            structure = np.asarray(structure, bool)
            if structure.ndim != 3:
                raise ValueError(f"an explicit structuring element must be 3D, got shape {structure.shape}")
        if slice_axis is not None and slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1, 2 or None, got {slice_axis}")
        self.structure, self.radius, self.iterations = structure, int(radius), int(iterations)
        self.in_plane, self.slice_axis = in_plane, slice_axis

    def element(self, affine=None) -> np.ndarray:
        """The 3D boolean structuring element used for an image with ``affine``."""
        axis = None
        if self.in_plane:
            axis = self.slice_axis
            if axis is None:
                if affine is None:
                    raise ValueError("in_plane opening needs slice_axis or an affine (MetaTensor) to find the slice axis")
                axis = si_axis(affine)
        if isinstance(self.structure, str):
            return structuring_element(self.structure, self.radius, axis)
        se = self.structure
        if axis is not None:
            centre = [s // 2 for s in se.shape]
            keep = np.zeros_like(se)
            idx = [slice(None)] * 3
            idx[axis] = centre[axis]
            keep[tuple(idx)] = True
            se = se & keep
        return se

    def __call__(self, img, affine=None):
        """Args:
            img: mask ``(C, X, Y, Z)`` (or any shape whose last three dims are spatial).
            affine: 4x4 affine for ``in_plane`` when ``img`` is not a MetaTensor.

        Returns:
            the opened mask, same type, shape and dtype.
        """
        se = self.element(_affine(img, affine))
        return _apply(img, lambda m: binary_opening(m, se, self.iterations))


class _Wrapper(MapTransform):
    def __init__(self, keys: KeysCollection, transform, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class LargestComponentd(_Wrapper):
    """Dictionary wrapper of :class:`LargestComponent` (``keys``, ``connectivity``)."""

    def __init__(self, keys: KeysCollection, connectivity: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, LargestComponent(connectivity), allow_missing_keys)


class SliceLargestComponentd(_Wrapper):
    """Dictionary wrapper of :class:`SliceLargestComponent` (``keys``, ``slice_axis``, ``connectivity``)."""

    def __init__(self, keys: KeysCollection, slice_axis: int | None = None, connectivity: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, SliceLargestComponent(slice_axis, connectivity), allow_missing_keys)


class BinaryOpeningd(_Wrapper):
    """Dictionary wrapper of :class:`BinaryOpening` (same arguments after ``keys``)."""

    def __init__(
        self,
        keys: KeysCollection,
        structure="ball",
        radius: int = 1,
        iterations: int = 1,
        in_plane: bool = False,
        slice_axis: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, BinaryOpening(structure, radius, iterations, in_plane, slice_axis), allow_missing_keys)
