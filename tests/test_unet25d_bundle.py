"""UNet-2.5D bundle end to end on small phantoms, run as a user runs it (``python -m monai.bundle``):
pretrain -> train (five scales, frozen shared encoder) -> ensemble evaluation; ConfigWorkflow
properties; torchrun DDP on 2 CPU processes; MLflow tracking; TorchScript export; k-fold run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES_DIR, bundle_scripts, run_bundle

pytestmark = pytest.mark.slow
BUNDLE = "unet25d_ssl"
BUNDLE_DIR = BUNDLES_DIR / BUNDLE
QUICK_ENV = {"OMP_NUM_THREADS": "1"}


class _Out:
    def __init__(self, stdout: str):
        self.stdout = stdout


@pytest.fixture(scope="module")
def cycle(small_ct_dataset, tmp_path_factory):
    """The quick demo sequence: pretrain, train all five scales, evaluate the ensemble.

    Run once per test session even under pytest-xdist (the tests of this module may land on
    different workers): the first worker runs it under a file lock in the folder shared by all
    workers, the others reuse its outputs.
    """
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    work = shared / "unet25d_cycle"
    done = work / "cycle.json"
    with FileLock(str(shared / "unet25d_cycle.lock")):
        if not done.is_file():
            work.mkdir(exist_ok=True)
            common = {"ckpt_dir": str(work / "models"), "output_dir": str(work / "eval")}
            pre = run_bundle(BUNDLE, "pretraining", ["pretrain.yaml", "quick.yaml"], {**common, "unlabeled_dir": str(work / "healthy")}, env=QUICK_ENV)
            train = run_bundle(BUNDLE, "training", ["train.yaml", "quick.yaml"], {**common, "dataset_dir": str(small_ct_dataset)}, env=QUICK_ENV)
            ev = run_bundle(
                BUNDLE, "evaluating", ["inference.yaml", "evaluate.yaml", "quick.yaml"],
                {**common, "dataset_dir": str(small_ct_dataset), "save_uncertainty": True, "tracking": "mlflow"}, env=QUICK_ENV,
            )
            done.write_text(json.dumps({"data": str(small_ct_dataset), "pretrain": pre.stdout, "train": train.stdout, "eval": ev.stdout,
                                        "eval_stderr": ev.stderr}))
    info = json.loads(done.read_text())
    return {"work": work, "data": Path(info["data"]), **{k: _Out(info[k]) for k in ("pretrain", "train", "eval")}}


def test_pretrain_on_tumour_free_phantoms_writes_encoder(cycle):
    work = cycle["work"]
    healthy = json.loads((work / "healthy" / "dataset.json").read_text())
    assert healthy["generator"]["tumour"] is False
    net = bundle_scripts(BUNDLE, "network")
    state = torch.load(work / "models" / "pretrain" / "encoder.pt", weights_only=True)
    enc = net.UNet25DEncoder()
    enc.load_state_dict(state)  # strict: exactly the encoder
    assert sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 3_845_058 - 895_122
    out = cycle["pretrain"].stdout
    assert "rot_ce" in out and "rpl_ce" in out  # both pretext terms are logged
    report = json.loads((work / "models" / "pretrain" / "pretext_accuracy.json").read_text())
    assert report["rot_chance"] == pytest.approx(0.1) and report["rpl_chance"] == pytest.approx(1 / 26)
    assert 0.0 <= report["rot_acc"] <= 1.0 and 0.0 <= report["rpl_acc"] <= 1.0 and report["samples"] > 0
    assert f"rotation {report['rot_acc']:.3f} (chance 0.100)" in out


def test_train_all_scales_with_frozen_shared_encoder(cycle):
    work, out = cycle["work"], cycle["train"].stdout
    assert out.count("trainable parameters: 895,122 of 3,845,058 (encoder frozen)") == 5
    for scale in ("extra_large", "large", "medium", "small", "extra_small"):
        assert f"=== training scale {scale} ===" in out
        member = torch.load(work / "models" / scale / "model.pt", weights_only=True)
        assert not any(k.startswith("encoder") for k in member)  # decoder only
        assert sum(v.numel() for k, v in member.items() if k.endswith(("weight", "bias"))) == 895_122
        assert all(v.device.type == "cpu" for v in member.values())
    ens = torch.load(work / "models" / "model.pt", weights_only=True)
    encoder = torch.load(work / "models" / "pretrain" / "encoder.pt", weights_only=True)
    layout = json.loads((work / "models" / "ensemble.json").read_text())
    assert layout["shared_encoder"] is True and layout["negative_slope"] == 0.0  # the paper's ReLU, recorded for inference
    # one encoder copy on disk, identical to the pretrained (frozen) one; five decoders
    enc_keys = [k for k in ens if k.startswith("encoder.")]
    assert len(enc_keys) == len(encoder)
    for k in encoder:
        assert torch.equal(ens["encoder." + k], encoder[k]), k
    assert {int(k.split(".")[1]) for k in ens if k.startswith("decoders.")} == {0, 1, 2, 3, 4}
    assert not any(k.startswith("members.") for k in ens)


def test_ensemble_evaluation_outputs_on_input_grid(cycle):
    work, data = cycle["work"], cycle["data"]
    ds = json.loads((data / "dataset.json").read_text())
    assert ds["test"]
    for entry in ds["test"]:
        img = nib.load(str(data / entry["image"]))
        pred = nib.load(str(work / "eval" / "predictions" / f"{entry['case_id']}_seg.nii.gz"))
        unc = nib.load(str(work / "eval" / "uncertainty" / f"{entry['case_id']}_uncertainty.nii.gz"))
        assert pred.shape == img.shape == unc.shape
        np.testing.assert_allclose(pred.affine, img.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1}
        spread = np.asarray(unc.dataobj)
        assert spread.min() >= 0 and spread.max() <= 0.5  # std of five values in [0, 1]
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary  # the report of npc_gtv.evaluation
    rows = (work / "eval" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(ds["test"])
    # MLflow tracking: a run recorded in the default sqlite store under output_dir
    import mlflow

    db = work / "eval" / "mlruns.db"
    assert db.is_file(), sorted(p.name for p in (work / "eval").iterdir()) + [json.loads((work / "cycle.json").read_text()).get("eval_stderr", "")[-4000:]]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs


def test_config_workflow_properties_fold_training_and_inference(cycle):
    """ConfigWorkflow + check_properties for train (one scale of fold 1 of 3) and infer."""
    work, data = cycle["work"], cycle["data"]
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(BUNDLE_DIR)!r})
        from monai.bundle import ConfigWorkflow
        cfg = {str(BUNDLE_DIR / 'configs')!r}
        common = dict(meta_file=cfg + '/metadata.json', logging_file=cfg + '/logging.conf', bundle_root={str(BUNDLE_DIR)!r},
                      dataset_dir={str(data)!r}, output_dir={str(work / 'wf_eval')!r})
        wf = ConfigWorkflow(config_file=[cfg + '/train.yaml', cfg + '/quick.yaml'], workflow_type='train', run_id='train_one',
                            ckpt_dir={str(work / 'wf_models')!r}, fold=1, num_folds=3, scale='small',
                            pretrained_encoder={str(work / 'models' / 'pretrain' / 'encoder.pt')!r}, **common)
        wf.initialize()
        print('TRAIN-MISSING', json.dumps(wf.check_properties()))
        wf.run(); wf.finalize()
        wf = ConfigWorkflow(config_file=[cfg + '/inference.yaml', cfg + '/quick.yaml'], workflow_type='infer',
                            ckpt_dir={str(work / 'models')!r}, **common)
        wf.initialize()
        print('INFER-MISSING', json.dumps(wf.check_properties()))
        wf.run(); wf.finalize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=str(work),
                          env=dict(os.environ, **QUICK_ENV))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TRAIN-MISSING []" in proc.stdout or "TRAIN-MISSING null" in proc.stdout
    assert "INFER-MISSING []" in proc.stdout or "INFER-MISSING null" in proc.stdout
    fold_list = json.loads((work / "wf_models" / "datalist_fold1of3_seed0.json").read_text())
    assert all(e["fold"] == 1 for e in fold_list["test"]) and all(e["fold"] != 1 for e in fold_list["training"])
    assert (work / "wf_models" / "fold1" / "small" / "model.pt").is_file()
    assert len(list((work / "wf_eval" / "predictions").glob("*_seg.nii.gz"))) == 2


def test_ddp_two_cpu_processes(cycle):
    work, data = cycle["work"], cycle["data"]
    cfg = BUNDLE_DIR / "configs"
    files = [str(cfg / f) for f in ("train.yaml", "quick.yaml", "multi_gpu_train.yaml")]
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous (other test workers may run torchrun too)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "monai.bundle", "run", "train_one",
           "--config_file", repr(files), "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
           "--dataset_dir", str(data), "--ckpt_dir", str(work / "ddp"), "--output_dir", str(work / "ddp_eval"), "--scale", "medium",
           "--pretrained_encoder", str(work / "models" / "pretrain" / "encoder.pt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(BUNDLE_DIR), env=dict(os.environ, **QUICK_ENV))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    state = torch.load(work / "ddp" / "medium" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    assert sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias"))) == 895_122


def test_verify_net_in_out_and_torchscript_export_of_trained_ensemble(cycle):
    work = cycle["work"]
    cfg = BUNDLE_DIR / "configs"
    verify = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", str(cfg / "metadata.json"),
              "--config_file", str(cfg / "inference.yaml"), "--bundle_root", str(BUNDLE_DIR), "--ckpt_dir", str(work / "models"),
              "--n", "2"]
    proc = subprocess.run(verify, capture_output=True, text=True, timeout=600, cwd=str(BUNDLE_DIR), env=dict(os.environ, **QUICK_ENV))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
    ts = work / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(work / "models" / "model.pt"), "--meta_file", str(cfg / "metadata.json"),
           "--config_file", str(cfg / "inference.yaml"), "--bundle_root", str(BUNDLE_DIR), "--ckpt_dir", str(work / "models")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(BUNDLE_DIR), env=dict(os.environ, **QUICK_ENV))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    net = bundle_scripts(BUNDLE, "network")
    eager = net.UNet25DEnsemble(5, shared_encoder=True).eval()
    eager.load_state_dict(torch.load(work / "models" / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(ts)).eval()
    x = torch.rand(1, 1, 32, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)


def test_inference_from_repository_root_with_bundle_root(cycle, tmp_path):
    """The second invocation style: from another folder, with --bundle_root (scripts found through it)."""
    from conftest import REPO_ROOT

    work, data = cycle["work"], cycle["data"]
    ds = json.loads((data / "dataset.json").read_text())
    image = str(data / ds["test"][0]["image"])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['bundles/unet25d_ssl/configs/inference.yaml','bundles/unet25d_ssl/configs/quick.yaml']",
           "--bundle_root", "bundles/unet25d_ssl", "--ckpt_dir", str(work / "models"), "--output_dir", str(tmp_path),
           "--datalist", repr([{"image": image}]), "--opening", "False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO_ROOT), env=dict(os.environ, **QUICK_ENV))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "predictions" / f"{ds['test'][0]['case_id']}_seg.nii.gz"))
    assert out.shape == nib.load(image).shape
