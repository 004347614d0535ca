"""DICOM CT series reading: a checked volume with a nibabel-style RAS affine, and a MONAI reader.

A planning CT arrives as a folder of single-frame DICOM files. :func:`read_dicom_series` turns
one series of such a folder into an ``(X, Y, Z)`` volume in Hounsfield units and the 4x4
voxel-to-RAS affine that nibabel would give the same data, so a DICOM folder and its NIfTI
conversion are interchangeable everywhere in the project.

Geometry (DICOM PS3.3 C.7.6.2.1.1): a pixel at column ``c`` and row ``r`` of a slice lies at
``IPP + c * dc * F_row + r * dr * F_col`` (LPS mm), where ``IPP`` is ImagePositionPatient,
``F_row, F_col`` the two direction cosines of ImageOrientationPatient and ``(dr, dc)`` the
PixelSpacing (row spacing first). Array axis 0 of the volume is therefore the DICOM column
index, axis 1 the row index, axis 2 the slice index, with slices sorted by their position along
the slice normal ``F_row x F_col``. The affine's third column is the measured step between
consecutive slice positions, so gantry tilt is represented exactly. LPS is converted to RAS by
negating the first two world rows.

Checks (each raises :class:`~shared_transforms.io.InputError` naming the folder or file):
no DICOM image in the folder, several candidate series and none chosen (the message lists
them), a chosen series that is not there, a modality other than the allowed ones (CT by
default), inconsistent orientation / pixel spacing / matrix size between slices, duplicate slice
positions, missing slices and non-uniform slice spacing.

Patient names are never read into messages or metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared_transforms.io import InputError

__all__ = [
    "SeriesInfo",
    "DicomVolume",
    "list_series",
    "select_series",
    "read_dicom_series",
    "is_dicom_path",
    "load_volume",
    "LPS_TO_RAS",
    "DicomSeriesReader",
    "register_dicom_reader",
    "prefetched_series",
]

logger = logging.getLogger(__name__)

# diag(-1, -1, 1, 1): DICOM patient coordinates (LPS) <-> nibabel world coordinates (RAS)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# storage classes that carry pixel data but are not single-frame slices of a volume
_NON_VOLUME_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "SR", "KO", "REG"}

# header fields copied into the reader's metadata (identifiers only, never the patient's name)
META_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "PatientID",
)


@dataclass
class SeriesInfo:
    """One image series found in a folder (headers only, pixels not read).

    Attributes:
        uid: SeriesInstanceUID.
        modality: Modality of the first file (``"CT"``, ``"MR"``, ...).
        description: SeriesDescription (may be empty).
        files: paths of the series' files (unsorted).
    """

    uid: str
    modality: str
    description: str
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality}{desc}, {len(self.files)} file(s))"


@dataclass
class DicomVolume:
    """A DICOM series read as a volume.

    Attributes:
        array: ``(X, Y, Z)`` float32 volume (CT: Hounsfield units after RescaleSlope/Intercept).
        affine: 4x4 voxel -> RAS mm (nibabel convention).
        headers: the pydicom datasets of the slices in array order (pixel data dropped).
        files: the slice files in array order.
        series: the :class:`SeriesInfo` that was read.
    """

    array: np.ndarray
    affine: np.ndarray
    headers: list
    files: list[Path]
    series: SeriesInfo

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def meta(self) -> dict:
        """Identifiers of the series (UIDs, modality, PatientID; never the patient's name)."""
        first = self.headers[0]
        return {tag: str(getattr(first, tag, "")) for tag in META_TAGS}


def _pydicom():
    import pydicom

    return pydicom


def is_dicom_path(path) -> bool:
    """True for a directory, a ``.dcm`` file, or a file with the DICOM ``DICM`` preamble marker."""
    path = Path(path)
    if path.is_dir():
        return True
    if not path.is_file():
        return path.suffix.lower() == ".dcm"
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _candidate_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            out.append(Path(root) / name)
    return out


def list_series(folder) -> dict[str, SeriesInfo]:
    """Find the image series in ``folder`` (searched recursively), reading headers only.

    Files that are not DICOM, and DICOM objects without pixel rows/columns or of a non-volume
    modality (RTSTRUCT, SEG, RTDOSE, ...), are ignored.

    Args:
        folder: directory to search.

    Returns:
        ``{SeriesInstanceUID: SeriesInfo}`` in order of first appearance.

    Raises:
        InputError: ``folder`` does not exist or is not a directory.
    """
    pydicom = _pydicom()
    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "DICOM folder does not exist")
    if not folder.is_dir():
        raise InputError(folder, "is not a directory (expected a folder of DICOM files)")
    series: dict[str, SeriesInfo] = {}
    for path in _candidate_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM (or unreadable): skipped, like any other stray file
            continue
        modality = str(getattr(ds, "Modality", "")).upper()
        if "Rows" not in ds or "Columns" not in ds or modality in _NON_VOLUME_MODALITIES:
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "")) or "<no SeriesInstanceUID>"
        if uid not in series:
            series[uid] = SeriesInfo(uid, modality, str(getattr(ds, "SeriesDescription", "")))
        series[uid].files.append(path)
    return series


