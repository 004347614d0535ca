"""``npc-gtv package``: vendored copy equals the source, layout, zip, and the package works with the repo hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import load_ci_module

from npc_gtv import packaging

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "ci"
BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]


@pytest.fixture()
def tiny(tmp_path):
    bundle = load_ci_module("tiny_bundle").write_tiny_bundle(tmp_path / "src")
    # a package __init__ that imports its modules (which import shared code) at once
    (bundle / "scripts" / "__init__.py").write_text('"""Tiny."""\n\nfrom __future__ import annotations\n\nfrom . import net  # noqa\n')
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (bundle / "models" / "checkpoint_last.pt").write_bytes(b"training state")
    (bundle / "models" / ".checkpoint_last.pt.abc.pt").write_bytes(b"stale temp")
    (bundle / "scripts" / "__pycache__").mkdir()
    (bundle / "scripts" / "__pycache__" / "net.cpython-311.pyc").write_bytes(b"x")
    return bundle


def test_package_layout_vendoring_and_zip(tiny, tmp_path, capsys):
    packaging.package_command(str(tiny), out=str(tmp_path / "dist"))
    printed = capsys.readouterr().out
    assert "vendored copy verified identical to the source" in printed
    pkg = tmp_path / "dist" / "tiny_seg"
    manifest = json.loads((pkg / "scripts" / "_vendor" / "VENDORED.json").read_text())
    # exactly what the configs/scripts need, transitively; unrelated shared code stays out
    for needed in ("npc_gtv", "npc_gtv.phantoms", "npc_gtv.training", "shared_transforms", "shared_transforms.io",
                   "shared_transforms.intensity"):
        assert needed in manifest["modules"]
    for unrelated in ("npc_gtv.packaging", "npc_gtv.cli", "shared_transforms.symmetry", "shared_transforms.flip"):
        assert unrelated not in manifest["modules"]
    for rel in manifest["files"]:  # byte-for-byte copies
        assert (pkg / "scripts" / "_vendor" / rel).read_bytes() == (REPO / rel).read_bytes()
    assert packaging.verify_vendored(pkg) == []
    # training state and caches are not shipped; final weights are
    assert (pkg / "models" / "model.pt").read_bytes() == b"weights"
    assert not (pkg / "models" / "checkpoint_last.pt").exists()
    assert not list(pkg.rglob("*.pyc")) and not list(pkg.rglob(".checkpoint_last*"))
    # configs: only "$import scripts" added, first in the imports list
    src_lines = (tiny / "configs" / "train.yaml").read_text().splitlines()
    pkg_lines = (pkg / "configs" / "train.yaml").read_text().splitlines()
    assert pkg_lines[:2] == ["imports:", "  - $import scripts"] and pkg_lines[2:] == src_lines[1:]
    assert (pkg / "configs" / "quick.yaml").read_text() == (tiny / "configs" / "quick.yaml").read_text()
    assert (pkg / "scripts" / "net.py").read_bytes() == (tiny / "scripts" / "net.py").read_bytes()
    init = (pkg / "scripts" / "__init__.py").read_text()  # vendoring block first, then the package's own imports
    assert init.startswith('"""Tiny."""\n\nfrom __future__ import annotations\n')
    assert init.index(packaging.BOOTSTRAP_MARK) < init.index("from . import net")
    with zipfile.ZipFile(tmp_path / "dist" / "tiny_seg.zip") as zf:
        names = set(zf.namelist())
    assert "tiny_seg/configs/metadata.json" in names and "tiny_seg/scripts/_vendor/npc_gtv/training.py" in names
    assert len(names) == sum(1 for p in pkg.rglob("*") if p.is_file())


def test_tampered_vendored_copy_is_detected_and_outputs_protected(tiny, tmp_path):
    result = packaging.package_bundle(tiny, tmp_path / "dist")
    copy = result["folder"] / "scripts" / "_vendor" / "npc_gtv" / "training.py"
    copy.write_text(copy.read_text() + "\n# edited by hand\n")
    assert packaging.verify_vendored(result["folder"]) == ["npc_gtv/training.py: differs from the source"]
    with pytest.raises(ValueError, match="already exists"):
        packaging.package_bundle(tiny, tmp_path / "dist")
    again = packaging.package_bundle(tiny, tmp_path / "dist", overwrite=True)
    assert packaging.verify_vendored(again["folder"]) == []
    foreign = tmp_path / "other" / "tiny_seg"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not made by"):
        packaging.package_bundle(tiny, tmp_path / "other", overwrite=True)
    assert (foreign / "precious.txt").exists()
    with pytest.raises(ValueError, match="not found"):
        packaging.package_bundle(tmp_path / "nope", tmp_path / "dist")


def test_scripts_import_is_put_first_even_when_the_config_imports_scripts_later(tmp_path):
    """A later "$import scripts" (after "$import npc_gtv") is too late for the vendored path: one goes first."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text("# comment\nimports:\n  # the modules\n  - $import npc_gtv\n  - $import scripts\nrun:\n  - \"$import scripts\"\n")
    assert packaging._prepend_scripts_import(cfg)
    assert cfg.read_text().splitlines()[1:5] == ["imports:", "  - $import scripts", "  # the modules", "  - $import npc_gtv"]
    assert not packaging._prepend_scripts_import(cfg)  # already first: unchanged
    flow = tmp_path / "flow.yaml"
    flow.write_text('imports: ["$import npc_gtv", "$import scripts"]\n')
    assert packaging._prepend_scripts_import(flow) and not packaging._prepend_scripts_import(flow)
    assert flow.read_text() == 'imports: ["$import scripts", "$import npc_gtv", "$import scripts"]\n'
    js = tmp_path / "train.json"
    js.write_text(json.dumps({"imports": ["$import npc_gtv", "$import scripts"]}))
    assert packaging._prepend_scripts_import(js) and not packaging._prepend_scripts_import(js)
    assert json.loads(js.read_text())["imports"] == ["$import scripts", "$import npc_gtv", "$import scripts"]


