"""The ``npc-gtv`` command line: paths stay text, and every failure is one line (issue #18, failures 7 and 10)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from shared_transforms.io import save_nifti

AFF = np.diag([-1.0, -1.0, 3.0, 1.0])


def npc_gtv(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NPC_GTV_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "npc_gtv.cli", *map(str, args)], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=env)


def _mask(path: Path, shift: int = 0) -> Path:
    m = np.zeros((24, 24, 10), np.uint8)
    m[6 + shift:14 + shift, 6:14, 3:7] = 1
    return save_nifti(m, AFF, path)


def one_line_error(proc, command: str, pattern: str) -> str:
    """Assert that ``proc`` failed with one ``npc-gtv COMMAND: error: ...`` line (no traceback) holding ``pattern``."""
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert lines, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"npc-gtv {command}: error: ") or lines[-1].startswith(f"npc-gtv {command}: "), lines[-1]
    assert pattern in lines[-1], lines[-1]
    return lines[-1]


def test_numeric_and_none_names_stay_paths(tmp_path):
    """fire turned 20240101, 12345 and None into numbers / None: TypeError tracebacks in every command."""
    from npc_gtv.dicom.series import write_dicom_series
    from npc_gtv.phantoms import make_phantom

    for name in ("20240101", "12345"):
        _mask(tmp_path / name / "case1.nii.gz")
        _mask(tmp_path / name / "case2.nii.gz", shift=1)
    proc = npc_gtv("morphology", "12345", "--out", "None", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "None").read_text().startswith("case_id,volume_cm3")
    proc = npc_gtv("evaluate", "12345", "20240101", "00042", "--figures", "False", "--progress", "False", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "00042" / "metrics.csv").read_text().count("\n") == 3  # the leading zeros survived too
    proc = npc_gtv("agreement", "12345", "20240101", "None_agreement", "--figures", "False", "--progress", "False", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ph = make_phantom(3, size="small")
    write_dicom_series(ph.image, ph.affine, tmp_path / "CT" / "20240101")
    save_nifti(ph.label, ph.affine, tmp_path / "None.nii.gz")
    proc = npc_gtv("dicom2nifti", "CT/20240101", "ct.nii.gz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "CT"
    proc = npc_gtv("dicom2nifti", "20240101", "12345.nii.gz", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = npc_gtv("rtstruct", "--ct", "20240101", "--mask", "../None.nii.gz", "--out", "None", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "None").stat().st_size > 0
    proc = npc_gtv("dicomseg", "--ct", "20240101", "--mask", "../None.nii.gz", "--out", "12345", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_failures_are_one_line(tmp_path, readonly_dir):
    _mask(tmp_path / "m" / "a.nii.gz")
    one_line_error(npc_gtv("convert", "badformat", "src", "out", cwd=tmp_path), "convert", "unknown format 'badformat'")
    proc = npc_gtv("morphology", "m", "--out", readonly_dir / "morph.csv", cwd=tmp_path)
    assert proc.returncode == 1
    one_line_error(proc, "morphology", "Read-only file system")
    proc = npc_gtv("evaluate", "m", "m", readonly_dir / "report", "--figures", "False", "--progress", "False", cwd=tmp_path)
    one_line_error(proc, "evaluate", "Read-only file system")
    proc = npc_gtv("dicom2nifti", "nowhere", "x.nii.gz", cwd=tmp_path)
    one_line_error(proc, "dicom2nifti", "nowhere")
