"""Validated NIfTI reading and safe (atomic, non-clobbering) writing.

Every tool and transform of the project reads volumes through :func:`load_nifti` and writes
through :func:`save_nifti` / :func:`atomic_write`, so bad input always produces an
:class:`InputError` that names the file and the problem, and outputs never replace inputs.

The output discipline of every writer (:func:`atomic_write`):

* the data go to a temporary file in the target folder, which is flushed to disk (``fsync``)
  and then renamed onto the target, so a reader never sees a partial file and a crash, a full
  disk or a failed writer leaves no partial file behind (the temporary file is removed);
* a failed write raises (``OSError``; an empty result counts as failed);
* without ``overwrite`` an existing target is refused, race-free: the temporary file is
  hard-linked to the target name, which fails when another process created it meanwhile;
* the file gets the mode a newly created file gets (``0666`` minus the umask), not the
  owner-only ``0600`` of ``mkstemp``.

Input geometry is checked where it is read: a singular or non-finite affine, a NIfTI header
whose voxel size is zero (nibabel then silently uses 1 mm), and a spacing outside
:data:`SPACING_RANGE_MM` are refused (:func:`check_affine`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "InputError",
    "input_error_from",
    "load_nifti",
    "load_label",
    "check_image_array",
    "check_label_array",
    "check_same_grid",
    "save_nifti",
    "atomic_write",
    "ensure_not_input",
    "file_mode",
    "make_temp_dir",
    "fsync_path",
    "SPACING_RANGE_MM",
    "check_affine",
    "nifti_header_problem",
    "safe_name",
    "lossless_reorientation",
    "reorient_to_grid",
]

# affines that differ by less than this (mm, or unit-free for the direction part) are the same grid
AFFINE_TOLERANCE = 1e-3

#: smallest and largest voxel spacing (mm) accepted for an image or mask: planning CT has 0.4-1.5 mm
#: pixels and 0.5-10 mm slices; 0 mm (a broken header) or 50 mm (a wrong unit) are refused before any
#: metric, registration or resampling is computed on them
SPACING_RANGE_MM = (0.05, 15.0)


class InputError(ValueError):
    """Bad input data. The message always names the offending file (or case) and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str | None = None):
        if problem is None:  # one argument: a whole message (e.g. re-raised by torch's DataLoader from a worker)
            source, problem = None, str(source)
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)

    def __reduce__(self):  # picklable across processes with its two fields
        return (type(self), (self.source, self.problem))


