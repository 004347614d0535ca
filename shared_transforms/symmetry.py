"""Symmetric (mid-sagittal) registration with ITK: atlas-free and atlas modes.

The SATS method pairs every voxel with its left-right mirror, which is only meaningful when the
head's mid-sagittal plane is the central sagittal plane of the voxel grid. This module estimates
that plane and resamples the volume so that it is.

Two modes (:class:`SymmetricAlign`):

* **atlas-free** (default, ``atlas=None``): the image is rigidly registered (ITK
  ``ImageRegistrationMethodv4``, ``VersorRigid3DTransform``, correlation metric by default) to its
  own left-right mirror about the grid's central sagittal plane ``S``. If ``T`` maps the image onto
  the mirror, ``P = S o T`` is the reflection of the head onto itself, i.e. the reflection about
  the mid-sagittal plane; its normal is the eigenvector of the (symmetrised) linear part with
  eigenvalue -1 and its position is the midpoint of any point and its reflection ("half
  transform"). The output keeps the input grid (shape, spacing, orientation) and the content is
  moved by the smallest rotation that turns the plane normal onto the grid's left-right direction
  plus a shift along the normal, so that the plane lands on the grid's central sagittal plane.
  A tumour breaks the symmetry only locally, so the registration is robust to it.
* **atlas** (the papers' variant, ``atlas=path``): rigid then (by default) affine registration of
  the image to a symmetric atlas CT (Mattes mutual information by default), multi-resolution,
  on body masks. The output is on the atlas grid. ``npc-gtv make-atlas`` builds such an atlas.
  The SATS papers say both "rigid registration (rotation and translation)" and "affine
  registration" for this step; ``atlas_transform="affine"`` (default, rigid first then affine)
  follows the longer description, ``"rigid"`` stops after the rigid stage.

Speed: registration runs on a down-sampled (block-averaged, default about 4 mm) copy of the
volume, restricted to a body mask (threshold, erosion, largest component: the couch is cut off);
the transform found there is then applied once at full resolution.

Coordinates: arrays are ``(X, Y, Z)`` in NIfTI voxel order, affines map voxels to RAS mm (nibabel
and MONAI). ITK works in LPS; every matrix crossing the ITK boundary is converted with
``diag(-1, -1, 1)`` explicitly (:func:`ras_to_lps_matrix`).

The estimated transform is the 4x4 RAS matrix ``output world -> input world`` (it pulls input
samples onto the output grid). It is stored in the meta data (``symmetry_transform``), together
with a JSON report (``symmetry_report``), and in the MetaTensor's ``applied_operations`` so that
MONAI ``Invertd`` puts a prediction back on the original grid (same shape and affine).

Labels (nearest neighbour) and their exact inverse: a rotation sampled with plain nearest
neighbour is not a bijection of the voxel lattice (by 10 degrees about 2.5 % of the input voxels
are read by no output voxel), so the moved label could not be put back exactly. When the voxel
map is volume preserving (atlas-free mode, and atlas mode with a rigid transform on an atlas grid
of the same spacing), labels are therefore moved by :mod:`shared_transforms.lattice`: the map is
split into four single-axis shears with rounded row shifts, a bijection of the lattice within
about one in-plane voxel (half a slice along z) of the exact map. A label moved only by the
forward transform comes back **voxel-exact** on every voxel that stayed inside the grid. Other
maps (atlas mode with an affine, or a different atlas spacing) use round-half-up nearest
neighbour; their inverse is exact on every voxel the forward map read and takes the nearest output
voxel elsewhere. The inverse records the number of original voxels no output voxel read (left
the grid, or skipped by a non-bijective map) in ``meta["symmetry_inverse_unread_voxels"]``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys, TransformBackends, ensure_tuple_rep
from scipy import ndimage

from shared_transforms.flip import lr_axis
from shared_transforms.io import InputError, check_image_array, load_nifti
from shared_transforms.lattice import lattice_map
from shared_transforms.spatial import body_mask as _body_mask_ct
from shared_transforms.spatial import check_resample_memory, world_to_array_pixdim

__all__ = [
    "SymmetryError",
    "SymmetryResult",
    "estimate_symmetry",
    "apply_symmetry",
    "invert_symmetry",
    "grid_mirror_matrix",
    "plane_from_reflection",
    "plane_angle_error_deg",
    "plane_distance_mm",
    "ras_to_lps_matrix",
    "make_symmetric_atlas",
    "SymmetricAlign",
    "SymmetricAlignd",
]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LINEAR_MODES = ("bilinear", "linear", "trilinear")
NEAREST_MODES = ("nearest",)


class SymmetryError(InputError):
    """The symmetric registration failed or is not trustworthy (message names the case and why)."""


# ----------------------------------------------------------------------------- geometry helpers


def _as_np_affine(affine) -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"expected a finite, non-singular 4x4 affine, got\n{aff}")
    return aff


def ras_to_lps_matrix(matrix) -> np.ndarray:
    """Convert a 4x4 point map (or a voxel-to-world affine) between RAS and LPS world coordinates.

    For a point map ``M`` (world -> world) the result is ``F M F``; the conversion is its own
    inverse, so it also converts LPS to RAS. Apply it to voxel-to-world affines as ``F @ A``
    instead (see :func:`_to_itk_image`).
    """
    return _LPS @ np.asarray(matrix, dtype=np.float64) @ _LPS


def grid_mirror_matrix(affine, shape, axis: int | None = None) -> np.ndarray:
    """World (4x4) reflection about the grid's central plane across array axis ``axis``.

    This is the world-space meaning of reversing the array along ``axis`` while keeping the
    affine (``np.flip``): voxel ``i`` goes to ``shape[axis] - 1 - i``.

    Args:
        affine: 4x4 voxel-to-world matrix.
        shape: spatial shape ``(X, Y, Z)``.
        axis: array axis; default the left-right axis read from the affine.
    """
    aff = _as_np_affine(affine)
    axis = lr_axis(aff) if axis is None else int(axis)
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = shape[axis] - 1
    return aff @ flip @ np.linalg.inv(aff)


def grid_plane(affine, shape, axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit normal (pointing towards world +x) and centre point of the grid's central sagittal plane (world)."""
    aff = _as_np_affine(affine)
    axis = lr_axis(aff) if axis is None else int(axis)
    others = [a for a in range(3) if a != axis]
    normal = np.cross(aff[:3, others[0]], aff[:3, others[1]])
    normal /= np.linalg.norm(normal)
    if normal[0] < 0:
        normal = -normal
    centre = aff[:3, :3] @ ((np.asarray(shape[:3], float) - 1.0) / 2.0) + aff[:3, 3]
    return normal, centre


def plane_from_reflection(reflection, point) -> tuple[np.ndarray, np.ndarray, float]:
    """Plane of an (approximate) reflection ``P`` (4x4 world map).

    Args:
        reflection: 4x4 map that should be a reflection about a plane (improper, orthogonal).
        point: any world point near the structure (the midpoint of it and its image lies on the plane).

    Returns:
        ``(normal, plane_point, residual_deg)``: unit normal with positive world x, the point of
        the plane closest to ``point``, and the rotation angle (degrees) that separates ``P`` from a
        pure reflection (0 for a perfect mirror symmetry; large values mean an inconsistent fit).
    """
    P = np.asarray(reflection, dtype=np.float64)
    lin = P[:3, :3]
    w, v = np.linalg.eigh((lin + lin.T) / 2.0)
    normal = v[:, int(np.argmin(w))]
    if normal[0] < 0:
        normal = -normal
    householder = np.eye(3) - 2.0 * np.outer(normal, normal)
    residual = householder @ lin  # a rotation; identity for a pure reflection
    cos = np.clip((np.trace(residual) - 1.0) / 2.0, -1.0, 1.0)
    p = np.asarray(point, dtype=np.float64)
    mid = 0.5 * (p + (lin @ p + P[:3, 3]))
    plane_point = p - float(normal @ (p - mid)) * normal
    return normal, plane_point, float(np.degrees(np.arccos(cos)))


