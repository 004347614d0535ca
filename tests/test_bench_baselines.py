"""bench/baselines.py: budgets, the results file, the nnU-Net raw conversion and a tiny MONAI UNet run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _baselines():
    if "baselines" in sys.modules:
        return sys.modules["baselines"]
    spec = importlib.util.spec_from_file_location("baselines", REPO_ROOT / "bench" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["baselines"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from npc_gtv.phantoms import generate_dataset

    d = tmp_path_factory.mktemp("tiny_set")
    generate_dataset(d, cases=4, seed=3, modality="ct", size="small")
    return d


def test_parse_budgets_and_epoch_length():
    b = _baselines()
    assert b.parse_budgets("500, 250,1000,250") == [250, 500, 1000]
    assert b.parse_budgets([10, 5]) == [5, 10]
    for bad in ("", "0,10", "ten"):
        with pytest.raises(ValueError):
            b.parse_budgets(bad)
    assert b.default_iterations_per_epoch([250, 500, 1000, 2000]) == 250
    assert b.default_iterations_per_epoch([500, 1000]) == 250  # capped at nnU-Net's epoch length
    assert b.default_iterations_per_epoch([5, 10]) == 5
    assert b.default_iterations_per_epoch([300, 600]) == 150  # largest divisor of 300 up to 250


def test_result_rows_are_merged(tmp_path):
    b = _baselines()
    row = {"method": "m", "seed": 0, "iterations": 10, "dsc_mean": 0.1}
    b.write_result_row(tmp_path, row)
    b.write_result_row(tmp_path, {**row, "seed": 1})
    b.write_result_row(tmp_path, {**row, "dsc_mean": 0.2})  # replaces seed 0 at 10 iterations
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["seed"], r["dsc_mean"]) for r in rows] == [(0, 0.2), (1, 0.1)]
    assert b.read_results(tmp_path / "missing") == []


def test_nnunet_raw_conversion(tiny_set, tmp_path):
    b = _baselines()
    ds, train, test = b.load_split(tiny_set)
    root = b.convert_to_nnunet_raw(ds, train, test, tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    assert root.name == "Dataset501_NPCPhantom"
    assert meta["channel_names"] == {"0": "CT"} and meta["labels"] == {"background": 0, "GTVp": 1}
    assert meta["numTraining"] == len(train) == 3 and meta["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [f"{c['case_id']}_0000.nii.gz" for c in train]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [f"{c['case_id']}.nii.gz" for c in train]
    assert (root / "imagesTs" / f"{test[0]['case_id']}_0000.nii.gz").read_bytes() == Path(test[0]["image"]).read_bytes()
    b.convert_to_nnunet_raw(ds, train, test, tmp_path)  # same data set again: fine
    with pytest.raises(ValueError, match="another data set"):
        b.convert_to_nnunet_raw(ds, train[:2], test, tmp_path)


def test_monai_unet_tiny_run(tiny_set, tmp_path):
    b = _baselines()
    rows = b.run_monai_unet(tiny_set, tmp_path, budgets=[2, 1], seed=0, threads=1, log_every=0)
    assert [r["iterations"] for r in rows] == [1, 2]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["iterations"] for r in saved] == [1, 2]
    for r in saved:
        assert r["method"] == "monai_unet" and r["seed"] == 0 and r["patches_per_iter"] == 2
        assert 0.0 <= r["dsc_mean"] <= 1.0 and r["hd95_mean"] > 0 and r["train_wall_s"] > 0
        assert list(r["dsc_per_case"]) == ["npc_003"]
        assert r["dsc_mean"] == pytest.approx(np.mean(list(r["dsc_per_case"].values())))
    pred = nib.load(str(tmp_path / "monai_unet_seed0" / "iter_2" / "pred" / "npc_003.nii.gz"))
    image = nib.load(str(tiny_set / "imagesTs" / "npc_003.nii.gz"))
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
