"""What the bundles do when MONAI Label drives them (the pieces; tests/test_monailabel*.py run them whole).

* an empty validation list disables validation (with a warning) instead of failing;
* the phantom set is generated only where the bundle's own data list is read (never when the data
  are supplied), and under ``torch.distributed`` by rank 0 while the other ranks wait;
* HCF: an empty validation list gives no slices, the gate stays at 0.5 and the last SANet weights
  are kept; the classifier is trained inside ``train`` unless ``classifier.pt`` is there;
* HCF's network takes a volume (metadata ``dimension`` 3) slice by slice.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLES_DIR, bundle_scripts

BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]


def test_no_validation_warns_on_empty_lists_only(caplog):
    from npc_gtv.training import no_validation

    with caplog.at_level(logging.WARNING):
        assert no_validation([]) is True
        assert no_validation(None) is True
    assert caplog.text.count("validation list is empty") == 2
    assert no_validation([{"image": "a.nii.gz"}]) is False


@pytest.mark.parametrize("name", BUNDLES)
def test_train_configs_skip_empty_validation_and_generate_no_data_in_initialize(name):
    from monai.bundle import ConfigParser

    cfg = BUNDLES_DIR / name / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / "train.yaml"), str(cfg / "quick.yaml")])
    parser["bundle_root"] = str(BUNDLES_DIR / name)
    targets = [h.get("_target_") for h in parser.get("train#handlers")]
    i = targets.index("ValidationHandler")
    for data, disabled in (([], True), ([{"image": "a.nii.gz", "label": "b.nii.gz"}], False)):
        parser["validate#dataset#data"] = data
        parser.parse()
        assert parser.get_parsed_content(f"train#handlers#{i}#_disabled_") is disabled, (name, data)
    # the data set is generated where the bundle's own list is read (tests/test_monailabel.py checks
    # that a MONAI Label training generates nothing)
    assert "ensure_dataset" not in json.dumps(parser.get("initialize"))
    assert "ensure_dataset" in json.dumps(parser.get())


def _ensure_rank(rank, world, init_file, out_dir, results):
    import torch.distributed as dist

    from npc_gtv.phantoms import ensure_dataset

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        path = ensure_dataset(out_dir, size="small", cases=2)
        results.put((rank, str(path)))
    finally:
        dist.destroy_process_group()


def test_ensure_dataset_under_ddp_rank0_generates_others_wait(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    out = tmp_path / "set"
    procs = [ctx.Process(target=_ensure_rank, args=(r, 2, tmp_path / "init", out, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(results.get(timeout=5) for _ in range(2))
    assert got[0] == got[1] == str(out / "dataset.json")
    assert len(json.loads((out / "dataset.json").read_text())["training"]) >= 1


def test_hcf_empty_validation_pieces(tmp_path):
    data = bundle_scripts("hcf_sanet", "data")
    assert data.volumes_to_slices([], None, allow_empty=True) == []
    with pytest.raises(ValueError, match="no case to cut into slices"):
        data.volumes_to_slices([], None)

    cascade = bundle_scripts("hcf_sanet", "cascade")
    nets = bundle_scripts("hcf_sanet", "networks")
    clf = nets.slice_classifier(in_channels=1, num_classes=2)
    torch.save(clf.state_dict(), tmp_path / "classifier.pt")
    res = cascade.calibrate_threshold(clf, tmp_path / "classifier.pt", [], tmp_path / "thr.json")
    assert res["threshold"] == 0.5 and res["slices"] == 0
    assert json.loads((tmp_path / "thr.json").read_text())["threshold"] == 0.5


def test_hcf_best_keeper_keeps_last_weights_without_validation(tmp_path):
    from ignite.engine import Engine

    engine_mod = bundle_scripts("hcf_sanet", "engine")
    net = torch.nn.Linear(2, 2)
    evaluator = Engine(lambda e, b: None)
    trainer = Engine(lambda e, b: None)
    keeper = engine_mod.BestModelKeeper(net, evaluator, tmp_path / "model.pt", "val_dice")
    keeper.attach(trainer)
    trainer.run([0, 1], max_epochs=2)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(saved["weight"], net.weight.detach())


def test_hcf_classifier_first_modes(tmp_path, monkeypatch):
    engine_mod = bundle_scripts("hcf_sanet", "engine")
    calls = []
    import monai.bundle

    def fake_run(**kwargs):
        calls.append(kwargs)
        (tmp_path / "classifier.pt").write_bytes(b"x")

    monkeypatch.setattr(monai.bundle, "run", fake_run)
    with pytest.raises(ValueError, match="classifier_first"):
        engine_mod.train_classifier_first("sometimes", tmp_path / "classifier.pt", [], [], [], 1)
    assert engine_mod.train_classifier_first("never", tmp_path / "classifier.pt", ["a.yaml"], [], [], 1) is False
    data = [{"image": "a.nii.gz", "label": "a_lbl.nii.gz"}]
    assert engine_mod.train_classifier_first("auto", tmp_path / "classifier.pt", ["a.yaml", "b.yaml"], data, [], 3,
                                             {"ckpt_dir": str(tmp_path)}) is True
    assert calls[0]["config_file"] == ["a.yaml", "b.yaml"] and calls[0]["run_id"] == "run"
    assert calls[0]["train#dataset#data"] == data and calls[0]["validate#dataset#data"] == []
    assert calls[0]["train#trainer#max_epochs"] == 3 and calls[0]["classifier_first"] == "never"
    assert engine_mod.train_classifier_first("auto", tmp_path / "classifier.pt", ["a.yaml"], data, [], 3) is False
    assert engine_mod.train_classifier_first("always", tmp_path / "classifier.pt", ["a.yaml"], data, [], 3) is True
    assert len(calls) == 2


def test_hcf_sanet_segments_a_volume_slice_by_slice():
    nets = bundle_scripts("hcf_sanet", "networks")
    net = nets.SANet(1, 2, width=16).eval()
    x = torch.randn(2, 1, 32, 32, 3)
    with torch.no_grad():
        y = net(x)
        ref = torch.stack([net(x[..., z]) for z in range(3)], -1)
    assert y.shape == (2, 2, 32, 32, 3)
    torch.testing.assert_close(y, ref)
    meta = json.loads((BUNDLES_DIR / "hcf_sanet" / "configs" / "metadata.json").read_text())
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 3  # MONAI Label's "dimension"


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_labels_match_the_masks(name):
    """MONAI Label reads labels from the output channel_def (non-background names -> channel index)."""
    meta = json.loads((BUNDLES_DIR / name / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
    assert labels == {"gtvp": 1}, labels  # the saved masks mark the GTVp with 1
    assert len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == 3


def test_peak_rss_counts_child_processes():
    """The memory sampler of the server check and bench/bench_train_request.py sees a child's allocation."""
    pytest.importorskip("psutil")
    import subprocess

    from npc_gtv.resources import PeakRSS

    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); import time; time.sleep(1.5)'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakRSS(proc.pid, interval=0.05) as rss:
        proc.wait()
    assert proc.returncode == 0
    assert rss.peak > 300 * 2**20, rss.peak
    with pytest.raises(ValueError, match="interval"):
        PeakRSS(os.getpid(), interval=0)