def select_series(folder, series_uid: str | None = None, modality: str | Sequence[str] | None = ("CT",)) -> SeriesInfo:
    """Choose one series of ``folder``.

    Args:
        folder: DICOM directory.
        series_uid: SeriesInstanceUID to read; required when several series of an allowed modality
            are present.
        modality: allowed modalities (``None``: any).

    Raises:
        InputError: no image in the folder, unknown ``series_uid``, wrong modality, or ambiguity.
    """
    folder = Path(folder)
    found = list_series(folder)
    if not found:
        n = len(_candidate_files(folder))
        raise InputError(folder, f"no DICOM image files found ({n} file(s) scanned)")
    allowed = None if modality is None else {m.upper() for m in ([modality] if isinstance(modality, str) else modality)}
    listing = "; ".join(s.summary() for s in found.values())
    if series_uid is not None:
        if series_uid not in found:
            raise InputError(folder, f"series {series_uid} is not in this folder; found: {listing}")
        info = found[series_uid]
        if allowed is not None and info.modality not in allowed:
            raise InputError(folder, f"series {series_uid} has modality {info.modality}, expected {'/'.join(sorted(allowed))}")
        return info
    candidates = [s for s in found.values() if allowed is None or s.modality in allowed]
    if not candidates:
        raise InputError(
            folder, f"no {'/'.join(sorted(allowed))} series in this folder (non-CT input?); found: {listing}"
        )
    if len(candidates) > 1:
        raise InputError(
            folder,
            f"{len(candidates)} series found, choose one by SeriesInstanceUID (series_uid=...): "
            + "; ".join(s.summary() for s in candidates),
        )
    return candidates[0]


def _floats(ds, tag: str, n: int, path) -> np.ndarray:
    value = getattr(ds, tag, None)
    if value is None:
        raise InputError(path, f"missing {tag}; cannot place the slice in space")
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"unreadable {tag} {value!r}") from exc
    if arr.size != n:
        raise InputError(path, f"{tag} must have {n} values, got {arr.size}")
    return arr


def _check_steps(folder, positions: np.ndarray, files: list[Path], tol: float) -> None:
    """Raise on duplicate positions, missing slices and non-uniform spacing (positions sorted)."""
    if positions.size < 2:
        return
    steps = np.diff(positions)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise InputError(
            folder,
            f"{dup.size} duplicate slice position(s), e.g. {positions[i]:.3f} mm in {files[i].name} and "
            f"{files[i + 1].name} (two acquisitions in one series?)",
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > max(tol * step, 1e-3))
    if not bad.size:
        return
    ratios = steps[bad] / step
    gaps = np.round(ratios)
    if np.all(gaps >= 2) and np.all(np.abs(ratios - gaps) <= tol * gaps):
        n_missing = int((gaps - 1).sum())
        where = ", ".join(f"{positions[i]:.2f}..{positions[i + 1]:.2f} mm" for i in bad[:5])
        raise InputError(
            folder,
            f"{n_missing} missing slice(s) (slice spacing {step:.3f} mm; gaps at {where}); "
            "refusing to build a distorted volume",
        )
    raise InputError(
        folder,
        f"non-uniform slice spacing: steps range from {steps.min():.3f} to {steps.max():.3f} mm "
        f"(median {step:.3f} mm, tolerance {tol:.1%}); resample the series or export it again",
    )