def input_error_from(exc: BaseException | None) -> InputError | None:
    """Find the :class:`InputError` behind an exception.

    MONAI's ``Compose`` re-raises every failure as ``RuntimeError("applying transform ...")``
    with the original exception as its cause; a command-line tool can call this to print the
    clear ``"<file>: <problem>"`` message instead of the wrapper.

    Returns:
        the first InputError along the ``__cause__`` / ``__context__`` chain, or None.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _name(source) -> str:
    return "<array>" if source is None else str(source)


def check_image_array(array: np.ndarray, source=None, *, ndim: int = 3, allow_nan: bool = False) -> np.ndarray:
    """Check an image volume's dimensionality and values.

    Args:
        array: image of shape ``(X, Y, Z)`` (``ndim=3``) or ``(C, X, Y, Z)`` (``ndim=4``).
        source: file name or case id used in error messages.
        ndim: expected number of dimensions. A trailing singleton 4th axis of a 3D NIfTI is accepted.
        allow_nan: accept NaN / inf voxels.

    Returns:
        the array, squeezed of a trailing singleton axis when that makes it ``ndim``-dimensional.

    Raises:
        InputError: wrong dimensionality, empty volume, or non-finite voxels.
    """
    arr = np.asarray(array)
    while arr.ndim > ndim and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != ndim:
        raise InputError(source, f"expected a {ndim}D volume, got {arr.ndim}D data of shape {tuple(array.shape)}")
    if arr.size == 0 or min(arr.shape) == 0:
        raise InputError(source, f"volume is empty (shape {tuple(arr.shape)})")
    if not allow_nan and np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        if n_bad:
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(source, f"{n_bad} NaN/inf voxel(s), first at index {first}")
    return arr


def check_label_array(label: np.ndarray, source=None, *, allow_empty: bool = True) -> np.ndarray:
    """Check that a mask holds only 0 and 1 and return it as ``uint8``.

    Raises:
        InputError: values other than 0/1 (NaN included), or an empty mask when ``allow_empty`` is False.
    """
    arr = np.asarray(label)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(source, "label contains NaN/inf values")
    flat = np.ravel(arr, order="K")  # no copy for Fortran-ordered NIfTI data
    lo, hi = (flat.min(), flat.max()) if flat.size else (0, 0)
    binary = lo >= 0 and hi <= 1 and (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.all((flat == 0) | (flat == 1)))
    extra = [] if binary else [v for v in np.unique(flat).tolist() if v not in (0, 1)]
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise InputError(source, f"label must be binary (0/1) but contains {shown}")
    out = arr.astype(np.uint8)
    if not allow_empty and not out.any():
        raise InputError(source, "label is empty (no foreground voxel)")
    return out


def check_same_grid(shape_a, affine_a, shape_b, affine_b, source_a=None, source_b=None, *, tol: float = AFFINE_TOLERANCE) -> None:
    """Raise :class:`InputError` unless two volumes share spatial shape and affine."""
    shape_a, shape_b = tuple(shape_a)[-3:], tuple(shape_b)[-3:]
    if shape_a != shape_b:
        raise InputError(source_b, f"shape {shape_b} does not match {_name(source_a)} shape {shape_a}")
    diff = np.abs(np.asarray(affine_a, float) - np.asarray(affine_b, float)).max()
    if diff > tol:
        raise InputError(
            source_b,
            f"affine differs from {_name(source_a)} by up to {diff:.4g} (orientation, spacing or origin mismatch)",
        )


def lossless_reorientation(shape, affine, target_shape, target_affine, *, tol: float = AFFINE_TOLERANCE):
    """How a volume maps onto another grid of the same voxel centres, or None.

    Two grids cover the same voxel centres when one is an axis permutation and/or flip of the
    other (e.g. a prediction saved in RAS order for an LPS-ordered CT). Then the volume can be
    brought over exactly, without interpolation.

    Args:
        shape, affine: the volume's spatial shape and 4x4 voxel-to-world matrix.
        target_shape, target_affine: the target grid.
        tol: largest accepted deviation, in voxels, of the index mapping from a signed permutation.

    Returns:
        ``(axes, flips)`` -- ``numpy.flip(numpy.transpose(volume, axes), flips)`` is the volume on the
        target grid -- or None when the grids differ otherwise (shift, other spacing, rotation, extent).
    """
    shape, target_shape = tuple(int(v) for v in shape)[-3:], tuple(int(v) for v in target_shape)[-3:]
    try:
        m = np.linalg.inv(np.asarray(affine, float)) @ np.asarray(target_affine, float)
    except np.linalg.LinAlgError:
        return None
    rot, offset = m[:3, :3], m[:3, 3]
    rounded = np.rint(rot)
    if np.abs(rot - rounded).max() > tol or sorted(np.abs(rounded).sum(axis=0).tolist()) != [1, 1, 1] \
            or sorted(np.abs(rounded).sum(axis=1).tolist()) != [1, 1, 1]:
        return None
    axes, flips = [], []
    for j in range(3):  # target axis j reads source axis i = axes[j], index s * t + o
        i = int(np.flatnonzero(rounded[:, j])[0])
        sign = int(rounded[i, j])
        if shape[i] != target_shape[j]:
            return None
        expected = 0.0 if sign > 0 else shape[i] - 1.0
        if abs(offset[i] - expected) > tol:
            return None
        axes.append(i)
        if sign < 0:
            flips.append(j)
    return tuple(axes), tuple(flips)


def reorient_to_grid(array: np.ndarray, affine, target_shape, target_affine, source=None, reference=None) -> np.ndarray:
    """Bring ``array`` onto the target grid when that is lossless (same voxel centres), else refuse.

    Identical grids return ``array`` itself; an axis permutation / flip of the same grid is applied
    exactly (:func:`lossless_reorientation`).

    Raises:
        InputError: the grids differ in any other way (shift, spacing, rotation, extent); the message
            says that the volume would have to be resampled.
    """
    arr = np.asarray(array)
    if tuple(arr.shape[-3:]) == tuple(target_shape)[-3:] and np.abs(np.asarray(affine, float) - np.asarray(target_affine, float)).max() <= AFFINE_TOLERANCE:
        return arr
    how = lossless_reorientation(arr.shape, affine, target_shape, target_affine)
    if how is None:
        diff = np.abs(np.asarray(affine, float) - np.asarray(target_affine, float)).max()
        raise InputError(
            source,
            f"grid (shape {tuple(arr.shape)}) is not that of {_name(reference)} (shape {tuple(target_shape)}, affine differs by up "
            f"to {diff:.4g}) and is not a lossless reorientation of it (axis permutation / flip of the same voxel centres): "
            "it would have to be resampled",
        )
    axes, flips = how
    return np.flip(np.transpose(arr, axes), flips) if flips else np.transpose(arr, axes)


def check_affine(affine, source=None, *, spacing_range=SPACING_RANGE_MM) -> tuple[float, float, float]:
    """Check that a voxel-to-world affine gives a usable geometry; return the voxel spacing.

    Args:
        affine: 4x4 voxel-to-world matrix (numpy or torch).
        source: file name or case id used in error messages.
        spacing_range: ``(smallest, largest)`` accepted spacing in mm, or None to check only that
            the affine is finite and non-singular.

    Returns:
        the spacing (mm) of array axes 0, 1, 2 (norms of the affine's columns).

    Raises:
        InputError: non-finite or singular affine (zero spacing), or a spacing outside ``spacing_range``.
    """
    a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(source, "has a non-finite affine (no usable orientation/spacing)")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    shown = " x ".join(f"{v:.4g}" for v in spacing)
    if np.any(spacing <= 1e-6) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise InputError(source, f"has a singular affine (voxel spacing {shown} mm): no usable orientation/spacing; fix the header")
    if spacing_range is not None:
        lo, hi = (float(v) for v in spacing_range)
        if spacing.min() < lo or spacing.max() > hi:
            raise InputError(
                source,
                f"implausible voxel spacing {shown} mm (accepted {lo:g} to {hi:g} mm per axis); wrong unit or broken header?",
            )
    return tuple(float(v) for v in spacing)


def nifti_header_problem(path) -> str | None:
    """Geometry problem of a NIfTI header that nibabel would hide, or None.

    nibabel replaces a zero voxel size (``pixdim``) by 1 mm while loading, with only a log message,
    so a file without a usable spacing would be measured in made-up millimetres. This reads the raw
    header (no fixing) and reports zero or non-finite ``pixdim`` of the spatial axes when the affine
    is taken from them (``sform_code == 0``: the qform and the fall-back affine use ``pixdim``).
    Unreadable headers return None (the reader reports them).
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as fobj:
            header = nib.Nifti1Header.from_fileobj(fobj, check=False)
        ndim = int(header["dim"][0])
        pixdim = np.asarray(header["pixdim"][1 : 1 + min(max(ndim, 1), 3)], dtype=float)
        sform_code = int(header["sform_code"])
    except Exception:
        return None
    if sform_code == 0 and (not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0)):
        shown = " x ".join(f"{v:g}" for v in pixdim)
        return f"header voxel size (pixdim) is {shown} mm: no usable spacing (nibabel would silently use 1 mm); fix the header"
    return None


