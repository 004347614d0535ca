"""Kill / resume through each bundle's own ``train.yaml`` + ``quick.yaml`` (``python -m monai.bundle run``).

For every bundle: an uninterrupted 2-epoch quick training; the same command SIGKILLed at the first
iteration of epoch 2 (after the epoch-1 checkpoint was written); the same command again, which must
resume at epoch 1 (not 0) and end with the same final weights as the uninterrupted run.

The kill point is set by a tiny wrapper around ``python -m monai.bundle`` that adds two probe handlers
next to each ``ResumableCheckpoint`` (it prints the engine state at start and blocks at the kill point
so the parent can SIGKILL the process there); the bundle itself runs unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# bundle -> (config files, run id, overrides giving 2 epochs)
BUNDLES = {
    "sats_npc": (["train.yaml", "quick.yaml"], "training", {"epochs": "2"}),
    "unet25d_ssl": (["train.yaml", "quick.yaml"], "training", {"epochs": "2"}),
    "hcf_sanet": (["train.yaml", "quick.yaml"], "training", {"max_epochs": "2"}),
}
# the resume of one training: HCF's train.yaml would also train its slice classifier first when
# classifier.pt is missing (classifier_first: auto, for MONAI Label); these tests resume SANet alone
FIXED = {"hcf_sanet": {"classifier_first": "never"}}

WRAPPER = r"""
import os, runpy, sys, time
from ignite.engine import Events
import npc_gtv.training as T

_attach = T.ResumableCheckpoint.attach
KILL_EPOCH = int(os.environ.get("NPC_KILL_AT_EPOCH", "0"))

def attach(self, engine):
    _attach(self, engine)
    engine.add_event_handler(Events.STARTED, lambda e: print(
        f"PROBE-START epoch={e.state.epoch} iteration={e.state.iteration} dir={self.save_dir}", flush=True))
    if KILL_EPOCH:
        def block(e):
            if e.state.epoch == KILL_EPOCH and e.state.iteration == (KILL_EPOCH - 1) * e.state.epoch_length + 1:
                print("KILL-ME", flush=True)
                time.sleep(900)
        engine.add_event_handler(Events.ITERATION_STARTED, block)

T.ResumableCheckpoint.attach = attach
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def _command(bundle: Path, configs, run_id, overrides):
    cfg = [str(bundle / "configs" / c) for c in configs]
    cmd = [sys.executable, "-c", WRAPPER, "run", run_id, "--config_file", repr(cfg),
           "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf")]
    for key, value in {**FIXED.get(bundle.name, {}), **overrides}.items():
        cmd += [f"--{key}", value]
    return cmd


def _run(cmd, cwd, kill: bool):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if kill:
        env["NPC_KILL_AT_EPOCH"] = "2"
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if kill and line.startswith("KILL-ME"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    expected = -signal.SIGKILL if kill else 0
    assert proc.returncode == expected, "\n".join(lines[-80:])
    return lines


def _weights(ckpt_dir: Path) -> dict:
    """Final weights written by every ResumableCheckpoint of the run, keyed by relative folder."""
    out = {}
    for last in sorted(ckpt_dir.rglob("checkpoint_last.pt")):
        ck = torch.load(last, map_location="cpu", weights_only=True)
        out[str(last.parent.relative_to(ckpt_dir))] = (ck["_engine"], ck["model"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_bundle_training_sigkill_resume(name, tmp_path, small_ct_dataset):
    bundle = REPO / "bundles" / name
    if not bundle.is_dir():
        pytest.skip(f"bundles/{name} does not exist yet")
    configs, run_id, epochs = BUNDLES[name]
    missing = [c for c in configs if not (bundle / "configs" / c).is_file()]
    assert not missing, f"{name}: missing configs {missing}"

    def overrides(tag):
        return {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / tag / "models"),
                "output_dir": str(tmp_path / tag / "eval"), **epochs}

    ref_lines = _run(_command(bundle, configs, run_id, overrides("ref")), bundle, kill=False)
    assert any(line.startswith("PROBE-START epoch=0 iteration=0") for line in ref_lines)
    reference = _weights(tmp_path / "ref" / "models")
    assert reference, f"{name}: no checkpoint_last.pt written under ckpt_dir"

    killed = _run(_command(bundle, configs, run_id, overrides("run")), bundle, kill=True)
    assert "KILL-ME" in killed
    first_dir = next(line for line in killed if line.startswith("PROBE-START")).split("dir=")[1]
    saved = torch.load(Path(first_dir) / "checkpoint_last.pt", map_location="cpu", weights_only=True)["_engine"]
    assert saved["epoch"] == 1 and saved["iteration"] == saved["epoch_length"]

    resumed = _run(_command(bundle, configs, run_id, overrides("run")), bundle, kill=False)
    start = next(line for line in resumed if line.startswith("PROBE-START"))
    assert start.startswith(f"PROBE-START epoch=1 iteration={saved['epoch_length']}"), start  # not from 0
    assert any("resumed from" in line for line in resumed)

    final = _weights(tmp_path / "run" / "models")
    assert final.keys() == reference.keys()
    for key, (engine_state, weights) in final.items():
        ref_state, ref_weights = reference[key]
        assert engine_state == ref_state
        different = [k for k in ref_weights if not torch.equal(ref_weights[k], weights[k])]
        assert not different, f"{name}/{key}: resumed weights differ from the uninterrupted run in {different[:5]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_more_epochs_on_a_finished_bundle_training_keep_learning(name, tmp_path, small_ct_dataset):
    """Raising the epochs of a finished SATS training trained nothing: the restored schedule kept its length (lr 0)."""
    bundle = REPO / "bundles" / name
    configs, run_id, epochs = BUNDLES[name]
    key = next(iter(epochs))
    overrides = {"dataset_dir": str(small_ct_dataset), "ckpt_dir": str(tmp_path / "models"),
                 "output_dir": str(tmp_path / "eval")}
    _run(_command(bundle, configs, run_id, {**overrides, key: "1"}), bundle, kill=False)
    one = _weights(tmp_path / "models")
    lines = _run(_command(bundle, configs, run_id, {**overrides, key: "2"}), bundle, kill=False)
    assert any("resumed from" in line for line in lines)
    two = _weights(tmp_path / "models")
    assert two.keys() == one.keys()
    for folder, (state, weights) in two.items():
        assert state["epoch"] == 2, (folder, state)
        moved = max(float((weights[k].float() - one[folder][1][k].float()).abs().max())
                    for k in weights if weights[k].is_floating_point())
        assert moved > 0.0, f"{name}/{folder}: the extra epoch did not change the weights (learning rate 0?)"
