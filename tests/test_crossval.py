"""Cross-validation in one command (npc_gtv.crossval and the bundles' configs/cross_validation.yaml)."""

from __future__ import annotations

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLES_DIR, run_bundle
from npc_gtv.crossval import cross_validate, read_summary, summarize_folds
from shared_transforms.io import InputError


def _summary(dsc, hd95=None):
    metrics = {"dsc": {"mean": dsc}}
    if hd95 is not None:
        metrics["hd95"] = {"mean": hd95}
    return {"metrics": metrics}


def test_summarize_folds_hand_computed():
    s = summarize_folds({1: _summary(0.6, 10.0), 0: _summary(0.8, 4.0), 2: _summary(0.7)}, ensemble=_summary(0.75, 5.0))
    assert list(s["folds"]) == [0, 1, 2] and s["folds"][2] == {"dsc": 0.7}
    assert s["over_folds"]["dsc"]["mean"] == pytest.approx(0.7) and s["over_folds"]["dsc"]["n"] == 3
    assert s["over_folds"]["dsc"]["std"] == pytest.approx(0.1)  # sample sd of 0.6, 0.7, 0.8
    assert s["over_folds"]["hd95"] == {"mean": 7.0, "std": pytest.approx(math.sqrt(18)), "n": 2}
    assert s["ensemble"] == {"dsc": 0.75, "hd95": 5.0}
    assert summarize_folds({0: _summary(0.5)})["over_folds"]["dsc"]["std"] is None
    with pytest.raises(ValueError, match="at least one"):
        summarize_folds({})


class _Recorder:
    """Stands in for monai.bundle.run: records each call and writes the report an evaluation would."""

    def __init__(self, dsc_of_fold, report_of):
        self.calls, self.dsc_of_fold, self.report_of = [], dsc_of_fold, report_of

    def __call__(self, run_id, config_file, **overrides):
        self.calls.append((run_id, list(config_file), dict(overrides)))
        if run_id == "evaluating":
            out = self.report_of(overrides)
            os.makedirs(out, exist_ok=True)
            dsc = 0.9 if "ensemble_folds" in overrides else self.dsc_of_fold[overrides["fold"]]
            with open(os.path.join(out, "summary.json"), "w") as fh:
                json.dump(_summary(dsc), fh)


def test_cross_validate_fold_dirs_layout_resume_and_overwrite(tmp_path):
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    rec = _Recorder({0: 0.5, 1: 0.7}, lambda o: o["output_dir"])
    args = dict(train_configs=["t.yaml", "q.yaml"], evaluate_configs=["i.yaml", "e.yaml"], folds=[0, 1], ckpt_root=ckpt,
                output_root=out, overrides={"dataset_dir": "/data", "intensity_fingerprint": "/fp.json"},
                ensemble_configs=["i.yaml", "f.yaml", "e.yaml"], runner=rec)
    result = cross_validate(**args)
    ids = [(c[0], c[2].get("fold"), c[2]["ckpt_dir"], c[2]["output_dir"]) for c in rec.calls]
    assert ids == [
        ("training", 0, str(ckpt / "fold0"), str(out / "fold0")),
        ("evaluating", 0, str(ckpt / "fold0"), str(out / "fold0" / "test")),
        ("training", 1, str(ckpt / "fold1"), str(out / "fold1")),
        ("evaluating", 1, str(ckpt / "fold1"), str(out / "fold1" / "test")),
        ("evaluating", None, str(ckpt), str(out / "ensemble")),
    ]
    assert all(c[2]["dataset_dir"] == "/data" and c[2]["intensity_fingerprint"] == "/fp.json" for c in rec.calls)
    assert rec.calls[0][1] == ["t.yaml", "q.yaml"] and rec.calls[-1][1] == ["i.yaml", "f.yaml", "e.yaml"]
    assert rec.calls[-1][2]["ensemble_folds"] == [0, 1]
    assert result["over_folds"]["dsc"]["mean"] == pytest.approx(0.6) and result["ensemble"]["dsc"] == 0.9
    assert json.loads((out / "cross_validation.json").read_text())["folds"] == {"0": {"dsc": 0.5}, "1": {"dsc": 0.7}}
    # rerun: the trainings run again (they resume and return at once), the reports are kept
    rec.calls.clear()
    cross_validate(**args)
    assert [c[0] for c in rec.calls] == ["training", "training"]
    rec.calls.clear()
    cross_validate(**args, overwrite=True)
    assert [c[0] for c in rec.calls].count("evaluating") == 3 and all(c[2]["overwrite"] for c in rec.calls if c[0] == "evaluating")