def _rotation_between(a, b) -> np.ndarray:
    """Smallest rotation (3x3) turning unit vector ``a`` onto unit vector ``b``."""
    a = np.asarray(a, float) / np.linalg.norm(a)
    b = np.asarray(b, float) / np.linalg.norm(b)
    v = np.cross(a, b)
    c = float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        raise ValueError("opposite vectors: the rotation is not unique")
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def euler_zyx_deg(rotation) -> tuple[float, float, float]:
    """Angles ``(pitch, roll, yaw)`` in degrees of ``R = Rz(yaw) @ Ry(roll) @ Rx(pitch)`` (RAS axes)."""
    R = np.asarray(rotation, float)[:3, :3]
    roll = -math.asin(float(np.clip(R[2, 0], -1.0, 1.0)))
    yaw = math.atan2(R[1, 0], R[0, 0])
    pitch = math.atan2(R[2, 1], R[2, 2])
    return math.degrees(pitch), math.degrees(roll), math.degrees(yaw)


def plane_angle_error_deg(normal_a, normal_b) -> float:
    """Angle (degrees, 0..90) between two planes given by their normals."""
    a = np.asarray(normal_a, float) / np.linalg.norm(normal_a)
    b = np.asarray(normal_b, float) / np.linalg.norm(normal_b)
    return float(np.degrees(np.arccos(np.clip(abs(a @ b), 0.0, 1.0))))


def plane_distance_mm(normal_est, point_est, normal_true, point_true, at=None) -> float:
    """Distance (mm) from the true plane of the estimated plane's point closest to ``at``.

    ``at`` defaults to ``point_true`` (for the phantoms: the head centre), so the value is how far
    the estimated plane passes from the true one at the centre of the head.
    """
    n_e = np.asarray(normal_est, float) / np.linalg.norm(normal_est)
    n_t = np.asarray(normal_true, float) / np.linalg.norm(normal_true)
    at = np.asarray(point_true if at is None else at, float)
    foot = at - float(n_e @ (at - np.asarray(point_est, float))) * n_e
    return float(abs(n_t @ (foot - np.asarray(point_true, float))))


# ----------------------------------------------------------------------------- working copy, masks


def _block_mean(array: np.ndarray, affine: np.ndarray, factors: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Down-sample by integer block averaging; returns the float32 array and its exact affine.

    Sums strided views axis by axis (no full-size float copy, any memory order); a remainder of
    fewer than ``factor`` voxels at the far end of an axis is dropped.
    """
    f = [max(1, int(v)) for v in factors]
    shape = [s // k for s, k in zip(array.shape, f)]
    if min(shape) < 1:
        f, shape = [1, 1, 1], list(array.shape)
    out = np.asarray(array)
    for axis in range(3):
        if f[axis] == 1:
            continue
        n = shape[axis]
        parts = [np.take(out, np.arange(o, n * f[axis], f[axis]), axis=axis) for o in range(f[axis])]
        acc = parts[0].astype(np.float32)
        for part in parts[1:]:
            acc += part
        out = acc / np.float32(f[axis])
    out = np.ascontiguousarray(out, dtype=np.float32)
    scale = np.diag([f[0], f[1], f[2], 1.0]).astype(np.float64)
    scale[:3, 3] = (np.asarray(f, float) - 1.0) / 2.0
    return out, affine @ scale


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def _is_ct(array: np.ndarray) -> bool:
    return float(np.percentile(array[:: max(1, array.shape[0] // 16)], 1)) < -500.0


def head_mask(array: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Body (head) mask of a working-resolution volume, CT or MRI.

    CT (1st percentile below -500): voxels above ``threshold`` (default -250 HU, so fat is in and
    a CT couch of about -350 HU is out). Other intensities (MRI): the Otsu threshold. Then
    :func:`shared_transforms.spatial.body_mask` (erosion cutting thin bridges, largest component,
    geodesic regrowth) and hole filling.

    Returns:
        ``(mask bool (X, Y, Z), threshold used)``.
    """
    if threshold is None:
        if _is_ct(array):
            threshold = -250.0
        else:
            from skimage.filters import threshold_otsu

            sample = array[:: max(1, array.shape[0] // 32), :: max(1, array.shape[1] // 32)].ravel()
            threshold = float(threshold_otsu(sample)) if np.ptp(sample) > 0 else float(sample.max())
    mask = _body_mask_ct(array, threshold=threshold, erosion_iterations=2, restore=True)
    mask = ndimage.binary_fill_holes(mask)
    return mask, float(threshold)


def _clip_range(array: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    vals = array[mask]
    if vals.size == 0:
        return float(array.min()), float(array.max())
    lo, hi = np.percentile(vals, [1.0, 99.0])
    return float(lo), float(max(hi, lo + 1e-6))


def asymmetry_score(array: np.ndarray, affine: np.ndarray, mask: np.ndarray, clip=None) -> float:
    """Mean absolute difference between a volume and its grid mirror inside ``mask OR mirror(mask)``.

    Intensities are clipped to ``clip`` (default: 1st-99th percentile inside the mask) so that
    bone or air extremes do not dominate. Units are the image's (HU for CT).
    """
    axis = lr_axis(affine)
    lo, hi = clip if clip is not None else _clip_range(array, mask)
    a = np.clip(array, lo, hi)
    region = mask | np.flip(mask, axis)
    if not region.any():
        return float("nan")
    return float(np.abs(a - np.flip(a, axis))[region].mean())


# ----------------------------------------------------------------------------- resampling


def _index_map(out_affine, in_affine, tmap) -> np.ndarray:
    """4x4 map from output voxel indices to (continuous) input voxel indices."""
    return np.linalg.inv(in_affine) @ tmap @ out_affine


def _mapped_indices(index_map: np.ndarray, grid_shape, k: int) -> list[np.ndarray]:
    """Rounded (half up) images under ``index_map`` of the voxels of slice ``k`` (last axis) of a grid.

    Returns three int64 ``(X, Y)`` arrays, the target indices along each axis.
    """
    i = np.arange(int(grid_shape[0]), dtype=np.float64)[:, None]
    j = np.arange(int(grid_shape[1]), dtype=np.float64)[None, :]
    return [np.floor(m[0] * i + m[1] * j + (m[2] * k + m[3]) + 0.5).astype(np.int64) for m in index_map[:3]]


def _in_bounds(idx: list[np.ndarray], shape) -> np.ndarray:
    valid = np.ones(idx[0].shape, dtype=bool)
    for r in range(3):
        valid &= (idx[r] >= 0) & (idx[r] < int(shape[r]))
    return valid


def _lattice_for(index_map: np.ndarray, in_affine: np.ndarray):
    """The exactly invertible lattice version of ``index_map`` (rigid maps on one grid), or None."""
    return lattice_map(index_map, spacing=_spacing(in_affine))


def _resample_nearest(array: np.ndarray, index_map: np.ndarray, out_shape, cval=0, lattice=None) -> np.ndarray:
    """Nearest-neighbour pull, slice by slice: through the lattice bijection when given, else round half up."""
    arr = np.asarray(array)
    out_shape = tuple(int(s) for s in out_shape)
    out = np.full(out_shape, cval, dtype=arr.dtype)
    ii, jj = np.meshgrid(np.arange(out_shape[0]), np.arange(out_shape[1]), indexing="ij")
    for k in range(out_shape[2]):
        if lattice is not None:
            src = lattice.pull([ii, jj, np.full_like(ii, k)])
        else:
            src = _mapped_indices(index_map, out_shape, k)
        valid = _in_bounds(src, arr.shape)
        sl = out[:, :, k]
        sl[valid] = arr[src[0][valid], src[1][valid], src[2][valid]]
    return out


def _invert_nearest_lattice(pred: np.ndarray, lattice, orig_shape, cval=0) -> tuple[np.ndarray, int]:
    """Exact inverse of the lattice pull: every original voxel takes the value of the one output voxel that read it."""
    pred = np.asarray(pred)
    orig_shape = tuple(int(s) for s in orig_shape)
    out = np.full(orig_shape, cval, dtype=pred.dtype)
    ii, jj = np.meshgrid(np.arange(orig_shape[0]), np.arange(orig_shape[1]), indexing="ij")
    unread = 0
    for k in range(orig_shape[2]):
        o = lattice.push([ii, jj, np.full_like(ii, k)])
        valid = _in_bounds(o, pred.shape)
        unread += int(valid.size - valid.sum())
        sl = out[:, :, k]
        sl[valid] = pred[o[0][valid], o[1][valid], o[2][valid]]
    return out, unread


def _invert_nearest(pred: np.ndarray, index_map: np.ndarray, orig_shape, cval=0) -> tuple[np.ndarray, int]:
    """Inverse of the round-half-up :func:`_resample_nearest` (maps that are not volume preserving).

    ``index_map`` is the forward map (output index -> input index). An original voxel ``v`` takes
    the value of the output voxel ``o`` nearest to it (pull through the inverse map) when that
    ``o`` sampled ``v`` in the forward direction; otherwise, when some other output voxel sampled
    ``v``, the value of that one; otherwise (``v`` was read by no output voxel) the pulled value.

    Returns:
        the volume on the original grid and the number of original voxels no output voxel read.
    """
    pred = np.asarray(pred)
    orig_shape = tuple(int(s) for s in orig_shape)
    inv_map = np.linalg.inv(index_map)
    hit = np.zeros(orig_shape, dtype=bool)
    hit_value = np.full(orig_shape, cval, dtype=pred.dtype)
    for k in range(pred.shape[2]):  # scatter: where did every output voxel read from?
        src = _mapped_indices(index_map, pred.shape, k)
        valid = _in_bounds(src, orig_shape)
        target = (src[0][valid], src[1][valid], src[2][valid])
        hit_value[target] = pred[:, :, k][valid]
        hit[target] = True
    out = np.full(orig_shape, cval, dtype=pred.dtype)
    ii = np.arange(orig_shape[0])[:, None]
    jj = np.arange(orig_shape[1])[None, :]
    for k in range(orig_shape[2]):  # pull, and check that the pulled voxel read this one
        o = _mapped_indices(inv_map, orig_shape, k)
        valid = _in_bounds(o, pred.shape)
        vals = np.full(valid.shape, cval, dtype=pred.dtype)
        vals[valid] = pred[o[0][valid], o[1][valid], o[2][valid]]
        back = [np.floor(m[0] * o[0] + m[1] * o[1] + m[2] * o[2] + m[3] + 0.5).astype(np.int64) for m in index_map[:3]]
        consistent = valid & (back[0] == ii) & (back[1] == jj) & (back[2] == k)
        use_hit = hit[:, :, k] & ~consistent
        vals[use_hit] = hit_value[:, :, k][use_hit]
        out[:, :, k] = vals
    return out, int(hit.size - int(hit.sum()))


# ----------------------------------------------------------------------------- ITK


def _itk():
    import itk  # imported lazily: loading ITK's registration modules takes seconds

    return itk


def _itk_geometry(affine_ras: np.ndarray, reverse: bool = True):
    """(spacing, origin, direction) in LPS of an ITK image holding a numpy ``(X, Y, Z)`` buffer.

    ITK runs its first index fastest. A C-ordered ``(X, Y, Z)`` array runs Z fastest, so ITK sees
    its axes in reverse order (ITK index ``(k, j, i)``) and the affine's columns are reversed to
    match (``reverse=True``); the same voxels lie at the same physical points and no transposed
    copy is made. A Fortran-ordered array (nibabel's) is handed over as its transpose, a C-ordered
    ``(Z, Y, X)`` view, with the columns in their order (``reverse=False``).
    """
    aff_lps = _LPS @ np.asarray(affine_ras, np.float64)
    cols = aff_lps[:3, [2, 1, 0]] if reverse else aff_lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    return spacing, aff_lps[:3, 3], cols / spacing


def _to_itk_image(array: np.ndarray, affine_ras: np.ndarray, pixel="F"):
    """numpy ``(X, Y, Z)`` + RAS affine -> ITK image (LPS physical space; see :func:`_itk_geometry`)."""
    itk = _itk()
    arr = np.asarray(array, dtype=np.float32 if pixel == "F" else np.uint8)
    fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
    img = itk.image_from_array(arr.T if fortran else np.ascontiguousarray(arr))
    spacing, origin, direction = _itk_geometry(affine_ras, reverse=not fortran)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in origin])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return img


def _resample_linear_world(array, in_affine, tmap, out_shape, out_affine, cval: float) -> np.ndarray:
    """Linear resampling with ITK's multi-threaded ``ResampleImageFilter`` (about 3x faster than scipy).

    ``tmap`` is the RAS map output world -> input world; the result is float32 ``out_shape``.
    Identical to ``scipy.ndimage.affine_transform(order=1)`` wherever the sample has input voxels on
    both sides; within one voxel of the input's edge ITK extrapolates the edge value where scipy
    blends in ``cval``.
    """
    itk = _itk()
    img = _to_itk_image(array, in_affine)
    transform = itk.AffineTransform[itk.D, 3].New()
    m = ras_to_lps_matrix(tmap)
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(m[:3, :3])))
    transform.SetTranslation([float(v) for v in m[:3, 3]])
    res = itk.ResampleImageFilter[type(img), type(img)].New()
    res.SetInput(img)
    res.SetTransform(transform)
    res.SetDefaultPixelValue(float(cval))
    sp, origin, direction = _itk_geometry(out_affine)
    res.SetSize([int(v) for v in reversed(tuple(out_shape))])
    res.SetOutputSpacing([float(v) for v in sp])
    res.SetOutputOrigin([float(v) for v in origin])
    res.SetOutputDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    res.Update()
    return itk.array_from_image(res.GetOutput())  # C-ordered (X, Y, Z), see _itk_geometry


