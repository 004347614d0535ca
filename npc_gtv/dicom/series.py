"""Write a volume as a single-frame DICOM image series (CT or MR) with pydicom.

Used to turn the project's phantoms into DICOM folders (tests, demo data, data-set fixtures),
so the DICOM reading, RTSTRUCT and SEG paths can be exercised without patient data. The writer
generates new UIDs: it creates a new, synthetic study. Identifiers of real patients are never
generated here; RTSTRUCT / SEG export copies them from the CT they reference.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

from shared_transforms.dicom import LPS_TO_RAS
from shared_transforms.io import atomic_write, check_image_array

__all__ = ["write_dicom_series", "CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir,
    *,
    modality: str = "CT",
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Synthetic",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "",
    series_number: int = 1,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    slice_order: str = "ascending",
    overwrite: bool = False,
) -> list[Path]:
    """Write ``array`` as one DICOM file per slice along array axis 2.

    Args:
        array: ``(X, Y, Z)`` volume (CT in HU). Axis 0 becomes the DICOM column index, axis 1 the
            row index, as read back by :func:`shared_transforms.dicom.read_dicom_series`.
        affine: 4x4 voxel -> RAS mm; its first two columns must be orthogonal.
        out_dir: folder to create/fill (``IM0001.dcm``, ...). Existing files are not overwritten
            unless ``overwrite``.
        modality: ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
        patient_id, patient_name: synthetic patient identifiers.
        study_uid, series_uid, frame_of_reference_uid: reuse given UIDs (e.g. several series of
            one study); generated when None.
        series_description, series_number: series labels.
        rescale_slope, rescale_intercept: stored value = round((value - intercept) / slope);
            intercept defaults to -1024 for CT and 0 for MR. Stored values are int16.
        slice_order: ``"ascending"`` writes InstanceNumber along the array's slice axis,
            ``"descending"`` numbers them the other way round, ``"shuffled"`` gives the files a
            random order, so readers cannot rely on file names or instance numbers.

    Returns:
        the written files, in array slice order.

    Raises:
        ValueError: bad arguments, or values that do not fit int16 after rescaling.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    if slice_order not in ("ascending", "descending", "shuffled"):
        raise ValueError(f"slice_order must be ascending, descending or shuffled, got {slice_order!r}")
    if rescale_slope == 0:
        raise ValueError("rescale_slope must be non-zero")
    array = check_image_array(np.asarray(array), "array")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {affine.shape}")
    lps = LPS_TO_RAS @ affine
    cols = lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing < 1e-6):
        raise ValueError("affine has a zero-length axis")
    row_dir, col_dir = cols[:, 0] / spacing[0], cols[:, 1] / spacing[1]
    if abs(row_dir @ col_dir) > 1e-4:
        raise ValueError("the affine's first two axes must be orthogonal to form DICOM image planes")
    intercept = (-1024.0 if modality == "CT" else 0.0) if rescale_intercept is None else float(rescale_intercept)
    stored = np.round((array.astype(np.float64) - intercept) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"values do not fit int16 after rescaling (range {stored.min()}..{stored.max()})")
    stored = stored.astype(np.int16)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    n = array.shape[2]
    numbers = list(range(1, n + 1)) if slice_order != "descending" else list(range(n, 0, -1))
    names = [f"IM{i:04d}.dcm" for i in numbers]
    if slice_order == "shuffled":
        perm = np.random.default_rng(n).permutation(n)
        names = [f"IM{int(p) + 1:04d}.dcm" for p in perm]
    thickness = float(abs(lps[:3, 2] @ np.cross(row_dir, col_dir)))
    written = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = date, time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "NPC GTV toolkit phantom"
        ds.InstanceNumber = numbers[k]
        ds.PatientOrientation = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (lps[:3, 3] + k * lps[:3, 2])]
        ds.SliceThickness = f"{thickness:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(array.shape[1]), int(array.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleSlope = f"{rescale_slope:g}"
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.AcquisitionNumber = 1
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "10", "500", 1
            ds.MagneticFieldStrength = "1.5"
            if rescale_slope != 1 or intercept != 0:
                ds.RescaleIntercept = f"{intercept:g}"
                ds.RescaleSlope = f"{rescale_slope:g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = out_dir / names[k]
        with atomic_write(path, overwrite=overwrite) as tmp:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        written.append(path)
    return written

