"""The packaging command's output passes the model-zoo checks from a clean environment (ci/fresh_env_check.py).

The slow test packages every real bundle, installs ONE new virtual environment (no system site-packages, no
editable install of this repository) with only MONAI and the packages' pinned requirements, and runs
``ci/check_bundles.py`` on each package extracted from its zip: static checks, ``verify_net_in_out``,
TorchScript export and quick train / eval / infer with ``check_properties``. It skips only when the package
index cannot be reached; any other failure (a missing pin, a vendoring gap, a failed check) fails it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import load_ci_module

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]
fresh_env_check = load_ci_module("fresh_env_check")


def _meta(**reqs):
    return {"pytorch_version": "2.13.0", "monai_version": "1.6.1", "numpy_version": "2.4.6",
            "required_packages_version": reqs}


def test_pins_are_merged_and_conflicts_named():
    pins = fresh_env_check.merge_pins({"a": _meta(PyYAML="6.0.3", scipy="1.17.1"), "b": _meta(pyyaml="6.0.3", tqdm="4.70.1")})
    assert {k: v for k, (v, _) in pins.items()} == {
        "torch": "2.13.0", "monai": "1.6.1", "numpy": "2.4.6", "pyyaml": "6.0.3", "scipy": "1.17.1", "tqdm": "4.70.1"}
    with pytest.raises(fresh_env_check.SetupError) as err:
        fresh_env_check.merge_pins({"a": _meta(scipy="1.17.1"), "b": dict(_meta(scipy="1.16.0"), monai_version="1.5.0")})
    assert "monai: a pins 1.6.1, b pins 1.5.0" in str(err.value) and "scipy: a pins 1.17.1, b pins 1.16.0" in str(err.value)
    with pytest.raises(fresh_env_check.SetupError, match="a: configs/metadata.json has no numpy_version"):
        fresh_env_check.merge_pins({"a": {"pytorch_version": "2.13.0", "monai_version": "1.6.1"}})
    assert fresh_env_check.torch_requirement(pins, "2.13.0+cpu") == "torch==2.13.0+cpu"
    assert fresh_env_check.torch_requirement(pins, None) == "torch==2.13.0"
    with pytest.raises(fresh_env_check.SetupError, match="not a build of torch 2.13.0"):
        fresh_env_check.torch_requirement(pins, "2.12.1+cpu")


def test_network_errors_are_told_apart_from_missing_packages():
    assert fresh_env_check.NETWORK_ERRORS.search(
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(...)': /simple/monai/")
    assert not fresh_env_check.NETWORK_ERRORS.search(
        "ERROR: Could not find a version that satisfies the requirement npc-gtv==0.1.0 (from versions: none)")


def _tiny_with_pins(dest: Path, name: str, **pins) -> Path:
    bundle = load_ci_module("tiny_bundle").write_tiny_bundle(dest, name)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["required_packages_version"].update(pins)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return bundle


def _run_check(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "ci" / "fresh_env_check.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_conflicting_pins_stop_before_any_install(tmp_path):
    a = _tiny_with_pins(tmp_path / "src", "tiny_a", tqdm="4.70.1")
    b = _tiny_with_pins(tmp_path / "src", "tiny_b", tqdm="4.60.0")
    proc = _run_check(a, b, "--work", tmp_path / "work")
    assert proc.returncode == fresh_env_check.EXIT_SETUP_FAILED, proc.stdout + proc.stderr
    assert "tqdm: tiny_a pins 4.70.1, tiny_b pins 4.60.0" in proc.stderr
    assert not (tmp_path / "work" / "venv").exists()


@pytest.mark.timeout(900)
def test_a_pin_the_index_does_not_have_fails_naming_it(tmp_path):
    """pyyaml==0.0.0 does not exist: the install fails (exit 2, not the 'index unreachable' skip) and says why."""
    bundle = _tiny_with_pins(tmp_path / "src", "tiny_seg", pyyaml="0.0.0")
    proc = _run_check(bundle, "--skip-runs", "--work", tmp_path / "work", "--torch", metadata.version("torch"))
    if proc.returncode == fresh_env_check.EXIT_INDEX_UNREACHABLE:
        pytest.skip(f"package index unreachable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == fresh_env_check.EXIT_SETUP_FAILED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pip install into" in proc.stderr and "pyyaml==0.0.0" in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_packaged_bundles_pass_model_zoo_checks_in_a_fresh_environment(tmp_path):
    """All three packages, one fresh venv, every check including the quick runs (a few minutes)."""
    work, summary_file = tmp_path / "work", tmp_path / "summary.json"
    # the installed torch build (e.g. 2.13.0+cpu from a local wheel): the fresh install stays CPU-only and light
    cmd = [sys.executable, str(REPO / "ci" / "fresh_env_check.py"), *BUNDLES, "--work", str(work),
           "--summary", str(summary_file), "--torch", metadata.version("torch"), "--timeout", "1200"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2300, env=env)
        output = proc.stdout[-8000:] + proc.stderr[-4000:]
        if proc.returncode == fresh_env_check.EXIT_INDEX_UNREACHABLE:
            pytest.skip(f"package index unreachable, fresh environment not installed: {proc.stderr.strip()[-500:]}")
        assert proc.returncode == 0, f"fresh-environment check failed (exit {proc.returncode}):\n{output}"
        summary = json.loads(summary_file.read_text())
        frozen = (work / "freeze.txt").read_text().lower().splitlines()
    finally:
        shutil.rmtree(work / "venv", ignore_errors=True)  # ~1.5 GB; pytest keeps recent tmp_paths
    assert summary["passed"] and sorted(summary["bundles"]) == sorted(BUNDLES)
    # the environment held the pinned CPU torch and MONAI, and not this project
    assert f"torch=={metadata.version('torch')}" in frozen and "monai==1.6.1" in frozen
    assert not any(line.startswith(("npc-gtv", "npc_gtv")) for line in frozen), frozen
    for name, res in summary["bundles"].items():
        statuses = res["checks"]
        assert all(s == "ok" for s in statuses.values()), (name, statuses)
        assert {"files", "metadata", "version", "data_format", "requirements", "net_in_out", "torchscript",
                "train", "eval", "infer"} <= set(statuses), (name, statuses)
        for r in res["results"]:  # every run imported the shared code from the package's own _vendor copy
            if r["check"] in ("train", "eval", "infer") or r["check"].startswith("train_extra"):
                assert f"{name}/scripts/_vendor/npc_gtv/__init__.py" in r["message"], (name, r)
                assert str(REPO) not in r["message"], (name, r)
