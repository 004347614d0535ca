"""HCF bundle: slice pre-processing round trip, cascade gating / zero filling, metrics, early stopping (in-process, fast)."""

from __future__ import annotations

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import bundle_scripts

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hcf():
    bundle_scripts("hcf_sanet")
    import importlib

    return {m: importlib.import_module(f"scripts.{m}") for m in ("data", "cascade", "engine", "sampler")}


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from npc_gtv.phantoms import make_phantom
    from shared_transforms.io import save_nifti

    ph = make_phantom(seed=3, size="small", modality="ct")
    out = tmp_path_factory.mktemp("hcf_phantom")
    save_nifti(ph.image, ph.affine, out / "case_a.nii.gz")
    save_nifti(ph.label, ph.affine, out / "case_a_label.nii.gz")
    return out / "case_a.nii.gz", out / "case_a_label.nii.gz", ph


def test_preprocessing_round_trip_to_original_grid(hcf, phantom_files):
    from monai.transforms import Invertd

    from shared_transforms.spatial import body_mask

    img_path, lbl_path, ph = phantom_files
    t = hcf["data"].volume_transforms(keys=["image", "label"], resize=96)
    d = t({"image": str(img_path), "label": str(lbl_path)})
    assert d["image"].shape[1:3] == (96, 96)
    assert float(d["image"].min()) >= 0.0 and float(d["image"].max()) <= 1.0
    assert set(np.unique(d["label"].numpy()).tolist()) <= {0, 1}
    # the slice count is the body's extent along the cranio-caudal axis (axis 2 after RAS)
    assert [op["class"] for op in d["image"].applied_operations] == ["Orientation", "BodyCrop", "Resize"]
    # the inference path: a float map inverted with bilinear interpolation, then thresholded
    d["pred"] = d["label"].float()
    back = Invertd(keys="pred", transform=t, orig_keys="label", nearest_interp=False)(d)["pred"]
    orig = nib.load(str(lbl_path))
    assert tuple(back.shape[1:]) == orig.shape
    assert np.abs(np.asarray(back.affine) - orig.affine).max() < 1e-4
    truth = np.asarray(orig.dataobj) > 0
    pred = back[0].numpy() > 0.5
    dice = 2 * (truth & pred).sum() / (truth.sum() + pred.sum())
    assert dice > 0.9
    # nothing comes back outside the body box
    body = body_mask(ph.image)
    idx = np.argwhere(body)
    lo, hi = idx.min(0), idx.max(0) + 1
    outside = np.ones_like(body)
    outside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
    assert not pred[outside].any()


def test_volumes_to_slices_flags_and_folds(hcf, phantom_files):
    img_path, lbl_path, _ = phantom_files
    t = hcf["data"].volume_transforms(keys=["image", "label"], resize=32)
    slices = hcf["data"].volumes_to_slices([{"image": str(img_path), "label": str(lbl_path), "case_id": "a"}], t)
    d = t({"image": str(img_path), "label": str(lbl_path)})
    assert len(slices) == d["image"].shape[-1]
    expected = [int(d["label"][..., z].sum() > 0) for z in range(d["image"].shape[-1])]
    assert [s["has_gtv"] for s in slices] == expected
    assert 0 < sum(expected) < len(expected)
    assert slices[0]["image"].shape == (1, 32, 32) and slices[0]["case_id"] == "a"
    aug = hcf["data"].augmentation(32, prob=1.0)
    out = aug(slices[int(np.argmax(expected))])
    assert out["image"].dtype == torch.float32 and out["image"].shape == (1, 32, 32)
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    cases = [{"case_id": f"c{i}"} for i in range(7)]
    seen = []
    for fold in range(5):
        tr, va = hcf["data"].split_fold(cases, fold, 5, seed=1)
        assert len(tr) + len(va) == 7 and not {c["case_id"] for c in tr} & {c["case_id"] for c in va}
        seen += [c["case_id"] for c in va]
    assert sorted(seen) == sorted(c["case_id"] for c in cases)  # every patient validated exactly once
    with pytest.raises(ValueError, match="at least 5"):
        hcf["data"].split_fold(cases[:3], 0, 5)
    with pytest.raises(Exception, match="missing.nii.gz"):
        hcf["data"].volumes_to_slices([{"image": "/nonexistent/missing.nii.gz", "label": str(lbl_path)}], t)


class _BrightSliceClassifier(torch.nn.Module):
    """Logits favouring 'GTV' for slices whose mean intensity is above 0.5."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), (m - 0.5) * 100], 1)


class _CountingSegmenter(torch.nn.Module):
    """Foreground logit +5 everywhere; records how many slices it saw."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.cat([torch.full_like(x[:, :1], -5.0), torch.full_like(x[:, :1], 5.0)], 1)


