"""DICOM RT Structure Set export of a GTV mask, and re-rasterising for verification.

Written with pydicom (rt-utils was evaluated and not used; see ``docs/dicom.md``). The structure
set references the CT series it was drawn on: study, series, frame of reference, and for every
contour the CT slice (SOP instance) it lies on. Contours are closed planar polygons in patient
coordinates (LPS mm) traced with ``skimage.measure.find_contours`` at the 0.5 iso-line of each
axial slice of the mask on the CT's own grid, so every island and every hole of a slice becomes
its own contour. Holes follow the even-odd (XOR) rule used by planning systems: a point is
inside the ROI when it is enclosed by an odd number of the slice's contours;
:func:`rasterize_rtstruct` applies the same rule.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared_transforms.dicom import LPS_TO_RAS, DicomVolume, read_dicom_series
from shared_transforms.io import InputError, atomic_write, check_label_array, load_label

from .grid import mask_to_grid

__all__ = [
    "RTSTRUCT_STORAGE",
    "mask_slice_contours",
    "mask_to_contours",
    "drop_collinear",
    "write_rtstruct",
    "rasterize_rtstruct",
    "read_rtstruct_rois",
    "export_rtstruct",
    "copy_patient_study",
]

logger = logging.getLogger(__name__)

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Referenced SOP Class of the RT Referenced Study Sequence item: PS3.3 section 10.6.1 allows the
# (retired) Detached Study Management SOP Class UID for references to a study
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

# patient / study attributes copied from the CT (type 2 ones written empty when the CT lacks them)
PATIENT_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"}


def copy_patient_study(source, target) -> None:
    """Copy patient and study identifiers from a CT header to a new object (never invented)."""
    for tag in PATIENT_STUDY_TAGS:
        if tag in source:
            setattr(target, tag, source.data_element(tag).value)
        elif tag in _TYPE2:
            setattr(target, tag, "")
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    if "StudyInstanceUID" not in target or not target.StudyInstanceUID:
        raise InputError(None, "the CT has no StudyInstanceUID; cannot reference its study")


def mask_slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed boundary polygons of a 2D binary mask.

    Args:
        mask2d: ``(X, Y)`` binary slice.

    Returns:
        list of ``(N, 2)`` float arrays of voxel coordinates ``(i, j)``, one per island outline and
        per hole outline, each closed implicitly (last point != first point).
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask2d, dtype=np.float32), 1)
    out = []
    for contour in find_contours(padded, 0.5, fully_connected="high"):
        contour = contour - 1.0
        if len(contour) > 1 and np.allclose(contour[0], contour[-1]):
            contour = contour[:-1]
        contour = drop_collinear(contour)
        if len(contour) >= 3:
            out.append(contour)
    return out


def drop_collinear(poly: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Remove vertices of a closed polygon that lie on the line through their neighbours.

    Lossless: the polygon encloses exactly the same region, with far fewer points along straight
    voxel edges (``find_contours`` places a vertex at every half voxel).

    Args:
        poly: ``(N, 2)`` closed polygon (last vertex not repeated).
        tol: cross-product tolerance in squared voxels.
    """
    pts = np.asarray(poly, dtype=float)
    while len(pts) > 3:
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        a, b = pts - prev, nxt - pts
        cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
        keep = np.abs(cross) > tol
        if keep.all():
            break
        # drop every other collinear vertex per pass so neighbours stay valid references
        drop = np.flatnonzero(~keep)[::2]
        pts = np.delete(pts, drop, axis=0)
    return pts


