"""Validated NIfTI reading and safe (atomic, non-clobbering) writing.

Every tool and transform of the project reads volumes through :func:`load_nifti` and writes
through :func:`save_nifti` / :func:`atomic_write`, so bad input always produces an
:class:`InputError` that names the file and the problem, and outputs never replace inputs.
"""

from __future__ import annotations

import contextlib
import os
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
]

# affines that differ by less than this (mm, or unit-free for the direction part) are the same grid
AFFINE_TOLERANCE = 1e-3


class InputError(ValueError):
    """Bad input data. The message always names the offending file (or case) and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)


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


def load_nifti(path, *, ndim: int = 3, allow_nan: bool = False, dtype=None):
    """Read a NIfTI file with checks.

    Args:
        path: ``.nii`` or ``.nii.gz`` file, or a DICOM CT series folder (read with
            :func:`shared_transforms.dicom.read_dicom_series`).
        ndim: expected dimensionality (3 for a volume).
        allow_nan: accept non-finite voxels.
        dtype: cast the data to this dtype (default: keep the on-disk type, scaled by slope/intercept).

    Returns:
        ``(array, affine)`` with ``array`` of shape ``(X, Y, Z)`` in voxel order and ``affine`` the
        4x4 voxel-to-RAS matrix (nibabel convention).

    Raises:
        InputError: missing, unreadable or corrupt file, wrong dimensionality, non-finite voxels,
            or a singular affine.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        # a DICOM CT series folder is accepted wherever a NIfTI volume is (same checks as dicom2nifti)
        from shared_transforms.dicom import read_dicom_series

        vol = read_dicom_series(path)
        arr = check_image_array(vol.array, path, ndim=ndim, allow_nan=allow_nan)
        return (arr if dtype is None else arr.astype(dtype)), np.asarray(vol.affine, dtype=float)
    try:
        img = nib.load(str(path))
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "has a singular or non-finite affine (no usable orientation/spacing)")
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


@contextlib.contextmanager
def atomic_write(path, *, overwrite: bool = True, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it onto ``path`` only on success.

    A crash or exception leaves any existing ``path`` untouched and removes the temporary file.

    Args:
        path: final destination.
        overwrite: allow replacing an existing file (never one listed in ``inputs``).
        inputs: paths that must never be written.
    """
    path = Path(path)
    ensure_not_input(path, inputs)
    if path.exists() and not overwrite:
        raise InputError(path, "already exists; refusing to overwrite (choose another output or allow overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_nifti(array: np.ndarray, affine: np.ndarray, path, *, dtype=None, overwrite: bool = True, inputs: Iterable = ()) -> Path:
    """Write ``array`` (``(X, Y, Z)``) with ``affine`` to ``path`` atomically; never over an input."""
    import nibabel as nib

    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=float))
    img.set_qform(np.asarray(affine, dtype=float), code=1)
    img.set_sform(np.asarray(affine, dtype=float), code=1)
    with atomic_write(path, overwrite=overwrite, inputs=inputs) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
