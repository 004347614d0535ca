"""Tumour morphology of the NPC MRI data-set paper (Li et al., "A dataset of primary nasopharyngeal
carcinoma MRI with multi-modalities segmentation", section "Morphological Parameters").

For a binary mask with voxel spacing ``(sx, sy, sz)`` mm:

* **surface mesh**: scikit-image marching cubes at level 0.5 with the spacing, on the mask
  zero-padded by 3 voxels (closed surface even where the mask touches the image border);
* **volume**: signed-tetrahedron sum over the mesh triangles ``|sum_f v0 . (v1 x v2)| / 6``;
* **surface area**: sum of the triangle areas;
* **maximum diameter**: largest Euclidean distance between two mesh vertices, taken over the
  vertices of the mesh's convex hull (the farthest pair of a point set always lies on its hull);
* **surface regularity**: ``v / (4/3 pi R^3)`` with ``R = sqrt(A / (4 pi))`` the radius of the
  sphere of the same surface area ``A`` (1 for a sphere, smaller for irregular shapes).

Smoothing (a documented deviation made configurable, ``smoothing=``): marching cubes on a raw
binary mask produces a staircase surface whose area overestimates the smooth surface by about
9 % on isotropic grids and 12-15 % on anisotropic ones, independently of resolution (a sphere's
regularity then reads about 0.88 instead of 1). The paper's intent is the tumour's surface, so:

* ``"taubin"`` (default): the raw marching-cubes mesh is smoothed by Taubin's lambda/mu filter
  (``lambda = 0.5``, ``mu = -0.53``, ``taubin_iterations = 30`` pairs of umbrella-Laplacian
  steps), which removes the staircase without shrinking the object. Measured: spheres of radius
  20-25 mm (1 mm or 0.5 x 0.5 x 1 mm voxels) volume within 0.3 %, area within 1 %; 1 x 1 x 3 mm
  slices area +2 %; an 80 x 60 x 40 mm box volume within 0.2 %, area -1.7 %; irregular phantom
  tumours of ~500 voxels keep their voxel-count volume within 1 %.
* ``"gaussian"``: the mask is blurred (``gaussian_sigma_vox`` voxels per axis) before marching
  cubes; good on large smooth objects, but it shrinks small or thin tumours (-12 % volume on the
  phantom tumours at sigma 0.8).
* ``"none"``: the literal raw-mask mesh (probably what the paper's numbers used).

The maximum diameter is that of the voxelised mask: it can exceed the diameter of the
underlying smooth object by up to about half a voxel at each end (one slice thickness at most),
because a voxel whose centre lies inside the object extends half a voxel beyond it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared_transforms.io import InputError, atomic_write, load_label

from .metrics import spacing_from_affine

__all__ = ["MORPHOLOGY_COLUMNS", "SMOOTHING", "taubin_smooth", "surface_mesh", "mesh_volume", "mesh_area", "max_diameter", "surface_regularity",
           "mask_morphology", "morphology_files", "morphology_command"]

MORPHOLOGY_COLUMNS = ("volume_cm3", "surface_area_cm2", "max_diameter_cm", "surface_regularity", "voxel_volume_cm3", "n_components")

_PAD = 3


SMOOTHING = ("taubin", "gaussian", "none")


def taubin_smooth(verts: np.ndarray, faces: np.ndarray, iterations: int = 30, lam: float = 0.5, mu: float = -0.53) -> np.ndarray:
    """Taubin lambda/mu smoothing of a triangle mesh (umbrella Laplacian, uniform weights).

    Each iteration moves every vertex by ``lam`` times the offset to the mean of its neighbours,
    then by ``mu`` (negative) times the new offset: a low-pass filter that removes the
    marching-cubes staircase without the shrinkage of plain Laplacian smoothing.

    Args:
        verts: vertices ``(V, 3)``.
        faces: triangles ``(F, 3)`` of vertex indices.
        iterations: number of (lam, mu) pairs.
        lam: positive step (0 < lam < 1).
        mu: negative step with ``|mu| > lam``.

    Returns:
        smoothed vertices ``(V, 3)``.
    """
    import scipy.sparse as sps

    if iterations < 0 or not 0 < lam < 1 or not mu < -lam:
        raise ValueError(f"need iterations >= 0, 0 < lam < 1 and mu < -lam, got {iterations}, {lam}, {mu}")
    n = len(verts)
    f = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = sps.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0  # each neighbour once, however many faces share the edge
    degree = np.asarray(adj.sum(axis=1)).ravel()
    mean_of_neighbours = sps.diags(1.0 / np.maximum(degree, 1.0)) @ adj
    v = np.asarray(verts, dtype=np.float64).copy()
    for _ in range(int(iterations)):
        v += lam * (mean_of_neighbours @ v - v)
        v += mu * (mean_of_neighbours @ v - v)
    return v


def surface_mesh(
    mask: np.ndarray, spacing, *, smoothing: str = "taubin", taubin_iterations: int = 30, gaussian_sigma_vox: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of a binary mask in mm.

    Args:
        mask: binary mask ``(X, Y, Z)``, not empty.
        spacing: voxel spacing in mm per axis.
        smoothing: ``"taubin"`` (mesh smoothing, default), ``"gaussian"`` (blur the mask first)
            or ``"none"`` (raw staircase mesh); see the module docstring.
        taubin_iterations: Taubin (lambda, mu) pairs.
        gaussian_sigma_vox: Gaussian blur in voxels per axis for ``"gaussian"``.

    Returns:
        ``(vertices (V, 3) in mm, faces (F, 3) vertex indices)``.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    m = np.asarray(mask) > 0
    if m.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {m.shape}")
    if not m.any():
        raise ValueError("mask is empty: no surface")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if smoothing not in SMOOTHING:
        raise ValueError(f"smoothing must be one of {SMOOTHING}, got {smoothing!r}")
    if gaussian_sigma_vox < 0 or taubin_iterations < 0:
        raise ValueError(f"gaussian_sigma_vox and taubin_iterations must be >= 0, got {gaussian_sigma_vox}, {taubin_iterations}")
    # crop to the mask's bounding box (+ padding) to keep the mesh computation small
    idx = np.argwhere(m)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    sub = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    vol = np.pad(sub.astype(np.float32), _PAD)
    if smoothing == "gaussian" and gaussian_sigma_vox > 0:
        blurred = gaussian_filter(vol, sigma=float(gaussian_sigma_vox), mode="constant", truncate=3.0)
        if blurred.max() > 0.5:  # a very thin object may vanish under the blur: keep the raw mask then
            vol = blurred
    verts, faces, _, _ = marching_cubes(vol, level=0.5, spacing=sp)
    verts = verts.astype(np.float64)
    if smoothing == "taubin" and taubin_iterations > 0:
        verts = taubin_smooth(verts, faces, taubin_iterations)
    return verts, faces.astype(np.int64)


def mesh_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed volume (mm^3) of a closed triangle mesh by the signed-tetrahedron sum."""
    tri = verts[faces]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    return float(abs(signed))