def _transform_to_matrix(transform) -> np.ndarray:
    """ITK MatrixOffsetTransformBase -> 4x4 (LPS point map)."""
    itk = _itk()
    m = np.eye(4)
    m[:3, :3] = np.asarray(itk.array_from_matrix(transform.GetMatrix()), dtype=np.float64)
    m[:3, 3] = np.asarray(list(transform.GetOffset()), dtype=np.float64)
    return m


@dataclass
class _RegOutcome:
    matrix_ras: np.ndarray
    metric_value: float
    stop_condition: str
    iterations: list
    converged: bool


def _register(fixed, fixed_aff, fixed_mask, moving, moving_aff, moving_mask, *, kind, init_ras, centre_ras,
              metric, shrink, sigmas_mm, iterations, sampling, learning_rate, seed=1234) -> _RegOutcome:
    """One multi-resolution ITK v4 registration. ``init_ras``/result: 4x4 RAS maps fixed world -> moving world."""
    itk = _itk()
    F = itk.Image[itk.F, 3]
    fixed_img = _to_itk_image(fixed, fixed_aff)
    moving_img = _to_itk_image(moving, moving_aff)
    init_lps = ras_to_lps_matrix(init_ras)
    centre_lps = (_LPS[:3, :3] @ np.asarray(centre_ras, float)).tolist()
    if kind == "rigid":
        transform = itk.VersorRigid3DTransform[itk.D].New()
    elif kind == "affine":
        transform = itk.AffineTransform[itk.D, 3].New()
    else:
        raise ValueError(f"kind must be 'rigid' or 'affine', got {kind!r}")
    transform.SetCenter(centre_lps)
    if kind == "rigid":  # ITK refuses a rotation that is orthogonal only to ~1e-7
        u, _, vt = np.linalg.svd(init_lps[:3, :3])
        init_lps = init_lps.copy()
        init_lps[:3, :3] = u @ vt
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(init_lps[:3, :3])))
    # x -> A (x - c) + c + t  ==  A x + offset  => t = offset - c + A c
    c = np.asarray(centre_lps)
    transform.SetTranslation((init_lps[:3, 3] - c + init_lps[:3, :3] @ c).tolist())

    if metric == "correlation":
        m = itk.CorrelationImageToImageMetricv4[F, F].New()
    elif metric == "mattes":
        m = itk.MattesMutualInformationImageToImageMetricv4[F, F].New()
        m.SetNumberOfHistogramBins(32)
    elif metric == "meansquares":
        m = itk.MeanSquaresImageToImageMetricv4[F, F].New()
    else:
        raise ValueError(f"metric must be 'correlation', 'mattes' or 'meansquares', got {metric!r}")
    for mask, setter, aff in ((fixed_mask, m.SetFixedImageMask, fixed_aff), (moving_mask, m.SetMovingImageMask, moving_aff)):
        if mask is not None:
            so = itk.ImageMaskSpatialObject[3].New()
            so.SetImage(_to_itk_image(mask, aff, pixel="UC"))
            so.Update()
            setter(so)

    opt = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    opt.SetLearningRate(float(learning_rate))
    opt.SetMinimumStepLength(1e-3)
    opt.SetRelaxationFactor(0.5)
    opt.SetGradientMagnitudeTolerance(1e-8)
    opt.SetNumberOfIterations(int(max(iterations)))
    opt.SetReturnBestParametersAndValue(True)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(m)].New()
    scales.SetMetric(m)
    opt.SetScalesEstimator(scales)
    opt.SetDoEstimateLearningRateOnce(False)
    opt.SetDoEstimateLearningRateAtEachIteration(False)

    reg = itk.ImageRegistrationMethodv4[F, F].New()
    reg.SetFixedImage(fixed_img)
    reg.SetMovingImage(moving_img)
    reg.SetMetric(m)
    reg.SetOptimizer(opt)
    reg.SetInitialTransform(transform)
    reg.InPlaceOn()
    reg.SetNumberOfLevels(len(shrink))
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in sigmas_mm])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if sampling < 1.0:
        reg.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling))
        reg.MetricSamplingReinitializeSeed(int(seed))

    per_level: list[int] = []

    def _level_start():  # fired by ITK at the start of every resolution level
        level = len(per_level)
        if level:
            per_level[-1] = int(opt.GetCurrentIteration())
        per_level.append(0)
        opt.SetNumberOfIterations(int(iterations[min(level, len(iterations) - 1)]))
        opt.SetLearningRate(float(learning_rate) / (2.0 ** level))

    reg.AddObserver(itk.MultiResolutionIterationEvent(), _level_start)
    reg.Update()
    n_last = int(opt.GetCurrentIteration())
    if per_level:
        per_level[-1] = n_last
    matrix_lps = _transform_to_matrix(transform)  # InPlaceOn: the initial transform holds the result
    return _RegOutcome(
        matrix_ras=ras_to_lps_matrix(matrix_lps), metric_value=float(opt.GetValue()),
        stop_condition=str(opt.GetStopConditionDescription()), iterations=per_level,
        converged=n_last < int(iterations[-1]),
    )