def test_cascade_zero_fills_rejected_slices_and_keeps_grid(hcf):
    from monai.data import MetaTensor

    vol = torch.zeros(1, 1, 32, 48, 6)
    vol[..., 1] = 1.0
    vol[..., 4] = 0.9
    affine = torch.diag(torch.tensor([-2.0, -2.0, 3.0, 1.0]))
    inputs = MetaTensor(vol, affine=affine)
    seg = _CountingSegmenter()
    inferer = hcf["cascade"].CascadeInferer(_BrightSliceClassifier(), threshold=0.5, slice_batch_size=4)
    out = inferer(inputs, seg)
    assert out.shape == (1, 2, 32, 48, 6)
    assert isinstance(out, MetaTensor) and torch.allclose(out.affine.double(), affine.double())
    assert inferer.last_keep.tolist() == [[False, True, False, False, True, False]]
    assert seg.seen == 2  # SANet only ran on the kept slices
    fg = out[0, 1]
    assert torch.all(fg[..., [0, 2, 3, 5]] == 0) and torch.all(out[0, 0][..., [0, 2, 3, 5]] == 1)
    assert torch.allclose(fg[..., [1, 4]], torch.full_like(fg[..., [1, 4]], 1 / (1 + math.exp(-10))))
    assert inferer.timings["slices"] == 6 and inferer.timings["kept"] == 2
    # SANet alone: every slice segmented
    seg_all = _CountingSegmenter()
    alone = hcf["cascade"].CascadeInferer(None)
    out_all = alone(vol, seg_all)
    assert seg_all.seen == 6 and bool((out_all[0].argmax(0) == 1).all())
    # nothing kept: an all-background volume
    none = hcf["cascade"].CascadeInferer(_BrightSliceClassifier(), threshold=0.5)
    empty = none(torch.zeros(1, 1, 16, 16, 3), _CountingSegmenter())
    assert empty.shape == (1, 2, 16, 16, 3) and bool((empty.argmax(1) == 0).all())



