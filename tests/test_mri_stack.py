"""Multi-sequence MRI stacking: resampling onto the reference grid, per-channel normalisation, inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from npc_gtv.dicom.series import write_dicom_series
from shared_transforms.io import InputError, save_nifti
from shared_transforms.mri import StackSequences, StackSequencesd

os.environ.setdefault("OMP_NUM_THREADS", "1")

COEF = np.array([0.7, -0.4, 1.3])  # a linear intensity field: linear interpolation reproduces it exactly


def _grid(shape, spacing, origin):
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = origin
    return shape, aff


def _linear_image(shape, aff, offset=200.0):
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    return (world @ COEF + offset).reshape(shape).astype(np.float32), world.reshape(*shape, 3)


def test_resampling_onto_reference_grid_is_exact_for_linear_field():
    ref_shape, ref_aff = _grid((20, 18, 8), (2.0, 2.0, 4.0), (20.0, 18.0, -16.0))
    mov_shape, mov_aff = _grid((30, 28, 20), (1.6, 1.5, 2.0), (25.0, 22.0, -22.0))  # covers the reference FOV
    ref_img, ref_world = _linear_image(ref_shape, ref_aff)
    mov_img, _ = _linear_image(mov_shape, mov_aff)
    seqs = [MetaTensor(torch.from_numpy(mov_img), affine=torch.from_numpy(mov_aff)), MetaTensor(torch.from_numpy(ref_img), affine=torch.from_numpy(ref_aff))]
    out = StackSequences(reference=-1, normalize=None, names=["t2", "cet1"])(seqs)
    assert tuple(out.shape) == (2, 20, 18, 8)
    np.testing.assert_allclose(out.affine.numpy(), ref_aff, atol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), ref_img, atol=1e-4)
    # the moved sequence equals the analytic field at the reference voxels' world positions
    np.testing.assert_allclose(out[0].numpy(), ref_world @ COEF + 200.0, atol=1e-3)
    assert out.meta["sequence_names"] == ["t2", "cet1"]


def test_per_channel_normalisation_and_fov_padding():
    shape, aff = _grid((16, 16, 6), (2.0, 2.0, 3.0), (16.0, 16.0, 0.0))
    rng = np.random.default_rng(0)
    a = rng.normal(100, 20, shape).astype(np.float32)
    b = rng.normal(500, 50, shape).astype(np.float32)
    half_shape, half_aff = _grid((8, 16, 6), (2.0, 2.0, 3.0), (16.0, 16.0, 0.0))  # covers only x-half of the FOV
    c = np.full(half_shape, 7.0, np.float32)
    mt = lambda arr, af: MetaTensor(torch.from_numpy(arr), affine=torch.from_numpy(af))  # noqa: E731
    out = StackSequences(reference=0, normalize=["zscore", {"mode": "percentile", "lower": 0, "upper": 100}, None])(
        [mt(a, aff), mt(b, aff), mt(c, half_aff)]
    )
    assert out[0].mean().item() == pytest.approx(0.0, abs=1e-5) and out[0].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert out[1].min().item() == pytest.approx(0.0) and out[1].max().item() == pytest.approx(1.0)
    np.testing.assert_allclose(out[2, :8].numpy(), 7.0, atol=1e-5)  # inside the partial FOV
    np.testing.assert_allclose(out[2, 9:].numpy(), 0.0)  # outside: zero padding


def test_stack_from_phantom_files_nifti_and_dicom(tmp_path):
    from npc_gtv.phantoms import make_phantom

    ph = make_phantom(2, size="small", modality="mri")
    t1 = save_nifti(ph.image["t1"], ph.affine, tmp_path / "t1.nii.gz")
    write_dicom_series(np.round(ph.image["t2"]), ph.affine, tmp_path / "t2", modality="MR")
    # CE-T1 on a coarser in-plane grid with a shifted origin
    coarse = ph.affine.copy()
    coarse[:3, :2] *= 2
    cet1 = save_nifti(ph.image["cet1"][::2, ::2], coarse, tmp_path / "cet1.nii.gz")
    d = StackSequencesd(keys="image", reference=0, normalize=None)({"image": [str(t1), str(tmp_path / "t2"), str(cet1)]})
    img = d["image"]
    assert tuple(img.shape) == (3, 96, 96, 20)
    np.testing.assert_allclose(img.affine.numpy(), ph.affine, atol=1e-4)
    np.testing.assert_allclose(img[0].numpy(), ph.image["t1"], atol=1e-3)
    np.testing.assert_allclose(img[1].numpy(), np.round(ph.image["t2"]), atol=1e-3)
    # coarse voxels land back on every second fine voxel exactly
    np.testing.assert_allclose(img[2, ::2, ::2][:47, :47].numpy(), ph.image["cet1"][::2, ::2][:47, :47], atol=1e-2)
    assert img.meta["sequence_names"] == ["t1", "t2", "cet1"]

    # multi-key form
    d2 = StackSequencesd(keys=["a", "b"], output_key="image", reference=0, normalize="zscore")({"a": str(t1), "b": str(cet1)})
    assert tuple(d2["image"].shape) == (2, 96, 96, 20) and d2["image"].meta["sequence_names"] == ["a", "b"]


def test_bad_inputs(tmp_path):
    shape, aff = _grid((8, 8, 4), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    far = aff.copy()
    far[:3, 3] += 400.0
    arr = np.ones(shape, np.float32)
    mt = lambda af: MetaTensor(torch.from_numpy(arr), affine=torch.from_numpy(af))  # noqa: E731
    with pytest.raises(InputError, match="does not overlap"):
        StackSequences(reference=0, normalize=None)([mt(aff), mt(far)])
    with pytest.raises(ValueError, match="normalisation specs"):
        StackSequences(normalize=["zscore", "zscore"])([mt(aff), mt(aff), mt(aff)])
    with pytest.raises(ValueError, match="output_key"):
        StackSequencesd(keys=["a", "b"])
    with pytest.raises(ValueError, match="mode"):
        StackSequences(mode="cubic")
    write_dicom_series(np.zeros(shape), aff, tmp_path / "ct")
    with pytest.raises(InputError, match="no MR series"):
        StackSequences()([str(tmp_path / "ct")])