# ----------------------------------------------------------------------------- estimation


@dataclass
class SymmetryResult:
    """What :func:`estimate_symmetry` found for one case.

    ``transform`` is the 4x4 RAS map from output-grid world coordinates to input world
    coordinates (it pulls input samples onto the output grid). ``plane_normal`` /
    ``plane_point`` describe the estimated mid-sagittal plane in the input's RAS world (mm).
    """

    case: str
    mode: str
    transform: np.ndarray
    input_shape: tuple
    input_affine: np.ndarray
    output_shape: tuple
    output_affine: np.ndarray
    plane_normal: np.ndarray
    plane_point: np.ndarray
    metric: str
    metric_value: float
    stop_condition: str
    iterations: list
    converged: bool
    asymmetry_before: float
    asymmetry_after: float
    reflection_residual_deg: float = float("nan")
    body_volume_ml: float = float("nan")
    working_spacing_mm: tuple = ()
    runtime_s: float = float("nan")
    ok: bool = True
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def plane_yaw_deg(self) -> float:
        """Yaw of the plane normal (rotation about S-I), as in the phantoms' ``R = Rz(yaw) Ry(roll) Rx(pitch)``."""
        n = self.plane_normal
        return math.degrees(math.atan2(n[1], n[0]))

    @property
    def plane_roll_deg(self) -> float:
        """Roll of the plane normal (rotation about A-P)."""
        return -math.degrees(math.asin(float(np.clip(self.plane_normal[2], -1.0, 1.0))))

    def with_output_spacing(self, pixdim, axis_order: str = "world") -> "SymmetryResult":
        """The same alignment onto a grid of spacing ``pixdim`` (mm; <= 0 keeps an axis).

        ``axis_order="world"`` (default, as :class:`~shared_transforms.spatial.ResampleToSpacing`):
        ``pixdim`` is (left-right, anterior-posterior, superior-inferior) and is mapped onto the
        grid's axes; ``"array"``: one value per grid axis.

        The new grid keeps the output grid's orientation and centre (so the mid-sagittal plane is
        still its central sagittal plane) and covers the same extent, ``round(n * s / s')`` voxels
        per axis. Resampling once onto it replaces a separate spacing step before the alignment
        (one interpolation instead of two). Labels moved onto a grid of another spacing are not a
        lattice bijection (see the module docstring).
        """
        if axis_order not in ("world", "array"):
            raise ValueError(f"axis_order must be 'world' or 'array', got {axis_order!r}")
        aff = np.asarray(self.output_affine, np.float64)
        pix = _check_pixdim(pixdim)
        pix = np.asarray(world_to_array_pixdim(pix, aff) if axis_order == "world" else pix)
        shape = np.asarray(self.output_shape, np.float64)
        sp = _spacing(aff)
        new_sp = np.where(pix > 0, pix, sp)
        new_shape = np.maximum(1, np.floor(shape * sp / new_sp + 0.5)).astype(int)
        new_aff = np.eye(4)
        new_aff[:3, :3] = aff[:3, :3] / sp * new_sp
        centre = aff[:3, :3] @ ((shape - 1) / 2) + aff[:3, 3]
        new_aff[:3, 3] = centre - new_aff[:3, :3] @ ((new_shape - 1) / 2)
        return replace(self, output_shape=tuple(int(n) for n in new_shape), output_affine=new_aff)

    def report(self) -> dict:
        """JSON-serialisable per-case report."""
        lin = self.transform[:3, :3]
        u, _, vt = np.linalg.svd(lin)
        rot = u @ vt
        pitch, roll, yaw = euler_zyx_deg(rot)
        centre_out = self.output_affine[:3, :3] @ ((np.asarray(self.output_shape, float) - 1) / 2) + self.output_affine[:3, 3]
        moved = self.transform[:3, :3] @ centre_out + self.transform[:3, 3]
        ratio = self.asymmetry_after / self.asymmetry_before if self.asymmetry_before > 0 else float("nan")
        return {
            "case": self.case,
            "mode": self.mode,
            "ok": bool(self.ok),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "plane_normal_ras": [round(float(v), 6) for v in self.plane_normal],
            "plane_point_ras_mm": [round(float(v), 3) for v in self.plane_point],
            "plane_yaw_deg": round(self.plane_yaw_deg, 3),
            "plane_roll_deg": round(self.plane_roll_deg, 3),
            "rotation_deg": {"pitch_lr_axis": round(pitch, 3), "roll_ap_axis": round(roll, 3), "yaw_si_axis": round(yaw, 3)},
            "translation_mm": [round(float(v), 3) for v in (moved - centre_out)],
            "scale": [round(float(v), 4) for v in np.linalg.svd(lin, compute_uv=False)],
            "metric": self.metric,
            "final_metric": round(float(self.metric_value), 6),
            "stop_condition": self.stop_condition,
            "iterations_per_level": list(self.iterations),
            "converged": bool(self.converged),
            "reflection_residual_deg": round(float(self.reflection_residual_deg), 4),
            "asymmetry_before": round(float(self.asymmetry_before), 4),
            "asymmetry_after": round(float(self.asymmetry_after), 4),
            "asymmetry_ratio": round(float(ratio), 4),
            "body_volume_ml": round(float(self.body_volume_ml), 1),
            "working_spacing_mm": [round(float(v), 3) for v in self.working_spacing_mm],
            "runtime_s": round(float(self.runtime_s), 3),
            "transform_out_to_in_ras": [[round(float(v), 8) for v in row] for row in self.transform],
            "input_shape": [int(v) for v in self.input_shape],
            "output_shape": [int(v) for v in self.output_shape],
        }


