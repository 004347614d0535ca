"""Assertions on RT structure sets shared by the RTSTRUCT writer's tests and the DICOM node's tests."""

from __future__ import annotations

from npc_gtv.dicom.rtstruct import RTSTRUCT_STORAGE


def assert_references_ct(rs, ct) -> None:
    """``rs`` is a new RTSTRUCT series of the CT's patient and study that references the CT's frame
    of reference, study, series and every slice (in slice order), and each contour one of its slices.

    Args:
        rs: the RT structure set (pydicom dataset).
        ct: the CT it was drawn on (:class:`shared_transforms.dicom.DicomVolume`).
    """
    first = ct.headers[0]
    assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == RTSTRUCT_STORAGE
    assert rs.PatientID == first.PatientID and str(rs.PatientName) == str(first.PatientName)
    assert rs.StudyInstanceUID == first.StudyInstanceUID
    assert rs.SeriesInstanceUID != first.SeriesInstanceUID
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID == rs.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    slices = [h.SOPInstanceUID for h in ct.headers]
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == slices
    for contour in getattr(rs.ROIContourSequence[0], "ContourSequence", []):
        assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID in slices
