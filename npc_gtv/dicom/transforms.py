"""Bundle inference post-processing: write the prediction as an RTSTRUCT (and/or SEG) for a DICOM CT input.

Add after ``Invertd`` (so the prediction is back on the input grid) in an ``inference.yaml``
post-processing list::

    - _target_: npc_gtv.dicom.transforms.SaveDicomRTd
      keys: pred
      output_dir: "@output_dir"
      write_seg: false

When the input image was a DICOM folder read with
:class:`shared_transforms.dicom.DicomSeriesReader`, the prediction's metadata carries
``dicom_dir`` and the CT's SeriesInstanceUID; the transform reads that CT series again and
writes ``<case>_rtstruct.dcm`` (and ``<case>_seg.dcm``). ``<case>`` is named exactly as
:class:`shared_transforms.saving.SafeSaveImaged` names the NIfTI prediction beside it (the data
list's ``case_id``, else the DICOM folder's name), so ``CT_seg.nii.gz`` and ``CT_rtstruct.dcm``
always belong to the same input: a second input of the run mapping to a name already written is
refused (two patients' folders both called ``CT`` need distinct ``case_id``), and an existing
output is refused unless ``overwrite``. For NIfTI inputs it does nothing (or raises, with
``skip_non_dicom=False``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shared_transforms.dicom import DicomVolume, read_dicom_series
from shared_transforms.io import InputError, reorient_to_grid

__all__ = ["SaveDicomRTd"]

logger = logging.getLogger(__name__)

try:
    from monai.transforms import MapTransform as _MapTransform
except ImportError:  # pragma: no cover
    _MapTransform = object


class SaveDicomRTd(_MapTransform):
    """Write an RTSTRUCT (and optionally a DICOM SEG) of ``d[key]`` for its DICOM CT input.

    Args:
        keys: prediction key(s); each is a ``(C, X, Y, Z)`` MetaTensor on the input grid with
            ``C == 1`` (probability or binary: thresholded at ``threshold``) or ``C >= 2``
            (one-hot / logits: argmax, foreground = ``label_index``).
        output_dir: folder of the outputs.
        roi_name: ROI / segment name.
        color: ROI display colour.
        threshold: foreground threshold for one-channel predictions.
        label_index: foreground channel for multi-channel predictions.
        write_rtstruct: write ``<case>_rtstruct.dcm``. write_seg: write ``<case>_seg.dcm``.
        skip_non_dicom: silently skip predictions of non-DICOM inputs (else raise).
        overwrite: replace existing outputs (default: refuse).
        case_key: data key of the per-case id (the data list's ``case_id``).
        allow_missing_keys: MONAI's usual flag.

    Raises:
        InputError: (at call time) an existing output without ``overwrite``, a second input mapping to
            a name already written, or a prediction not on the CT's voxel grid.
        OSError: the write failed; no partial file is left.
    """

    def __init__(
        self,
        keys="pred",
        output_dir="./eval",
        roi_name: str = "GTVp",
        color=(255, 0, 0),
        threshold: float = 0.5,
        label_index: int = 1,
        write_rtstruct: bool = True,
        write_seg: bool = False,
        skip_non_dicom: bool = True,
        overwrite: bool = False,
        case_key: str = "case_id",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not (write_rtstruct or write_seg):
            raise ValueError("at least one of write_rtstruct / write_seg must be True")
        self.output_dir = Path(output_dir)
        self.roi_name = roi_name
        self.color = tuple(int(c) for c in color)
        self.threshold = float(threshold)
        self.label_index = int(label_index)
        self.write_rtstruct = write_rtstruct
        self.write_seg = write_seg
        self.skip_non_dicom = skip_non_dicom
        self.overwrite = bool(overwrite)
        self.case_key = case_key
        self._names: dict[str, str] = {}  # output stem -> input written under it in this run

    def _stem(self, case_id, source: str) -> str:
        """The NIfTI saver's ``<case>`` (:func:`shared_transforms.saving.output_stem`); a second input refused."""
        from shared_transforms.saving import output_stem

        stem = output_stem(case_id, source)
        if self._names.get(stem, source) != source:
            raise InputError(source, f"maps to the output name {stem!r}, already written in this run for {self._names[stem]}; "
                                     "give each datalist entry a distinct 'case_id'")
        self._names[stem] = source
        return stem

    def _mask(self, pred) -> np.ndarray:
        arr = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
        if arr.ndim != 4:
            raise ValueError(f"prediction must be (C, X, Y, Z), got shape {arr.shape}")
        if arr.shape[0] == 1:
            return (arr[0] > self.threshold).astype(np.uint8)
        return (np.argmax(arr, axis=0) == self.label_index).astype(np.uint8)

    def __call__(self, data):
        d = dict(data)
        case_id = d.get(self.case_key)
        for key in self.key_iterator(d):
            pred = d[key]
            meta = dict(getattr(pred, "meta", {}) or {})
            dicom_dir = meta.get("dicom_dir")
            if not dicom_dir:
                if self.skip_non_dicom:
                    logger.info("%s: input was not a DICOM series; no RTSTRUCT written", meta.get("filename_or_obj", key))
                    continue
                raise InputError(meta.get("filename_or_obj"), "input was not a DICOM series; cannot write an RTSTRUCT")
            ct = read_dicom_series(dicom_dir, str(meta.get("SeriesInstanceUID") or "") or None)
            self.write(pred, ct, self._stem(case_id, str(meta.get("filename_or_obj") or dicom_dir)), source=f"prediction of {dicom_dir}")
        return d

    def write(self, pred, ct: DicomVolume, case: str, source: str = "pred") -> list[Path]:
        """Write the outputs of one prediction for a CT series that is already read.

        Args:
            pred: ``(C, X, Y, Z)`` prediction (MetaTensor with its affine, or array with
                ``meta["affine"]``) on any grid overlapping the CT.
            ct: the CT series the outputs reference.
            case: file stem: ``<case>_rtstruct.dcm``, ``<case>_seg.dcm`` in ``output_dir``.
            source: name of the prediction in error messages.

        Returns:
            the written files (RTSTRUCT first).
        """
        from .rtstruct import write_rtstruct
        from .seg import write_seg

        meta = dict(getattr(pred, "meta", {}) or {})
        affine = np.asarray(pred.affine if hasattr(pred, "affine") else meta["affine"], dtype=float)
        # Invertd has put the prediction back on the CT grid: anything but that grid (or an exact
        # reorientation of it) is a pipeline error, never silently resampled
        mask = reorient_to_grid(self._mask(pred), affine, ct.array.shape, ct.affine, source=source, reference=ct.files[0].parent)
        written = []
        if self.write_rtstruct:
            written.append(write_rtstruct(ct, mask, self.output_dir / f"{case}_rtstruct.dcm", roi_name=self.roi_name, color=self.color, overwrite=self.overwrite))
        if self.write_seg:
            written.append(write_seg(ct, mask, self.output_dir / f"{case}_seg.dcm", segment_label=self.roi_name, overwrite=self.overwrite))
        return written
