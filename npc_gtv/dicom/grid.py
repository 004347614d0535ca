"""Bring a mask onto a CT's own voxel grid (nearest neighbour in world coordinates)."""

from __future__ import annotations

import numpy as np

from shared_transforms.io import AFFINE_TOLERANCE, InputError, check_label_array, lossless_reorientation, reorient_to_grid

__all__ = ["mask_to_grid"]


def mask_to_grid(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray, *, source=None, reference=None,
                 resample: bool = False) -> np.ndarray:
    """Bring a binary mask onto a CT's grid (``shape``, ``affine``): exactly, or by nearest neighbour on request.

    Identical grids are returned unchanged; a mask stored on the same voxel centres in another axis
    order or direction (e.g. a prediction saved in RAS orientation) is reoriented exactly. Any other
    grid (shifted, other spacing, rotated) is refused unless ``resample``: then every target voxel
    centre is mapped to the mask's voxel space (``inv(mask_affine) @ affine``) and the nearest mask
    voxel is taken, which changes the mask (a half-voxel shift moves its border by a voxel).

    Args:
        mask: ``(X, Y, Z)`` binary mask.
        mask_affine: its 4x4 voxel -> RAS affine.
        shape: target spatial shape ``(X, Y, Z)``.
        affine: target voxel -> RAS affine.
        source: mask name for messages. reference: target (CT) name for messages.
        resample: allow nearest-neighbour resampling of a mask that is not on the CT's voxel grid.

    Returns:
        ``uint8`` mask of shape ``shape``.

    Raises:
        InputError: non-binary mask, a mask on another grid without ``resample``, or (with it) mask
            foreground lying (partly) outside the target volume, which means the mask does not belong
            to this CT.
    """
    from scipy import ndimage

    mask = check_label_array(mask, source)
    if mask.ndim != 3:
        raise InputError(source, f"mask must be 3D, got shape {mask.shape}")
    shape = tuple(int(s) for s in shape)
    mask_affine = np.asarray(mask_affine, float)
    affine = np.asarray(affine, float)
    if mask.shape == shape and np.abs(mask_affine - affine).max() <= AFFINE_TOLERANCE:
        return mask
    if lossless_reorientation(mask.shape, mask_affine, shape, affine) is not None:
        return np.ascontiguousarray(reorient_to_grid(mask, mask_affine, shape, affine, source, reference)).astype(np.uint8)
    if not resample:
        diff = np.abs(mask_affine - affine).max()
        raise InputError(
            source,
            f"is not on the voxel grid of {reference or 'the CT'} (shape {mask.shape} vs {shape}, affine differs by up to "
            f"{diff:.4g}) nor a lossless reorientation of it; bringing it over would resample (change) the mask: pass "
            "--resample to do so by nearest neighbour, or give the mask on the CT's grid",
        )
    matrix = np.linalg.inv(mask_affine) @ affine
    out = ndimage.affine_transform(
        mask, matrix[:3, :3], offset=matrix[:3, 3], output_shape=shape, order=0, mode="constant", cval=0
    ).astype(np.uint8)
    n_in, n_out = int(mask.sum()), int(out.sum())
    if n_in and not n_out:
        raise InputError(source, f"mask foreground does not overlap the field of view of {reference or 'the CT'}; wrong CT for this mask?")
    # compare physical volumes: voxels lost at the border mean the mask extends beyond the CT
    vol_in = n_in * abs(np.linalg.det(mask_affine[:3, :3]))
    vol_out = n_out * abs(np.linalg.det(affine[:3, :3]))
    if n_in and vol_out < 0.5 * vol_in:
        raise InputError(
            source,
            f"only {vol_out / vol_in:.0%} of the mask volume lies inside {reference or 'the CT'}; wrong CT for this mask?",
        )
    return out
