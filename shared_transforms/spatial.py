"""Spatial transforms: resampling to a target spacing and the body (foreground) crop.

Both are invertible MONAI transforms: they record what they did in the MetaTensor's
``applied_operations`` and ``monai.transforms.Invertd`` (or ``transform.inverse``) puts a
prediction back on the input image's exact grid (same shape, same affine).

* :class:`ResampleToSpacing` / :class:`ResampleToSpacingd` are thin subclasses of MONAI's
  ``Spacing`` / ``Spacingd`` (which already invert) with the project's defaults: target spacing
  ``1 x 1 x 3`` mm, images (bi/tri)linear, labels nearest, and the target spacing given per
  *world* axis (left-right, anterior-posterior, superior-inferior) and mapped onto the array axes
  through the affine, so that the 3 mm always goes to the slice axis whatever the array order.
  Before resampling, the memory the output and MONAI's sampling grid need is estimated
  (:func:`check_resample_memory`); a resampling that cannot fit is refused with a message
  naming the file, instead of failing (or swapping) in the middle of an allocation.
* :class:`BodyCrop` / :class:`BodyCropd` crop to the bounding box of the body as the HCF paper
  describes: threshold, binary erosion, largest connected component, bounding box (+ margin).
  They subclass MONAI's ``CropForeground`` / ``CropForegroundd`` and follow their push/pop
  pattern, so the inverse pads the crop back to the original grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForeground, CropForegroundd, Spacing, Spacingd
from monai.transforms.utils import generate_spatial_bounding_box, is_positive
from scipy import ndimage

from shared_transforms.flip import _world_axis, si_axis
from shared_transforms.io import InputError
from shared_transforms.postprocess import largest_component

__all__ = [
    "DEFAULT_SPACING",
    "available_memory",
    "check_resample_memory",
    "world_to_array_pixdim",
    "ResampleToSpacing",
    "ResampleToSpacingd",
    "body_mask",
    "BodyCrop",
    "BodyCropd",
]

DEFAULT_SPACING = (1.0, 1.0, 3.0)


def world_to_array_pixdim(pixdim: Sequence[float], affine) -> tuple[float, float, float]:
    """Map a spacing given per world axis (LR, AP, SI) onto the array axes ``(X, Y, Z)``.

    Each array axis takes the spacing of the world axis its direction is closest to. When two
    array axes are closest to the same world axis (strongly oblique grids), the array order is
    used unchanged.

    Args:
        pixdim: three spacings in mm for the left-right, anterior-posterior and superior-inferior axes.
        affine: 4x4 voxel-to-world matrix.

    Returns:
        the spacing of array axes 0, 1, 2.
    """
    pixdim = tuple(float(p) for p in pixdim)
    if len(pixdim) != 3:
        raise ValueError(f"pixdim must have 3 values (LR, AP, SI mm), got {pixdim}")
    axes = [_world_axis(affine, w) for w in range(3)]  # array axis closest to world axis w
    if sorted(axes) != [0, 1, 2]:
        return pixdim
    out = [0.0, 0.0, 0.0]
    for world, arr_axis in enumerate(axes):
        out[arr_axis] = pixdim[world]
    return tuple(out)


def available_memory(device=None) -> int | None:
    """Bytes of memory available for a new allocation on ``device`` (CPU: ``MemAvailable``), None if unknown."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free)
        except Exception:  # noqa: BLE001 - no CUDA context: unknown
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_resample_memory(out_shape, channels: int = 1, source=None, *, device=None, bytes_per_voxel: int = 4,
                          work_factor: float = 4.0, in_spacing=None, out_spacing=None, available: int | None = None) -> int:
    """Refuse a resampling whose output cannot fit in memory, before it starts.

    The estimate is ``prod(out_shape) * bytes_per_voxel * (channels + work_factor)``: the output
    plus MONAI's / ITK's sampling grid (about four values per output voxel in 3D).

    Args:
        out_shape: spatial shape of the resampled volume.
        channels: number of channels resampled.
        source: file name for the message.
        device: where the resampling runs (CPU memory or the CUDA device's free memory).
        bytes_per_voxel: size of one output value.
        work_factor: further values per output voxel needed while resampling.
        in_spacing, out_spacing: shown in the message.
        available: bytes available (default: :func:`available_memory`).

    Returns:
        the estimated bytes.

    Raises:
        InputError: the estimate exceeds the available memory.
    """
    n = float(np.prod([max(int(v), 1) for v in out_shape]))
    need = int(n * bytes_per_voxel * (max(int(channels), 1) + work_factor))
    avail = available_memory(device) if available is None else int(available)
    if avail is not None and need > avail:
        shown = " x ".join(str(int(v)) for v in out_shape)
        spacing, hint = "", ""
        if in_spacing is not None and out_spacing is not None:
            spacing = f" from {' x '.join(f'{v:.3g}' for v in in_spacing)} mm to {' x '.join(f'{v:.3g}' for v in out_spacing)} mm"
            hint = " (is the input spacing right?)"
        raise InputError(source, f"resampling{spacing} gives a {shown} volume needing about {_bytes(need)}, but only "
                                 f"{_bytes(avail)} of memory are available{hint}; refused before starting")
    return need


