"""Synthetic head-and-neck phantoms: the embedded default data set of every bundle.

The anatomy is described in *head coordinates* ``h`` (mm, RAS axes, origin at the head centre)
by simple solids (ellipsoids, elliptic cylinders, boxes). Every paired structure is added with
its mirror image, so a healthy head is exactly symmetric under ``h_x -> -h_x``. A case is posed
by ``p = R h + c + t`` (``R = Rz(yaw) @ Ry(roll) @ Rx(pitch)``, ``c`` the volume centre, ``t`` a
translation) and rasterised on a DICOM-like grid whose affine is ``diag(-sx, -sy, sz)`` (axis
codes LPS), so that no consumer can get away with assuming RAS voxel order.

Painting produces a *tissue map*; intensities come from per-tissue tables (Hounsfield units for
CT, arbitrary units for T1 / T2 / CE-T1 MRI) followed by partial-volume blur and noise. The
tumour (GTVp) grows from the fossa of Rosenmüller on one side and sometimes crosses the mid-line;
its CT contrast to muscle is small and configurable.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from shared_transforms.io import atomic_write, fsync_path, make_temp_dir

__all__ = [
    "Phantom",
    "make_phantom",
    "generate_dataset",
    "ensure_dataset",
    "default_dataset_dir",
    "phantoms_command",
    "TISSUES",
]

GENERATOR_VERSION = "1"

# tissue classes of the painted map
TISSUES = {
    "air": 0,
    "fat": 1,
    "soft": 2,
    "muscle": 3,
    "brain": 4,
    "cortical": 5,
    "cancellous": 6,
    "mucosa": 7,
    "fluid": 8,
    "tumour": 9,
    "couch": 10,
}
_T = TISSUES

# mean intensity per tissue: CT in HU; MRI sequences in arbitrary units
_CT_HU = {"air": -1000, "fat": -100, "soft": 35, "muscle": 50, "brain": 33, "cortical": 1250,
          "cancellous": 420, "mucosa": 45, "fluid": 8, "tumour": 50, "couch": -350}
_MRI = {
    "t1": {"air": 0, "fat": 900, "soft": 420, "muscle": 330, "brain": 520, "cortical": 25,
           "cancellous": 650, "mucosa": 400, "fluid": 140, "tumour": 380, "couch": 0},
    "t2": {"air": 0, "fat": 650, "soft": 380, "muscle": 180, "brain": 560, "cortical": 20,
           "cancellous": 420, "mucosa": 620, "fluid": 1300, "tumour": 520, "couch": 0},
    "cet1": {"air": 0, "fat": 880, "soft": 520, "muscle": 370, "brain": 540, "cortical": 25,
             "cancellous": 660, "mucosa": 720, "fluid": 150, "tumour": 760, "couch": 0},
}
MRI_SEQUENCES = ("t1", "t2", "cet1")

# grid presets: in-plane size, slices (range), in-plane spacing (range) and slice spacing
_GRIDS = {
    ("ct", "full"): {"shape_xy": 512, "slices": (100, 150), "spacing_xy": (0.8, 1.1), "spacing_z": 3.0},
    ("ct", "small"): {"shape_xy": 96, "slices": (32, 32), "spacing_xy": (2.4, 2.4), "spacing_z": 3.0},
    ("mri", "full"): {"shape_xy": 512, "slices": (24, 30), "spacing_xy": (0.43, 0.5), "spacing_z": 5.5},
    ("mri", "small"): {"shape_xy": 96, "slices": (20, 20), "spacing_xy": (2.4, 2.4), "spacing_z": 5.5},
}
# world position of the volume centre (RAS mm): deliberately not the origin
_VOLUME_CENTRE = np.array([2.0, -18.0, -45.0])


@dataclass
class Phantom:
    """One synthetic case.

    Attributes:
        image: CT: ``int16`` HU volume ``(X, Y, Z)``; MRI: dict ``{"t1", "t2", "cet1"}`` of float32 volumes.
        label: ``uint8`` GTVp mask ``(X, Y, Z)``.
        affine: 4x4 voxel -> RAS (mm) matrix.
        spacing: voxel size ``(sx, sy, sz)`` in mm.
        info: ground truth (pose, mid-sagittal plane, tumour measures), see ``docs/DEVELOPING.md``.
        tissue: the painted tissue map ``(X, Y, Z)`` (``TISSUES`` codes).
    """

    image: object
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple
    info: dict = field(default_factory=dict)
    tissue: np.ndarray | None = None


# ----------------------------------------------------------------------------- geometry


def _rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def pose_matrix(yaw_deg: float, roll_deg: float, pitch_deg: float) -> np.ndarray:
    """``R = Rz(yaw) @ Ry(roll) @ Rx(pitch)`` (angles in degrees, RAS axes)."""
    return _rot_z(math.radians(yaw_deg)) @ _rot_y(math.radians(roll_deg)) @ _rot_x(math.radians(pitch_deg))


_MIRROR = np.diag([-1.0, 1.0, 1.0])


@dataclass
class _Solid:
    """A solid in head coordinates: ``kind`` in {ellipsoid, cylinder, box}."""

    kind: str
    centre: tuple
    radii: tuple  # ellipsoid: semi-axes; cylinder: (rx, ry, half-height); box: half sizes
    rot: np.ndarray | None = None  # local orientation (columns = solid axes in head coords)
    taper: float = 1.0  # cylinder: radius scale at the top relative to the bottom
    zmin: float = -math.inf  # head-coordinate cut: only the part above this height

    def mirrored(self) -> "_Solid":
        rot = None if self.rot is None else _MIRROR @ self.rot @ _MIRROR
        c = (-self.centre[0], self.centre[1], self.centre[2])
        return _Solid(self.kind, c, self.radii, rot, self.taper, self.zmin)

    def extent(self) -> np.ndarray:
        """Half sizes of an axis-aligned box (head coordinates) that contains the solid."""
        a, b, c = self.radii
        t = max(1.0, self.taper)
        local = np.array([a * t, b * t, c], dtype=float)
        return local if self.rot is None else np.abs(self.rot) @ local

    def inside(self, hx, hy, hz):
        x, y, z = hx - self.centre[0], hy - self.centre[1], hz - self.centre[2]
        if self.rot is not None:
            r = self.rot
            x, y, z = (r[0, 0] * x + r[1, 0] * y + r[2, 0] * z,
                       r[0, 1] * x + r[1, 1] * y + r[2, 1] * z,
                       r[0, 2] * x + r[1, 2] * y + r[2, 2] * z)
        inside = self._inside_local(x, y, z)
        return inside if self.zmin == -math.inf else inside & (hz >= self.zmin)

    def _inside_local(self, x, y, z):
        a, b, c = self.radii
        if self.kind == "ellipsoid":
            return (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0
        if self.kind == "cylinder":
            scale = 1.0 + (self.taper - 1.0) * (z + c) / (2 * c)
            return ((x / (a * scale)) ** 2 + (y / (b * scale)) ** 2 <= 1.0) & (np.abs(z) <= c)
        if self.kind == "box":
            return (np.abs(x) <= a) & (np.abs(y) <= b) & (np.abs(z) <= c)
        raise ValueError(f"unknown solid kind {self.kind!r}")


def _ell(c, r, rot=None, zmin=-math.inf):
    return _Solid("ellipsoid", tuple(c), tuple(r), rot, zmin=zmin)


def _cyl(c, r, taper=1.0):
    return _Solid("cylinder", tuple(c), tuple(r), None, taper)


def _box(c, r):
    return _Solid("box", tuple(c), tuple(r))


def _anatomy() -> list[tuple[str, _Solid, bool]]:
    """Painting list ``(tissue, solid, paired)`` in head coordinates; later entries overwrite earlier ones."""
    tilt = lambda deg: _rot_x(math.radians(deg))  # noqa: E731
    yaw = lambda deg: _rot_z(math.radians(deg))  # noqa: E731
    return [
        # body envelope: subcutaneous fat, then soft tissue 6 mm inside it
        ("fat", _ell((0, -8, 62), (78, 98, 88)), False),
        ("fat", _cyl((0, 6, -85), (66, 84, 125), taper=1.06), False),
        ("soft", _ell((0, -8, 62), (72, 92, 82)), False),
        ("soft", _cyl((0, 6, -85), (60, 78, 119), taper=1.06), False),
        # mandible: rami and a U-shaped body (the posterior half of the ring is cut away)
        ("cortical", _Solid("cylinder", (0, -2, -55), (52, 78, 9)), False),
        ("soft", _Solid("cylinder", (0, -2, -55), (45, 71, 10)), False),
        ("soft", _box((0, -37.5, -55), (60, 32.5, 10)), False),
        ("cortical", _ell((47, 6, -28), (5, 14, 30)), True),
        ("cancellous", _ell((47, 6, -28), (3, 11, 27)), True),
        # neurocranium above the skull base: skull shell, brain, skull base plate
        ("cortical", _ell((0, -10, 62), (70, 90, 80), zmin=14.0), False),
        ("brain", _ell((0, -10, 64), (63, 83, 72), zmin=24.0), False),
        ("cortical", _box((0, -14, 19), (58, 46, 5)), False),
        ("cancellous", _box((0, -14, 19), (52, 40, 2.5)), False),
        # orbits and eyes
        ("fat", _ell((33, 60, 36), (17, 17, 15)), True),
        ("fluid", _ell((33, 64, 36), (12, 12, 12)), True),
        # nasal cavity with septum, maxillary sinuses, hard palate
        ("air", _ell((0, 44, 8), (17, 32, 16)), False),
        ("cancellous", _box((0, 44, 8), (1.5, 30, 15)), False),
        ("soft", _ell((11, 44, 2), (4, 22, 5)), True),
        ("cortical", _ell((28, 44, 6), (15, 18, 16)), True),
        ("air", _ell((28, 44, 6), (12.5, 15.5, 13.5)), True),
        ("cancellous", _box((0, 38, -10), (30, 28, 3)), False),
        # cervical spine, spinal canal, paravertebral and nuchal muscles
        ("muscle", _ell((22, -52, -75), (18, 15, 65)), True),
        ("cortical", _cyl((0, -40, -95), (12, 11, 105)), False),
        ("cancellous", _cyl((0, -40, -95), (9.5, 8.5, 105)), False),
        ("fluid", _cyl((0, -56, -95), (7, 6, 105)), False),
        ("muscle", _ell((10, -25, -20), (7, 6, 32)), True),  # longus capitis / colli
        # parapharyngeal fat and masticator muscles
        ("fat", _ell((21, -4, -2), (7, 11, 18)), True),
        ("muscle", _ell((27, 8, -16), (6, 13, 21), tilt(20) @ yaw(-15)), True),  # medial pterygoid
        ("muscle", _ell((36, 12, 4), (9, 14, 7)), True),  # lateral pterygoid
        ("muscle", _ell((53, 18, -22), (8, 18, 28)), True),  # masseter
        # pharynx: mucosa-lined nasopharynx and oropharynx air, fossae of Rosenmüller
        ("mucosa", _ell((0, 0, 2), (13.5, 12, 15)), False),
        ("mucosa", _cyl((0, -4, -60), (12, 10, 52)), False),
        ("air", _ell((0, 1, 2), (10, 8.5, 11.5)), False),
        ("air", _cyl((0, -4, -60), (8.5, 6.5, 52)), False),
        ("air", _ell((11.5, -6, 2), (3.5, 3, 6)), True),
    ]


def _expand(anatomy):
    out = []
    for tissue, solid, paired in anatomy:
        out.append((tissue, solid))
        if paired:
            out.append((tissue, solid.mirrored()))
    return out


class _Grid:
    """A voxel grid and the map from voxel indices to head coordinates for a given pose."""

    def __init__(self, shape, spacing, rotation, translation):
        self.shape = tuple(int(s) for s in shape)
        sx, sy, sz = spacing
        self.affine = np.diag([-sx, -sy, sz, 1.0])
        centre_index = (np.asarray(self.shape) - 1) / 2.0
        self.affine[:3, 3] = _VOLUME_CENTRE - self.affine[:3, :3] @ centre_index
        self.rotation = rotation
        self.head_centre = _VOLUME_CENTRE + np.asarray(translation, float)
        # h = M @ ijk + b
        self.M = rotation.T @ self.affine[:3, :3]
        self.b = rotation.T @ (self.affine[:3, 3] - self.head_centre)
        self.inv = np.linalg.inv(self.M)

    def index_box(self, centre, extent, margin=2):
        corners = np.array([[centre[0] + dx * extent[0], centre[1] + dy * extent[1], centre[2] + dz * extent[2]]
                            for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)])
        idx = (self.inv @ (corners - self.b).T).T
        lo = np.maximum(np.floor(idx.min(0)).astype(int) - margin, 0)
        hi = np.minimum(np.ceil(idx.max(0)).astype(int) + margin + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def head_coords(self, box, mirror=False):
        i = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
        j = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
        k = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
        m, b = self.M.astype(np.float32), self.b.astype(np.float32)
        hx = m[0, 0] * i + m[0, 1] * j + m[0, 2] * k + b[0]
        hy = m[1, 0] * i + m[1, 1] * j + m[1, 2] * k + b[1]
        hz = m[2, 0] * i + m[2, 1] * j + m[2, 2] * k + b[2]
        return (-hx if mirror else hx), hy, hz

    def paint(self, target, value, solid, mirror=False):
        centre = solid.centre if not mirror else (-solid.centre[0], solid.centre[1], solid.centre[2])
        box = self.index_box(centre, solid.extent())
        if box is None:
            return
        inside = solid.inside(*self.head_coords(box, mirror=mirror))
        if inside.any():
            target[box][inside] = value


# ----------------------------------------------------------------------------- tumour


def _random_tumour(rng, crossing: bool, side: int) -> list[_Solid]:
    """A lobulated mass of 3-6 overlapping ellipsoids grown from the fossa of Rosenmüller."""
    n = int(rng.integers(3, 7))
    centre = np.array([side * 11.5, -5.0, 2.0]) + rng.normal(0, 1.5, 3)
    solids = []
    for b in range(n):
        radii = rng.uniform(4.5, 10.0, 3) if b else rng.uniform(7.0, 11.0, 3)
        rot = _rot_z(rng.uniform(-0.6, 0.6)) @ _rot_x(rng.uniform(-0.5, 0.5))
        solids.append(_ell(tuple(centre), tuple(radii), rot))
        step = rng.normal(0, 5.0, 3)
        step[2] = rng.normal(0, 6.0)
        if crossing:
            step[0] = -side * abs(rng.normal(7.0, 2.0))
        centre = centre + step
        if not crossing:
            centre[0] = side * np.clip(side * centre[0], 6.0, 30.0)
        centre[1] = np.clip(centre[1], -16.0, 10.0)
        centre[2] = np.clip(centre[2], -22.0, 14.0)
    return solids


# ----------------------------------------------------------------------------- public API


def _grid_for(modality, size, rng):
    if (modality, size) not in _GRIDS:
        raise ValueError(f"modality must be 'ct' or 'mri' and size 'small' or 'full', got {modality!r}, {size!r}")
    g = _GRIDS[(modality, size)]
    lo, hi = g["slices"]
    n_slices = int(rng.integers(lo, hi + 1))
    sxy = float(np.round(rng.uniform(*g["spacing_xy"]), 4))
    return (g["shape_xy"], g["shape_xy"], n_slices), (sxy, sxy, g["spacing_z"])


def make_phantom(
    seed: int,
    size: str = "small",
    modality: str = "ct",
    tumour: bool = True,
    tumour_contrast_hu: float = 8.0,
    pose: dict | str | None = None,
    crossing: bool | None = None,
    noise_hu: float = 12.0,
    couch: bool = True,
) -> Phantom:
    """Generate one phantom.

    Args:
        seed: random seed; the same arguments always give the same phantom.
        size: ``"small"`` (96 x 96 in-plane, test size) or ``"full"`` (512 x 512, 100-150 slices for CT).
        modality: ``"ct"`` (int16 HU) or ``"mri"`` (T1, T2 and CE-T1 volumes).
        tumour: add a GTVp; ``False`` gives a healthy, exactly symmetric head (up to pose and noise).
        tumour_contrast_hu: CT tumour intensity minus muscle intensity (HU).
        pose: ``None`` for a random pose (yaw and roll in [-10, 10] deg, pitch in [-5, 5] deg,
            translation in [-20, 20] mm per axis), ``"identity"``, or a dict with any of ``yaw_deg``,
            ``roll_deg``, ``pitch_deg``, ``translation_mm``.
        crossing: force (True) or forbid (False) a tumour that crosses the mid-line; ``None``: 30 % chance.
        noise_hu: CT noise standard deviation (MRI noise is scaled from it).
        couch: add a CT couch (fixed in the scanner frame, not part of the symmetric anatomy).

    Returns:
        :class:`Phantom`.
    """
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    rng = np.random.default_rng(seed)
    shape, spacing = _grid_for(modality, size, rng)

    if pose is None:
        p = {"yaw_deg": rng.uniform(-10, 10), "roll_deg": rng.uniform(-10, 10), "pitch_deg": rng.uniform(-5, 5),
             "translation_mm": rng.uniform(-20, 20, 3).tolist()}
    elif pose == "identity":
        p = {}
    elif isinstance(pose, dict):
        p = dict(pose)
    else:
        raise ValueError(f"pose must be None, 'identity' or a dict, got {pose!r}")
    yaw, roll, pitch = (float(p.get(k, 0.0)) for k in ("yaw_deg", "roll_deg", "pitch_deg"))
    translation = np.asarray(p.get("translation_mm", (0.0, 0.0, 0.0)), dtype=float)
    if translation.shape != (3,):
        raise ValueError(f"translation_mm must have 3 values, got {p.get('translation_mm')!r}")
    rotation = pose_matrix(yaw, roll, pitch)
    grid = _Grid(shape, spacing, rotation, translation)

    tissue = np.zeros(shape, dtype=np.uint8)
    for name, solid in _expand(_anatomy()):
        grid.paint(tissue, _T[name], solid)

    label = np.zeros(shape, dtype=np.uint8)
    info = {}
    if tumour:
        cross = bool(rng.random() < 0.3) if crossing is None else bool(crossing)
        side = int(rng.choice([-1, 1]))
        solids = _random_tumour(rng, cross, side)
        grow = np.zeros(shape, dtype=bool)
        mirror = np.zeros(shape, dtype=bool)
        for solid in solids:
            grid.paint(grow, True, solid)
            grid.paint(mirror, True, solid, mirror=True)
        # the tumour infiltrates soft tissue, fat, mucosa, muscle and air, not bone or brain
        allowed = ~np.isin(tissue, [_T["cortical"], _T["cancellous"], _T["brain"]])
        s = grow & allowed
        s_mirror = mirror & allowed  # allowed is symmetric in head coordinates
        tissue[s] = _T["tumour"]
        label[s] = 1
        hx_sign = _side_of_midline(grid, s)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        n = int(s.sum())
        info.update({
            "tumour_side": "right" if side > 0 else "left",
            "crosses_midline": bool(hx_sign[0] and hx_sign[1]),
            "tumour_volume_ml": round(n * voxel_ml, 4),
            "asymmetric_fraction": round(float((s & ~s_mirror).sum()) / max(n, 1), 4),
        })
    if couch and modality == "ct":
        _paint_couch(tissue, grid)

    normal = rotation @ np.array([1.0, 0.0, 0.0])
    info.update({
        "yaw_deg": round(yaw, 4), "roll_deg": round(roll, 4), "pitch_deg": round(pitch, 4),
        "translation_mm": [round(float(v), 4) for v in translation],
        "plane_normal": [round(float(v), 6) for v in normal],
        "plane_point": [round(float(v), 4) for v in grid.head_centre],
        "spacing_mm": list(spacing), "shape": list(shape), "seed": seed if isinstance(seed, int) else [int(s) for s in seed], "modality": modality,
    })

    if modality == "ct":
        values = dict(_CT_HU)
        values["tumour"] = _CT_HU["muscle"] + float(tumour_contrast_hu)
        image = _render(tissue, values, spacing, rng, noise_hu, blur_mm=0.6)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        image = {}
        bias = _bias_field(shape, rng)
        for seq in MRI_SEQUENCES:
            vol = _render(tissue, _MRI[seq], spacing, rng, noise_hu * 1.5, blur_mm=0.6) * bias
            image[seq] = np.abs(vol).astype(np.float32)  # magnitude images: Rician-like floor
    return Phantom(image=image, label=label, affine=grid.affine, spacing=tuple(spacing), info=info, tissue=tissue)


def _side_of_midline(grid, mask):
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return (False, False)
    hx = idx @ grid.M[0] + grid.b[0]
    return (bool((hx > 1.0).any()), bool((hx < -1.0).any()))


def _paint_couch(tissue, grid):
    """A flat couch top 130 mm posterior of the volume centre, fixed in the scanner frame."""
    inv = np.linalg.inv(grid.affine)
    for y_world in np.arange(_VOLUME_CENTRE[1] - 138, _VOLUME_CENTRE[1] - 128, 1.0):
        j = inv[1, 1] * y_world + inv[1, 3]
        j = int(round(j))
        if 0 <= j < tissue.shape[1]:
            plane = tissue[:, j, :]
            plane[plane == _T["air"]] = _T["couch"]


def _render(tissue, values, spacing, rng, noise_sd, blur_mm):
    lut = np.zeros(max(_T.values()) + 1, dtype=np.float32)
    for name, v in values.items():
        lut[_T[name]] = v
    vol = lut[tissue]
    sigma = [blur_mm / s for s in spacing]
    # blur only the bounding box of everything that is not air (plus the kernel reach)
    occupied = np.argwhere(tissue != _T["air"])
    if len(occupied):
        reach = [int(math.ceil(2.0 * sg)) + 1 for sg in sigma]
        lo = np.maximum(occupied.min(0) - reach, 0)
        hi = np.minimum(occupied.max(0) + np.array(reach) + 1, tissue.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        vol[box] = ndimage.gaussian_filter(vol[box], sigma=sigma, truncate=2.0)
    vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(noise_sd)
    return vol


def _bias_field(shape, rng):
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = rng.uniform(-0.12, 0.12, 4).astype(np.float32)
    return 1.0 + c[0] * gx + c[1] * gy + c[2] * gz + c[3] * gx * gy


# ----------------------------------------------------------------------------- data sets


def default_dataset_dir(modality: str = "ct", size: str = "full") -> str:
    """Where the embedded phantom set lives: ``$NPC_GTV_DATA/phantom_<modality>_<size>``.

    ``NPC_GTV_DATA`` defaults to ``~/.cache/npc_gtv``.
    """
    root = Path(os.environ.get("NPC_GTV_DATA", Path.home() / ".cache" / "npc_gtv"))
    return str(root / f"phantom_{modality}_{size}")


def _write_nifti(array, affine, path):
    from shared_transforms.io import save_nifti

    save_nifti(array, affine, path, overwrite=False)


def generate_dataset(
    out_dir,
    cases: int,
    seed: int,
    modality: str = "ct",
    size: str = "full",
    tumour: bool = True,
    test_fraction: float = 0.25,
    **phantom_kwargs,
) -> Path:
    """Write a Decathlon-layout phantom data set and return the path of its ``dataset.json``.

    Args:
        out_dir: destination; must be missing or empty (existing data is never overwritten).
        cases: number of cases (>= 1).
        seed: base seed; case ``i`` uses the seed sequence ``(seed, i)``.
        modality: ``"ct"`` or ``"mri"`` (three files per case: T1, T2, CE-T1).
        size: ``"small"`` or ``"full"``.
        tumour: ``False`` writes healthy heads (e.g. for self-supervised pretraining).
        test_fraction: share of cases put in the ``test`` list (at least one when ``cases >= 2``).
        phantom_kwargs: passed to :func:`make_phantom`.
    """
    if int(cases) < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: directory is not empty; refusing to write a phantom set over existing files")
    cases = int(cases)
    n_test = 0 if cases < 2 else max(1, int(round(cases * float(test_fraction))))
    n_test = min(n_test, cases - 1)
    # write into a temporary sibling, then rename: a crash never leaves a half data set behind
    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.")  # mode 0777 & ~umask, not mkdtemp's 0700
    try:
        entries = {"training": [], "test": []}
        rows = []
        for i in range(cases):
            case_id = f"npc_{i:03d}"
            part = "test" if i >= cases - n_test else "training"
            img_dir, lbl_dir = ("imagesTs", "labelsTs") if part == "test" else ("imagesTr", "labelsTr")
            ph = make_phantom(seed=[int(seed), i], size=size, modality=modality, tumour=tumour, **phantom_kwargs)
            if modality == "ct":
                image_rel = f"{img_dir}/{case_id}.nii.gz"
                _write_nifti(ph.image, ph.affine, tmp / image_rel)
            else:
                image_rel = [f"{img_dir}/{case_id}_{seq}.nii.gz" for seq in MRI_SEQUENCES]
                for seq, rel in zip(MRI_SEQUENCES, image_rel):
                    _write_nifti(ph.image[seq], ph.affine, tmp / rel)
            label_rel = f"{lbl_dir}/{case_id}.nii.gz"
            _write_nifti(ph.label, ph.affine, tmp / label_rel)
            entries[part].append({"case_id": case_id, "image": image_rel, "label": label_rel})
            rows.append({"case_id": case_id, "split": part, **{k: v for k, v in ph.info.items()}})
        meta = {
            "name": f"npc_gtv_phantom_{modality}_{size}",
            "description": "Synthetic head-and-neck phantoms with a nasopharyngeal GTVp (npc_gtv.phantoms)",
            "reference": "npc-gtv phantom generator",
            "licence": "CC0-1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"} if modality == "ct" else {"0": "T1", "1": "T2", "2": "CE-T1"},
            "labels": {"0": "background", "1": "GTVp"},
            "numTraining": len(entries["training"]),
            "numTest": len(entries["test"]),
            "generator": {"version": GENERATOR_VERSION, "seed": int(seed), "size": size, "modality": modality,
                          "tumour": bool(tumour), **{k: v for k, v in phantom_kwargs.items() if _jsonable(v)}},
            "training": entries["training"],
            "test": entries["test"],
            "case_info": {r["case_id"]: {k: v for k, v in r.items() if k != "case_id"} for r in rows},
        }
        with atomic_write(tmp / "dataset.json") as path:
            path.write_text(json.dumps(meta, indent=2))
        with atomic_write(tmp / "cases.csv") as path:
            _write_cases_csv(path, rows)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        fsync_path(out.parent, directory=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "dataset.json"


def _jsonable(v):
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _write_cases_csv(path, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


_DEFAULT_CASES = {"small": 16, "full": 20}


def ensure_dataset(dataset_dir, modality: str = "ct", size: str = "full", cases: int | None = None, seed: int = 0, **kwargs) -> Path:
    """Return ``dataset_dir/dataset.json``, generating a phantom set first if the folder is missing or empty.

    A folder that holds files but no ``dataset.json`` is an error: it is probably a user's data set
    that needs converting (``npc-gtv convert``), and it is never written into.

    Bundle configs call it where their data list is read, so nothing is generated when the data
    come from elsewhere (MONAI Label overrides ``train#dataset#data``). Under an initialised
    ``torch.distributed`` group every rank calls it: rank 0 generates, the others wait for it.
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency of the bundles, not of the generator
        dist = None
    shared = dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not shared or dist.get_rank() == 0
    if not rank0:
        dist.barrier()  # rank 0 has written the set (or failed: then this rank's own check fails clearly)
    try:
        return _ensure_dataset(dataset_dir, modality, size, cases, seed, **kwargs)
    finally:
        if shared and rank0:
            dist.barrier()


def _ensure_dataset(dataset_dir, modality, size, cases, seed, **kwargs) -> Path:
    d = Path(dataset_dir)
    ds = d / "dataset.json"
    if ds.is_file():
        return ds
    if d.exists() and any(d.iterdir()):
        raise FileNotFoundError(f"{d}: no dataset.json in a non-empty folder (convert your data with `npc-gtv convert`)")
    n = _DEFAULT_CASES[size] if cases is None else int(cases)
    print(f"npc-gtv: generating {n} {size} {modality.upper()} phantoms into {d} (seed {seed})")
    return generate_dataset(d, cases=n, seed=seed, modality=modality, size=size, **kwargs)


def phantoms_command(
    out: str,
    cases: int = 24,
    seed: int = 0,
    modality: str = "ct",
    size: str = "full",
    no_tumour: bool = False,
    tumour_contrast: float = 8.0,
    test_fraction: float = 0.25,
) -> None:
    """Write a synthetic head-and-neck phantom data set (Decathlon layout) to OUT.

    Args:
        out: output folder (must be missing or empty).
        cases: number of cases.
        seed: random seed (the same seed gives the same data set).
        modality: ct or mri (T1, T2, CE-T1 per case).
        size: small (96x96 in-plane, for tests) or full (512x512).
        no_tumour: healthy heads only (self-supervised pretraining data).
        tumour_contrast: CT tumour minus muscle intensity in HU (low by default, as in planning CT).
        test_fraction: share of cases listed under "test".
    """
    ds = generate_dataset(out, cases=cases, seed=seed, modality=modality, size=size, tumour=not no_tumour,
                          test_fraction=test_fraction, tumour_contrast_hu=tumour_contrast)
    meta = json.loads(Path(ds).read_text())
    print(f"wrote {meta['numTraining']} training + {meta['numTest']} test cases to {Path(ds).parent} ({ds.name}, cases.csv)")