def test_cross_validate_bundle_layout_and_bad_arguments(tmp_path):
    out = tmp_path / "eval"
    rec = _Recorder({2: 0.4, 5: 0.6}, lambda o: os.path.join(o["output_dir"], f"fold{o['fold']}"))
    result = cross_validate(["t.yaml"], ["e.yaml"], [2, 5], tmp_path / "m", out, layout="bundle", runner=rec)
    assert {(c[2]["ckpt_dir"], c[2]["output_dir"]) for c in rec.calls} == {(str(tmp_path / "m"), str(out))}
    assert result["folds"] == {2: {"dsc": 0.4}, 5: {"dsc": 0.6}} and result["ensemble"] is None
    with pytest.raises(ValueError, match="layout"):
        cross_validate(["t.yaml"], ["e.yaml"], [0], tmp_path, out, layout="nested", runner=rec)
    with pytest.raises(ValueError, match="distinct"):
        cross_validate(["t.yaml"], ["e.yaml"], [0, 0], tmp_path, out, runner=rec)
    with pytest.raises(ValueError, match="at least one fold"):
        cross_validate(["t.yaml"], ["e.yaml"], [], tmp_path, out, runner=rec)
    # an evaluation that writes no report: a one-line error naming the file
    with pytest.raises(InputError, match="summary.json"):
        cross_validate(["t.yaml"], ["e.yaml"], [0], tmp_path / "m2", tmp_path / "e2", runner=lambda **kw: None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not an evaluation summary"):
        read_summary(tmp_path / "bad")


@pytest.mark.parametrize("bundle,layout", [("hcf_sanet", "fold_dirs"), ("unet25d_ssl", "bundle")])
def test_cross_validation_config_wiring(bundle, layout, tmp_path):
    """The configs the fold runs get exist and carry the override configs; the fold runs get the data set."""
    cfg = BUNDLES_DIR / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / c) for c in ("train.yaml", "cross_validation.yaml", "quick.yaml")])
    parser["bundle_root"] = str(BUNDLES_DIR / bundle)
    parser["dataset_dir"] = str(tmp_path / "data")
    parser.parse()
    assert parser.get_parsed_content("cross_validation#layout") == layout
    trains = parser.get_parsed_content("cross_validation#train_configs")
    evals = parser.get_parsed_content("cross_validation#evaluate_configs")
    for files in (trains, evals):
        assert all(os.path.isfile(f) for f in files) and files[-1].endswith("quick.yaml")
    assert trains[0].endswith("train.yaml")
    overrides = parser.get_parsed_content("cross_validation#overrides")
    assert overrides["dataset_dir"] == str(tmp_path / "data") and overrides["dataset_size"] == "small"
    assert parser.get_parsed_content("cross_validation#folds") == list(range(parser.get_parsed_content("num_folds")))
    if bundle == "hcf_sanet":
        ens = parser.get_parsed_content("cross_validation#ensemble_configs")
        assert [os.path.basename(f) for f in ens] == ["inference.yaml", "fold_ensemble.yaml", "evaluate.yaml", "quick.yaml"]
        assert overrides["intensity_fingerprint"] == parser.get_parsed_content("ckpt_dir") + "/intensity_fingerprint.json"
    else:
        assert overrides["val_fraction"] == 0.0  # the paper's final fold models: training + validation cases