def _source(img) -> str | None:
    if isinstance(img, MetaTensor):
        src = img.meta.get("filename_or_obj")
        if isinstance(src, (list, tuple)):
            src = ", ".join(str(s) for s in src)
        return None if src in (None, "") else str(src)
    return None


class ResampleToSpacing(Spacing):
    """MONAI ``Spacing`` with the project's defaults; invertible (``inverse`` restores shape and affine).

    Args:
        pixdim: target spacing in mm, default ``(1, 1, 3)``.
        axis_order: ``"world"`` (default): ``pixdim`` is (left-right, anterior-posterior,
            superior-inferior) and is mapped onto the array axes from each image's affine;
            ``"array"``: ``pixdim`` is per array axis ``(X, Y, Z)`` exactly as in MONAI.
        mode: interpolation, ``"bilinear"`` (trilinear in 3D) for images, ``"nearest"`` for labels.
        kwargs: passed to ``monai.transforms.Spacing`` (``padding_mode``, ``align_corners``,
            ``dtype``, ``diagonal``, ...).

    Input ``(C, X, Y, Z)`` MetaTensor (the affine is read from it); output ``(C, X', Y', Z')``.
    """

    def __init__(self, pixdim: Sequence[float] = DEFAULT_SPACING, axis_order: str = "world", mode="bilinear", **kwargs) -> None:
        if axis_order not in ("world", "array"):
            raise ValueError(f"axis_order must be 'world' or 'array', got {axis_order!r}")
        if len(tuple(pixdim)) != 3 or min(float(p) for p in pixdim) <= 0:
            raise ValueError(f"pixdim must be three positive spacings in mm, got {pixdim}")
        super().__init__(pixdim=pixdim, mode=mode, **kwargs)
        self.axis_order = axis_order
        self.target_pixdim = tuple(float(p) for p in pixdim)

    def __call__(self, data_array, *args, **kwargs):  # noqa: D102 (see Spacing.__call__)
        if self.axis_order == "world":
            if not isinstance(data_array, MetaTensor):
                raise ValueError("ResampleToSpacing needs a MetaTensor (its affine tells which axis is which)")
            self.pixdim = np.asarray(world_to_array_pixdim(self.target_pixdim, data_array.peek_pending_affine()), dtype=np.float64)
        if isinstance(data_array, MetaTensor) and data_array.ndim == 4:
            affine = np.asarray(data_array.peek_pending_affine(), dtype=np.float64)
            in_spacing = np.linalg.norm(affine[:3, :3], axis=0)
            out_spacing = np.where(np.asarray(self.pixdim, np.float64) > 0, np.asarray(self.pixdim, np.float64), in_spacing)
            shape = np.asarray(data_array.peek_pending_shape(), dtype=np.float64)[-3:]
            out_shape = np.ceil(shape * in_spacing / np.maximum(out_spacing, 1e-6))
            check_resample_memory(out_shape, int(data_array.shape[0]), _source(data_array), device=data_array.device,
                                  in_spacing=in_spacing, out_spacing=out_spacing)
        return super().__call__(data_array, *args, **kwargs)


