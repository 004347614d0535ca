"""Resumable training: SIGKILL mid-epoch, rerun the same command, continue from the saved epoch.

A tiny real ignite training (MLP, Adam, StepLR stepped by an epoch handler attached *after* the
checkpoint handler, dropout, numpy/python RNG draws in the step) runs in a subprocess. The parent
SIGKILLs it when it reports a chosen iteration, reruns the identical command and compares the final
``model.pt`` with an uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CHILD = textwrap.dedent(
    """
    import random, sys, time
    import numpy as np, torch
    from ignite.engine import Engine, Events
    from npc_gtv.training import ResumableCheckpoint

    save_dir, max_epochs, kill_at, every_it = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    torch.use_deterministic_algorithms(True)
    x = torch.randn(40, 8); y = x.sum(1, keepdim=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)

    def step(engine, batch):
        model.train(); opt.zero_grad()
        xb, yb = batch
        xb = xb + float(np.random.randn()) * 0.01 + random.random() * 0.01
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward(); opt.step()
        return loss.item()

    trainer = Engine(step)
    ResumableCheckpoint(save_dir, {"model": model, "optimizer": opt, "lr_scheduler": sched},
                        every_n_iterations=every_it).attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())  # attached after the checkpoint

    @trainer.on(Events.STARTED)
    def _started(e):
        print(f"START epoch={e.state.epoch} iteration={e.state.iteration}", flush=True)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _iteration(e):
        print(f"ITER {e.state.iteration} lr={opt.param_groups[0]['lr']:g}", flush=True)
        if e.state.iteration == kill_at:
            print("KILL-ME", flush=True)
            time.sleep(300)

    trainer.run(loader, max_epochs=max_epochs)
    print(f"END epoch={trainer.state.epoch} iteration={trainer.state.iteration}", flush=True)
    """
)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_child(script: Path, save_dir: Path, max_epochs: int, every_it: int = 0, kill_at: int = -1) -> list[str]:
    """Run the training; with ``kill_at`` SIGKILL it when it reports that iteration. Returns stdout lines."""
    cmd = [sys.executable, str(script), str(save_dir), str(max_epochs), str(kill_at), str(every_it)]
    if kill_at < 0:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("KILL-ME"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, lines[-5:])
    return lines


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    path = tmp_path_factory.mktemp("child") / "train_child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture(scope="module")
def reference(child, tmp_path_factory):
    """Uninterrupted 3-epoch run (10 iterations per epoch)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    lines = run_child(child, out, 3)
    assert lines[0] == "START epoch=0 iteration=0" and lines[-1] == "END epoch=3 iteration=30"
    return out, lines


def _same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a, weights_only=True)
    wb = torch.load(b, weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_mid_epoch_resumes_from_saved_epoch_and_matches_uninterrupted(child, reference, tmp_path):
    ref_dir, ref_lines = reference
    killed = run_child(child, tmp_path, 3, kill_at=15)  # epoch 2, iteration 5 of 10
    assert "ITER 15 lr=0.005" in killed  # the epoch-1 scheduler step happened before the kill
    saved = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert saved["_engine"] == {"epoch": 1, "iteration": 10, "epoch_length": 10, "max_epochs": 3}
    assert not (tmp_path / "model.pt").exists()

    resumed = run_child(child, tmp_path, 3)
    assert resumed[0] == "START epoch=1 iteration=10"  # continues, does not restart from 0
    iters = [line for line in resumed if line.startswith("ITER")]
    assert iters[0] == "ITER 11 lr=0.005" and len(iters) == 20
    # same losses/lr trajectory and bit-identical final weights as the uninterrupted run
    assert iters == [line for line in ref_lines if line.startswith("ITER")][10:]
    assert resumed[-1] == "END epoch=3 iteration=30"
    assert _same_weights(tmp_path / "model.pt", ref_dir / "model.pt")


def test_mid_epoch_iteration_checkpoint_runs_only_the_rest_of_the_epoch(child, tmp_path):
    run_child(child, tmp_path, 2, every_it=3, kill_at=14)  # last iteration save: 12 (epoch 2, 2 of 10 done)
    saved = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert saved["_engine"]["iteration"] == 12 and saved["_engine"]["epoch"] == 2
    resumed = run_child(child, tmp_path, 2, every_it=3)
    assert resumed[0] == "START epoch=1 iteration=12"  # engine epoch = completed epochs
    iters = [line.split()[1] for line in resumed if line.startswith("ITER")]
    assert iters == [str(i) for i in range(13, 21)]  # the remaining 8 iterations of epoch 2 only
    assert resumed[-1] == "END epoch=2 iteration=20"


def test_rerun_of_a_completed_training_is_a_no_op_and_more_epochs_continue(child, reference, tmp_path):
    ref_dir, _ = reference
    import shutil

    shutil.copy(ref_dir / "checkpoint_last.pt", tmp_path / "checkpoint_last.pt")
    shutil.copy(ref_dir / "model.pt", tmp_path / "model.pt")
    again = run_child(child, tmp_path, 3)
    assert not [line for line in again if line.startswith("ITER")]  # nothing retrained from epoch 0
    assert _same_weights(tmp_path / "model.pt", ref_dir / "model.pt")
    longer = run_child(child, tmp_path, 4)
    assert longer[0] == "START epoch=3 iteration=30"
    assert [line.split()[1] for line in longer if line.startswith("ITER")] == [str(i) for i in range(31, 41)]
    assert not _same_weights(tmp_path / "model.pt", ref_dir / "model.pt")
