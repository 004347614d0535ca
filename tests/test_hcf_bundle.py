"""HCF / SANet bundle workflows on small phantoms, run as users run them (subprocesses, quick mode).

Order inside the module: classifier training (from the repository root), SANet training (from the
bundle folder, ConfigWorkflow + check_properties, MLflow tracking), cascade inference
(ConfigWorkflow), evaluation (``python -m monai.bundle run evaluating``), net in/out + TorchScript
export, and a 2-process DDP training on CPU (gloo).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES_DIR, REPO_ROOT, bundle_scripts, run_bundle

BUNDLE = "hcf_sanet"
BUNDLE_DIR = BUNDLES_DIR / BUNDLE
CFG = BUNDLE_DIR / "configs"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

WORKFLOW_SCRIPT = r"""
import json, sys
from monai.bundle import ConfigWorkflow
a = json.loads(sys.argv[1])
wf = ConfigWorkflow(config_file=a["config"], meta_file=a["meta"], logging_file=a["logging"],
                    workflow_type=a["type"], tracking=a.get("tracking"), **a["overrides"])
wf.initialize()
missing = wf.check_properties()
print("MISSING_PROPERTIES", json.dumps(missing))
if missing:
    raise SystemExit(f"missing properties: {missing}")
wf.run()
wf.finalize()
"""


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed:\n{out[-8000:]}")
    return out


def _config_workflow(configs, workflow_type, overrides, tracking=None):
    args = {
        "config": [str(CFG / c) for c in configs],
        "meta": str(CFG / "metadata.json"),
        "logging": str(CFG / "logging.conf"),
        "type": workflow_type,
        "overrides": overrides,
        "tracking": tracking,
    }
    proc = subprocess.run([sys.executable, "-c", WORKFLOW_SCRIPT, json.dumps(args)], cwd=str(BUNDLE_DIR), capture_output=True, text=True, timeout=900, env=ENV)
    out = _check(proc, f"ConfigWorkflow {workflow_type} {configs}")
    assert "MISSING_PROPERTIES null" in out or "MISSING_PROPERTIES []" in out
    return out


@pytest.fixture(scope="module")
def trained(small_ct_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("hcf_bundle")
    common = {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval")}
    # 1) slice classifier, launched from the repository root (config paths relative to it)
    rel = [f"bundles/{BUNDLE}/configs/{c}" for c in ("train.yaml", "train_classifier.yaml", "quick.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(rel),
           "--meta_file", f"bundles/{BUNDLE}/configs/metadata.json", "--logging_file", f"bundles/{BUNDLE}/configs/logging.conf"]
    for k, v in common.items():
        cmd += [f"--{k}", v]
    log_cls = _check(subprocess.run(cmd, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=900, env=ENV), "classifier training")
    # 2) SANet from the bundle folder, through ConfigWorkflow with check_properties and MLflow
    log_seg = _config_workflow(["train.yaml", "quick.yaml"], "train", common, tracking="mlflow")
    return {"work": work, "common": common, "log_cls": log_cls, "log_seg": log_seg, "data": small_ct_dataset}


def test_trainings_write_cpu_weights_and_resumable_state(trained):
    nets = bundle_scripts(BUNDLE, "networks")
    ckpt = trained["work"] / "models"
    cls_state = torch.load(ckpt / "classifier.pt", weights_only=True)
    seg_state = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in list(cls_state.values()) + list(seg_state.values()))
    nets.slice_classifier().load_state_dict(cls_state)  # strict: the right architectures
    nets.SANet().load_state_dict(seg_state)
    for sub in ("classifier_train", "sanet_train"):
        last = torch.load(ckpt / sub / "checkpoint_last.pt", weights_only=True)
        assert {"model", "optimizer", "lr_scheduler", "best_keeper"} <= set(last)
        assert last["best_keeper"]["best_epoch"] == 1
    # balance sampling was used: both trainings drew every tumour slice and 4 normal slices per tumour slice
    # (theta_4, or all normal slices when there are fewer), read from the sampler's own log line
    for log in (trained["log_cls"], trained["log_seg"]):
        draws = re.findall(r"balance sampling \(ratio (\w+)\): epoch \d+ draws (\d+) tumour \+ (\d+) normal slices of (\d+) "
                           r"\((\d+) \+ (\d+) available\)", log)
        assert draws, log[-3000:]
        for ratio, pos, neg, total, avail_pos, avail_neg in draws:
            pos, neg, total, avail_pos, avail_neg = map(int, (pos, neg, total, avail_pos, avail_neg))
            assert ratio == "4" and pos == avail_pos > 0 and neg == min(avail_neg, 4 * avail_pos) and pos + neg == total
    assert (trained["work"] / "eval" / "tensorboard_classifier").is_dir()
    assert (trained["work"] / "eval" / "tensorboard_sanet").is_dir()
    # MLflow (MONAI's default tracking settings: sqlite store under output_dir) recorded the run
    db = trained["work"] / "eval" / "mlruns.db"
    assert db.is_file()
    with sqlite3.connect(str(db)) as con:
        assert con.execute("select count(*) from runs").fetchone()[0] >= 1
        assert con.execute("select count(*) from metrics where key = 'train_loss'").fetchone()[0] >= 1


def test_cascade_inference_on_original_grid(trained):
    out_dir = trained["work"] / "infer"
    overrides = dict(trained["common"], output_dir=str(out_dir))
    log = _config_workflow(["inference.yaml", "quick.yaml"], "infer", overrides)
    assert "slices segmented" in log
    test_cases = json.loads((trained["data"] / "dataset.json").read_text())["test"]
    for case in test_cases:
        pred_path = out_dir / "predictions" / f"{case['case_id']}_seg.nii.gz"
        assert pred_path.is_file()
        pred, img = nib.load(str(pred_path)), nib.load(str(trained["data"] / case["image"]))
        assert pred.shape == img.shape
        assert np.abs(pred.affine - img.affine).max() < 1e-3
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}


def test_evaluation_report_and_slice_recall(trained):
    out_dir = trained["work"] / "evaluation"
    overrides = dict(trained["common"], output_dir=str(out_dir), evaluation_figures=False)
    run_bundle(BUNDLE, "evaluating", ["inference.yaml", "evaluate.yaml", "quick.yaml"], overrides, env={"OMP_NUM_THREADS": "1"})
    for name in ("metrics.csv", "summary.json", "summary.md", "slice_classification.json", "slice_classification.csv"):
        assert (out_dir / name).is_file(), name
    test_cases = json.loads((trained["data"] / "dataset.json").read_text())["test"]
    sc = json.loads((out_dir / "slice_classification.json").read_text())
    assert len(sc["cases"]) == len(test_cases)
    assert sc["slices"] == sc["tp"] + sc["fp"] + sc["fn"] + sc["tn"] > 0
    # every truth slice with GTV is either kept (tp) or missed (fn): recall is tp / (tp + fn)
    if sc["tp"] + sc["fn"]:
        assert sc["recall"] == pytest.approx(sc["tp"] / (sc["tp"] + sc["fn"]))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert "dsc" in json.dumps(summary)


def test_net_in_out_and_torchscript_export(trained, tmp_path):
    ts = tmp_path / "sanet.ts"
    script = (
        "from monai.bundle import verify_net_in_out, ckpt_export\n"
        f"verify_net_in_out(net_id='network_def', meta_file={str(CFG / 'metadata.json')!r}, config_file={str(CFG / 'inference.yaml')!r})\n"
        f"ckpt_export(net_id='network_def', filepath={str(ts)!r}, ckpt_file={str(trained['work'] / 'models' / 'model.pt')!r}, "
        f"meta_file={str(CFG / 'metadata.json')!r}, config_file={str(CFG / 'inference.yaml')!r})\n"
    )
    _check(subprocess.run([sys.executable, "-c", script], cwd=str(BUNDLE_DIR), capture_output=True, text=True, timeout=600, env=ENV), "verify/export")
    nets = bundle_scripts(BUNDLE, "networks")
    eager = nets.SANet().eval()
    eager.load_state_dict(torch.load(trained["work"] / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts)).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)


def test_ddp_training_two_cpu_processes(small_ct_dataset, tmp_path):
    configs = repr([str(CFG / c) for c in ("train.yaml", "multi_gpu_train.yaml", "quick.yaml")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "monai.bundle", "run", "training",
           "--config_file", configs, "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
           "--dataset_dir", str(small_ct_dataset), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval")]
    _check(subprocess.run(cmd, cwd=str(BUNDLE_DIR), capture_output=True, text=True, timeout=900, env=ENV), "DDP training")
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    bundle_scripts(BUNDLE, "networks").SANet().load_state_dict(state)
    assert (tmp_path / "models" / "sanet_train" / "checkpoint_last.pt").is_file()