def _working_copy(array, affine, spacing_mm):
    sp = _spacing(affine)
    factors = [max(1, int(math.floor(spacing_mm / s + 0.5))) for s in sp]
    return _block_mean(array, affine, factors)


def _centred_working_grid(affine, shape, w_affine, w_shape):
    """Affine of a working-resolution grid whose centre coincides with the full grid's centre."""
    a = np.asarray(w_affine, float).copy()
    full_centre = affine[:3, :3] @ ((np.asarray(shape[:3], float) - 1) / 2) + affine[:3, 3]
    w_centre = a[:3, :3] @ ((np.asarray(w_shape, float) - 1) / 2) + a[:3, 3]
    a[:3, 3] += full_centre - w_centre
    return a


def _centroid(mask, affine) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def _moments_plane(mask, affine, max_angle_deg: float, min_gap: float = 1.1):
    """Initial mid-sagittal plane from the body mask's second moments.

    A mirror-symmetric body has its plane normal as a principal axis; the principal axis closest
    to the grid's left-right direction is taken when it is within ``max_angle_deg`` of it and its
    variance differs from the others by the factor ``min_gap`` (otherwise the axis is ill-defined).

    Returns:
        ``(normal or None, centroid)`` in world mm.
    """
    idx = np.argwhere(mask).astype(np.float64)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    centroid = pts.mean(axis=0)
    centred = pts - centroid
    evals, evecs = np.linalg.eigh(centred.T @ centred / len(pts))
    e, _ = grid_plane(affine, mask.shape)
    k = int(np.argmax(np.abs(evecs.T @ e)))
    normal = evecs[:, k] * np.sign(evecs[:, k] @ e)
    others = np.delete(evals, k)
    gap = np.min(np.maximum(others / evals[k], evals[k] / others))
    if plane_angle_error_deg(normal, e) > max_angle_deg or gap < min_gap:
        return None, centroid
    return normal, centroid


def _reflection(normal, point) -> np.ndarray:
    n = np.asarray(normal, float) / np.linalg.norm(normal)
    P = np.eye(4)
    P[:3, :3] = np.eye(3) - 2.0 * np.outer(n, n)
    P[:3, 3] = 2.0 * float(n @ np.asarray(point, float)) * n
    return P


def _load_atlas(atlas):
    if isinstance(atlas, (tuple, list)) and len(atlas) == 2:
        arr, aff = atlas
        arr = check_image_array(np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr), "atlas")
        return np.asarray(arr, dtype=np.float32), _as_np_affine(aff), "atlas"
    arr, aff = load_nifti(atlas, dtype=np.float32)
    return arr, aff, str(atlas)