class ResampleToSpacingd(Spacingd):
    """Dictionary version of :class:`ResampleToSpacing` (MONAI ``Spacingd`` with project defaults).

    Args:
        keys: keys to resample, e.g. ``["image", "label"]``.
        pixdim: target spacing in mm, default ``(1, 1, 3)`` (see ``axis_order``).
        mode: one mode for all keys or one per key; default None: ``"bilinear"`` for the first key
            (the image) and ``"nearest"`` for every other key (labels).
        axis_order: ``"world"`` or ``"array"``, see :class:`ResampleToSpacing`.
        kwargs: passed to ``monai.transforms.Spacingd``.

    ``Invertd`` with this transform returns each key (or a prediction with ``orig_keys``) to the
    original shape and affine.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] = DEFAULT_SPACING,
        mode=None,
        axis_order: str = "world",
        **kwargs,
    ) -> None:
        if mode is None:
            n_keys = len([keys] if isinstance(keys, (str, int)) else list(keys))
            mode = ["bilinear"] + ["nearest"] * (n_keys - 1)
        super().__init__(keys, pixdim=pixdim, mode=mode, **kwargs)
        old = self.spacing_transform
        new = ResampleToSpacing(
            pixdim=pixdim, axis_order=axis_order, diagonal=old.diagonal, recompute_affine=old.recompute_affine, lazy=old.lazy
        )
        new.min_pixdim, new.max_pixdim = old.min_pixdim, old.max_pixdim
        self.spacing_transform = new

    def __call__(self, data, lazy: bool | None = None):
        # MONAI's Spacingd calls ``.update()`` on every ``<key>_*`` entry after resampling; entries
        # that are not meta dicts (MONAI Label's ``image_path`` string, say) are set aside meanwhile.
        keys = set(self.keys)
        aside = {
            k: v for k, v in data.items()
            if isinstance(k, str) and not isinstance(v, Mapping) and any(k.startswith(f"{key}_") for key in keys)
        }
        out = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        out.update(aside)
        return out


def body_mask(
    image,
    threshold: float = -500.0,
    erosion_iterations: int = 2,
    restore: bool = True,
    connectivity: int = 1,
    slice_axis: int | None = None,
) -> np.ndarray:
    """Body mask of a CT volume: threshold, erosion, largest connected component.

    Args:
        image: ``(X, Y, Z)`` volume (numpy or torch), in HU by default.
        threshold: voxels above this value are candidate body (HU; -500 separates air from the
            soft tissue, fat and bone of the head and neck).
        erosion_iterations: iterations of a 6-connected binary erosion before the largest
            component is taken; it cuts thin bridges to the couch, mask or other objects.
        restore: grow the kept component back by the same number of iterations of a 26-connected
            dilation inside the thresholded mask (geodesic dilation), so the erosion does not
            shrink the body (a convex body is restored exactly; a bridge to another object is
            re-entered by at most ``erosion_iterations`` voxels).
        connectivity: connectivity of the component labelling (1: faces).
        slice_axis: if given, erode and re-grow in-plane only (structuring elements flat across
            this array axis), so volumes with few slices keep their first and last slices.

    Returns:
        boolean ``(X, Y, Z)`` mask (all False when nothing is above the threshold).
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"body_mask expects a 3D (X, Y, Z) volume, got shape {arr.shape}")
    if erosion_iterations < 0:
        raise ValueError(f"erosion_iterations must be >= 0, got {erosion_iterations}")
    if slice_axis is not None and slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis must be 0, 1, 2 or None, got {slice_axis}")
    fg = arr > threshold
    struct = ndimage.generate_binary_structure(3, 1)
    cube = ndimage.generate_binary_structure(3, 3)
    if slice_axis is not None:
        flat = [slice(None)] * 3
        flat[slice_axis] = slice(1, 2)
        keep = np.zeros((3, 3, 3), bool)
        keep[tuple(flat)] = True
        struct, cube = struct & keep, cube & keep
    core = ndimage.binary_erosion(fg, struct, iterations=erosion_iterations) if erosion_iterations else fg
    core = largest_component(core, connectivity)
    if restore and erosion_iterations and core.any():
        core = ndimage.binary_dilation(core, cube, iterations=erosion_iterations, mask=fg)
    return core


