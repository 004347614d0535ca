"""Checkpoint safety: atomic writes, weights_only loading, CPU tensors, DDP unwrapping, loader handler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from npc_gtv import training
from npc_gtv.training import CHECKPOINT_NAME, ResumableCheckpoint, SafeCheckpointLoader, load_weights
from shared_transforms.io import InputError


def _tiny():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return net, opt


def _engine(net, opt, n_iter=4):
    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).mean()
        loss.backward()
        opt.step()
        return loss.item()

    return Engine(step), [torch.randn(1, 1, 5, 5, 5) for _ in range(n_iter)]


def test_checkpoint_content_cpu_tensors_counters_rng(tmp_path):
    net, opt = _tiny()
    engine, data = _engine(net, opt)
    handler = ResumableCheckpoint(tmp_path, {"model": net, "optimizer": opt})
    handler.attach(engine)
    engine.run(data, max_epochs=2)
    ck = load_weights(tmp_path / CHECKPOINT_NAME)
    assert ck["_engine"] == {"epoch": 2, "iteration": 8, "epoch_length": 4, "max_epochs": 2}
    assert set(ck) == {"model", "optimizer", "_format", "_engine", "_rng", "_transform_rng", "_data"}
    assert ck["_data"] is None  # a plain list of tensors has no .dataset.data to fingerprint
    assert all(t.device.type == "cpu" for t in ck["model"].values())
    assert ck["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 1, 3, 3, 3)
    assert ck["_rng"]["numpy"]["keys"].shape == (624,) and ck["_rng"]["python"]["state"].shape == (625,)
    final = load_weights(tmp_path / "model.pt")
    assert list(final) == list(net.state_dict())  # bare state_dict, zoo layout: no "module.", no wrapper keys
    assert torch.equal(final["0.weight"], net.state_dict()["0.weight"])
    assert oct((tmp_path / "model.pt").stat().st_mode & 0o777) != oct(0o600)


def test_rng_round_trip():
    state = training.capture_rng_state()
    a = (np.random.rand(3), torch.rand(3), __import__("random").random())
    training.restore_rng_state(state)
    b = (np.random.rand(3), torch.rand(3), __import__("random").random())
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_failed_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    net, opt = _tiny()
    engine, data = _engine(net, opt)
    handler = ResumableCheckpoint(tmp_path, {"model": net, "optimizer": opt})
    handler.attach(engine)
    engine.run(data, max_epochs=1)
    before = load_weights(tmp_path / CHECKPOINT_NAME)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):  # half the bytes, then the disk fills up
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    engine.state.iteration = 99
    with pytest.raises(OSError):
        handler.save(engine)
    after = load_weights(tmp_path / CHECKPOINT_NAME)
    assert after["_engine"] == before["_engine"] and after["_engine"]["iteration"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, "model.pt"]  # temp file removed


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing leaves the old file intact; the stale temp file is cleaned."""
    script = textwrap.dedent(
        f"""
        import io, os, signal, torch
        from ignite.engine import Engine
        from npc_gtv.training import ResumableCheckpoint
        net = torch.nn.Linear(3, 2)
        eng = Engine(lambda e, b: 0.0)
        h = ResumableCheckpoint({str(tmp_path)!r}, {{"model": net}})
        h.attach(eng)
        eng.run([0, 0], max_epochs=1)      # a good checkpoint at iteration 2
        real = torch.save
        def dying_save(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf)
            f.write(buf.getvalue()[:100]); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        eng.state.iteration = 7
        h.save(eng)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".{CHECKPOINT_NAME}.")]
    assert len(stale) == 1 and stale[0].stat().st_size == 100
    assert load_weights(tmp_path / CHECKPOINT_NAME)["_engine"]["iteration"] == 2
    net = torch.nn.Linear(3, 2)
    ResumableCheckpoint(tmp_path, {"model": net}).attach(Engine(lambda e, b: 0.0))  # resumes fine, cleans up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('NPC_EVIL_MARKER', '/tmp/npc_evil_marker')}",))


def test_tampered_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("NPC_EVIL_MARKER", str(marker))
    evil = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil()}, evil)
    with pytest.raises(InputError) as err:
        load_weights(evil)
    text = str(err.value)
    assert text.startswith(f"{evil}: refused to load: the file holds Python objects other than weights (posix.system")
    assert "delete it to start over or point `ckpt_dir` elsewhere" in text
    assert "weights_only=False" not in text and "will likely succeed" not in text  # torch's hint is not repeated
    assert not marker.exists()
    # the same refusal when such a file sits where a resume would read it
    os.replace(evil, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(InputError, match="refused"):
        ResumableCheckpoint(tmp_path, {"model": torch.nn.Linear(2, 2)}).attach(Engine(lambda e, b: 0.0))
    assert not marker.exists()


def test_corrupt_missing_and_non_mapping_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match="file is corrupt or not a checkpoint of this toolkit .*; delete it to start over "
                                         "or point `ckpt_dir` elsewhere") as err:
        load_weights(truncated)
    assert str(truncated) in str(err.value)
    # random bytes were reported as possibly tampered with, repeating torch's weights_only=False hint
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(InputError) as err:
        load_weights(noise)
    assert str(err.value) == (f"{noise}: file is corrupt or not a checkpoint of this toolkit; delete it to start over or "
                              "point `ckpt_dir` elsewhere")
    with pytest.raises(InputError, match="does not exist"):
        load_weights(tmp_path / "nope.pt")
    listy = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listy)
    with pytest.raises(InputError, match="expected a state_dict"):
        load_weights(listy)


def test_checkpoint_of_another_network_is_reported(tmp_path):
    net, opt = _tiny()
    engine, data = _engine(net, opt, 1)
    ResumableCheckpoint(tmp_path, {"model": net}).attach(engine)
    engine.run(data, max_epochs=1)
    with pytest.raises(InputError, match="does not fit") as err:
        ResumableCheckpoint(tmp_path, {"model": torch.nn.Linear(2, 2)}).attach(Engine(lambda e, b: 0.0))
    assert CHECKPOINT_NAME in str(err.value)
    with pytest.raises(InputError, match="no entries"):
        ResumableCheckpoint(tmp_path, {"model": net, "optimizer": opt}).attach(Engine(lambda e, b: 0.0))


def test_bad_arguments():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError):
        ResumableCheckpoint("x", {})
    with pytest.raises(ValueError):
        ResumableCheckpoint("x", {"model": net}, every_n_epochs=-1)
    with pytest.raises(ValueError):
        ResumableCheckpoint("x", {"model": object()})
    with pytest.raises(ValueError):
        ResumableCheckpoint("x", {"net": net})  # final_key "model" missing
    with pytest.raises(ValueError):
        ResumableCheckpoint("x", {"model": net, "_rng": net})
    with pytest.raises(ValueError):
        SafeCheckpointLoader("x", {})


def test_ddp_unwrapped_and_only_rank0_writes(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = torch.nn.Linear(3, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        engine = Engine(lambda e, b: (opt.zero_grad(), ddp(torch.ones(1, 3)).sum().backward(), opt.step()))
        out = tmp_path / "ck"
        ResumableCheckpoint(out, {"model": ddp, "optimizer": opt}).attach(engine)
        engine.run([0, 0], max_epochs=1)
        assert list(load_weights(out / "model.pt")) == ["weight", "bias"]
        assert list(load_weights(out / CHECKPOINT_NAME)["model"]) == ["weight", "bias"]
        # resume into a DDP-wrapped network of a new run
        ddp2 = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        ResumableCheckpoint(out, {"model": ddp2}).attach(Engine(lambda e, b: 0.0))
        assert torch.equal(ddp2.module.weight, net.weight)
    finally:
        dist.destroy_process_group()
    monkeypatch.setattr(training, "is_rank0", lambda: False)
    other = tmp_path / "rank1"
    engine = Engine(lambda e, b: 0.0)
    ResumableCheckpoint(other, {"model": torch.nn.Linear(3, 2)}).attach(engine)
    engine.run([0], max_epochs=1)
    assert not other.exists()


def test_safe_checkpoint_loader(tmp_path):
    net = torch.nn.Linear(3, 2)
    torch.save(OrderedDict(("module." + k, v) for k, v in net.state_dict().items()), tmp_path / "model.pt")
    target = torch.nn.Linear(3, 2)
    evaluator = Engine(lambda e, b: 0.0)
    SafeCheckpointLoader(tmp_path / "model.pt", {"model": target}).attach(evaluator)
    assert not torch.equal(target.weight, net.weight)  # loads at STARTED, not at attach
    evaluator.run([0], max_epochs=1)
    assert torch.equal(target.weight, net.weight) and torch.equal(target.bias, net.bias)
    # from a multi-entry resumable checkpoint
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    eng = Engine(lambda e, b: 0.0)
    ResumableCheckpoint(tmp_path / "ck", {"model": net, "optimizer": opt}).attach(eng)
    eng.run([0], max_epochs=1)
    opt2 = torch.optim.SGD(target.parameters(), lr=0.9)
    SafeCheckpointLoader(tmp_path / "ck" / CHECKPOINT_NAME, {"model": target, "optimizer": opt2}).load()
    assert opt2.param_groups[0]["lr"] == 0.3
    with pytest.raises(InputError, match="does not fit"):
        SafeCheckpointLoader(tmp_path / "model.pt", {"model": torch.nn.Linear(4, 2)}).load()
    with pytest.raises(InputError, match="does not exist"):
        SafeCheckpointLoader(tmp_path / "missing.pt", {"model": target}).load()


def test_changed_training_data_starts_a_new_training(tmp_path):
    """Same data: resume. Other data (e.g. MONAI Label retraining with new labels): start fresh, not resume."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer

    def trainer(data):
        torch.manual_seed(0)
        net = torch.nn.Conv3d(1, 1, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        loader = DataLoader(Dataset(data, transform=lambda d: {"image": torch.ones(1, 2, 2, 2) * d["v"],
                                                                "label": torch.zeros(1, 2, 2, 2)}), batch_size=1)
        tr = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=net,
                               optimizer=opt, loss_function=torch.nn.MSELoss())
        handler = ResumableCheckpoint(tmp_path, {"model": net, "optimizer": opt})
        handler.attach(tr)
        return tr, handler

    data = [{"v": 1.0, "image": "a.nii"}, {"v": 2.0, "image": "b.nii"}]
    tr, _ = trainer(data)
    tr.run()
    saved = load_weights(tmp_path / CHECKPOINT_NAME)
    assert saved["_engine"]["iteration"] == 4 and len(saved["_data"]) == 64
    tr, handler = trainer(data)  # same data, finished: nothing to do
    assert handler.resumed_from == {"epoch": 2, "iteration": 4}
    tr, handler = trainer(data + [{"v": 3.0, "image": "c.nii"}])  # new labels: a new training
    assert handler.resumed_from is None and tr.state.iteration == 0
    tr.run()
    assert load_weights(tmp_path / CHECKPOINT_NAME)["_engine"]["iteration"] == 6


# ------------------------------------------------------------------------ issue #18: resume by content
def _data_trainer(tmp_path, data, epochs=2, scheduler=None, epoch_level=True, record=None):
    """A SupervisedTrainer on NIfTI-named data entries (the files exist), with ResumableCheckpoint in ``tmp_path/ckpt``."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(Dataset(data, transform=lambda d: {"image": torch.ones(1, 2, 2, 2) * len(d["image"]),
                                                            "label": torch.zeros(1, 2, 2, 2)}), batch_size=1)
    tr = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=net,
                           optimizer=opt, loss_function=torch.nn.MSELoss())
    save = {"model": net, "optimizer": opt}
    if scheduler is not None:
        sched = scheduler(opt, epochs, len(data))
        LrScheduleHandler(sched, epoch_level=epoch_level, print_lr=False).attach(tr)
        save["lr_scheduler"] = sched
    if record is not None:
        from ignite.engine import Events

        tr.add_event_handler(Events.ITERATION_STARTED, lambda e: record.append((e.state.iteration, opt.param_groups[0]["lr"])))
    handler = ResumableCheckpoint(tmp_path / "ckpt", save)
    handler.attach(tr)
    return tr, handler


def test_resume_is_keyed_on_content_not_on_path_spelling(tmp_path, monkeypatch):
    """The same data reached through a symlink or a relative path restarted at epoch 1 and overwrote the checkpoint."""
    from npc_gtv.training import PREVIOUS_NAME

    real = tmp_path / "data"
    real.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (real / name).write_bytes(name.encode() * 100)
    data = [{"image": str(real / "a.nii.gz")}, {"image": str(real / "b.nii.gz")}]
    tr, _ = _data_trainer(tmp_path, data)
    tr.run()
    first = load_weights(tmp_path / "ckpt" / CHECKPOINT_NAME)
    (tmp_path / "link").symlink_to(real)
    via_link = [{"image": str(tmp_path / "link" / "a.nii.gz")}, {"image": str(tmp_path / "link" / "b.nii.gz")}]
    monkeypatch.chdir(tmp_path)
    relative = [{"image": "data/a.nii.gz"}, {"image": "./data/../data/b.nii.gz"}]
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (copy / name).write_bytes((real / name).read_bytes())
    copied = [{"image": str(copy / "a.nii.gz")}, {"image": str(copy / "b.nii.gz")}]
    for same in (via_link, relative, copied):
        tr, handler = _data_trainer(tmp_path, same)
        assert handler.resumed_from == {"epoch": 2, "iteration": 4}, same
    # other content: a new training, and the earlier checkpoint is kept, not overwritten
    (copy / "b.nii.gz").write_bytes(b"new labels" * 100)
    tr, handler = _data_trainer(tmp_path, copied)
    assert handler.resumed_from is None and tr.state.iteration == 0
    kept = load_weights(tmp_path / "ckpt" / PREVIOUS_NAME)
    assert kept["_engine"] == first["_engine"] and kept["_data"] == first["_data"]
    assert not (tmp_path / "ckpt" / CHECKPOINT_NAME).exists()


def _poly_epochs(opt, epochs, length):
    return torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs, power=0.9)


def _poly_iterations(opt, epochs, length):
    return torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs * length, power=0.9)


def _cosine_restarts(opt, epochs, length):
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=3 * length)


def _step_decay(opt, epochs, length):
    step = max(1, epochs * length // 2)  # halve the lr at the middle of the training
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 ** (it // step))


@pytest.mark.parametrize("scheduler, epoch_level", [(_poly_epochs, True), (_poly_iterations, False),
                                                    (_cosine_restarts, False), (_step_decay, False)])
def test_more_epochs_continue_with_the_schedule_extended(tmp_path, scheduler, epoch_level):
    """Raising the epochs of a finished training ran the extra epochs at lr 0 (the restored schedule kept its length)."""
    data = [{"image": "a"}, {"image": "b"}]
    tr, _ = _data_trainer(tmp_path / "run", data, epochs=2, scheduler=scheduler, epoch_level=epoch_level)
    tr.run()
    resumed: list = []
    tr, handler = _data_trainer(tmp_path / "run", data, epochs=4, scheduler=scheduler, epoch_level=epoch_level, record=resumed)
    assert handler.resumed_from == {"epoch": 2, "iteration": 4}
    tr.run()
    assert [it for it, _ in resumed] == [5, 6, 7, 8]
    reference: list = []  # the same 4-epoch schedule, run without interruption
    tr, _ = _data_trainer(tmp_path / "ref", data, epochs=4, scheduler=scheduler, epoch_level=epoch_level, record=reference)
    tr.run()
    expected = [lr for it, lr in reference if it > 4]
    got = [lr for _, lr in resumed]
    assert min(got) > 0.0
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_container_schedulers_are_restored_as_they_were(tmp_path):
    """SequentialLR holds other schedulers (and through them the optimiser): restored unchanged, never deep-copied."""

    def sequential(opt, epochs, length):
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
        poly = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=epochs * length)
        return torch.optim.lr_scheduler.SequentialLR(opt, [warm, poly], milestones=[2])

    data = [{"image": "a"}, {"image": "b"}]
    tr, _ = _data_trainer(tmp_path, data, epochs=1, scheduler=sequential, epoch_level=False)
    tr.run()
    tr, handler = _data_trainer(tmp_path, data, epochs=2, scheduler=sequential, epoch_level=False)
    assert handler.resumed_from == {"epoch": 1, "iteration": 2}
    tr.run()
    assert load_weights(tmp_path / "ckpt" / CHECKPOINT_NAME)["_engine"]["epoch"] == 2
