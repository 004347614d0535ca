"""Bundle inference checks its input, writes safely and fails with one clear line (every bundle, as users run it).

Failures of issue #18 reproduced here, each through ``python -m monai.bundle run inference``:

* a 0..1 normalised or MR-like image went through the CT bundles; a zero voxel size was read as 1 mm, a
  50 mm spacing made inference try to allocate 65 GB, a singular affine was accepted;
* a failed run printed 228-348 lines ending in a generic ``RuntimeError``, the clear message buried inside;
* an empty data list exited 0 with no message, a malformed one ended in a traceback;

* a full disk during inference exited 0 and left 0-byte ``*_seg.nii.gz`` files (MONAI's ``SaveImage``
  logs a failed writer and falls back to another one);
* two inputs with the same base name (two ``ct.nii.gz`` in different folders, two DICOM folders called
  ``CT``) wrote one ``CT_seg.nii.gz``, the second patient's over the first one's;
* a rerun replaced earlier predictions silently;
* predictions were owner-only (0600).

The networks are freshly initialised (the I/O path does not depend on training): their weights are
written where each bundle's inference loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLES_DIR, fill_disk

pytestmark = pytest.mark.slow

BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]

_WEIGHTS = textwrap.dedent(
    """
    import json, sys, torch
    from monai.bundle import ConfigParser
    bundle, ckpt = sys.argv[1], sys.argv[2]
    sys.path.insert(0, bundle)
    parser = ConfigParser()
    parser.read_config([bundle + "/configs/inference.yaml", bundle + "/configs/quick.yaml"])
    parser["bundle_root"] = bundle
    parser["ckpt_dir"] = ckpt
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt + "/model.pt")
    if "classifier_def" in parser:
        torch.save(parser.get_parsed_content("classifier_def").state_dict(), ckpt + "/classifier.pt")
    if parser.get("normalization") == "ct":  # the fingerprint a training writes beside the weights (soft tissue)
        fp = {"mean": 50.0, "std": 15.0, "median": 50.0, "min": 0.0, "max": 100.0,
              "percentile_00_5": 10.0, "percentile_99_5": 90.0}
        open(ckpt + "/intensity_fingerprint.json", "w").write(json.dumps(fp))
    """
)


def write_initial_weights(bundle: str, ckpt_dir: Path) -> Path:
    """Freshly initialised weights of a bundle's inference network(s) in ``ckpt_dir``."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _WEIGHTS, str(BUNDLES_DIR / bundle), str(ckpt_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt_dir / "model.pt"


