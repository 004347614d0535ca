"""The output discipline of every writer and the geometry checks of every reader (shared_transforms.io)."""

from __future__ import annotations

import errno
import os
import struct
import threading

import nibabel as nib
import numpy as np
import pytest

from conftest import fill_disk
from shared_transforms.io import (
    InputError,
    atomic_write,
    check_affine,
    file_mode,
    load_nifti,
    lossless_reorientation,
    make_temp_dir,
    reorient_to_grid,
    safe_name,
    save_nifti,
)

AFF = np.diag([-1.0, -1.0, 3.0, 1.0])


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_nifti(np.zeros((3, 3, 3), np.uint8), AFF, tmp_path / "a.nii.gz")
        assert out.stat().st_mode & 0o777 == 0o644
        assert make_temp_dir(tmp_path, ".x.").stat().st_mode & 0o777 == 0o755
        os.umask(0o027)
        assert file_mode() == 0o640
        with atomic_write(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_no_clobber_is_race_free(tmp_path):
    target = tmp_path / "pred.nii.gz"
    save_nifti(np.zeros((3, 3, 3), np.uint8), AFF, target, overwrite=False)
    with pytest.raises(InputError, match="already exists; refusing to overwrite"):
        save_nifti(np.ones((3, 3, 3), np.uint8), AFF, target, overwrite=False)
    # another process creates the name while we write: ours must not replace it
    other = tmp_path / "race.txt"
    with pytest.raises(InputError, match="another process"):
        with atomic_write(other, overwrite=False) as tmp:
            tmp.write_text("ours")
            other.write_text("theirs")
    assert other.read_text() == "theirs"
    assert _leftovers(tmp_path) == []
    # threads writing the same name at once: exactly one wins, the file is complete
    results = []

    def write(i):
        try:
            save_nifti(np.full((20, 20, 20), i, np.uint8), AFF, tmp_path / "same.nii.gz", overwrite=False)
            results.append(i)
        except InputError:
            results.append(None)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(1, 5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert np.all(np.asarray(nib.load(str(tmp_path / "same.nii.gz")).dataobj) == winners[0])


def test_failed_or_empty_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    with pytest.raises(OSError, match="empty file"):
        with atomic_write(tmp_path / "y.csv"):
            pass  # a writer that "succeeded" without writing anything (MONAI's ITK fallback on a full disk)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_raises_and_leaves_no_partial_file(tiny_disk):
    fill_disk(tiny_disk)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 64), dtype=np.uint8)
    with pytest.raises(OSError) as info:
        save_nifti(noise, AFF, tiny_disk / "pred.nii.gz")
    assert info.value.errno == errno.ENOSPC
    assert str(tiny_disk / "pred.nii.gz") in str(info.value)  # names the destination, not the temporary file
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler.bin"]


def test_read_only_folder_raises_oserror(readonly_dir):
    with pytest.raises(OSError) as info:
        save_nifti(np.zeros((3, 3, 3), np.uint8), AFF, readonly_dir / "a.nii.gz")
    assert info.value.errno == errno.EROFS


def _zero_pixdim_file(tmp_path):
    path = tmp_path / "zero.nii"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    img.set_sform(None, code=0)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]; nibabel itself refuses to write zeros
    path.write_bytes(bytes(raw))
    return path


def test_geometry_checks(tmp_path):
    with pytest.raises(InputError, match=r"zero.nii: header voxel size \(pixdim\) is 0 x 0 x 0 mm: no usable spacing"):
        load_nifti(_zero_pixdim_file(tmp_path))
    far = save_nifti(np.zeros((4, 4, 4), np.int16), np.diag([50.0, 50.0, 50.0, 1.0]), tmp_path / "far.nii.gz")
    with pytest.raises(InputError, match=r"far.nii.gz: implausible voxel spacing 50 x 50 x 50 mm"):
        load_nifti(far)
    assert load_nifti(far, spacing_range=None)[0].shape == (4, 4, 4)
    with pytest.raises(InputError, match="singular affine"):
        check_affine(np.diag([1.0, 0.0, 1.0, 1.0]), "s.nii")
    with pytest.raises(InputError, match="non-finite affine"):
        check_affine(np.diag([1.0, np.nan, 1.0, 1.0]), "s.nii")
    assert check_affine(AFF) == (1.0, 1.0, 3.0)


def test_safe_names():
    assert safe_name("npc_001") == "npc_001"
    assert safe_name("../../etc/x") == "etc_x"
    assert safe_name("/abs/path.png") == "abs_path.png"
    assert safe_name("a b\\c") == "a_b_c"
    with pytest.raises(InputError, match="no usable file name"):
        safe_name("..")


def test_lossless_reorientation():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 2, (5, 6, 7)).astype(np.uint8)
    aff = np.array([[-1.0, 0, 0, 10], [0, -1.2, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    # the same voxel centres stored in another axis order and direction (e.g. RAS instead of LPS)
    perm = np.transpose(vol, (2, 0, 1))[:, ::-1, :]
    m = np.zeros((4, 4))
    m[2, 0] = 1
    m[0, 1] = -1
    m[0, 3] = 4
    m[1, 2] = 1
    m[3, 3] = 1
    perm_aff = aff @ m  # index (i, j, k) of perm is index (4 - j, k, i) of vol
    assert lossless_reorientation(perm.shape, perm_aff, vol.shape, aff) is not None
    np.testing.assert_array_equal(reorient_to_grid(perm, perm_aff, vol.shape, aff), vol)
    shifted = aff.copy()
    shifted[0, 3] += 0.5
    assert lossless_reorientation(vol.shape, shifted, vol.shape, aff) is None
    with pytest.raises(InputError, match="not a lossless reorientation .* would have to be resampled"):
        reorient_to_grid(vol, shifted, vol.shape, aff, "pred.nii.gz", "ct.nii.gz")
