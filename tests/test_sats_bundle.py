"""End-to-end runs of the SATS bundle configs (quick mode, small phantoms, CPU).

Stage 1, stage 2 and inference + evaluation go through MONAI's ``ConfigWorkflow`` with
``check_properties`` (``ci/run_workflow.py`` in a subprocess: every bundle has its own ``scripts``
package); the DDP run goes through ``torch.distributed.run -m monai.bundle run`` as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

BUNDLE = "sats_npc"
BDIR = BUNDLES_DIR / BUNDLE
# The ITK registration costs ~5-20 s per small case on a busy 2-core machine: the training runs here
# switch it off (the training pre-processing with it on is tested in test_sats_scripts.py), the
# inference + evaluation run keeps the default (on), so its inversion to the input grid is tested.
ALIGN_TRAINING = False


def _overrides(ds, work, **extra):
    o = {
        "dataset_dir": str(ds),
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "eval"),
        "symmetric_align": ALIGN_TRAINING,
        "epochs": 1,
        "num_workers": 0,
    }
    o.update(extra)
    return o


def _workflow(wtype: str, configs: list[str], overrides: dict, timeout: int = 900) -> str:
    cmd = [sys.executable, str(REPO_ROOT / "ci" / "run_workflow.py"), str(BDIR), wtype, *configs, "--override", json.dumps(overrides)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "CHECK-PROPERTIES-OK" in out, out[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(small_ct_dataset, tmp_path_factory):
    """Stage 1 then stage 2 (MLflow tracking), 1 epoch each, through ConfigWorkflow + check_properties."""
    work = tmp_path_factory.mktemp("sats")
    _workflow("train", ["configs/train.yaml", "configs/quick.yaml"], _overrides(small_ct_dataset, work))
    stage1 = torch.load(work / "models" / "stage1" / "model.pt", weights_only=True)
    # stage 2 with check_properties too; `tracking` goes to ConfigWorkflow (MONAI's default MLflow settings)
    _workflow("train", ["configs/train.yaml", "configs/train_stage2.yaml", "configs/quick.yaml"],
              {**_overrides(small_ct_dataset, work), "tracking": "mlflow"})
    return work, stage1


def test_stage1_and_stage2(trained):
    from npc_gtv.training import load_weights

    work, stage1 = trained
    models = work / "models"
    stage2 = load_weights(models / "stage2" / "model.pt")
    published = load_weights(models / "model.pt")
    assert set(stage1) == set(stage2) == set(published)
    assert all(v.device.type == "cpu" for v in published.values())
    # quick network (nnU-Net's PlainConvUNet): first conv 1 -> 8 channels, 3x3x1 kernel
    assert tuple(stage1["encoder.stages.0.0.convs.0.conv.weight"].shape) == (8, 1, 3, 3, 1)
    # stage 2 fine-tunes the encoder-decoder (lr 1e-5): close to, but not equal to stage 1
    diffs = [float((stage2[k].float() - stage1[k].float()).abs().max()) for k in stage1 if stage1[k].is_floating_point()]
    assert max(diffs) > 0 and max(diffs) < 1e-2
    for k in published:
        assert torch.equal(published[k], stage2[k])  # models/model.pt is stage 2's network
    last = torch.load(models / "stage2" / "checkpoint_last.pt", weights_only=True)
    head = last["head"]
    assert tuple(head["layers.0.weight"].shape) == (16, 8, 1, 1, 1)
    assert tuple(head["layers.4.weight"].shape) == (16, 16, 1, 1, 1)
    assert [g["initial_lr"] for g in last["optimizer"]["param_groups"]] == [0.01, 1e-05]


def test_inference_and_evaluation_on_input_grid(trained, small_ct_dataset):
    """inference.yaml + evaluate.yaml through ConfigWorkflow('infer') with check_properties."""
    work, _ = trained
    out = _workflow(
        "infer",
        ["configs/inference.yaml", "configs/evaluate.yaml", "configs/quick.yaml"],
        # a spacing unlike the input's, so that Invertd has to resample back; mirror TTA on
        _overrides(small_ct_dataset, work, pixdim=[2.0, 2.2, 3.5], mirror_tta=True, evaluation_figures=False, symmetric_align=True),
    )
    assert "WORKFLOW-DONE infer" in out
    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    assert ds["test"]
    preds = sorted(p.name for p in (work / "eval" / "predictions").glob("*_seg.nii.gz"))
    assert preds == sorted(f"{c['case_id']}_seg.nii.gz" for c in ds["test"])
    for case in ds["test"]:
        src = nib.load(str(small_ct_dataset / case["image"]))
        pred = nib.load(str(work / "eval" / "predictions" / f"{case['case_id']}_seg.nii.gz"))
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
    # the evaluation report of evaluate.yaml's finalize
    assert (work / "eval" / "metrics.csv").read_text().count("\n") == len(ds["test"]) + 1
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary and (work / "eval" / "summary.md").is_file()


def test_mlflow_tracking(trained):
    work, _ = trained
    db = work / "eval" / "mlruns.db"
    assert db.is_file()
    with sqlite3.connect(db) as con:
        n_runs = con.execute("select count(*) from runs").fetchone()[0]
        n_metrics = con.execute("select count(*) from metrics where key = 'train_loss'").fetchone()[0]
    assert n_runs >= 1 and n_metrics >= 1


def test_export_and_verify(trained):
    work, _ = trained
    ts = work / "model.ts"
    env = dict(os.environ)
    cfg = "['configs/inference.yaml','configs/quick.yaml']"
    for cmd in (
        ["verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml", "--n", "2"],
        # PlainConvUNet is not scriptable: exported by tracing (metadata.json "torchscript")
        ["ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(work / "models" / "model.pt"),
         "--meta_file", "configs/metadata.json", "--config_file", cfg, "--use_trace", "True", "--input_shape", "[1, 1, 64, 64, 16]"],
    ):
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *cmd], cwd=str(BDIR), capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    scripted = torch.jit.load(str(ts))
    from conftest import bundle_scripts

    net_mod = bundle_scripts(BUNDLE, "network")
    net = net_mod.SATSUNet(features=[8, 16, 32, 64], kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                           strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]], deep_supervision=False)
    net.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.rand(1, 1, 64, 64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-4, rtol=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes(small_ct_dataset, tmp_path):
    cfg = BDIR / "configs"
    files = repr([str(cfg / "train.yaml"), str(cfg / "quick.yaml"), str(cfg / "multi_gpu_train.yaml")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()), "-m", "monai.bundle", "run", "training",
           "--config_file", files, "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf")]
    for k, v in _overrides(small_ct_dataset, tmp_path).items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(BDIR), capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP unwrapped
    assert "encoder.stages.0.0.convs.0.conv.weight" in state


def test_dicom_ct_in_rtstruct_out(trained, tmp_path):
    """A DICOM CT folder as the only input: prediction on the CT grid plus an RTSTRUCT that references it."""
    import pydicom

    from npc_gtv.dicom.rtstruct import rasterize_rtstruct
    from npc_gtv.dicom.series import write_dicom_series
    from npc_gtv.phantoms import make_phantom
    from shared_transforms.dicom import read_dicom_series

    work, _ = trained
    # the trained weights with the full-resolution output layer set to "GTVp everywhere", so that the
    # RTSTRUCT always has content to check (after one quick epoch the prediction is usually empty)
    from npc_gtv.training import load_weights

    forced = tmp_path / "forced"
    shutil.copytree(work / "models", forced / "models")
    state = load_weights(work / "models" / "model.pt")
    last = max((k for k in state if k.startswith("decoder.seg_layers.") and k.endswith(".bias")), key=lambda k: int(k.split(".")[2]))
    state[last.replace(".bias", ".weight")].zero_()
    state[last] = torch.tensor([-20.0, 20.0], dtype=state[last].dtype)
    torch.save(state, forced / "models" / "model.pt")
    work = forced
    ph = make_phantom(31, size="small")
    ct_dir = tmp_path / "CT"
    write_dicom_series(ph.image, ph.affine, ct_dir)
    out_dir = tmp_path / "out"
    overrides = _overrides(tmp_path, work, output_dir=str(out_dir), symmetric_align=False, write_rtstruct=True)
    overrides["datalist"] = [{"image": str(ct_dir)}]
    del overrides["dataset_dir"]
    out = _workflow("infer", ["configs/inference.yaml", "configs/quick.yaml"], overrides)
    assert "WORKFLOW-DONE infer" in out
    pred = nib.load(str(out_dir / "predictions" / "CT_seg.nii.gz"))
    ct = read_dicom_series(ct_dir)
    assert pred.shape == ct.array.shape
    np.testing.assert_allclose(pred.affine, ct.affine, atol=1e-3)
    rs_path = out_dir / "predictions" / "CT_rtstruct.dcm"
    rs = pydicom.dcmread(rs_path)
    first_ct = pydicom.dcmread(sorted(ct_dir.iterdir())[0])
    assert rs.Modality == "RTSTRUCT" and rs.StudyInstanceUID == first_ct.StudyInstanceUID
    assert rs.PatientID == first_ct.PatientID
    assert rs.StructureSetROISequence[0].ROIName == "GTVp"
    # the structure set holds exactly the saved mask
    mask = np.asarray(pred.dataobj) > 0
    assert mask.sum() > 1000, int(mask.sum())
    np.testing.assert_array_equal(rasterize_rtstruct(rs_path, ct) > 0, mask)