def estimate_symmetry(
    array,
    affine,
    *,
    atlas=None,
    case: str | None = None,
    metric: str | None = None,
    atlas_transform: str = "affine",
    working_spacing_mm: float = 4.0,
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas_mm: Sequence[float] = (4.0, 1.0),
    iterations: Sequence[int] = (200, 100),
    sampling: float | None = None,
    learning_rate: float = 2.0,
    body_threshold: float | None = None,
    min_body_ml: float = 300.0,
    max_angle_deg: float = 25.0,
    max_residual_deg: float = 2.0,
    max_asymmetry_ratio: float = 1.05,
    scale_range: tuple = (0.75, 1.33),
) -> SymmetryResult:
    """Estimate the mid-sagittal plane of a volume and the transform that centres it.

    Args:
        array: ``(X, Y, Z)`` volume (CT in HU, or MRI intensities).
        affine: 4x4 voxel-to-RAS matrix.
        atlas: None for the atlas-free mode; a NIfTI path, or ``(array, affine)``, of a symmetric
            atlas for the atlas mode.
        case: name used in messages and the report.
        metric: ``"correlation"`` (atlas-free default), ``"mattes"`` (atlas default, Mattes mutual
            information) or ``"meansquares"``.
        atlas_transform: ``"affine"`` (rigid, then affine; default) or ``"rigid"`` (atlas mode only).
        working_spacing_mm: the registration runs on a block-averaged copy with voxels of about this size.
        shrink_factors: ITK shrink factor per resolution level (on the working copy).
        smoothing_sigmas_mm: Gaussian smoothing per level (mm).
        iterations: maximum optimiser iterations per level.
        sampling: fraction of the masked voxels used by the metric (1: all; <1: random sampling with a
            fixed seed). Default: all up to 40 000 body voxels, then a fraction (at least 20 %) giving about that many.
        learning_rate: initial step of the regular-step gradient descent (about mm), halved per level.
        body_threshold: body mask threshold (default: -250 HU for CT, Otsu otherwise).
        min_body_ml: less body than this in view is an error ("not enough head in view").
        max_angle_deg: a plane tilted more than this from the grid's sagittal plane is a failure.
        max_residual_deg: atlas-free: the fitted self-map must be a reflection up to this rotation.
        max_asymmetry_ratio: asymmetry after / before above this is a failure.
        scale_range: atlas mode: allowed range of the affine's scale factors.

    Returns:
        :class:`SymmetryResult`; ``ok`` is False and ``problems`` says why when the result is not
        trustworthy (the caller decides whether to raise, see :class:`SymmetricAlign`).

    Raises:
        InputError: not a 3D volume, non-finite values, or not enough body in view.
        ValueError: bad arguments.
    """
    t0 = time.perf_counter()
    name = case or "<array>"
    arr = check_image_array(np.asarray(array), name)
    aff = _as_np_affine(affine)
    if atlas_transform not in ("affine", "rigid"):
        raise ValueError(f"atlas_transform must be 'affine' or 'rigid', got {atlas_transform!r}")
    if len(shrink_factors) != len(smoothing_sigmas_mm) or len(shrink_factors) != len(iterations) or not shrink_factors:
        raise ValueError("shrink_factors, smoothing_sigmas_mm and iterations need one entry per level")
    if sampling is not None and not 0 < sampling <= 1:
        raise ValueError(f"sampling must be in (0, 1], got {sampling}")
    metric = metric or ("correlation" if atlas is None else "mattes")

    w_arr, w_aff = _working_copy(arr, aff, working_spacing_mm)
    mask, _ = head_mask(w_arr, body_threshold)
    voxel_ml = float(np.prod(_spacing(w_aff))) / 1000.0
    body_ml = float(mask.sum()) * voxel_ml
    if body_ml < min_body_ml:
        raise InputError(
            name,
            f"not enough head in view: {body_ml:.0f} ml of body found (need >= {min_body_ml:.0f} ml); "
            "cannot estimate the mid-sagittal plane",
        )
    warn = []
    axis = lr_axis(aff)
    border = np.concatenate([np.take(mask, 0, axis=axis).ravel(), np.take(mask, -1, axis=axis).ravel()])
    if border.mean() > 0.02:
        warn.append(f"the body touches the left/right edge of the field of view ({100 * border.mean():.1f}% of the edge)")
    centroid = _centroid(mask, w_aff)
    problems = []
    residual = float("nan")
    ws = tuple(float(v) for v in _spacing(w_aff))
    if sampling is None:
        sampling = float(min(1.0, max(0.2, 40000.0 / max(1, int(mask.sum())))))
    reg_kw = dict(shrink=shrink_factors, sigmas_mm=smoothing_sigmas_mm, iterations=iterations, sampling=sampling,
                  learning_rate=learning_rate)

    if atlas is None:
        mode = "atlas-free"
        w_axis = lr_axis(w_aff)
        S = grid_mirror_matrix(w_aff, w_arr.shape, w_axis)
        # up to two starts: the plane of the body's second moments (good unless the head is cut by the
        # field of view), then, unless that gave a converged, consistent, well-matched mirror map, the
        # grid's own plane through the body centroid; the better final metric wins
        grid_init = np.eye(4)
        grid_init[:3, 3] = (S[:3, :3] @ centroid + S[:3, 3]) - centroid
        n0, _ = _moments_plane(mask, w_aff, max_angle_deg)
        starts = ([] if n0 is None else [S @ _reflection(n0, centroid)]) + [grid_init]
        moving, moving_mask = np.ascontiguousarray(np.flip(w_arr, w_axis)), np.ascontiguousarray(np.flip(mask, w_axis))
        tries = []
        for init in starts:
            tries.append(_register(w_arr, w_aff, mask, moving, w_aff, moving_mask, kind="rigid", init_ras=init,
                                   centre_ras=centroid, metric=metric, **reg_kw))
            good_match = metric != "correlation" or tries[-1].metric_value < -0.8
            if tries[-1].converged and good_match and \
                    plane_from_reflection(S @ tries[-1].matrix_ras, centroid)[2] < max_residual_deg / 2:
                break
        out = min(tries, key=lambda o: o.metric_value)
        normal, point, residual = plane_from_reflection(S @ out.matrix_ras, centroid)
        e, c_g = grid_plane(aff, arr.shape)
        R = _rotation_between(e, normal)
        tmap = np.eye(4)
        tmap[:3, :3] = R
        tmap[:3, 3] = c_g + float(normal @ (point - c_g)) * normal - R @ c_g
        out_shape, out_aff = tuple(arr.shape), aff
        if residual > max_residual_deg:
            problems.append(
                f"the image-to-mirror registration is not a mirror symmetry (residual rotation {residual:.2f} deg "
                f"> {max_residual_deg} deg)"
            )
        after_shape, after_aff = w_arr.shape, _centred_working_grid(aff, arr.shape, w_aff, w_arr.shape)
        outcomes = [out]
        if metric == "correlation" and out.metric_value > -0.5:
            problems.append(f"poor match between the image and its mirror (correlation {-out.metric_value:.2f} < 0.5)")
    else:
        mode = "atlas"
        at_arr, at_aff, at_name = _load_atlas(atlas)
        wa_arr, wa_aff = _working_copy(at_arr, at_aff, working_spacing_mm)
        at_mask, _ = head_mask(wa_arr, body_threshold)
        if not at_mask.any():
            raise InputError(at_name, "no body found in the atlas")
        at_centroid = _centroid(at_mask, wa_aff)
        # two starts, the better final metric wins: centroids matched with the atlas unrotated, and
        # additionally the atlas' sagittal plane turned onto the patient's moments plane
        n0, _ = _moments_plane(mask, w_aff, max_angle_deg)
        e_at, _ = grid_plane(wa_aff, wa_arr.shape)
        starts = []
        for rot in [np.eye(3)] + ([] if n0 is None else [_rotation_between(e_at, n0)]):
            init = np.eye(4)
            init[:3, :3] = rot
            init[:3, 3] = centroid - rot @ at_centroid
            starts.append(init)
        tries = [_register(wa_arr, wa_aff, at_mask, w_arr, w_aff, mask, kind="rigid", init_ras=init,
                           centre_ras=at_centroid, metric=metric, **reg_kw) for init in starts]
        rigid = min(tries, key=lambda o: o.metric_value)
        outcomes = [rigid]
        tmap = rigid.matrix_ras
        if atlas_transform == "affine":
            aff_out = _register(wa_arr, wa_aff, at_mask, w_arr, w_aff, mask, kind="affine", init_ras=rigid.matrix_ras,
                                centre_ras=at_centroid, metric=metric, **reg_kw)
            outcomes.append(aff_out)
            tmap = aff_out.matrix_ras
        out = outcomes[-1]
        e_a, c_a = grid_plane(at_aff, at_arr.shape)
        lin = tmap[:3, :3]
        normal = np.linalg.inv(lin).T @ e_a
        normal /= np.linalg.norm(normal)
        if normal[0] < 0:
            normal = -normal
        on_plane = lin @ c_a + tmap[:3, 3]
        point = centroid - float(normal @ (centroid - on_plane)) * normal
        scales = np.linalg.svd(lin, compute_uv=False)
        if scales.min() < scale_range[0] or scales.max() > scale_range[1]:
            problems.append(f"atlas registration scale factors {np.round(scales, 3).tolist()} outside {list(scale_range)}")
        out_shape, out_aff = tuple(at_arr.shape), at_aff
        after_shape, after_aff = wa_arr.shape, _centred_working_grid(at_aff, at_arr.shape, wa_aff, wa_arr.shape)

    e_in, _ = grid_plane(aff, arr.shape)
    tilt = plane_angle_error_deg(normal, e_in)
    if tilt > max_angle_deg:
        problems.append(f"estimated mid-sagittal plane is tilted {tilt:.1f} deg from the grid's sagittal plane (> {max_angle_deg})")

    # asymmetry inside the head, before and after, at working resolution
    clip = _clip_range(w_arr, mask)
    before = asymmetry_score(w_arr, w_aff, mask, clip)
    idx_map = _index_map(after_aff, w_aff, tmap)
    bg = float(w_arr.min())
    moved = _resample_linear_world(w_arr, w_aff, tmap, after_shape, after_aff, bg)
    moved_mask = _resample_nearest(mask.astype(np.uint8), idx_map, after_shape, 0).astype(bool)
    after = asymmetry_score(moved, after_aff, moved_mask, clip)
    if not moved_mask.any():
        problems.append("the transform moves the whole head out of the output grid")
    elif after > max_asymmetry_ratio * before:
        problems.append(f"asymmetry did not decrease ({before:.2f} before, {after:.2f} after)")
    if not all(o.converged for o in outcomes):
        warn.append(f"registration stopped at the iteration limit ({outcomes[-1].stop_condition})")

    return SymmetryResult(
        case=name, mode=mode, transform=tmap, input_shape=tuple(arr.shape), input_affine=aff,
        output_shape=out_shape, output_affine=np.asarray(out_aff, float), plane_normal=normal, plane_point=point,
        metric=metric, metric_value=out.metric_value, stop_condition=out.stop_condition,
        iterations=[o.iterations for o in outcomes] if len(outcomes) > 1 else out.iterations,
        converged=all(o.converged for o in outcomes), asymmetry_before=before, asymmetry_after=after,
        reflection_residual_deg=residual, body_volume_ml=body_ml, working_spacing_mm=ws,
        runtime_s=time.perf_counter() - t0, ok=not problems, problems=problems, warnings=warn,
    )


# ----------------------------------------------------------------------------- applying and inverting


