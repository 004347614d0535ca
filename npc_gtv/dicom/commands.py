"""``npc-gtv dicom2nifti``, ``npc-gtv rtstruct`` and ``npc-gtv dicomseg``.

Printed output names files, series UIDs, shapes and spacings; never the patient's name.
"""

from __future__ import annotations

import numpy as np

from shared_transforms.dicom import list_series, read_dicom_series
from shared_transforms.io import AFFINE_TOLERANCE, InputError, load_label, lossless_reorientation, save_nifti

__all__ = ["dicom2nifti_command", "rtstruct_command", "dicomseg_command", "dice"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _parse_color(color) -> tuple[int, int, int]:
    if isinstance(color, str):
        parts = [p for p in color.replace(";", ",").replace(" ", ",").split(",") if p]
    else:
        parts = list(color)
    try:
        rgb = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"color must be 'R,G,B' integers, got {color!r}") from exc
    if len(rgb) != 3:
        raise ValueError(f"color must have three components, got {color!r}")
    return rgb


def dicom2nifti_command(dicom_dir: str, out: str, series_uid: str | None = None, modality: str = "CT", overwrite: bool = False, list_only: bool = False):
    """Convert a DICOM image series folder to NIfTI with slice-order, spacing and modality checks.

    Args:
        dicom_dir: folder with the DICOM files of the series (searched recursively).
        out: output ``.nii.gz``.
        series_uid: SeriesInstanceUID to convert when the folder holds several series.
        modality: expected modality (``CT``; ``MR`` for MRI; ``any`` to accept every modality).
        overwrite: replace an existing output file.
        list_only: only list the series of the folder.
    """
    if list_only:
        for info in list_series(dicom_dir).values():
            print(info.summary())
        return None
    vol = read_dicom_series(dicom_dir, series_uid, modality=None if str(modality).lower() == "any" else modality)
    array = vol.array
    if np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    save_nifti(array, vol.affine, out, overwrite=overwrite, inputs=vol.files)
    sx, sy, sz = vol.spacing
    print(
        f"{out}: series {vol.series.uid} ({vol.series.modality}), shape {tuple(array.shape)}, "
        f"spacing {sx:.3f} x {sy:.3f} x {sz:.3f} mm, {array.dtype}"
    )
    return None


def _load_on_ct(ct, mask, series_uid, resample: bool = False):
    from .grid import mask_to_grid

    vol = read_dicom_series(ct, series_uid)
    arr, affine = load_label(mask)
    on_ct = mask_to_grid(arr, affine, vol.array.shape, vol.affine, source=mask, reference=ct, resample=resample)
    same = arr.shape == vol.array.shape and np.abs(np.asarray(affine, float) - vol.affine).max() <= AFFINE_TOLERANCE
    resampled = resample and not same and lossless_reorientation(arr.shape, affine, vol.array.shape, vol.affine) is None
    return vol, on_ct, resampled


def rtstruct_command(
    ct: str,
    mask: str,
    out: str,
    roi_name: str = "GTVp",
    color="255,0,0",
    series_uid: str | None = None,
    algorithm_name: str = "NPC GTV toolkit",
    overwrite: bool = False,
    verify: bool = True,
    resample: bool = False,
):
    """Write a DICOM RT Structure Set of a NIfTI mask for a DICOM CT series.

    Args:
        ct: DICOM CT folder the structure set will reference.
        mask: NIfTI mask on the CT's voxel grid (or a lossless reorientation of it).
        out: output RTSTRUCT file (e.g. ``RS.dcm``).
        roi_name: ROI name.
        color: ROI display colour ``R,G,B``.
        series_uid: CT SeriesInstanceUID when the folder holds several series.
        algorithm_name: recorded generating algorithm.
        overwrite: replace an existing output.
        verify: re-rasterise the written contours on the CT grid and print the Dice with the mask.
        resample: bring a mask on another grid over by nearest neighbour (it changes the mask; said in the output).
    """
    from .rtstruct import rasterize_rtstruct, write_rtstruct

    vol, on_ct, resampled = _load_on_ct(ct, mask, series_uid, resample)
    write_rtstruct(
        vol, on_ct, out, roi_name=roi_name, color=_parse_color(color), algorithm_name=algorithm_name,
        overwrite=overwrite, inputs=[mask],
    )
    msg = f"{out}: RTSTRUCT ROI '{roi_name}' on CT series {vol.series.uid}, {int(on_ct.any(axis=(0, 1)).sum())} slice(s) contoured"
    if verify:
        back = rasterize_rtstruct(out, vol, roi_name)
        msg += f", re-rasterised Dice {dice(back, on_ct):.4f}" + (" against the mask as resampled onto the CT grid" if resampled else "")
    if resampled:
        msg += "; NOTE: the mask was not on the CT's grid and was resampled by nearest neighbour (--resample)"
    print(msg)
    return None


def dicomseg_command(
    ct: str,
    mask: str,
    out: str,
    label: str = "GTVp",
    series_uid: str | None = None,
    algorithm_name: str = "NPC GTV toolkit",
    overwrite: bool = False,
    verify: bool = True,
    resample: bool = False,
):
    """Write a DICOM Segmentation (highdicom) of a NIfTI mask for a DICOM CT series.

    Args:
        ct: DICOM CT folder the SEG is derived from.
        mask: NIfTI mask on the CT's voxel grid (or a lossless reorientation of it).
        out: output SEG file.
        label: segment label.
        series_uid: CT SeriesInstanceUID when the folder holds several series.
        algorithm_name: recorded algorithm name.
        overwrite: replace an existing output.
        verify: read the SEG back and check it equals the mask on the CT grid.
        resample: bring a mask on another grid over by nearest neighbour (it changes the mask; said in the output).
    """
    from .seg import read_seg, write_seg

    vol, on_ct, resampled = _load_on_ct(ct, mask, series_uid, resample)
    write_seg(vol, on_ct, out, segment_label=label, algorithm_name=algorithm_name, overwrite=overwrite, inputs=[mask])
    msg = f"{out}: DICOM SEG segment '{label}' on CT series {vol.series.uid}, {int(on_ct.sum())} voxel(s)"
    if verify:
        back = read_seg(out, vol)
        if not np.array_equal(back, on_ct):
            raise InputError(out, "SEG read back differs from the mask (please report this bug)")
        msg += ", read back exactly"
    if resampled:
        msg += "; NOTE: the mask was not on the CT's grid and was resampled by nearest neighbour (--resample)"
    print(msg)
    return None