def infer(bundle: str, overrides: dict, *, configs=("inference.yaml", "quick.yaml"), timeout: int = 600):
    """``python -m monai.bundle run inference`` of a bundle; returns the completed process (any exit status)."""
    cfg = BUNDLES_DIR / bundle / "configs"
    files = [str(cfg / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", repr(files),
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf")]
    defaults = {"num_workers": 0}
    if bundle == "sats_npc":
        defaults["symmetric_align"] = False  # ITK registration is tested elsewhere; here only the outputs matter
    for key, value in {**defaults, **overrides}.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=str(BUNDLES_DIR / bundle), capture_output=True, text=True, timeout=timeout, env=env)


def last_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_clear_failure(proc, *fragments: str) -> str:
    """A failed bundle run ends with ``npc-gtv bundle run: error: <message>`` as its last line, printed once."""
    assert proc.returncode == 1, proc.returncode
    line = last_line(proc)
    assert line.startswith("npc-gtv bundle run: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    assert proc.stderr.count("npc-gtv bundle run: error: ") == 1
    return line


def prediction_dir(bundle: str, output_dir: Path) -> Path:
    return output_dir / "predictions"


@pytest.fixture(scope="module")
def two_ct(small_ct_dataset, tmp_path_factory):
    """Two different patients' CTs, both stored as ``ct.nii.gz`` (in folders p1/ and p2/)."""
    root = tmp_path_factory.mktemp("same_names")
    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    paths = []
    for i, entry in enumerate(ds["training"][:2]):
        dst = root / f"p{i + 1}" / "ct.nii.gz"
        dst.parent.mkdir()
        shutil.copyfile(small_ct_dataset / entry["image"], dst)
        paths.append(dst)
    return paths


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_outputs_are_safe(bundle, small_ct_dataset, two_ct, tmp_path):
    write_initial_weights(bundle, tmp_path / "models")
    base = {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / "models")}
    p1, p2 = two_ct

    # 1. two inputs with one base name: refused before anything is written
    out = tmp_path / "dup"
    proc = infer(bundle, {**base, "output_dir": str(out), "datalist": [{"image": str(p1)}, {"image": str(p2)}]})
    assert_clear_failure(proc, "has the same output name 'ct'", str(p1), str(p2))
    assert not prediction_dir(bundle, out).exists() or not any(prediction_dir(bundle, out).iterdir())

    # 2. with a case_id per entry both are written, each under its own name, with the umask's mode
    out = tmp_path / "ok"
    datalist = [{"image": str(p1), "case_id": "patient1"}, {"image": str(p2), "case_id": "patient2"}]
    proc = infer(bundle, {**base, "output_dir": str(out), "datalist": datalist})
    assert proc.returncode == 0, proc.stderr[-4000:]
    preds = prediction_dir(bundle, out)
    assert sorted(p.name for p in preds.iterdir()) == ["patient1_seg.nii.gz", "patient2_seg.nii.gz"]
    for name, src in (("patient1", p1), ("patient2", p2)):
        img = nib.load(str(preds / f"{name}_seg.nii.gz"))
        assert img.shape == nib.load(str(src)).shape
        np.testing.assert_allclose(img.affine, nib.load(str(src)).affine, atol=1e-4)
        assert (preds / f"{name}_seg.nii.gz").stat().st_mode & 0o777 == 0o666 & ~_umask()

    # 3. a rerun does not replace earlier predictions unless asked to
    before = (preds / "patient1_seg.nii.gz").stat().st_mtime_ns
    proc = infer(bundle, {**base, "output_dir": str(out), "datalist": datalist})
    assert_clear_failure(proc, "patient1_seg.nii.gz: already exists and 1 more; refusing to overwrite", "--overwrite true")
    assert (preds / "patient1_seg.nii.gz").stat().st_mtime_ns == before
    proc = infer(bundle, {**base, "output_dir": str(out), "datalist": datalist, "overwrite": True})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (preds / "patient1_seg.nii.gz").stat().st_mtime_ns != before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("bundle", BUNDLES)
def test_full_disk_during_inference_fails_without_partial_files(bundle, small_ct_dataset, tiny_disk, tmp_path):
    write_initial_weights(bundle, tmp_path / "models")
    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    image = str(small_ct_dataset / ds["test"][0]["image"])
    (tiny_disk / "predictions").mkdir()
    fill_disk(tiny_disk)
    proc = infer(bundle, {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / "models"),
                          "output_dir": str(tiny_disk), "datalist": [{"image": image}]})
    assert_clear_failure(proc, str(tiny_disk / "predictions"), "No space left on device")
    left = sorted(p.name for p in (tiny_disk / "predictions").iterdir())
    assert left == [], f"partial or temporary files left: {left}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_failed_run_ends_with_one_clear_line(bundle, small_ct_dataset, tmp_path):
    """A bad input gave 228-348 lines ending in a generic RuntimeError, the message buried three times inside."""
    write_initial_weights(bundle, tmp_path / "models")
    base = {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
    nan = np.zeros((40, 40, 12), np.float32)
    nan[3, 4, 5] = np.nan
    bad = tmp_path / "nan_ct.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.diag([-1.0, -1.0, 3.0, 1.0])), str(bad))
    proc = infer(bundle, {**base, "datalist": [{"image": str(bad)}], "num_workers": 2})  # the error crosses a worker process
    assert_clear_failure(proc, f"{bad}: image has 1 NaN/inf voxel(s)")
    for datalist, fragment in (("[]", "datalist: is empty"), (f"'{bad}'", "datalist: must be a list of {'image': path} entries")):
        proc = infer(bundle, {**base, "datalist": datalist})
        assert_clear_failure(proc, fragment)


def _bad_inputs(folder: Path, ct_path: Path) -> dict[str, Path]:
    """Copies of a phantom CT that a CT bundle must refuse."""
    import struct

    img = nib.load(str(ct_path))
    hu = np.asarray(img.dataobj).astype(np.float32)
    out = {}
    out["normalised"] = folder / "normalised.nii.gz"
    nib.save(nib.Nifti1Image((hu - hu.min()) / (hu.max() - hu.min()), img.affine), str(out["normalised"]))
    zero = folder / "zero_spacing.nii"
    z = nib.Nifti1Image(hu.astype(np.int16), img.affine)
    z.set_sform(None, code=0)
    z.set_qform(None, code=0)
    nib.save(z, str(zero))
    raw = bytearray(zero.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)
    zero.write_bytes(bytes(raw))
    out["zero_spacing"] = zero
    far = img.affine.copy()
    far[:3, :3] *= 50.0 / np.linalg.norm(far[:3, :3], axis=0)
    out["far"] = folder / "spacing_50mm.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), far), str(out["far"]))
    singular = img.affine.copy()
    singular[:3, 2] *= 1e-9  # a collapsed slice axis (nibabel cannot store an exactly singular qform)
    s = nib.Nifti1Image(hu.astype(np.int16), singular)
    s.set_qform(None, code=0)
    s.set_sform(singular, code=1)
    out["singular"] = folder / "singular.nii.gz"
    nib.save(s, str(out["singular"]))
    return out


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundles_check_intensities_and_geometry(bundle, small_ct_dataset, tmp_path):
    write_initial_weights(bundle, tmp_path / "models")
    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    bad = _bad_inputs(tmp_path, small_ct_dataset / ds["test"][0]["image"])
    base = {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
    expected = {
        "normalised": "intensities do not look like a CT in Hounsfield units",
        "zero_spacing": "header voxel size (pixdim) is 0 x 0 x 0 mm: no usable spacing",
        "far": "implausible voxel spacing 50 x 50 x 50 mm",
        "singular": "has a singular affine",
    }
    cases = list(expected) if bundle == "sats_npc" else ["normalised", "zero_spacing", "singular"]
    for name in cases:
        proc = infer(bundle, {**base, "datalist": [{"image": str(bad[name])}]})
        assert_clear_failure(proc, f"{bad[name]}: {expected[name]}")
    # the switch for deliberate non-CT input
    proc = infer(bundle, {**base, "datalist": [{"image": str(bad["normalised"])}], "input_modality": "MR"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "predictions" / "normalised_seg.nii.gz").is_file()
