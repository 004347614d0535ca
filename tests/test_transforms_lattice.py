"""Lattice bijections from shear decompositions (exactly invertible nearest-neighbour label moves)."""

from __future__ import annotations

import numpy as np
import pytest

from shared_transforms.lattice import lattice_map


def _rotation(yaw_deg, roll_deg, pitch_deg):
    def planar(deg, i, j):
        a = np.radians(deg)
        m = np.eye(3)
        m[[i, i, j, j], [i, j, i, j]] = [np.cos(a), -np.sin(a), np.sin(a), np.cos(a)]
        return m

    return planar(yaw_deg, 0, 1) @ planar(roll_deg, 0, 2) @ planar(pitch_deg, 1, 2)


def _index_map(rotation, spacing, translation):
    s = np.diag(spacing)
    m = np.eye(4)
    m[:3, :3] = np.linalg.inv(s) @ rotation @ s  # the rotation in mm seen on a grid of this spacing
    m[:3, 3] = translation
    return m


def _grid(shape):
    return [g.ravel() for g in np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")]


@pytest.mark.parametrize("angles", [(0, 0, 0), (7, 0, 0), (0, -9, 0), (0, 0, 5), (8, 6, -3), (-10, 10, 2)])
def test_shear_map_is_a_bijection_close_to_the_exact_map(angles):
    spacing = np.array([1.0, 1.2, 3.0])
    m = _index_map(_rotation(*angles), spacing, [1.3, -2.6, 0.4])
    lm = lattice_map(m, spacing)
    assert lm is not None and len(lm.shears) == 4
    p = _grid((40, 36, 14))
    q = lm.pull(p)
    # injective: no two output voxels read the same input voxel
    assert len(np.unique(np.stack(q, 1), axis=0)) == p[0].size
    # push undoes pull exactly
    for a, b in zip(p, lm.push(q)):
        np.testing.assert_array_equal(a, b)
    # within the stated bound of the exact map, and the bound is small: about one voxel in plane, half a slice in z
    err_mm = np.abs((np.stack(q) - (m[:3, :3] @ np.stack(p) + m[:3, 3:])) * spacing[:, None]).max(1)
    assert np.all(err_mm <= np.asarray(lm.error_bound_mm) + 1e-9)
    assert max(lm.error_bound_mm[:2]) <= 1.5 * spacing[1] and lm.error_bound_mm[2] <= 0.5 * spacing[2] + 0.2


def test_pure_translation_is_a_plain_voxel_shift():
    lm = lattice_map(_index_map(np.eye(3), [1.0, 1.0, 3.0], [2.0, -1.0, 3.0]), [1.0, 1.0, 3.0])
    p = _grid((5, 4, 3))
    q = lm.pull(p)
    np.testing.assert_array_equal(np.stack(q), np.stack(p) + np.array([[2], [-1], [3]]))


def test_maps_that_change_volume_have_no_lattice_bijection():
    m = np.eye(4)
    m[0, 0] = 1.1
    assert lattice_map(m) is None
    with pytest.raises(ValueError, match="4x4"):
        lattice_map(np.eye(3))
