"""UNet-2.5D bundle: the rotation and relative-patch-location pretext tasks and their loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import bundle_scripts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pt():
    return bundle_scripts("unet25d_ssl", "pretext")


def test_ten_rotations_distinct_and_invertible(pt):
    assert len(pt.ROTATIONS) == 10
    cube = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 4, 4, 4)
    outs = [pt.rotate(cube, c) for c in range(10)]
    assert torch.equal(outs[0], cube)
    for a, b in itertools.combinations(range(10), 2):
        assert not torch.equal(outs[a], outs[b]), (a, b)
    for c in range(10):
        assert outs[c].shape == cube.shape
        assert torch.equal(pt.unrotate(outs[c], c), cube)
    # class 7 is 90 degrees about Z: (x, y) -> rot90 in the X-Y plane, slices untouched
    assert torch.equal(outs[7][0, :, :, 2], torch.rot90(cube[0, :, :, 2], 1, (0, 1)))
    # three quarter turns compose to the identity; 180 about each axis differ from each other
    assert torch.equal(pt.rotate(pt.rotate(outs[1], 1), 2), cube)
    with pytest.raises(ValueError):
        pt.rotate(torch.zeros(1, 4, 4, 2), 1)
    with pytest.raises(ValueError):
        pt.rotate(cube, 10)


def test_rpl_offsets_26_classes_centre_excluded(pt):
    assert len(pt.RPL_OFFSETS) == 26
    assert len(set(pt.RPL_OFFSETS)) == 26
    assert (0, 0, 0) not in pt.RPL_OFFSETS
    assert set(pt.RPL_OFFSETS) | {(0, 0, 0)} == set(itertools.product((-1, 0, 1), repeat=3))


def test_rpl_grid_geometry(pt):
    cell, patch = np.array([10, 10, 6]), np.array([8, 8, 4])
    rng = np.random.RandomState(0)
    jitter = np.stack([rng.randint(0, c - p + 1, 27) for c, p in zip(cell, patch)], 1)
    starts = pt.rpl_patch_starts((5, 6, 7), cell, patch, jitter)
    assert starts.shape == (27, 3)
    # row 13 is the centre cell (1, 1, 1); every patch stays inside its own cell
    for row, (i, j, k) in enumerate(itertools.product((0, 1, 2), repeat=3)):
        lo = np.array([5, 6, 7]) + np.array([i, j, k]) * cell
        assert np.all(starts[row] >= lo) and np.all(starts[row] + patch <= lo + cell)
    assert np.all(starts[13] >= np.array([5, 6, 7]) + cell)
    # patches never overlap (they sit in disjoint cells)
    boxes = [(s, s + patch) for s in starts]
    for (a0, a1), (b0, b1) in itertools.combinations(boxes, 2):
        assert np.any(a1 <= b0) or np.any(b1 <= a0)
    with pytest.raises(ValueError):
        pt.rpl_patch_starts((0, 0, 0), cell, patch, np.full((27, 3), 3))


def test_sampler_labels_match_patch_positions(pt):
    # coordinate-coded image: channel value encodes (x, y, z), so a patch tells where it came from
    X, Y, Z = 70, 70, 24
    gx, gy, gz = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    code = torch.as_tensor((gx * 10000 + gy * 100 + gz).astype(np.float64))[None]
    sampler = pt.PretextSampler(rot_size=16, rpl_patch=(16, 16, 4), rpl_jitter=(3, 3, 2), num_samples=40)
    sampler.set_random_state(3)
    samples = sampler(code)
    assert len(samples) == 40
    seen_rot, seen_rpl = set(), set()
    for s in samples:
        assert s["rot_image"].shape == (1, 16, 16, 16)
        assert s["rpl_centre"].shape == s["rpl_query"].shape == (1, 16, 16, 4)
        c0 = s["rpl_centre"][0, 0, 0, 0].item()
        q0 = s["rpl_query"][0, 0, 0, 0].item()
        c = np.array([c0 // 10000, (c0 // 100) % 100, c0 % 100])
        q = np.array([q0 // 10000, (q0 // 100) % 100, q0 % 100])
        # cell = patch + jitter = (19, 19, 6); the grid offset is the displacement in cells
        cell = np.array([19, 19, 6])
        offset = tuple(int(v) for v in np.round((q - c) / cell))
        label = int(s["rpl_label"])
        assert offset == pt.RPL_OFFSETS[label]
        # the query lies in the neighbouring cell, displaced by at most the jitter
        d = np.abs(q - c)
        for axis in range(3):
            if offset[axis] == 0:
                assert d[axis] <= (3, 3, 2)[axis]
            else:
                assert cell[axis] - (3, 3, 2)[axis] <= d[axis] <= cell[axis] + (3, 3, 2)[axis]
        rot = int(s["rot_label"])
        seen_rot.add(rot)
        seen_rpl.add(label)
        # un-rotating the rotation cube gives a contiguous block of the image
        block = pt.unrotate(s["rot_image"], rot)[0]
        start = block[0, 0, 0].item()
        assert block[1, 0, 0].item() - start == 10000 and block[0, 1, 0].item() - start == 100 and block[0, 0, 1].item() - start == 1
    assert len(seen_rot) >= 8 and len(seen_rpl) >= 15


def test_sampler_pads_small_images_and_validates(pt):
    sampler = pt.PretextSampler(rot_size=16, rpl_patch=(16, 16, 4), rpl_jitter=(2, 2, 1), num_samples=2)
    out = sampler(torch.rand(1, 20, 20, 10))
    assert out[0]["rpl_query"].shape == (1, 16, 16, 4)
    with pytest.raises(ValueError):
        pt.PretextSampler(rot_size=20)
    with pytest.raises(ValueError):
        pt.PretextSampler(rpl_patch=(16, 16, 3))


def test_sampler_redraws_crops_without_structure(pt):
    # a uniform volume with one textured corner block: only crops touching the block have any std
    img = torch.zeros(1, 64, 64, 16)
    img[:, :24, :24, :8] = torch.rand(1, 24, 24, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(rot_size=16, rpl_patch=(16, 16, 4), rpl_jitter=(2, 2, 1), num_samples=40)
    plain = pt.PretextSampler(**kwargs)
    plain.set_random_state(0)
    picky = pt.PretextSampler(**kwargs, min_std=0.05, max_tries=200)
    picky.set_random_state(0)
    def counts(samples):
        flat_cubes = sum(float(s["rot_image"].std()) < 0.05 for s in samples)
        structured_pairs = sum(min(float(s["rpl_centre"].std()), float(s["rpl_query"].std())) >= 0.05 for s in samples)
        return flat_cubes, structured_pairs

    (flat_plain, pairs_plain), (flat_picky, pairs_picky) = counts(plain(img)), counts(picky(img))
    assert flat_plain >= 10 and flat_picky == 0  # uniformly random cubes are often flat here, redrawn ones never
    # an RPL pair is redrawn with its location label fixed: some labels put the query outside the texture
    assert pairs_picky > pairs_plain
    with pytest.raises(ValueError, match="min_std"):
        pt.PretextSampler(min_std=-1)


def test_pretext_samplesd_returns_list(pt):
    tr = pt.PretextSamplesd(keys="image", rot_size=16, rpl_patch=(16, 16, 4), rpl_jitter=(2, 2, 1), num_samples=3)
    out = tr({"image": torch.rand(1, 60, 60, 16), "case_id": "a"})
    assert isinstance(out, list) and len(out) == 3 and out[0]["case_id"] == "a"


def test_combined_loss_hand_computed(pt):
    rot_logits = torch.tensor([[2.0] + [0.0] * 9])
    rpl_logits = torch.tensor([[0.0] * 26])
    rot_label, rpl_label = torch.tensor([0]), torch.tensor([5])
    l_rot = -math.log(math.exp(2) / (math.exp(2) + 9))
    l_rpl = math.log(26)
    for alpha in (0.0, 0.3, 1.0):
        loss = pt.PretextLoss(alpha)((rot_logits, rpl_logits), (rot_label, rpl_label))
        assert loss.item() == pytest.approx(alpha * l_rpl + (1 - alpha) * l_rot, rel=1e-6)
    with pytest.raises(ValueError):
        pt.PretextLoss(1.5)


def test_prepare_batch(pt):
    batch = {"rot_image": torch.zeros(2, 1, 16, 16, 16), "rot_label": torch.tensor([1, 2]), "rpl_centre": torch.zeros(2, 1, 16, 16, 4),
             "rpl_query": torch.ones(2, 1, 16, 16, 4), "rpl_label": torch.tensor([3, 4])}
    inputs, targets = pt.prepare_pretext_batch(batch, torch.device("cpu"))
    assert len(inputs) == 3 and inputs[2].sum() == 2 * 16 * 16 * 4
    assert targets[1].tolist() == [3, 4]