def mesh_area(verts: np.ndarray, faces: np.ndarray) -> float:
    """Surface area (mm^2): sum of triangle areas."""
    tri = verts[faces]
    return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


def max_diameter(verts: np.ndarray) -> float:
    """Largest distance (mm) between two points of ``verts (V, 3)``, searched on the convex hull."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    pts = np.unique(np.asarray(verts, dtype=np.float64), axis=0)
    if len(pts) < 2:
        return 0.0
    try:
        pts = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):  # flat or degenerate point set: use all points
        pass
    if len(pts) > 20000:  # keep the pairwise search bounded in memory
        best = 0.0
        for start in range(0, len(pts), 4000):
            d = np.linalg.norm(pts[start:start + 4000, None, :] - pts[None, :, :], axis=-1)
            best = max(best, float(d.max()))
        return best
    return float(pdist(pts).max())


def surface_regularity(volume: float, area: float) -> float:
    """``v / (4/3 pi R^3)`` with ``R = sqrt(area / (4 pi))`` (1 for a sphere)."""
    if area <= 0:
        return float("nan")
    radius = math.sqrt(area / (4.0 * math.pi))
    return float(volume / (4.0 / 3.0 * math.pi * radius**3))


def mask_morphology(mask: np.ndarray, spacing, *, smoothing: str = "taubin", taubin_iterations: int = 30,
                    gaussian_sigma_vox: float = 0.8) -> dict:
    """Morphology of one mask.

    Args:
        mask: binary mask ``(X, Y, Z)``.
        spacing: voxel spacing (mm).
        smoothing, taubin_iterations, gaussian_sigma_vox: see :func:`surface_mesh`.

    Returns:
        dict with :data:`MORPHOLOGY_COLUMNS` (cm^3, cm^2, cm; an empty mask gives zeros and NaN
        regularity).
    """
    from scipy.ndimage import label

    m = np.asarray(mask) > 0
    sp = tuple(float(s) for s in spacing)
    vox_cm3 = float(np.count_nonzero(m) * np.prod(sp) / 1000.0)
    n_comp = int(label(m)[1]) if m.any() else 0
    if not m.any():
        return {"volume_cm3": 0.0, "surface_area_cm2": 0.0, "max_diameter_cm": 0.0, "surface_regularity": float("nan"),
                "voxel_volume_cm3": 0.0, "n_components": 0}
    verts, faces = surface_mesh(m, sp, smoothing=smoothing, taubin_iterations=taubin_iterations,
                                gaussian_sigma_vox=gaussian_sigma_vox)
    v = mesh_volume(verts, faces)
    a = mesh_area(verts, faces)
    return {
        "volume_cm3": v / 1000.0,
        "surface_area_cm2": a / 100.0,
        "max_diameter_cm": max_diameter(verts) / 10.0,
        "surface_regularity": surface_regularity(v, a),
        "voxel_volume_cm3": vox_cm3,
        "n_components": n_comp,
    }


def _expand(paths: Sequence) -> list[Path]:
    from .report import find_niftis

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = find_niftis(p)
            if not found:
                raise InputError(p, "folder holds no NIfTI masks")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(p, "file does not exist")
    return files


def morphology_files(masks: Sequence, *, progress: bool = True, **options) -> list[dict]:
    """Morphology rows (with ``file`` and ``case_id``) of NIfTI masks or folders of masks."""
    from tqdm.auto import tqdm

    from .report import case_key

    rows = []
    for f in tqdm(_expand(masks), desc="morphology", unit="mask", disable=not progress):
        mask, affine = load_label(f)
        row = {"case_id": case_key(f), "file": str(f)}
        row.update(mask_morphology(mask, spacing_from_affine(affine), **options))
        rows.append(row)
    return rows


def morphology_command(*masks: str, out: str = "morphology.csv", smoothing: str = "taubin", taubin_iterations: int = 30,
                       gaussian_sigma_vox: float = 0.8, progress: bool = True, overwrite: bool = False) -> None:
    """Tumour volume, surface area, maximum diameter and surface regularity of NIfTI masks.

    Args:
        masks: NIfTI mask files and/or folders of masks (searched recursively).
        out: CSV file to write (never one of the inputs).
        smoothing: "taubin" (smooth the mesh, default), "gaussian" (blur the mask first) or "none"
            (raw staircase mesh, as the paper probably did).
        taubin_iterations: Taubin smoothing iterations.
        gaussian_sigma_vox: blur in voxels for smoothing="gaussian".
        progress: show a progress bar.
        overwrite: replace an existing OUT (default: refuse).
    """
    if not masks:
        raise SystemExit("npc-gtv morphology: give at least one mask file or folder")
    try:
        if Path(out).exists() and not overwrite:  # before any computation
            raise InputError(out, "already exists; refusing to overwrite (--overwrite replaces it, or choose another --out)")
        rows = morphology_files(masks, progress=progress, smoothing=smoothing, taubin_iterations=taubin_iterations,
                                gaussian_sigma_vox=gaussian_sigma_vox)
        cols = ["case_id", *MORPHOLOGY_COLUMNS, "file"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        with atomic_write(out, overwrite=overwrite, inputs=[r["file"] for r in rows]) as tmp:
            tmp.write_text(buf.getvalue())
    except (InputError, ValueError) as exc:
        raise SystemExit(f"npc-gtv morphology: error: {exc}") from None
    print(f"{'case':<20} {'volume cm3':>11} {'area cm2':>9} {'diam cm':>8} {'regularity':>10}")
    for r in rows:
        print(f"{r['case_id']:<20} {r['volume_cm3']:>11.3f} {r['surface_area_cm2']:>9.3f} {r['max_diameter_cm']:>8.3f} "
              f"{r['surface_regularity']:>10.3f}")
    if len(rows) > 1:
        print("median (min - max), as the data-set paper's Table 2:")
        for col in ("volume_cm3", "surface_area_cm2", "max_diameter_cm", "surface_regularity"):
            vals = np.array([r[col] for r in rows], dtype=float)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                print(f"  {col:<20} {np.median(vals):.2f} ({vals.min():.2f} - {vals.max():.2f})")
    print(f"wrote {out} ({len(rows)} masks)")