def test_package_metadata_drops_the_vendored_project_requirement(tiny, tmp_path):
    """Inside the repository a bundle may list npc-gtv; its package vendors that code and must not ask pip for it."""
    meta_path = tiny / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["required_packages_version"]["npc_gtv"] = "0.1.0"  # any spelling of the distribution name
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    result = packaging.package_bundle(tiny, tmp_path / "dist")
    assert result["dropped_requirements"] == {"npc_gtv": "0.1.0"}
    packaged = json.loads((result["folder"] / "configs" / "metadata.json").read_text())
    del meta["required_packages_version"]["npc_gtv"]
    assert packaged == meta
    manifest = json.loads((result["folder"] / "scripts" / "_vendor" / "VENDORED.json").read_text())
    assert manifest["distribution"] == "npc-gtv" and manifest["dropped_requirements"] == {"npc_gtv": "0.1.0"}
    # the zoo check refuses a package that still lists it
    check_bundles = load_ci_module("check_bundles")
    packaged["required_packages_version"]["npc-gtv"] = "0.1.0"
    errors, _ = check_bundles.check_requirements(result["folder"], packaged, None)
    assert errors == ["lists 'npc-gtv', whose code this package vendors in scripts/_vendor; a package must not require it "
                      "(it is on no package index, so installing the requirements would fail)"]


HIDDEN_IMPORT = r"""
import json, os, sys
sys.path.insert(0, {ci!r})
import bundle_deps
bundle_deps.hide_installed_project()
sys.path.pop(0)
try:
    import npc_gtv
    raise SystemExit("repository still importable")
except ImportError:
    pass
bundle = {bundle!r}
sys.path.insert(0, bundle)
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config([os.path.join(bundle, "configs", c) for c in {configs!r}])
parser["bundle_root"] = bundle
for i, entry in enumerate(parser["imports"]):
    # MONAI turns a failed "$import x" into a stand-in that raises only when used: catch it here
    if type(parser.get_parsed_content(f"imports#{{i}}")).__name__ in ("_LazyRaise", "_LazyCls"):
        raise SystemExit(f"imports#{{i}} {{entry!r}} failed to import (the vendored code was not on sys.path yet)")
net = parser.get_parsed_content("network_def")
files = {{}}
for mod in json.load(open(os.path.join(bundle, "scripts/_vendor/VENDORED.json")))["modules"]:
    files[mod] = __import__(mod, fromlist=["_"]).__file__
print("NET", type(net).__name__, sum(p.numel() for p in net.parameters()))
print("FILES", json.dumps(files))
"""


def _run_hidden(bundle: Path, configs: list[str]):
    code = HIDDEN_IMPORT.format(ci=str(CI), bundle=str(bundle), configs=configs)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(bundle), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("FILES "))[6:])
    assert files and all(str(bundle / "scripts" / "_vendor") in f for f in files.values()), files
    return next(line for line in proc.stdout.splitlines() if line.startswith("NET "))


def test_tiny_package_imports_with_repository_hidden(tiny, tmp_path):
    pkg = packaging.package_bundle(tiny, tmp_path / "dist")["folder"]
    assert _run_hidden(pkg, ["train.yaml", "quick.yaml"]) == "NET TinySegNet 221"  # 1*4*27+4 + 4*27+1


@pytest.mark.parametrize("name", BUNDLES)
def test_real_bundle_package_vendors_and_imports_without_repository(name, tmp_path):
    bundle = REPO / "bundles" / name
    if not (bundle / "configs" / "metadata.json").is_file():
        pytest.skip(f"bundles/{name} has no configs/metadata.json yet")
    result = packaging.package_bundle(bundle, tmp_path / "dist", make_zip=False)
    assert packaging.verify_vendored(result["folder"]) == []
    source_meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    packaged_meta = json.loads((result["folder"] / "configs" / "metadata.json").read_text())
    source_meta["required_packages_version"].pop("npc-gtv", None)
    assert packaged_meta == source_meta  # only the project's own (vendored) distribution is dropped
    assert "npc_gtv.training" in result["vendored"]
    configs = ["train.yaml"] + (["quick.yaml"] if (bundle / "configs" / "quick.yaml").is_file() else [])
    assert _run_hidden(result["folder"], configs).startswith("NET ")


@pytest.mark.slow
def test_packaged_tiny_bundle_passes_model_zoo_checks_with_repository_hidden(tiny, tmp_path):
    """The package alone (repo code hidden) passes every ci/check_bundles.py check, quick train/eval/infer included."""
    check_bundles = load_ci_module("check_bundles")
    pkg = packaging.package_bundle(tiny, tmp_path / "dist")["folder"]
    results = check_bundles.check_bundle(pkg, work_dir=tmp_path / "work", data_dir=tmp_path / "data", hide_repo=True,
                                         timeout=900, log=lambda r: None)
    assert [r.check for r in results if r.status != "ok"] == [], [r for r in results if r.status != "ok"]
    train = next(r for r in results if r.check == "train")
    assert str(pkg / "scripts" / "_vendor" / "npc_gtv") in train.message