def test_hcf_cross_validation_end_to_end(small_ct_dataset, tmp_path):
    """`run cross_validation` (quick, two folds): fold models, their test reports, the fold ensemble
    (majority vote of the two folds = both agree, then the largest component) and the summary."""
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    run_bundle("hcf_sanet", "cross_validation", ["train.yaml", "cross_validation.yaml", "quick.yaml"],
               {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(ckpt), "output_dir": str(out)},
               env={"OMP_NUM_THREADS": "1"})
    for k in (0, 1):
        assert (ckpt / f"fold{k}" / "model.pt").is_file() and (ckpt / f"fold{k}" / "classifier.pt").is_file()
    result = json.loads((out / "cross_validation.json").read_text())
    for k in (0, 1):
        fold = read_summary(out / f"fold{k}" / "test")
        assert result["folds"][str(k)]["dsc"] == pytest.approx(fold["metrics"]["dsc"]["mean"])
    dscs = [result["folds"][str(k)]["dsc"] for k in (0, 1)]
    assert result["over_folds"]["dsc"]["mean"] == pytest.approx(np.mean(dscs))
    assert result["over_folds"]["dsc"]["std"] == pytest.approx(np.std(dscs, ddof=1))
    ensemble = read_summary(out / "ensemble")
    assert result["ensemble"]["dsc"] == pytest.approx(ensemble["metrics"]["dsc"]["mean"])
    test_ids = sorted(p.name[: -len("_seg.nii.gz")] for p in (out / "ensemble" / "predictions").glob("*_seg.nii.gz"))
    assert test_ids and test_ids == sorted(p.name[: -len("_seg.nii.gz")] for p in (out / "fold0" / "test" / "predictions").glob("*_seg.nii.gz"))
    for case in test_ids:
        ens = np.asarray(nib.load(out / "ensemble" / "predictions" / f"{case}_seg.nii.gz").dataobj)
        both = np.logical_and(*[np.asarray(nib.load(out / f"fold{k}" / "test" / "predictions" / f"{case}_seg.nii.gz").dataobj) > 0 for k in (0, 1)])
        assert not np.any(ens.astype(bool) & ~both)  # the ensemble never labels what a fold did not
    # rerun: every fold resumes at its end, nothing is re-evaluated, the summary is the same
    run_bundle("hcf_sanet", "cross_validation", ["train.yaml", "cross_validation.yaml", "quick.yaml"],
               {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(ckpt), "output_dir": str(out)},
               env={"OMP_NUM_THREADS": "1"})
    assert json.loads((out / "cross_validation.json").read_text())["folds"] == result["folds"]


def test_unet25d_cross_validation_end_to_end(small_ct_dataset, tmp_path):
    """`run cross_validation` (quick, two folds, one scale): each fold's final model is trained on all
    of its non-test cases (no validation split) and tested on its own held-out fold."""
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    proc = run_bundle("unet25d_ssl", "cross_validation", ["train.yaml", "cross_validation.yaml", "quick.yaml"],
                      {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(ckpt), "output_dir": str(out), "num_folds": 2,
                       "scales": "['medium']"}, env={"OMP_NUM_THREADS": "1"})
    assert (proc.stdout + proc.stderr).count("the validation list is empty") == 2  # both folds: training + validation cases
    result = json.loads((out / "cross_validation.json").read_text())
    tested = []
    for k in (0, 1):
        assert (ckpt / f"fold{k}" / "model.pt").is_file()
        report = read_summary(out / f"fold{k}")
        assert result["folds"][str(k)]["dsc"] == pytest.approx(report["metrics"]["dsc"]["mean"])
        datalist = json.loads(next(ckpt.glob(f"datalist_fold{k}of2_*.json")).read_text())
        test_ids = {d["case_id"] for d in datalist["test"]}
        train_ids = {d["case_id"] for d in datalist["training"]}
        assert test_ids and not test_ids & train_ids and report["n_cases"] == len(test_ids)
        tested.append(test_ids)
    assert not tested[0] & tested[1] and len(tested[0] | tested[1]) == 6  # every case tested once
    assert result["over_folds"]["dsc"]["n"] == 2 and result["ensemble"] is None