def read_dicom_series(
    folder,
    series_uid: str | None = None,
    *,
    modality: str | Sequence[str] | None = ("CT",),
    spacing_tolerance: float = 0.01,
    dtype=np.float32,
) -> DicomVolume:
    """Read one single-frame DICOM image series as a checked volume.

    Args:
        folder: directory holding the series (searched recursively), or one file of the series
            (then that file's series is read from its folder).
        series_uid: SeriesInstanceUID to read when the folder holds several.
        modality: allowed modalities; ``("CT",)`` by default, ``"MR"`` for MRI, ``None`` for any.
        spacing_tolerance: relative tolerance of the slice-to-slice step before the spacing counts
            as non-uniform (missing slices are steps of about 2x, 3x, ... the median step).
        dtype: output dtype.

    Returns:
        :class:`DicomVolume` with ``array`` ``(X, Y, Z)`` (stored values x RescaleSlope +
        RescaleIntercept, i.e. HU for CT) and the voxel->RAS ``affine``.

    Raises:
        InputError: see the module docstring.
        ValueError: bad arguments.
    """
    if not 0 < spacing_tolerance < 0.5:
        raise ValueError(f"spacing_tolerance must be in (0, 0.5), got {spacing_tolerance}")
    pydicom = _pydicom()
    folder = Path(folder)
    if folder.is_file():
        try:
            ds = pydicom.dcmread(folder, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(folder, f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc
        series_uid = series_uid or str(getattr(ds, "SeriesInstanceUID", "")) or None
        folder = folder.parent
    info = select_series(folder, series_uid, modality)

    headers, pixels = [], []
    for path in info.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise InputError(path, f"cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(path, "multi-frame (enhanced) images are not supported; export single-frame slices")
        if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise InputError(path, "colour images are not supported (SamplesPerPixel != 1)")
        try:
            px = ds.pixel_array
        except Exception as exc:  # compressed transfer syntax without a decoder, truncated data
            raise InputError(
                path,
                f"pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
                "a compressed series may need pylibjpeg / gdcm, or decompress it with dcmdjpeg",
            ) from exc
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        pixels.append(px.astype(np.float64) * slope + intercept)
        del ds.PixelData
        headers.append(ds)

    first, first_path = headers[0], info.files[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing_rc = _floats(first, "PixelSpacing", 2, first_path)
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise InputError(first_path, f"ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    normal = np.cross(row_dir, col_dir)
    shape_rc = (int(first.Rows), int(first.Columns))
    ipps = []
    for ds, path in zip(headers, info.files):
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), iop, atol=1e-4):
            raise InputError(path, "ImageOrientationPatient differs from the rest of the series")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), spacing_rc, atol=1e-4):
            raise InputError(path, "PixelSpacing differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != shape_rc:
            raise InputError(path, f"matrix {int(ds.Rows)}x{int(ds.Columns)} differs from {shape_rc[0]}x{shape_rc[1]}")
        ipps.append(_floats(ds, "ImagePositionPatient", 3, path))
    ipps = np.asarray(ipps)
    positions = ipps @ normal
    order = np.argsort(positions, kind="stable")
    positions, ipps = positions[order], ipps[order]
    files = [info.files[i] for i in order]
    _check_steps(folder, positions, files, spacing_tolerance)

    if len(order) > 1:
        step_vec = (ipps[-1] - ipps[0]) / (len(order) - 1)
    else:
        thick = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
        step_vec = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]  # along a row: column index, column spacing
    lps[:3, 1] = col_dir * spacing_rc[0]  # down a column: row index, row spacing
    lps[:3, 2] = step_vec
    lps[:3, 3] = ipps[0]
    affine = LPS_TO_RAS @ lps

    # pixel_array is (rows, columns) -> transpose to (column index, row index)
    array = np.stack([pixels[i].T for i in order], axis=-1).astype(dtype)
    logger.info("read DICOM series %s: %d slices, shape %s", info.uid, len(order), array.shape)
    return DicomVolume(array=array, affine=affine, headers=[headers[i] for i in order], files=files, series=info)


def load_volume(path, *, series_uid: str | None = None, modality=("CT",), dtype=None, **nifti_kwargs):
    """Read an image from a NIfTI file or a DICOM series folder with the project's checks.

    A drop-in for :func:`shared_transforms.io.load_nifti` in tools that should also accept DICOM:
    directories (and ``.dcm`` files) go through :func:`read_dicom_series`, anything else through
    ``load_nifti``.

    Returns:
        ``(array (X, Y, Z), affine voxel->RAS)``.
    """
    from shared_transforms.io import load_nifti

    if Path(path).is_dir() or Path(path).suffix.lower() == ".dcm":
        vol = read_dicom_series(path, series_uid, modality=modality)
        return (vol.array if dtype is None else vol.array.astype(dtype)), vol.affine
    return load_nifti(path, dtype=dtype, **nifti_kwargs)


# --------------------------------------------------------------------------------------------
# A series the caller has just read and checked (the DICOM node), served to the reader below
# --------------------------------------------------------------------------------------------

_PREFETCHED: dict[str, tuple[DicomVolume, frozenset, float]] = {}
_PREFETCHED_LOCK = threading.Lock()


@contextlib.contextmanager
def prefetched_series(folder, volume: DicomVolume, *, modality: str | Sequence[str] = ("CT",), spacing_tolerance: float = 0.01):
    """Inside the block, :class:`DicomSeriesReader` takes ``volume`` for ``folder`` instead of reading it again.

    The DICOM node reads and checks every received series with :func:`read_dicom_series` before it
    runs a bundle on it; this hands that volume to the bundle's ``LoadImaged`` (a copy of the array,
    the same affine and metadata) instead of a second read of the same files. The reader uses it only
    for the same folder, a matching series UID, a modality it allows and a spacing tolerance no
    stricter than the one ``volume`` was checked with; otherwise it reads the folder as usual.

    Args:
        folder: the folder ``volume`` was read from. volume: its :class:`DicomVolume`.
        modality, spacing_tolerance: the arguments ``volume`` was read with.
    """
    key = str(Path(folder).resolve())
    allowed = frozenset(m.upper() for m in ([modality] if isinstance(modality, str) else modality))
    with _PREFETCHED_LOCK:
        _PREFETCHED[key] = (volume, allowed, float(spacing_tolerance))
    try:
        yield
    finally:
        with _PREFETCHED_LOCK:
            _PREFETCHED.pop(key, None)


def _prefetched(path: Path, series_uid, modality, spacing_tolerance) -> DicomVolume | None:
    with _PREFETCHED_LOCK:
        entry = _PREFETCHED.get(str(Path(path).resolve())) if _PREFETCHED else None
    if entry is None:
        return None
    volume, checked_modality, checked_tolerance = entry
    wanted = None if modality is None else {m.upper() for m in ([modality] if isinstance(modality, str) else modality)}
    if series_uid not in (None, volume.series.uid) or spacing_tolerance < checked_tolerance:
        return None
    if wanted is not None and not checked_modality <= wanted:
        return None
    return DicomVolume(array=volume.array.copy(), affine=volume.affine.copy(), headers=volume.headers, files=volume.files, series=volume.series)


# --------------------------------------------------------------------------------------------
# MONAI reader
# --------------------------------------------------------------------------------------------

try:  # MONAI is a project dependency, but keep this module importable for header-only use
    from monai.data.image_reader import ImageReader as _ImageReader
except ImportError:  # pragma: no cover
    _ImageReader = object


class _PendingSeries:
    """What :meth:`DicomSeriesReader.read` returns for a DICOM path; reading happens in ``get_data``."""

    def __init__(self, path):
        self.path = Path(path)


class DicomSeriesReader(_ImageReader):
    """MONAI image reader that accepts DICOM series folders (and still reads NIfTI files).

    Use as ``LoadImaged(keys="image", reader=DicomSeriesReader)`` (or the dotted name
    ``"shared_transforms.dicom.DicomSeriesReader"`` in a bundle config): a directory (or one
    ``.dcm`` file) is read with :func:`read_dicom_series` and all its checks; anything else is
    handed to MONAI's ``NibabelReader``. The DICOM series is read in :meth:`get_data`, which
    ``LoadImage`` does not wrap in its reader fall-back loop, so a folder with a missing slice
    raises :class:`~shared_transforms.io.InputError` instead of silently being read by another
    reader.

    Metadata: ``affine`` / ``original_affine`` (RAS, like ``NibabelReader``), ``spatial_shape``,
    ``space`` = ``"RAS"``, ``original_channel_dim`` = NaN (no channel), ``dicom_dir`` and the
    identifiers of :data:`META_TAGS` (never the patient's name).

    Args:
        series_uid: SeriesInstanceUID to read from folders holding several series.
        modality: allowed DICOM modalities (default CT; ``None`` for any).
        spacing_tolerance: see :func:`read_dicom_series`.
        nifti_kwargs: keyword arguments of the ``NibabelReader`` used for non-DICOM files.
    """

    def __init__(self, series_uid=None, modality=("CT",), spacing_tolerance: float = 0.01, nifti_kwargs=None, **kwargs):
        super().__init__()
        self.series_uid = series_uid
        self.modality = modality
        self.spacing_tolerance = spacing_tolerance
        self.nifti_kwargs = dict(nifti_kwargs or {})
        self.nifti_kwargs.update(kwargs)
        self._nifti = None

    def _nifti_reader(self):
        if self._nifti is None:
            from monai.data import NibabelReader

            self._nifti = NibabelReader(**self.nifti_kwargs)
        return self._nifti

    def verify_suffix(self, filename) -> bool:
        """True when every given path is a directory or a DICOM file."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(is_dicom_path(n) for n in names)

    def read(self, data, **kwargs):
        """Return one handle per path: pending DICOM series or a loaded NIfTI image.

        Args:
            data: a path or a sequence of paths (several paths are stacked as channels and must
                share one grid).
        """
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        out = []
        for name in names:
            if is_dicom_path(name):
                out.append(_PendingSeries(name))
            else:
                out.append(self._nifti_reader().read(name, **kwargs))
        return out if len(out) > 1 else out[0]

    def _one(self, item):
        if isinstance(item, _PendingSeries):
            vol = _prefetched(item.path, self.series_uid, self.modality, self.spacing_tolerance) or read_dicom_series(
                item.path, self.series_uid, modality=self.modality, spacing_tolerance=self.spacing_tolerance
            )
            meta = vol.meta()
            meta.update(
                {
                    "affine": vol.affine.copy(),
                    "original_affine": vol.affine.copy(),
                    "spatial_shape": np.asarray(vol.array.shape),
                    "space": "RAS",
                    "original_channel_dim": float("nan"),
                    "dicom_dir": str(item.path if item.path.is_dir() else item.path.parent),
                    "filename_or_obj": str(item.path),
                }
            )
            return vol.array, meta
        return self._nifti_reader().get_data(item)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Read the pending series / NIfTI images and return ``(array, meta)``.

        Returns:
            ``array`` of shape ``(X, Y, Z)`` for one path or ``(C, X, Y, Z)`` for several, and its
            metadata dict.

        Raises:
            InputError: bad DICOM series, or several paths on different grids.
        """
        items = img if isinstance(img, list) else [img]
        arrays, metas = zip(*(self._one(i) for i in items))
        if len(arrays) == 1:
            return arrays[0], metas[0]
        base = metas[0]
        for other in metas[1:]:
            if tuple(other["spatial_shape"]) != tuple(base["spatial_shape"]) or not np.allclose(
                other["affine"], base["affine"], atol=1e-3
            ):
                raise InputError(
                    other.get("filename_or_obj"),
                    "is not on the grid of the first image; use shared_transforms.mri.StackSequencesd "
                    "to resample sequences onto one reference grid",
                )
        meta = dict(base)
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta


READER_KEY = "npcgtvdicomseriesreader"


def register_dicom_reader() -> None:
    """Make MONAI's ``LoadImage`` / ``LoadImaged`` pick :class:`DicomSeriesReader` by itself.

    Adds the reader to ``monai.transforms.io.array.SUPPORTED_READERS`` (MONAI's documented
    extension point) as the last entry, i.e. the first one tried: a ``LoadImaged`` without a
    ``reader`` argument then reads DICOM folders and ``.dcm`` files with this module's checks
    (instead of ITK reading them unchecked), while NIfTI files still go to ``NibabelReader``.
    Called when this module is imported; calling it again is harmless.
    """
    try:
        from monai.transforms.io import array as _io
    except ImportError:  # pragma: no cover
        return
    if _io.SUPPORTED_READERS.get(READER_KEY) is not DicomSeriesReader:
        _io.SUPPORTED_READERS.pop(READER_KEY, None)
        _io.SUPPORTED_READERS[READER_KEY] = DicomSeriesReader


register_dicom_reader()