def load_nifti(path, *, ndim: int = 3, allow_nan: bool = False, dtype=None, spacing_range=SPACING_RANGE_MM):
    """Read a NIfTI file with checks.

    Args:
        path: ``.nii`` or ``.nii.gz`` file, or a DICOM CT series folder (read with
            :func:`shared_transforms.dicom.read_dicom_series`).
        ndim: expected dimensionality (3 for a volume).
        allow_nan: accept non-finite voxels.
        dtype: cast the data to this dtype (default: keep the on-disk type, scaled by slope/intercept).
        spacing_range: accepted voxel spacing in mm (see :func:`check_affine`); None: any non-zero spacing.

    Returns:
        ``(array, affine)`` with ``array`` of shape ``(X, Y, Z)`` in voxel order and ``affine`` the
        4x4 voxel-to-RAS matrix (nibabel convention).

    Raises:
        InputError: missing, unreadable or corrupt file, wrong dimensionality, non-finite voxels,
            a singular affine, a zero voxel size in the header, or an implausible spacing.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        # a DICOM CT series folder is accepted wherever a NIfTI volume is (same checks as dicom2nifti)
        from shared_transforms.dicom import read_dicom_series

        vol = read_dicom_series(path)
        check_affine(vol.affine, path, spacing_range=spacing_range)
        arr = check_image_array(vol.array, path, ndim=ndim, allow_nan=allow_nan)
        return (arr if dtype is None else arr.astype(dtype)), np.asarray(vol.affine, dtype=float)
    problem = nifti_header_problem(path)
    if problem:
        raise InputError(path, problem)
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=float)
    check_affine(affine, path, spacing_range=spacing_range)
    arr = check_image_array(raw, path, ndim=ndim, allow_nan=allow_nan)
    if dtype is not None:
        arr = arr.astype(dtype)
    return arr, affine


def load_label(path, *, reference=None, reference_affine=None, reference_shape=None, allow_empty: bool = True):
    """Read a binary mask with checks, optionally against its image's grid.

    Args:
        path: mask file.
        reference: name of the image file the mask belongs to (for messages).
        reference_affine: the image's affine; when given with ``reference_shape`` the grids must match.
        reference_shape: the image's spatial shape.
        allow_empty: accept an all-zero mask.

    Returns:
        ``(mask uint8 (X, Y, Z), affine)``.
    """
    arr, affine = load_nifti(path, allow_nan=False)
    if reference_affine is not None and reference_shape is not None:
        check_same_grid(reference_shape, reference_affine, arr.shape, affine, reference, path)
    return check_label_array(arr, path, allow_empty=allow_empty), affine


def ensure_not_input(out_path, inputs: Iterable) -> None:
    """Refuse to write ``out_path`` when it is (or links to) one of ``inputs``."""
    out = Path(out_path).resolve()
    for item in inputs:
        if item is None:
            continue
        if Path(item).resolve() == out:
            raise InputError(out_path, "output path is one of the inputs; refusing to overwrite input data")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # fallback: briefly set and restore
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a newly created file under the current umask (``0666 & ~umask``, e.g. ``0644``)."""
    return 0o666 & ~_umask()