def mask_to_contours(mask: np.ndarray, affine: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Contours of every axial slice (array axis 2) in patient coordinates.

    Args:
        mask: ``(X, Y, Z)`` binary mask on the CT grid.
        affine: the CT's voxel -> RAS affine.

    Returns:
        ``{slice index: [ (N, 3) LPS mm polygons ]}`` for the slices holding foreground.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    out = {}
    for k in np.flatnonzero(mask.reshape(-1, mask.shape[2]).any(axis=0)):
        polys = []
        for c in mask_slice_contours(mask[:, :, k]):
            vox = np.column_stack([c, np.full(len(c), float(k)), np.ones(len(c))])
            polys.append((vox @ lps.T)[:, :3])
        out[int(k)] = polys
    return out


def _algorithm_item(name: str, version: str):
    from pydicom.dataset import Dataset

    fam = Dataset()
    fam.CodeValue, fam.CodingSchemeDesignator, fam.CodeMeaning = "123110", "DCM", "Artificial Intelligence"
    item = Dataset()
    item.AlgorithmFamilyCodeSequence = [fam]
    item.AlgorithmName = name
    item.AlgorithmVersion = version
    return item


def write_rtstruct(
    ct: DicomVolume,
    mask: np.ndarray,
    out_path,
    *,
    roi_name: str = "GTVp",
    color: Sequence[int] = (255, 0, 0),
    interpreted_type: str = "GTV",
    algorithm_name: str = "NPC GTV toolkit",
    algorithm_version: str | None = None,
    structure_set_label: str = "NPC GTV auto",
    series_number: int = 901,
    overwrite: bool = False,
    inputs: Iterable = (),
) -> Path:
    """Write a one-ROI RT Structure Set for ``mask`` drawn on the CT series ``ct``.

    Args:
        ct: the CT as read by :func:`shared_transforms.dicom.read_dicom_series`.
        mask: ``(X, Y, Z)`` binary mask on the CT's grid (same shape; see :func:`export_rtstruct`
            for masks on other grids).
        out_path: output ``.dcm`` file, written atomically, never over an input.
        roi_name: ROI name (``"GTVp"``).
        color: ROI display colour, three integers 0-255.
        interpreted_type: RT ROI Interpreted Type (``"GTV"``).
        algorithm_name, algorithm_version: recorded as the ROI's generating algorithm
            (ROI Generation Algorithm ``AUTOMATIC``).
        structure_set_label: Structure Set Label (at most 16 characters).
        series_number: SeriesNumber of the new RTSTRUCT series.
        overwrite: replace an existing ``out_path``.
        inputs: extra paths that must never be written (the CT files are always protected).

    Returns:
        ``out_path``.

    Raises:
        ValueError: bad arguments. InputError: mask not on the CT grid or not binary.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import npc_gtv

    color = [int(c) for c in color]
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise ValueError(f"color must be three integers in 0..255, got {color}")
    if not roi_name or len(roi_name) > 64:
        raise ValueError("roi_name must be 1..64 characters")
    if len(structure_set_label) > 16:
        raise ValueError("structure_set_label must be at most 16 characters")
    mask = check_label_array(mask, "mask")
    if mask.shape != ct.array.shape:
        raise InputError("mask", f"shape {mask.shape} does not match the CT grid {ct.array.shape}; resample it first")
    algorithm_version = algorithm_version or npc_gtv.__version__
    first = ct.headers[0]
    frame_uid = str(getattr(first, "FrameOfReferenceUID", "") or "")
    if not frame_uid:
        raise InputError(ct.files[0], "the CT has no FrameOfReferenceUID; an RT structure set cannot reference it")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SpecificCharacterSet = "ISO_IR 100"
    copy_patient_study(first, ds)
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"{roi_name} ({algorithm_name})"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "NPC GTV toolkit"
    ds.SoftwareVersions = str(npc_gtv.__version__)
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = str(getattr(first, "PositionReferenceIndicator", "") or "")
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetDate, ds.StructureSetTime = date, time

    def image_ref(header):
        ref = Dataset()
        ref.ReferencedSOPClassUID = header.SOPClassUID
        ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
        return ref

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = str(first.SeriesInstanceUID)
    series_ref.ContourImageSequence = [image_ref(h) for h in ct.headers]
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study_ref.ReferencedSOPInstanceUID = str(first.StudyInstanceUID)
    study_ref.RTReferencedSeriesSequence = [series_ref]
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = [study_ref]
    ds.ReferencedFrameOfReferenceSequence = [frame_ref]

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = roi_name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
    roi.ROIDerivationAlgorithmIdentificationSequence = [_algorithm_item(algorithm_name, str(algorithm_version))]
    ds.StructureSetROISequence = [roi]

    contours = []
    per_slice = mask_to_contours(mask, ct.affine)
    for k, polys in per_slice.items():
        for poly in polys:
            item = Dataset()
            item.ContourImageSequence = [image_ref(ct.headers[k])]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(poly)
            item.ContourNumber = len(contours) + 1
            item.ContourData = [f"{v:.4f}" for v in poly.reshape(-1)]
            contours.append(item)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = color
    roi_contour.ReferencedROINumber = 1
    if contours:
        roi_contour.ContourSequence = contours
    else:
        logger.warning("the mask is empty: the structure set holds ROI %s without contours", roi_name)
    ds.ROIContourSequence = [roi_contour]

    obs = Dataset()
    obs.ObservationNumber = 1
    obs.ReferencedROINumber = 1
    obs.RTROIInterpretedType = interpreted_type
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence = [obs]

    protected = [*ct.files, *inputs]
    with atomic_write(out_path, overwrite=overwrite, inputs=protected) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    logger.info("wrote RTSTRUCT %s: ROI %s, %d contours on %d slices", out_path, roi_name, len(contours), len(per_slice))
    return Path(out_path)


def read_rtstruct_rois(path) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Contours of every ROI of an RT Structure Set.

    Returns:
        ``{roi name: [(referenced SOP instance UID or "", (N, 3) LPS polygon), ...]}``.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc
    if str(getattr(ds, "Modality", "")) != "RTSTRUCT":
        raise InputError(path, f"is not an RT Structure Set (modality {getattr(ds, 'Modality', '?')})")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out: dict[str, list] = {name: [] for name in names.values()}
    for rc in getattr(ds, "ROIContourSequence", []):
        name = names.get(int(rc.ReferencedROINumber), f"ROI {rc.ReferencedROINumber}")
        for c in getattr(rc, "ContourSequence", []):
            pts = np.asarray([float(v) for v in c.ContourData], dtype=float).reshape(-1, 3)
            refs = getattr(c, "ContourImageSequence", [])
            uid = str(refs[0].ReferencedSOPInstanceUID) if refs else ""
            out.setdefault(name, []).append((uid, pts))
    return out


def rasterize_rtstruct(path, ct: DicomVolume, roi_name: str | None = None) -> np.ndarray:
    """Re-rasterise an ROI of an RT Structure Set onto the CT grid (even-odd rule for holes).

    Args:
        path: RTSTRUCT file.
        ct: the CT it was drawn on.
        roi_name: ROI to rasterise (default: the only ROI).

    Returns:
        ``uint8 (X, Y, Z)`` mask on the CT grid. A pixel is inside when its centre is enclosed by an
        odd number of the slice's contours.

    Raises:
        InputError: unknown ROI, several ROIs and none named, or contours off the CT slices.
    """
    from skimage.draw import polygon2mask

    rois = read_rtstruct_rois(path)
    if roi_name is None:
        if len(rois) != 1:
            raise InputError(path, f"holds {len(rois)} ROIs ({', '.join(rois)}); choose one with roi_name")
        roi_name = next(iter(rois))
    if roi_name not in rois:
        raise InputError(path, f"has no ROI named {roi_name!r} (ROIs: {', '.join(rois)})")
    inv = np.linalg.inv(LPS_TO_RAS @ ct.affine)
    out = np.zeros(ct.array.shape, dtype=bool)
    for _, pts in rois[roi_name]:
        vox = (np.column_stack([pts, np.ones(len(pts))]) @ inv.T)[:, :3]
        k = float(np.median(vox[:, 2]))
        ki = int(round(k))
        if abs(k - ki) > 0.1 or np.ptp(vox[:, 2]) > 0.1 or not 0 <= ki < out.shape[2]:
            raise InputError(path, f"contour of {roi_name} does not lie on a slice of the CT (slice coordinate {k:.2f})")
        out[:, :, ki] ^= polygon2mask(out.shape[:2], vox[:, :2])
    return out.astype(np.uint8)


def export_rtstruct(ct_dir, mask_path, out_path, *, series_uid: str | None = None, overwrite: bool = False, resample: bool = False, **kwargs) -> Path:
    """Read the CT series and a NIfTI mask, bring the mask onto the CT grid and write the RTSTRUCT.

    Args:
        ct_dir: DICOM CT folder (or one file of the series).
        mask_path: NIfTI mask (any grid overlapping the CT; nearest-neighbour resampled).
        out_path: output RTSTRUCT file.
        series_uid: CT series to use when the folder holds several.
        overwrite: replace an existing output.
        **kwargs: passed to :func:`write_rtstruct` (roi_name, color, ...).
    """
    ct = read_dicom_series(ct_dir, series_uid)
    mask, mask_affine = load_label(mask_path)
    on_ct = mask_to_grid(mask, mask_affine, ct.array.shape, ct.affine, source=mask_path, reference=ct_dir, resample=resample)
    return write_rtstruct(ct, on_ct, out_path, overwrite=overwrite, inputs=[mask_path], **kwargs)