class _MaskSegmenter(torch.nn.Module):
    """Foreground logit +5 where a fixed in-plane mask is 1, -5 elsewhere (one mask for every slice)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))

    def forward(self, x):
        fg = (self.mask * 10 - 5).expand(x.shape[0], 1, *self.mask.shape)
        return torch.cat([-fg, fg], 1)


class _FixedSliceClassifier(torch.nn.Module):
    """GTV probability ``probs[z]`` for the z-th slice of each call (a volume of len(probs) slices)."""

    def __init__(self, probs):
        super().__init__()
        self.probs = torch.tensor(probs)

    def forward(self, x):
        p = self.probs[: x.shape[0]].clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], 1)


def test_fold_vote_is_the_majority_of_the_fold_cascades(hcf):
    """Three folds, hand-made masks and gates: the ensemble label is the per-voxel majority of the
    folds' cascade outputs (a fold's rejected slice votes background), the gate a majority too."""
    from monai.data import MetaTensor

    cascade = hcf["cascade"]
    a, b, c = torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4)
    a[0:2, 0:2] = 1  # voxels (0..1, 0..1)
    b[1:3, 1:3] = 1
    c[1:2, 0:3] = 1
    # fold gates on the 3 slices: fold 0 keeps all, fold 1 rejects slice 2, fold 2 rejects slices 0 and 2
    gates = [[0.9, 0.9, 0.9], [0.9, 0.9, 0.1], [0.1, 0.9, 0.2]]
    cascades = [cascade.CascadeInferer(_FixedSliceClassifier(g), threshold=0.5) for g in gates]
    ensemble = cascade.FoldEnsemble([_MaskSegmenter(m) for m in (a, b, c)])
    inputs = MetaTensor(torch.zeros(1, 1, 4, 4, 3), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    vote = cascade.FoldVoteInferer(cascades)
    out = vote(inputs, ensemble)
    assert out.shape == (1, 2, 4, 4, 3) and isinstance(out, MetaTensor)
    assert torch.allclose(out.sum(1), torch.ones(1, 4, 4, 3))
    label = out.argmax(1)[0]
    kept = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float32)  # fold x slice: slice kept
    masks = torch.stack([a, b, c])
    for z in range(3):
        votes = (masks * kept[:, z, None, None]).sum(0)
        assert torch.equal(label[..., z], (votes >= 2).long()), z
        assert torch.allclose(out[0, 1, ..., z], votes / 3)
    # slice 1: all folds keep it; (1,1) is in a, b and c, (1,0) in a and c, (1,2) in b and c
    assert sorted(map(tuple, torch.nonzero(label[..., 1]).tolist())) == [(1, 0), (1, 1), (1, 2)]
    # slice 0: folds 0 and 1 keep it, so a voxel needs both a and b: only (1,1)
    assert torch.nonzero(label[..., 0]).tolist() == [[1, 1]]
    # slice 2: only fold 0 keeps it -> no majority anywhere
    assert not label[..., 2].any()
    assert vote.last_keep.tolist() == [[True, True, False]]
    assert vote.threshold == [0.5, 0.5, 0.5] and vote.timings["slices"] == 9
    with pytest.raises(ValueError, match="3 fold cascades but the network has 2"):
        vote(inputs, cascade.FoldEnsemble([_MaskSegmenter(a), _MaskSegmenter(b)]))
    with pytest.raises(ValueError, match="at least one"):
        cascade.FoldVoteInferer([])
    with pytest.raises(ValueError, match="ensemble_folds is empty"):
        cascade.fold_ckpt_dirs("/models", [])
    assert cascade.fold_ckpt_dirs("/models", [0, 3]) == ["/models/fold0", "/models/fold3"]

def test_slice_recorder_hand_computed(hcf, tmp_path):
    from types import SimpleNamespace

    inferer = hcf["cascade"].CascadeInferer(None)
    rec = hcf["cascade"].SliceDecisionRecorder(inferer, tmp_path)
    label = torch.zeros(1, 4, 4, 5)
    label[0, 1, 1, [1, 2, 3]] = 1  # GTV on slices 1, 2, 3
    inferer.last_keep = torch.tensor([[False, True, True, False, True]])  # tp 2, fn 1, fp 1, tn 1
    engine = SimpleNamespace(state=SimpleNamespace(batch=[{"label": label, "case_id": "case7"}]))
    rec.iteration(engine)
    summary = rec.completed()
    assert (summary["tp"], summary["fp"], summary["fn"], summary["tn"]) == (2, 1, 1, 1)
    assert summary["recall"] == pytest.approx(2 / 3) and summary["precision"] == pytest.approx(2 / 3)
    saved = json.loads((tmp_path / "slice_classification.json").read_text())
    assert saved["cases"][0]["case_id"] == "case7" and saved["slices"] == 5


def test_metrics_hand_computed(hcf):
    eng = hcf["engine"]
    m = eng.SliceConfusion("recall")
    logits = torch.tensor([[0.0, 3.0], [0.0, -3.0], [0.0, 3.0], [0.0, -3.0]])  # predicted 1, 0, 1, 0
    target = torch.tensor([1, 1, 0, 0])
    m.update((logits, target))
    assert m.compute() == pytest.approx(0.5)
    b = eng.SliceConfusion("balanced_accuracy")
    b.update((logits, target))
    assert b.compute() == pytest.approx(0.5)
    g = eng.GlobalDice()
    pred = torch.zeros(2, 2, 2, 2)
    pred[:, 0] = 1.0
    pred[0, 1, 0, 0] = 5.0  # one foreground pixel predicted in image 0
    lab = torch.zeros(2, 1, 2, 2)
    lab[0, 0, 0, 0] = 1
    lab[1, 0, 1, 1] = 1  # one missed in image 1
    g.update((pred, lab))
    assert g.compute() == pytest.approx(2 * 1 / (1 + 2))


def test_best_keeper_saves_best_and_stops_early(hcf, tmp_path):
    from ignite.engine import Engine, Events

    eng = hcf["engine"]
    net = torch.nn.Linear(2, 1)
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.29, 0.9])
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.COMPLETED)
    def _score(e):
        e.state.metrics["val"] = next(scores)

    trainer = Engine(lambda e, b: None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(e):
        with torch.no_grad():
            net.weight.fill_(float(e.state.epoch))
        evaluator.run([0])

    keeper = eng.BestModelKeeper(net, evaluator, tmp_path / "best.pt", "val", patience=3)
    keeper.attach(trainer)
    trainer.run([0], max_epochs=6)
    assert trainer.state.epoch == 5  # epochs 3, 4, 5 did not beat 0.3 -> stop after 5
    assert keeper.best == pytest.approx(0.3) and keeper.best_epoch == 2 and keeper.stopped_epoch == 5
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert float(saved["weight"][0, 0]) == 2.0 and saved["weight"].device.type == "cpu"
    state = keeper.state_dict()
    other = eng.BestModelKeeper(net, evaluator, tmp_path / "x.pt", "val")
    other.load_state_dict(state)
    assert other.best == pytest.approx(0.3) and other.bad_rounds == 3


def test_cascade_optimized_cpu_path_matches_eager(hcf):
    nets = bundle_scripts("hcf_sanet", "networks")
    torch.manual_seed(0)
    sanet, cls = nets.SANet().eval(), nets.slice_classifier().eval()
    x = torch.rand(1, 1, 32, 32, 3)
    eager = hcf["cascade"].CascadeInferer(cls, threshold=0.0, optimize=False)
    fast = hcf["cascade"].CascadeInferer(cls, threshold=0.0, optimize=True)
    a, b = eager(x, sanet), fast(x, sanet)
    assert torch.allclose(a, b, atol=1e-5)
    assert fast.last_keep.all()
    # SANet's PPM pools to non-divisible sizes, which oneDNN tensors reject: it runs frozen without
    # oneDNN layouts (level 1); the classifier keeps the fully optimised copy (level 0)
    levels = {type(v[0]).__name__: v[2] for v in fast._frozen.values()}
    assert levels == {"ResNet": 0, "SANet": 1}
