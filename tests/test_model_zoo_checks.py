"""Model-zoo style checks (ci/check_bundles.py): the rules on hand-made metadata, then every real bundle."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import load_ci_module

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "ci"




check_bundles = load_ci_module("check_bundles")
tiny_bundle = load_ci_module("tiny_bundle")
BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]


@pytest.fixture()
def meta():
    return tiny_bundle.metadata()


def test_schema_copy_names_its_source_and_required_fields():
    schema = json.loads((CI / "meta_schema_20240725_required.json").read_text())
    assert schema["x-source-schema"] == "meta_schema_20240725.json"
    assert schema["required"] == [
        "schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
        "task", "description", "authors", "copyright", "network_data_format",
    ]
    assert schema["$defs"]["tensor"]["required"] == ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


def test_valid_metadata_passes_every_static_rule(meta):
    assert check_bundles.check_metadata_schema(meta) == []
    assert check_bundles.check_version(meta) == []
    assert check_bundles.check_data_format(meta) == []


def test_metadata_schema_violations_are_named(meta):
    bad = copy.deepcopy(meta)
    del bad["copyright"]
    bad["monai_version"] = 1.6
    bad["network_data_format"]["inputs"]["image"].pop("value_range")
    errors = check_bundles.check_metadata_schema(bad)
    assert any("'copyright' is a required property" in e for e in errors)
    assert any(e.startswith("monai_version:") and "not of type 'string'" in e for e in errors)
    assert any("network_data_format/inputs/image" in e for e in errors)
    bad = copy.deepcopy(meta)
    bad["schema"] = "https://example.org/whatever.json"
    assert any("meta_schema_YYYYMMDD" in e for e in check_bundles.check_metadata_schema(bad))


def test_version_changelog_rules(meta):
    bad = copy.deepcopy(meta)
    bad["version"] = "0.2.0"
    assert check_bundles.check_version(bad) == [
        "version '0.2.0' has no changelog entry (changelog has ['0.1.1', '0.1.0'])",
        "version 0.2.0 is not the newest changelog entry (0.1.1)",
    ]
    bad = copy.deepcopy(meta)
    bad["version"] = "0.1.0"
    assert check_bundles.check_version(bad) == ["version 0.1.0 is not the newest changelog entry (0.1.1)"]
    bad["version"] = "v1"
    assert "version 'v1' is not of the form X.Y.Z" in check_bundles.check_version(bad)


def test_data_format_needs_image_in_and_pred_out(meta):
    bad = copy.deepcopy(meta)
    bad["network_data_format"]["outputs"] = {"seg": bad["network_data_format"]["outputs"]["pred"]}
    bad["network_data_format"]["inputs"]["image"]["spatial_shape"] = [32]
    errors = check_bundles.check_data_format(bad)
    assert errors == [
        "network_data_format.inputs.image.spatial_shape should have 2 or 3 entries, got [32]",
        "network_data_format.outputs has no 'pred' entry (has ['seg'])",
    ]


def test_required_packages_follow_the_imports(tmp_path):
    bundle = tiny_bundle.write_tiny_bundle(tmp_path)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert check_bundles.check_requirements(bundle, meta, REPO)[0] == []
    # scripts start importing skimage; the metadata does not list scikit-image
    (bundle / "scripts" / "extra.py").write_text("import skimage.morphology\n")
    errors, _ = check_bundles.check_requirements(bundle, meta, REPO)
    assert errors == ["imports 'skimage' (scripts/extra.py) but required_packages_version does not list 'scikit-image'"]
    # an ImportError-guarded import is optional and not required
    (bundle / "scripts" / "extra.py").write_text("try:\n    import skimage\nexcept ImportError:\n    skimage = None\n")
    assert check_bundles.check_requirements(bundle, meta, REPO)[0] == []
    # a listed package that is not installed
    meta["required_packages_version"]["no-such-package-xyz"] = "1.0"
    assert "required package no-such-package-xyz==1.0 is not installed" in check_bundles.check_requirements(bundle, meta, REPO)[0]


def test_required_files(tmp_path):
    bundle = tiny_bundle.write_tiny_bundle(tmp_path)
    assert check_bundles.check_files(bundle) == []
    (bundle / "LICENSE").unlink()
    (bundle / "configs" / "quick.yaml").unlink()
    assert check_bundles.check_files(bundle) == ["configs/quick.yaml", "LICENSE"]


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_passes_model_zoo_checks(name, tmp_path):
    """The full check (static + verify_net_in_out + TorchScript + quick train/eval/infer) on a real bundle.

    ``NPC_GTV_ZOO_RUNS=0`` leaves out the train/eval/infer runs (about 2-3 CPU minutes per bundle; the
    bundles' own tests run the same configs through ``monai.bundle run``).
    """
    bundle = REPO / "bundles" / name
    if not bundle.is_dir():
        pytest.skip(f"bundles/{name} does not exist yet")
    runs = os.environ.get("NPC_GTV_ZOO_RUNS", "1") != "0"
    logs = []
    results = check_bundles.check_bundle(bundle, quick=True, runs=runs, work_dir=tmp_path / "work",
                                         data_dir=tmp_path / "data", timeout=1200, log=logs.append)
    failed = [r for r in results if r.status == "fail"]
    assert not failed, "\n".join(map(repr, failed))
    checks = {r.check: r.status for r in results}
    expected = {"files", "metadata", "version", "data_format", "requirements", "net_in_out", "torchscript"}
    assert expected | ({"train", "eval", "infer"} if runs else set()) <= set(checks)
    assert all(s == "ok" for c, s in checks.items() if c != "torchscript")
