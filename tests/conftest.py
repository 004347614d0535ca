"""Shared pytest fixtures: tiny phantoms and a way to import one bundle's ``scripts`` package.

Every bundle has its own top-level ``scripts`` package (model-zoo layout), so two bundles cannot
be imported side by side under that name. :func:`bundle_scripts` swaps the package in and out.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Restore ``os.environ`` after every test.

    Some libraries change it in-process (``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``),
    and every bundle run started later by the same worker would inherit that and write elsewhere.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def bundle_scripts(bundle: str, module: str | None = None):
    """Import ``scripts`` (or ``scripts.<module>``) of ``bundles/<bundle>`` freshly."""
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        del sys.modules[name]
    root = str(BUNDLES_DIR / bundle)
    sys.path[:] = [p for p in sys.path if not (p.startswith(str(BUNDLES_DIR)) and p != root)]
    if root not in sys.path:
        sys.path.insert(0, root)
    importlib.invalidate_caches()
    return importlib.import_module("scripts" if module is None else f"scripts.{module}")


def load_ci_module(name: str):
    """Import ``ci/<name>.py`` (the CI scripts are not a package) once per process."""
    if name in sys.modules:
        return sys.modules[name]
    ci_dir = str(REPO_ROOT / "ci")
    if ci_dir not in sys.path:
        sys.path.insert(0, ci_dir)
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_bundle(bundle: str, workflow: str, config_files: list[str], overrides: dict | None = None, *, timeout: int = 900, env=None):
    """Run ``python -m monai.bundle run WORKFLOW`` on a bundle in a subprocess, as a user would.

    ``config_files`` are names inside ``configs/`` (merged in order). ``overrides`` become
    ``--key value`` pairs. Returns the completed process; raises with its output on failure.
    """
    cfg_dir = BUNDLES_DIR / bundle / "configs"
    files = [str(cfg_dir / f) for f in config_files]
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", repr(files) if len(files) > 1 else files[0]]
    cmd += ["--meta_file", str(cfg_dir / "metadata.json"), "--logging_file", str(cfg_dir / "logging.conf")]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    run_env = dict(os.environ, PYTHONUNBUFFERED="1")
    run_env.update(env or {})
    proc = subprocess.run(cmd, cwd=str(BUNDLES_DIR / bundle), capture_output=True, text=True, timeout=timeout, env=run_env)
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({' '.join(cmd)}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def small_ct_dataset(tmp_path_factory):
    """A 6-case small CT phantom set (Decathlon layout); returns its directory."""
    from npc_gtv.phantoms import generate_dataset

    out = tmp_path_factory.mktemp("phantom_ct")
    generate_dataset(out, cases=6, seed=7, modality="ct", size="small")
    return out


@pytest.fixture(scope="session")
def small_mri_dataset(tmp_path_factory):
    """A 3-case small multi-sequence MRI phantom set; returns its directory."""
    from npc_gtv.phantoms import generate_dataset

    out = tmp_path_factory.mktemp("phantom_mri")
    generate_dataset(out, cases=3, seed=11, modality="mri", size="small")
    return out


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (full-disk / read-only file-system tests)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    """Mount a tmpfs with ``options`` at ``where`` for the block (skips the test where that cannot be done)."""
    _mount_tmpfs(where, options)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A folder on a 256 KiB tmpfs (a full disk after a few writes); skipped where tmpfs cannot be mounted."""
    with _tmpfs(tmp_path / "tiny_disk", "size=256k,mode=0755") as where:
        yield where


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder on a read-only tmpfs (writes fail with EROFS even as root); skipped where tmpfs cannot be mounted."""
    with _tmpfs(tmp_path / "readonly", "size=64k,ro") as where:
        yield where


def fill_disk(folder: Path) -> None:
    """Fill the file system of ``folder`` up to the last byte."""
    try:
        with open(folder / "filler.bin", "wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError:
        pass