def _check_pixdim(pixdim) -> tuple[float, float, float]:
    try:
        pix = np.asarray(ensure_tuple_rep(pixdim, 3), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pixdim must be 3 numbers (mm), got {pixdim!r}") from exc
    if pix.shape != (3,) or not np.all(np.isfinite(pix)):
        raise ValueError(f"pixdim must be 3 finite numbers (mm), got {pixdim!r}")
    return tuple(float(v) for v in pix)


def _check_mode(mode: str) -> str:
    mode = str(mode)
    if mode not in LINEAR_MODES + NEAREST_MODES:
        raise ValueError(f"mode must be one of {LINEAR_MODES + NEAREST_MODES}, got {mode!r}")
    return "nearest" if mode in NEAREST_MODES else "bilinear"


def apply_symmetry(array, transform, input_affine, output_shape, output_affine, mode: str = "bilinear", cval=None):
    """Resample a volume from its grid onto the symmetric output grid.

    Args:
        array: ``(X, Y, Z)`` or ``(C, X, Y, Z)`` numpy array on the input grid.
        transform: 4x4 RAS map output world -> input world (``SymmetryResult.transform``).
        input_affine: the input grid's affine.
        output_shape: spatial shape of the output grid.
        output_affine: the output grid's affine (the input's in atlas-free mode, the atlas's in atlas mode).
        mode: ``"bilinear"`` (images; float32 output) or ``"nearest"`` (labels; dtype kept).
        cval: value outside the input (default: the array minimum for images, 0 for labels).

    Returns:
        the resampled array, ``(X', Y', Z')`` or ``(C, X', Y', Z')``.
    """
    mode = _check_mode(mode)
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (X, Y, Z) or (C, X, Y, Z), got shape {arr.shape}")
    chans = arr[None] if arr.ndim == 3 else arr
    input_affine, output_affine = _as_np_affine(input_affine), _as_np_affine(output_affine)
    transform = np.asarray(transform, float)
    idx = _index_map(output_affine, input_affine, transform)
    lattice = _lattice_for(idx, input_affine) if mode == "nearest" else None
    outs = []
    for ch in chans:
        if mode == "nearest":
            outs.append(_resample_nearest(ch, idx, output_shape, 0 if cval is None else cval, lattice))
        else:
            outs.append(_resample_linear_world(ch, input_affine, transform, output_shape, output_affine,
                                               float(ch.min()) if cval is None else cval))
    return outs[0] if arr.ndim == 3 else np.stack(outs)


def invert_symmetry(array, transform, input_shape, input_affine, output_affine, mode: str = "nearest", cval=0):
    """Put a volume from the symmetric output grid back on the original input grid.

    Args:
        array: ``(X', Y', Z')`` or ``(C, X', Y', Z')`` on the output grid (e.g. a prediction).
        transform: the forward 4x4 RAS map output world -> input world.
        input_shape: spatial shape of the original grid.
        input_affine: affine of the original grid.
        output_affine: affine of the output grid the array lies on.
        mode: ``"nearest"`` (labels: the exact inverse of :func:`apply_symmetry`'s nearest mode, see the
            module docstring) or ``"bilinear"`` (images, probabilities; ITK linear resampling).
        cval: value outside the output grid.

    Returns:
        ``(array on the original grid, number of original voxels the forward map did not read)``.
    """
    mode = _check_mode(mode)
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (X, Y, Z) or (C, X, Y, Z), got shape {arr.shape}")
    chans = arr[None] if arr.ndim == 3 else arr
    input_affine, output_affine = _as_np_affine(input_affine), _as_np_affine(output_affine)
    transform = np.asarray(transform, float)
    fwd = _index_map(output_affine, input_affine, transform)
    lattice = _lattice_for(fwd, input_affine) if mode == "nearest" else None
    outs, unread = [], 0
    for ch in chans:
        if lattice is not None:
            o, unread = _invert_nearest_lattice(ch, lattice, input_shape, cval)
        elif mode == "nearest":
            o, unread = _invert_nearest(ch, fwd, input_shape, cval)
        else:  # ITK's multi-threaded resampler, from the output grid back onto the input grid
            o = _resample_linear_world(np.asarray(ch, np.float32), output_affine, np.linalg.inv(transform),
                                       input_shape, input_affine, float(cval))
        outs.append(o)
    out = np.stack(outs)
    return (out[0] if arr.ndim == 3 else out), unread


# ----------------------------------------------------------------------------- MONAI transforms


def _case_name(img, default="<array>") -> str:
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return default


def _to_numpy(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        t = img.as_tensor() if isinstance(img, MetaTensor) else img
        return t.detach().cpu().numpy()
    return np.asarray(img)


class SymmetricAlign(InvertibleTransform):
    """Make a head volume bilaterally symmetric about its grid's central sagittal plane.

    Estimates the mid-sagittal plane with ITK (atlas-free: registration to the image's own mirror;
    atlas: rigid then affine registration to a symmetric atlas) and resamples the image so that
    the plane is the central sagittal plane of the output grid. After this transform,
    ``shared_transforms.flip.flip_lr`` pairs every voxel with its anatomical mirror.

    Input: a channel-first ``(C, X, Y, Z)`` MetaTensor (the affine is read from it) or a tensor /
    array with ``affine`` given. The plane is estimated on channel ``channel`` (a CT in HU or one
    MRI sequence); all channels are resampled.

    Output grid: atlas-free, the input grid (same shape and spacing); atlas mode, the atlas grid.
    ``output_affine="grid"`` (default) gives the output that grid's affine, so the straightened head
    appears straight in any viewer and world coordinates are those of the symmetric frame;
    ``"physical"`` gives it ``transform @ grid_affine``, the true scanner position of every output
    voxel (an oblique affine).

    Meta data written: ``symmetry_transform`` (4x4 float64 RAS map output world -> input world),
    ``symmetry_report`` (JSON string, see :meth:`SymmetryResult.report`), ``symmetry_ok``, and an
    ``applied_operations`` entry so that :meth:`inverse` / MONAI ``Invertd`` restore the original
    grid (same shape, same affine). With ``Invertd(..., nearest_interp=True)`` or ``mode="nearest"``
    a label moved by this transform comes back voxel-exact (volume-preserving maps, see the module
    docstring).

    Args:
        atlas: None (atlas-free mode, default) or a symmetric atlas NIfTI path / ``(array, affine)``.
        mode: ``"bilinear"`` (images) or ``"nearest"`` (labels) for :meth:`__call__`.
        output_affine: ``"grid"`` or ``"physical"`` (see above).
        on_failure: ``"raise"`` (default: :class:`SymmetryError` naming the case and the problem),
            ``"warn"`` (warn, apply the estimated transform, ``symmetry_ok`` False) or ``"identity"``
            (warn and leave the volume where it is, unaligned but not misaligned).
        channel: channel used for the estimation.
        cval: value outside the input for images (default the image minimum; labels always 0).
        pixdim: output voxel size in mm per world axis (left-right, anterior-posterior,
            superior-inferior; <= 0 keeps an axis), or None to keep the output grid's spacing. Resamples once onto a grid of that spacing with the same centre and extent
            (:meth:`SymmetryResult.with_output_spacing`), in place of a spacing transform before this
            one; labels then use round-half-up nearest neighbour (no exact lattice inverse).
        estimate_kwargs: passed to :func:`estimate_symmetry` (``metric``, ``atlas_transform``,
            ``working_spacing_mm``, ``shrink_factors``, ``smoothing_sigmas_mm``, ``iterations``, ...).
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(self, atlas=None, mode: str = "bilinear", output_affine: str = "grid", on_failure: str = "raise",
                 channel: int = 0, cval: float | None = None, pixdim=None, **estimate_kwargs):
        _check_mode(mode)
        self.pixdim = None if pixdim is None else _check_pixdim(pixdim)
        if output_affine not in ("grid", "physical"):
            raise ValueError(f"output_affine must be 'grid' or 'physical', got {output_affine!r}")
        if on_failure not in ("raise", "warn", "identity"):
            raise ValueError(f"on_failure must be 'raise', 'warn' or 'identity', got {on_failure!r}")
        self.mode = mode
        self.output_affine = output_affine
        self.on_failure = on_failure
        self.channel = int(channel)
        self.cval = cval
        self.estimate_kwargs = dict(estimate_kwargs)
        self.atlas = None
        if atlas is not None and str(atlas) not in ("", "None", "none"):
            arr, aff, _ = _load_atlas(atlas)  # read once; errors name the atlas file
            self.atlas = (arr, aff)

    def estimate(self, img, affine=None, case: str | None = None) -> SymmetryResult:
        """Estimate the symmetric transform of ``img`` (``(C, X, Y, Z)``) and apply the failure policy."""
        arr = _to_numpy(img)
        name = case or _case_name(img)
        if arr.ndim != 4:
            raise InputError(name, f"expected a channel-first 3D image (C, X, Y, Z), got shape {tuple(arr.shape)}")
        aff = affine if affine is not None else (img.affine if isinstance(img, MetaTensor) else None)
        if aff is None:
            raise ValueError("SymmetricAlign needs the affine: pass a MetaTensor or `affine`")
        if not 0 <= self.channel < arr.shape[0]:
            raise ValueError(f"channel {self.channel} out of range for {arr.shape[0]} channel(s)")
        result = estimate_symmetry(arr[self.channel], _as_np_affine(aff), atlas=self.atlas, case=name,
                                   **self.estimate_kwargs)
        for w in result.warnings:
            warnings.warn(f"{name}: symmetric registration: {w}", stacklevel=2)
        if not result.ok:
            msg = (f"symmetric registration failed: {'; '.join(result.problems)} "
                   f"(plane yaw {result.plane_yaw_deg:.1f} deg, roll {result.plane_roll_deg:.1f} deg, "
                   f"asymmetry {result.asymmetry_before:.2f} -> {result.asymmetry_after:.2f})")
            if self.on_failure == "raise":
                raise SymmetryError(name, msg)
            warnings.warn(f"{name}: {msg}; on_failure={self.on_failure!r}", stacklevel=2)
            if self.on_failure == "identity":
                result.transform = np.eye(4)
                result.output_shape = tuple(result.input_shape)
                result.output_affine = result.input_affine
                result.warnings.append("failure: identity transform used, the volume is NOT aligned")
        if self.pixdim is not None:
            result = result.with_output_spacing(self.pixdim)
        return result

    def __call__(self, img, affine=None, result: SymmetryResult | None = None, mode: str | None = None):
        """Align ``img``; ``result`` reuses an estimate (the dictionary version passes the image's to the label).

        Args:
            img: ``(C, X, Y, Z)`` MetaTensor (or tensor/array with ``affine``).
            affine: 4x4 affine when ``img`` carries none.
            result: a previous :meth:`estimate` of the same grid; estimated from ``img`` when None.
            mode: ``"bilinear"`` or ``"nearest"``; default ``self.mode``.

        Returns:
            ``(C, X', Y', Z')`` MetaTensor on the output grid (float32 for bilinear, dtype kept for nearest).
        """
        mode = _check_mode(mode or self.mode)
        if result is None:
            result = self.estimate(img, affine)
        arr = _to_numpy(img)
        if arr.ndim != 4:
            raise InputError(_case_name(img), f"expected (C, X, Y, Z), got shape {tuple(arr.shape)}")
        in_aff = _as_np_affine(affine if affine is not None else (img.affine if isinstance(img, MetaTensor) else result.input_affine))
        if tuple(arr.shape[1:]) != tuple(result.input_shape) or np.abs(in_aff - result.input_affine).max() > 1e-3:
            raise InputError(_case_name(img), f"grid {tuple(arr.shape[1:])} does not match the grid the symmetry was "
                                              f"estimated on {tuple(result.input_shape)} (shape or affine differ)")
        cval = 0 if mode == "nearest" else self.cval
        check_resample_memory(result.output_shape, arr.shape[0], _case_name(img),
                              in_spacing=np.linalg.norm(in_aff[:3, :3], axis=0),
                              out_spacing=np.linalg.norm(np.asarray(result.output_affine, float)[:3, :3], axis=0))
        out = apply_symmetry(arr, result.transform, in_aff, result.output_shape, result.output_affine, mode, cval)
        out_aff = result.output_affine if self.output_affine == "grid" else result.transform @ result.output_affine
        device = img.device if isinstance(img, torch.Tensor) else None
        meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
        ops = list(img.applied_operations) if isinstance(img, MetaTensor) else []
        out_t = MetaTensor(torch.as_tensor(out, device=device), meta=meta, applied_operations=ops)
        out_t.affine = torch.as_tensor(out_aff, dtype=torch.float64)
        out_t.meta["symmetry_transform"] = torch.as_tensor(result.transform, dtype=torch.float64)
        out_t.meta["symmetry_report"] = json.dumps(result.report())
        out_t.meta["symmetry_ok"] = bool(result.ok)
        self.push_transform(
            out_t,
            orig_size=tuple(int(s) for s in arr.shape[1:]),
            extra_info={
                "mode": mode,
                "transform": torch.as_tensor(result.transform, dtype=torch.float64),
                "orig_affine": torch.as_tensor(in_aff, dtype=torch.float64),
                "grid_affine": torch.as_tensor(result.output_affine, dtype=torch.float64),
            },
        )
        return out_t

    def inverse(self, data):
        """Put ``data`` (``(C, X', Y', Z')`` on the output grid) back on the original grid (shape and affine)."""
        info = self.pop_transform(data)
        return self.inverse_transform(data, info)

    def inverse_transform(self, data, info: Mapping):
        extra = info[TraceKeys.EXTRA_INFO]
        mode = extra["mode"]
        mode = "nearest" if (isinstance(mode, str) and mode in NEAREST_MODES) or mode == 0 else "bilinear"
        orig_size = tuple(int(s) for s in info[TraceKeys.ORIG_SIZE])
        orig_aff = _to_numpy(extra["orig_affine"]).astype(np.float64).reshape(4, 4)
        arr = _to_numpy(data)
        if arr.ndim != 4:
            raise ValueError(f"expected (C, X', Y', Z') data to invert, got shape {tuple(arr.shape)}")
        out, unread = invert_symmetry(arr, _to_numpy(extra["transform"]).reshape(4, 4), orig_size, orig_aff,
                                      _to_numpy(extra["grid_affine"]).reshape(4, 4), mode, 0)
        device = data.device if isinstance(data, torch.Tensor) else None
        if isinstance(data, MetaTensor):
            out_t = MetaTensor(torch.as_tensor(out, device=device), meta=dict(data.meta),
                               applied_operations=list(data.applied_operations))
        else:
            out_t = MetaTensor(torch.as_tensor(out, device=device))
        out_t.affine = torch.as_tensor(orig_aff, dtype=torch.float64)
        out_t.meta["symmetry_inverse_unread_voxels"] = int(unread)
        return out_t


class SymmetricAlignd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`SymmetricAlign`: one estimate from ``image_key``, applied to all ``keys``.

    Typical use (images bilinear, labels nearest)::

        SymmetricAlignd(keys=["image", "label"], mode=["bilinear", "nearest"])            # atlas-free
        SymmetricAlignd(keys=["image", "label"], atlas="atlas.nii.gz")                     # atlas mode

    and, after inference, ``Invertd(keys="pred", transform=preprocessing, orig_keys="image",
    nearest_interp=True)`` puts the prediction back on the original CT grid.

    Args:
        keys: keys to resample; all must share the grid of ``image_key``.
        image_key: key the symmetry is estimated on (default: the first key).
        mode: one mode per key; default ``"bilinear"`` for ``image_key`` and ``"nearest"`` for the others.
        allow_missing_keys: skip missing keys.
        kwargs: :class:`SymmetricAlign` arguments (``atlas``, ``output_affine``, ``on_failure``,
            ``channel``, ``cval`` and the :func:`estimate_symmetry` options).
    """

    backend = SymmetricAlign.backend

    def __init__(self, keys: KeysCollection, image_key: Hashable | None = None, mode=None,
                 allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.image_key = self.keys[0] if image_key is None else image_key
        if mode is None:
            mode = ["bilinear" if k == self.image_key else "nearest" for k in self.keys]
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            _check_mode(m)
        self.aligner = SymmetricAlign(**kwargs)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"image key {self.image_key!r} not in the data (keys: {list(d)})")
        result = self.aligner.estimate(d[self.image_key])
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.aligner(d[key], result=result, mode=mode)
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.aligner.inverse(d[key])
        return d


# ----------------------------------------------------------------------------- atlas building


def make_symmetric_atlas(array, affine, case: str | None = None, **estimate_kwargs):
    """Turn one CT into a symmetric atlas: align it to its own mirror (atlas-free), then average with its mirror.

    Returns:
        ``(atlas float32 (X, Y, Z), affine, SymmetryResult)``; the atlas is exactly symmetric about
        its grid's central sagittal plane (array reversal along the left-right axis).
    """
    result = estimate_symmetry(array, affine, case=case, **estimate_kwargs)
    if not result.ok:
        raise SymmetryError(case or "<array>", "cannot build an atlas: " + "; ".join(result.problems))
    aligned = apply_symmetry(np.asarray(array), result.transform, affine, result.output_shape, result.output_affine,
                             "bilinear")
    axis = lr_axis(affine)
    atlas = 0.5 * (aligned + np.flip(aligned, axis))
    return atlas.astype(np.float32), np.asarray(affine, float), result