def fsync_path(path, *, directory: bool = False) -> None:
    """Flush a file (or, with ``directory``, a folder's entries) to disk; folders that cannot be opened are skipped."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def make_temp_dir(parent, prefix: str) -> Path:
    """A new temporary folder in ``parent`` with the mode a new folder gets (``mkdtemp`` makes it 0700)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name, source=None) -> str:
    """A file-name-safe version of a case id: one path component, no separators, no leading dot.

    Characters other than letters, digits and ``. _ + -`` become ``_`` (so ``../x`` or ``/abs/p``
    cannot leave the output folder), leading dots are dropped (no hidden names, no ``..``).

    Raises:
        InputError: nothing usable is left (e.g. an empty id).
    """
    text = _UNSAFE.sub("_", str(name)).lstrip("._").rstrip("_")
    if not text or text in (".", ".."):
        raise InputError(source, f"case id {str(name)!r} gives no usable file name")
    return text[:200]


@contextlib.contextmanager
def atomic_write(path, *, overwrite: bool = True, inputs: Iterable = (), allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it onto ``path`` only on success.

    The caller writes the temporary file (by name). On leaving the block without an exception the
    file is checked to be non-empty, flushed to disk, given the mode ``0666 & ~umask`` and renamed
    onto ``path`` (its folder is flushed too). A crash, an exception or a failed write leaves any
    existing ``path`` untouched and removes the temporary file.

    Args:
        path: final destination.
        overwrite: allow replacing an existing file (never one listed in ``inputs``). Without it an
            existing ``path`` is refused before and again (race-free, by a hard link) after writing,
            so of two processes writing the same name only one succeeds.
        inputs: paths that must never be written.
        allow_empty: accept an empty result (default: an empty file means the writer failed).

    Raises:
        InputError: ``path`` is an input, or exists and ``overwrite`` is False.
        OSError: the write failed (no space, permission, ...), naming ``path``.
    """
    path = Path(path)
    ensure_not_input(path, inputs)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise InputError(path, "already exists; refusing to overwrite (choose another output or allow overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.is_file():
            raise OSError(errno.EIO, "the writer left no file", str(path))
        if not allow_empty and tmp_path.stat().st_size == 0:
            raise OSError(errno.EIO, "the writer produced an empty file (disk full?)", str(path))
        fsync_path(tmp_path)
        os.chmod(tmp_path, file_mode())
        if overwrite:
            os.replace(tmp_path, path)
        else:
            try:
                os.link(tmp_path, path)  # fails if the name was taken meanwhile (another process)
            except FileExistsError:
                raise InputError(path, "already exists (written by another process meanwhile); refusing to overwrite") from None
            except OSError as exc:  # file systems without hard links: check, then rename
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                    raise
                if path.exists():
                    raise InputError(path, "already exists; refusing to overwrite") from None
                os.replace(tmp_path, path)
        fsync_path(path.parent, directory=True)
    except OSError as exc:
        if exc.filename is None or Path(str(exc.filename)) == tmp_path:
            # name the destination, not the temporary file, in the message
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp_path.exists() or tmp_path.is_symlink():
                tmp_path.unlink()


def save_nifti(array: np.ndarray, affine: np.ndarray, path, *, dtype=None, overwrite: bool = True, inputs: Iterable = ()) -> Path:
    """Write ``array`` (``(X, Y, Z)``) with ``affine`` to ``path`` atomically; never over an input.

    Raises:
        InputError: ``path`` is an input, or exists and ``overwrite`` is False.
        OSError: the write failed (no partial file is left).
    """
    import nibabel as nib

    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float))
    img.set_qform(np.asarray(affine, dtype=float), code=1)
    img.set_sform(np.asarray(affine, dtype=float), code=1)
    with atomic_write(path, overwrite=overwrite, inputs=inputs) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
