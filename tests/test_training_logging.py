"""Long-run logging of a bundle training: progress bar, TensorBoard, and MLflow with ``--tracking mlflow``.

Runs the tiny CI bundle (ci/tiny_bundle.py, the same handler layout as the real bundles' train.yaml)
once through ``python -m monai.bundle run ... --tracking mlflow`` and reads back what was logged.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny_bundle", REPO / "ci" / "tiny_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_progress_tensorboard_and_mlflow(tmp_path, small_ct_dataset):
    bundle = _tiny().write_tiny_bundle(tmp_path / "src")
    out = tmp_path / "eval"
    cfg = repr([str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "quick.yaml")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", cfg,
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf"),
           "--dataset_dir", str(small_ct_dataset), "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(out),
           "--tracking", "mlflow", "--experiment_name", "npc_test", "--run_name", "tiny_run",
           # MONAI 1.6 builds the default executed-config path as an expression on output_dir, which breaks
           # when output_dir is overridden by a plain path; naming the file explicitly works in every case
           "--save_execute_config", str(out / "executed_config.json")]
    proc = subprocess.run(cmd, cwd=str(bundle), capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # progress bar (ignite ProgressBar, tqdm on stderr): the epoch's iterations counted to the end
    import re

    done = re.findall(r"\[(\d+)/(\d+)\] 100%", proc.stderr)
    assert done and done[-1][0] == done[-1][1], proc.stderr[-2000:]
    n_iter = int(done[-1][0])  # iterations of the single quick epoch
    assert n_iter >= 1
    # TensorBoard event file with the training loss
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"] and len(acc.Scalars("train_loss")) == n_iter

    # MLflow: the run with params, per-iteration loss, validation metric and the executed config
    import mlflow
    from mlflow.tracking import MlflowClient

    db = out / "mlruns.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("npc_test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny_run"]
    run = runs[0]
    assert run.data.params["max_epochs"] == "1" and "epoch_length" in run.data.params
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == n_iter
    assert "val_mean_dice" in run.data.metrics
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "executed_config.json" in artifacts, artifacts
    local = client.download_artifacts(run.info.run_id, "executed_config.json", str(tmp_path / "dl"))
    text = Path(local).read_text()
    assert "TinySegNet" in text and str(small_ct_dataset) in text  # the executed (overridden) config