class BodyCrop(CropForeground):
    """Crop a CT volume to the bounding box of the body (HCF preprocessing); invertible.

    The body is found by :func:`body_mask` on the selected channel(s); the box is its bounding box
    enlarged by ``margin`` voxels and limited to the image. ``inverse`` pads the crop back to the
    original grid (shape and affine), with ``pad_value`` outside the box.

    Args:
        threshold: body threshold (HU when run on the raw CT, i.e. before ``HUWindow``).
        erosion_iterations: erosion before the largest component (see :func:`body_mask`).
        margin: voxels added on each side of the box (int or one per spatial axis).
        restore: geodesic re-dilation after the component selection (see :func:`body_mask`).
        channel_indices: channels used to find the body (default: channel 0).
        allow_empty: when no voxel is above the threshold, keep the whole image instead of raising.
        in_plane: erode / re-grow in the slice plane only (slice axis from the MetaTensor's
            affine, :func:`~shared_transforms.flip.si_axis`), for volumes with very few slices.
        lazy: MONAI lazy resampling flag.

    Raises:
        InputError: (at call time) no body found, naming the image file.
    """

    def __init__(
        self,
        threshold: float = -500.0,
        erosion_iterations: int = 2,
        margin: Sequence[int] | int = 0,
        restore: bool = True,
        channel_indices: Sequence[int] | int | None = 0,
        allow_empty: bool = False,
        in_plane: bool = False,
        lazy: bool = False,
    ) -> None:
        if erosion_iterations < 0:
            raise ValueError(f"erosion_iterations must be >= 0, got {erosion_iterations}")
        super().__init__(select_fn=is_positive, channel_indices=channel_indices, margin=margin, allow_smaller=True, lazy=lazy)
        self.threshold = float(threshold)
        self.erosion_iterations = int(erosion_iterations)
        self.restore = restore
        self.allow_empty = allow_empty
        self.in_plane = in_plane

    def body_mask(self, img) -> np.ndarray:
        """Boolean ``(X, Y, Z)`` body mask of a ``(C, X, Y, Z)`` image (union over the selected channels)."""
        if img.ndim != 4:
            raise ValueError(f"BodyCrop expects a channel-first (C, X, Y, Z) image, got shape {tuple(img.shape)}")
        chans = range(img.shape[0]) if self.channel_indices is None else self.channel_indices
        axis = None
        if self.in_plane:
            if not isinstance(img, MetaTensor):
                raise ValueError("BodyCrop(in_plane=True) needs a MetaTensor (its affine gives the slice axis)")
            axis = si_axis(img.peek_pending_affine())
        t = img.as_tensor() if isinstance(img, MetaTensor) else img
        mask = np.zeros(tuple(img.shape[1:]), dtype=bool)
        for c in chans:
            mask |= body_mask(t[c], self.threshold, self.erosion_iterations, self.restore, slice_axis=axis)
        return mask

    def compute_bounding_box(self, img):
        """Return ``(box_start, box_end)`` (int arrays, end exclusive) of the body box of ``img``."""
        mask = self.body_mask(img)
        if not mask.any():
            if not self.allow_empty:
                raise InputError(
                    _source(img),
                    f"no body found: no voxel above {self.threshold:g} after erosion (is the image a CT in HU, "
                    "and is BodyCrop placed before intensity windowing?)",
                )
            return np.zeros(3, dtype=np.int64), np.asarray(img.shape[1:], dtype=np.int64)
        start, end = generate_spatial_bounding_box(mask[None], is_positive, None, self.margin, allow_smaller=True)
        return np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)


class BodyCropd(CropForegroundd):
    """Dictionary version of :class:`BodyCrop`: the box comes from ``source_key``, all ``keys`` are cropped.

    Args:
        keys: keys to crop, e.g. ``["image", "label"]``.
        source_key: key of the CT used to find the body (default ``"image"``).
        threshold, erosion_iterations, margin, restore, channel_indices, allow_empty, in_plane: see
            :class:`BodyCrop`.
        start_coord_key / end_coord_key: keys that receive the box start / end (voxel indices, end
            exclusive), e.g. for a 2D pipeline that crops slices itself; None to skip.
        allow_missing_keys: skip missing keys.
        lazy: MONAI lazy resampling flag.

    ``Invertd`` with this transform pads each key (or a prediction with ``orig_keys``) back to the
    original grid.
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: Hashable = "image",
        threshold: float = -500.0,
        erosion_iterations: int = 2,
        margin: Sequence[int] | int = 0,
        restore: bool = True,
        channel_indices: Sequence[int] | int | None = 0,
        allow_empty: bool = False,
        in_plane: bool = False,
        start_coord_key: str | None = "body_box_start",
        end_coord_key: str | None = "body_box_end",
        allow_missing_keys: bool = False,
        lazy: bool = False,
    ) -> None:
        super().__init__(
            keys,
            source_key=source_key,
            start_coord_key=start_coord_key,
            end_coord_key=end_coord_key,
            allow_missing_keys=allow_missing_keys,
            lazy=lazy,
        )
        self.cropper = BodyCrop(threshold, erosion_iterations, margin, restore, channel_indices, allow_empty, in_plane, lazy)
