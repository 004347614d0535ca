"""DICOM Segmentation (SEG) export of a GTV mask with highdicom, and reading it back.

The SEG is a BINARY segmentation with one segment (label ``GTVp`` by default; segmented property
category "Morphologically abnormal structure", type "Gross tumor volume", SNOMED CT), derived
from the CT series: highdicom copies patient, study and frame-of-reference identifiers from the
CT and records a per-frame reference to the CT slice each frame segments.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shared_transforms.dicom import DicomVolume, read_dicom_series
from shared_transforms.io import InputError, atomic_write, check_label_array, load_label

from .grid import mask_to_grid

__all__ = ["write_seg", "read_seg", "export_seg"]

logger = logging.getLogger(__name__)


def write_seg(
    ct: DicomVolume,
    mask: np.ndarray,
    out_path,
    *,
    segment_label: str = "GTVp",
    algorithm_name: str = "NPC GTV toolkit",
    algorithm_version: str | None = None,
    series_number: int = 902,
    omit_empty_frames: bool = True,
    overwrite: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Write ``mask`` (on the CT grid) as a one-segment binary DICOM SEG referencing ``ct``.

    Args:
        ct: CT read by :func:`shared_transforms.dicom.read_dicom_series`.
        mask: ``(X, Y, Z)`` binary mask on the CT grid.
        out_path: output file (atomic, never over an input).
        segment_label: segment label.
        algorithm_name, algorithm_version: recorded algorithm identification (family: AI).
        series_number: SeriesNumber of the new SEG series.
        omit_empty_frames: leave out slices without foreground (smaller file; reading restores them).
        overwrite: replace an existing output. inputs: further paths never to be written.

    Returns:
        ``out_path``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    import npc_gtv

    mask = check_label_array(mask, "mask")
    if mask.shape != ct.array.shape:
        raise InputError("mask", f"shape {mask.shape} does not match the CT grid {ct.array.shape}; resample it first")
    if not mask.any() and omit_empty_frames:
        omit_empty_frames = False  # a SEG needs at least one frame
    version = str(algorithm_version or npc_gtv.__version__)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.GrossTumorVolume,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    # frames follow the CT slices: frame k = mask[:, :, k] as (rows, columns)
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(bool)
    seg = hd.seg.Segmentation(
        source_images=ct.headers,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="NPC GTV toolkit",
        manufacturer_model_name=algorithm_name,
        software_versions=str(npc_gtv.__version__),
        device_serial_number="0",
        omit_empty_frames=omit_empty_frames,
        series_description=f"{segment_label} ({algorithm_name})"[:64],
    )
    with atomic_write(out_path, overwrite=overwrite, inputs=[*ct.files, *inputs]) as tmp:
        pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    logger.info("wrote DICOM SEG %s: segment %s, %d voxels", out_path, segment_label, int(mask.sum()))
    return Path(out_path)


def read_seg(path, ct: DicomVolume, segment_number: int = 1) -> np.ndarray:
    """Read one segment of a DICOM SEG back onto the CT grid it references.

    Returns:
        ``uint8 (X, Y, Z)`` mask, zero on CT slices without a SEG frame.

    Raises:
        InputError: not a SEG, or it references another CT series.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM SEG ({type(exc).__name__}: {exc})") from exc
    ct_uids = [str(h.SOPInstanceUID) for h in ct.headers]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(ct_uids):
        raise InputError(path, "does not reference any slice of the given CT series")
    out = np.zeros(ct.array.shape, dtype=np.uint8)
    present = [i for i, uid in enumerate(ct_uids) if uid in referenced]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ct_uids[i] for i in present],
        segment_numbers=[segment_number],
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )  # (frames, rows, columns, segments)
    for j, k in enumerate(present):
        out[:, :, k] = pixels[j, :, :, 0].T
    return out


def export_seg(ct_dir, mask_path, out_path, *, series_uid: str | None = None, overwrite: bool = False, resample: bool = False, **kwargs) -> Path:
    """Read the CT series and a NIfTI mask, bring the mask onto the CT grid and write the SEG."""
    ct = read_dicom_series(ct_dir, series_uid)
    mask, mask_affine = load_label(mask_path)
    on_ct = mask_to_grid(mask, mask_affine, ct.array.shape, ct.affine, source=mask_path, reference=ct_dir, resample=resample)
    return write_seg(ct, on_ct, out_path, overwrite=overwrite, inputs=[mask_path], **kwargs)
