"""Cascade inference of the HCF (paper section 3.1, Fig. 3).

:class:`CascadeInferer` is a MONAI ``Inferer``: the evaluator passes it the pre-processed 3D
volume and the *segmentation* network (SANet, the bundle's ``network_def``: one 2D tensor in, one
tensor out). The inferer

1. cuts the volume into axial slices (last spatial axis after ``Orientationd("RAS")``),
2. runs the slice classifier on every slice,
3. runs SANet only on the slices the classifier keeps (probability of "contains GTV" above
   ``threshold``),
4. fills the rejected slices with the background class (probability 1 for class 0, 0 for the
   others) and stacks everything back into a ``(B, K, X, Y, Z)`` probability volume.

Because the gating lives in the inferer, ``network_def`` stays a plain single-input network
(``verify_net_in_out``, TorchScript export and MONAI Label work on it).

:class:`SliceDecisionRecorder` (handler) compares the classifier's decisions with the ground-truth
slice flags during evaluation and writes the paper's Table 3 measure (slice recall) plus
precision, per case and overall.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from .engine import confusion_scores

__all__ = [
    "CascadeInferer",
    "FoldEnsemble",
    "FoldVoteInferer",
    "SliceDecisionRecorder",
    "load_classifier",
    "load_fold_ensemble",
    "fold_cascades",
    "fold_ckpt_dirs",
    "calibrate_threshold",
    "gate_threshold",
]

logger = logging.getLogger(__name__)


class CascadeInferer(Inferer):
    """Classifier-gated slice-wise segmentation of a 3D volume.

    Args:
        classifier: slice classifier ``(N, C, H, W) -> (N, 2)`` logits, or ``None`` to segment every
            slice (the "SANet alone" baseline).
        threshold: keep a slice when ``softmax(classifier)[:, 1] > threshold``.
        slice_batch_size: slices per forward pass (memory / speed trade-off).
        use_classifier: False segments every slice even when a classifier is given.
        min_kept: when no slice passes the gate, segment the ``min_kept`` slices with the highest
            classifier probability (0, the paper's behaviour: the output is empty).
        optimize: on CPU, run frozen TorchScript copies of both networks
            (``torch.jit.optimize_for_inference``: batch-norm folded into the convolutions, oneDNN
            layouts; about 3x faster on CPU, same outputs to float tolerance). The copies are made
            at the first call, i.e. after the checkpoint loaders ran; later weight changes are not
            seen, so use it for inference only. Falls back to the eager network if scripting fails.

    Call:
        ``inferer(inputs (B, C, X, Y, Z), network) -> (B, K, X, Y, Z)`` probabilities (softmax of
        SANet on kept slices, one-hot background on rejected slices). A 4D input ``(N, C, H, W)``
        is treated as ``N`` independent slices and returns ``(N, K, H, W)``.

    Attributes (of the last call):
        last_keep: ``(B, Z)`` bool, slices sent to SANet.
        last_prob: ``(B, Z)`` float, classifier probability of "contains GTV" (1 without classifier).
        timings: dict with ``classifier_s``, ``segmenter_s``, ``slices``, ``kept`` (cumulated
            over calls; :meth:`reset_timings` clears them).
    """

    def __init__(
        self,
        classifier: torch.nn.Module | None = None,
        threshold: float = 0.5,
        slice_batch_size: int = 16,
        use_classifier: bool = True,
        min_kept: int = 0,
        optimize: bool = False,
    ):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if slice_batch_size < 1:
            raise ValueError(f"slice_batch_size must be >= 1, got {slice_batch_size}")
        if min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {min_kept}")
        self.classifier = classifier
        self.threshold = float(threshold)
        self.slice_batch_size = int(slice_batch_size)
        self.use_classifier = bool(use_classifier) and classifier is not None
        self.min_kept = int(min_kept)
        self.optimize = bool(optimize)
        self._frozen: dict[int, tuple] = {}
        self.last_keep: torch.Tensor | None = None
        self.last_prob: torch.Tensor | None = None
        self.reset_timings()

    def reset_timings(self) -> None:
        self.timings = {"classifier_s": 0.0, "segmenter_s": 0.0, "slices": 0, "kept": 0}

    @staticmethod
    def _sync(device) -> None:
        if torch.cuda.is_available() and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    @staticmethod
    def _compile(net, level: int):
        """Level 0: frozen + ``optimize_for_inference``; 1: frozen only; 2: the eager network."""
        if level >= 2:
            return net
        net.eval()
        scripted = torch.jit.freeze(torch.jit.script(net))
        return torch.jit.optimize_for_inference(scripted) if level == 0 else scripted

    def _runnable(self, net, device, level: int | None = None) -> torch.nn.Module:
        """``net`` itself, or (``optimize`` on CPU) its frozen TorchScript copy, made once."""
        if not self.optimize or torch.device(device).type != "cpu":
            return net
        cached = self._frozen.get(id(net))
        if cached is None or cached[0] is not net or (level is not None and level > cached[2]):
            if level is None:
                # oneDNN tensors cannot be adaptively pooled to sizes that do not divide the input
                # (SANet's PPM bins 3 and 6): such networks start without the oneDNN conversion
                pools = [m.output_size for m in net.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
                level = 1 if any(p not in (1, (1, 1)) for p in pools) else 0
            while True:
                try:
                    run = self._compile(net, level)
                    break
                except Exception as exc:  # a network that does not script: next level
                    logger.warning("CascadeInferer: TorchScript level %d failed for %s (%s)", level, type(net).__name__, exc)
                    level += 1
            cached = (net, run, level)
            self._frozen[id(net)] = cached
        return cached[1]

    def _batched(self, net, x: torch.Tensor) -> torch.Tensor:
        while True:
            run = self._runnable(net, x.device)
            try:
                with torch.inference_mode():
                    outs = [run(x[i : i + self.slice_batch_size]) for i in range(0, x.shape[0], self.slice_batch_size)]
                return torch.cat(outs, 0).clone()
            except RuntimeError as exc:
                if run is net:
                    raise
                # e.g. oneDNN tensors reject adaptive pooling to non-divisible sizes (SANet's PPM)
                level = self._frozen[id(net)][2] + 1
                logger.info("CascadeInferer: %s falls back to TorchScript level %d (%s)", type(net).__name__, level, str(exc).strip().splitlines()[-1][:160])
                self._runnable(net, x.device, level=level)

    def classify(self, slices: torch.Tensor) -> torch.Tensor:
        """Probability ``(N,)`` that each slice ``(N, C, H, W)`` contains GTV (ones without classifier)."""
        if not self.use_classifier:
            return torch.ones(slices.shape[0], device=slices.device)
        self.classifier.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = self._batched(self.classifier, slices)
        self._sync(slices.device)
        self.timings["classifier_s"] += time.perf_counter() - t0
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"the classifier must return (N, 2) logits, got shape {tuple(logits.shape)}")
        return torch.softmax(logits.float(), 1)[:, 1]

    def segment_slices(self, slices: torch.Tensor, network, prob: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and segment ``(N, C, H, W)`` slices: returns ``(probabilities (N, K, H, W), keep (N,))``."""
        prob = self.classify(slices) if prob is None else prob
        keep = prob > self.threshold if self.use_classifier else torch.ones_like(prob, dtype=torch.bool)
        if self.min_kept and not keep.any():
            keep[torch.topk(prob, min(self.min_kept, prob.numel())).indices] = True
        idx = torch.nonzero(keep).flatten()
        t0 = time.perf_counter()
        seg = None
        if idx.numel():
            with torch.no_grad():
                seg = torch.softmax(self._batched(network, slices[idx]).float(), 1)
        self._sync(slices.device)
        self.timings["segmenter_s"] += time.perf_counter() - t0
        self.timings["slices"] += int(slices.shape[0])
        self.timings["kept"] += int(idx.numel())
        if seg is None:  # nothing kept: we still need K; ask the network for one slice's shape
            k = int(self._batched(network, slices[:1]).shape[1])
            out = slices.new_zeros((slices.shape[0], k) + tuple(slices.shape[2:]), dtype=torch.float32)
        else:
            out = slices.new_zeros((slices.shape[0], seg.shape[1]) + tuple(slices.shape[2:]), dtype=torch.float32)
            out[idx] = seg
        rejected = torch.nonzero(~keep).flatten()
        if rejected.numel():
            out[rejected, 0] = 1.0  # background with certainty: the zero mask after arg-max
        return out, keep

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        if x.ndim == 4:
            out, keep = self.segment_slices(x, network)
            self.last_keep = keep[None].cpu()
            self.last_prob = None
            return out
        if x.ndim != 5:
            raise ValueError(f"CascadeInferer expects (B, C, X, Y, Z) volumes or (N, C, H, W) slices, got shape {tuple(x.shape)}")
        b, c, h, w, z = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(b * z, c, h, w)
        prob = self.classify(slices)
        out, keep = self.segment_slices(slices, network, prob=prob)
        k = out.shape[1]
        vol = out.reshape(b, z, k, h, w).permute(0, 2, 3, 4, 1).contiguous()
        self.last_keep = keep.reshape(b, z).cpu()
        self.last_prob = prob.reshape(b, z).cpu()
        if isinstance(inputs, MetaTensor):  # keep meta data and transform trace for Invertd / SaveImaged
            out_meta = MetaTensor(vol)
            out_meta.copy_meta_from(inputs)
            return out_meta
        return vol


class FoldEnsemble(torch.nn.Module):
    """The SANets of the cross-validation folds, one per fold (the network of the fold-ensemble
    inference; :class:`FoldVoteInferer` runs each with its own fold's gate).

    Args:
        members: one segmentation network per fold, in fold order.
    """

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("FoldEnsemble needs at least one member network")
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean softmax of the members on ``(N, C, H, W)`` slices (no gating; see FoldVoteInferer)."""
        return torch.stack([torch.softmax(m(x).float(), 1) for m in self.members]).mean(0)


class FoldVoteInferer(Inferer):
    """Majority vote of the fold cascades (the HCF authors' fold ensemble).

    Fold ``k``'s :class:`CascadeInferer` (its classifier and gate threshold) runs with fold ``k``'s
    SANet (``network.members[k]``); each fold's result is arg-maxed, and the output holds, per class,
    the share of folds that voted for it: ``argmax`` of it is the majority (plurality) label, a tie
    going to the lower class, i.e. background. The largest connected component is kept afterwards by
    the inference post-processing (``keep_largest_component: true`` in ``fold_ensemble.yaml``).

    Args:
        cascades: one :class:`CascadeInferer` per fold, in the order of ``network.members``.

    Call:
        ``inferer(inputs (B, C, X, Y, Z), network: FoldEnsemble) -> (B, K, X, Y, Z)`` vote shares.

    Attributes (of the last call, for :class:`SliceDecisionRecorder`):
        last_keep: ``(B, Z)`` slices that a majority of the folds' gates kept.
        last_prob: ``(B, Z)`` mean gate probability over the folds.
        threshold: the folds' gate thresholds; timings: summed over the folds.
    """

    def __init__(self, cascades):
        super().__init__()
        self.cascades = list(cascades)
        if not self.cascades:
            raise ValueError("FoldVoteInferer needs at least one fold cascade")
        self.threshold = [c.threshold for c in self.cascades]
        self.last_keep: torch.Tensor | None = None
        self.last_prob: torch.Tensor | None = None

    @property
    def timings(self) -> dict:
        return {k: sum(c.timings[k] for c in self.cascades) for k in ("classifier_s", "segmenter_s", "slices", "kept")}

    def reset_timings(self) -> None:
        for c in self.cascades:
            c.reset_timings()

    def __call__(self, inputs: torch.Tensor, network: FoldEnsemble, *args, **kwargs) -> torch.Tensor:
        members = list(getattr(network, "members", []))
        if len(members) != len(self.cascades):
            raise ValueError(f"FoldVoteInferer has {len(self.cascades)} fold cascades but the network has {len(members)} members")
        votes, keeps, probs = None, [], []
        for cascade, net in zip(self.cascades, members):
            out = cascade(inputs, net)
            k = out.shape[1]
            onehot = torch.nn.functional.one_hot(torch.as_tensor(out).argmax(1), k).movedim(-1, 1).float()
            votes = onehot if votes is None else votes + onehot
            keeps.append(cascade.last_keep)
            if cascade.last_prob is not None:
                probs.append(cascade.last_prob)
        shares = votes / len(members)
        self.last_keep = torch.stack(keeps).float().mean(0) > 0.5
        self.last_prob = torch.stack(probs).mean(0) if probs else None
        if isinstance(inputs, MetaTensor):
            out_meta = MetaTensor(shares)
            out_meta.copy_meta_from(inputs)
            return out_meta
        return shares


def fold_ckpt_dirs(ckpt_dir, folds) -> list[str]:
    """``ckpt_dir/fold<k>`` for each fold (the layout written by ``configs/cross_validation.yaml``)."""
    from npc_gtv.crossval import fold_dir

    folds = [int(k) for k in folds]
    if not folds:
        raise ValueError("ensemble_folds is empty: list the folds to ensemble, e.g. [0, 1, 2, 3, 4]")
    return [fold_dir(ckpt_dir, k) for k in folds]


def load_fold_ensemble(network: torch.nn.Module, ckpt_dirs, device="cpu") -> FoldEnsemble:
    """One copy of ``network`` per fold with that fold's ``model.pt`` loaded (when the config is parsed).

    Raises:
        InputError: a fold's weights file is missing, unsafe or does not fit (names the file).
    """
    import copy

    from npc_gtv.training import load_weights
    from shared_transforms.io import InputError

    members = []
    for d in ckpt_dirs:
        path = Path(d) / "model.pt"
        state = load_weights(path, map_location="cpu")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        member = copy.deepcopy(network)
        try:
            member.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(path, f"weights do not fit the segmentation network: {str(exc).strip()[:300]}") from exc
        members.append(member)
    return FoldEnsemble(members).to(device).eval()


def fold_cascades(classifier: torch.nn.Module, ckpt_dirs, cls_threshold="auto", device="cpu", use_classifier: bool = True,
                  **cascade_args) -> list[CascadeInferer]:
    """One :class:`CascadeInferer` per fold: a copy of ``classifier`` with the fold's ``classifier.pt``
    and the fold's gate threshold (``cls_threshold`` as in ``inference.yaml``: ``auto`` reads the
    fold's ``classifier_threshold.json``)."""
    import copy

    cascades = []
    for d in ckpt_dirs:
        clf = load_classifier(copy.deepcopy(classifier), Path(d) / "classifier.pt", device, enabled=use_classifier)
        threshold = gate_threshold(cls_threshold, Path(d) / "classifier_threshold.json")
        cascades.append(CascadeInferer(clf, threshold=threshold, use_classifier=use_classifier, **cascade_args))
    return cascades


def load_classifier(network: torch.nn.Module, path, device="cpu", enabled: bool = True):
    """Load the slice classifier's weights (``weights_only``) when the config is parsed.

    Loading at instantiation (not in an evaluator handler) means every user of ``inferer`` gets the
    trained gate, including MONAI Label, which never runs the bundle's ``handlers``.

    Args:
        network: the classifier module (``classifier_def``).
        path: weights file (``ckpt_dir/classifier.pt``, a CPU ``state_dict``).
        device: device to move the classifier to.
        enabled: False returns ``None`` without reading anything (SANet alone).

    Raises:
        InputError: missing or unsafe file, or weights that do not fit the network (names the file).
    """
    if not enabled:
        return None
    from npc_gtv.training import load_weights
    from shared_transforms.io import InputError

    state = load_weights(path, map_location="cpu")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the slice classifier: {str(exc).strip()[:300]}") from exc
    return network.to(device).eval()


def calibrate_threshold(classifier: torch.nn.Module, path, dataloader, out_json, target_recall: float = 0.95,
                        device="cpu") -> dict:
    """Choose the gate's threshold on the validation slices: the highest one that keeps ``target_recall``.

    The paper does not give the classifier's operating point. A slice the gate rejects is lost to
    SANet, so the cascade needs a high slice recall more than a high precision: this picks the
    largest threshold ``t`` with ``recall(p > t) >= target_recall`` on the validation fold (``p``:
    softmax probability of "contains GTV") and writes it with its recall and precision to ``out_json``.

    Args:
        classifier: the classifier network (``network_def`` of ``train_classifier.yaml``).
        path: the trained weights (``classifier.pt``, the best by validation).
        dataloader: the validation slice loader (items with ``image`` and ``has_gtv``).
        out_json: file to write (``ckpt_dir/classifier_threshold.json``; rank 0, atomically).
        target_recall: slice recall to keep, in (0, 1].
        device: where to run the classifier.

    Returns:
        ``{"threshold", "target_recall", "recall", "precision", "positives", "slices"}``; with no
        positive validation slice (or no validation slice at all) the threshold stays 0.5.
    """
    from npc_gtv.training import is_rank0
    from shared_transforms.io import atomic_write

    if not 0.0 < float(target_recall) <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    net = load_classifier(classifier, path, device)
    probs, flags = [], []
    with torch.no_grad():
        for batch in dataloader:
            x = torch.as_tensor(batch["image"]).to(device=device, dtype=torch.float32)
            probs.append(torch.softmax(net(x).float(), 1)[:, 1].cpu())
            flags.append(torch.as_tensor(batch["has_gtv"]).reshape(-1).cpu())
    if not probs:
        logger.warning("no validation slices: the gate threshold stays 0.5 (not calibrated)")
    p = torch.cat(probs) if probs else torch.zeros(0)
    y = torch.cat(flags).bool() if flags else torch.zeros(0, dtype=torch.bool)
    pos = p[y]
    if pos.numel() == 0:
        threshold = 0.5
    else:
        # keep ceil(target * n) positives: the threshold sits just below the k-th highest positive score
        k = max(1, math.ceil(float(target_recall) * pos.numel()))
        kth = float(torch.sort(pos, descending=True).values[k - 1])
        threshold = max(0.0, min(0.5, kth - 1e-6))
    kept = p > threshold
    tp, fp = int((kept & y).sum()), int((kept & ~y).sum())
    result = {"threshold": threshold, "target_recall": float(target_recall),
              "recall": tp / max(int(y.sum()), 1), "precision": tp / max(tp + fp, 1),
              "positives": int(y.sum()), "slices": int(p.numel())}
    if is_rank0():
        with atomic_write(out_json) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2))
        print(f"gate threshold {threshold:.4f} (slice recall {result['recall']:.3f}, precision {result['precision']:.3f} "
              f"on {result['slices']} validation slices; target recall {target_recall}) written to {out_json}", flush=True)
    return result


def gate_threshold(setting, calibrated_json) -> float:
    """The gate threshold of inference: a number, or ``"auto"`` (the calibrated one, else 0.5).

    Args:
        setting: ``cls_threshold`` of ``inference.yaml``: a number in [0, 1] or ``"auto"``.
        calibrated_json: ``classifier_threshold.json`` written by the classifier training.
    """
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        path = Path(calibrated_json)
        if path.is_file():
            return float(json.loads(path.read_text())["threshold"])
        print(f"cls_threshold auto: no {path} (train the classifier with this bundle's train_classifier.yaml); using 0.5", flush=True)
        return 0.5
    value = float(setting)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"cls_threshold must be in [0, 1] or 'auto', got {setting!r}")
    return value


def _json_safe(obj):
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class SliceDecisionRecorder:
    """Evaluation handler: slice recall / precision of the cascade's classifier against the truth.

    At every evaluator iteration it reads the pre-processed label(s) of the batch (``label_key``,
    same grid as the classifier's input) and the inferer's ``last_keep``; at completion it writes
    ``<output_dir>/slice_classification.json`` (overall and per case) and ``slice_classification.csv``.

    Args:
        inferer: the :class:`CascadeInferer` used by the evaluator.
        output_dir: report folder.
        label_key: key of the pre-processed label in the batch.
    """

    def __init__(self, inferer: CascadeInferer, output_dir, label_key: str = "label"):
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.label_key = label_key
        self.records: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.records.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    @staticmethod
    def _items(batch) -> list:
        if isinstance(batch, dict):
            return [batch]
        return list(batch)

    def iteration(self, engine) -> None:
        keep = self.inferer.last_keep
        if keep is None:
            return
        items = self._items(engine.state.batch)
        labels, names = [], []
        for it in items:
            if self.label_key not in it:
                raise KeyError(f"SliceDecisionRecorder needs {self.label_key!r} in the batch (evaluate.yaml loads it)")
            lab = torch.as_tensor(it[self.label_key])
            labels.extend(lab if lab.ndim == 5 else [lab])
            meta = getattr(it.get("image"), "meta", {}) or {}
            name = it.get("case_id") or meta.get("filename_or_obj", "case")
            names.extend(name if isinstance(name, (list, tuple)) else [name])
        for i, lab in enumerate(labels):
            truth = (torch.as_tensor(lab) > 0).flatten(0, -2).any(0).cpu().numpy()
            pred = keep[i].numpy().astype(bool)
            if truth.shape != pred.shape:
                raise ValueError(f"{names[i]}: {pred.shape[0]} classified slices but the label has {truth.shape[0]}")
            case = Path(str(names[i])).name.split(".")[0]
            tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
            fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
            self.records.append({"case_id": case, "tp": tp, "fp": fp, "fn": fn, "tn": tn, **{k: v for k, v in confusion_scores(tp, fp, fn, tn).items() if k in ("recall", "precision")}})

    def summary(self) -> dict:
        tot = {k: sum(r[k] for r in self.records) for k in ("tp", "fp", "fn", "tn")}
        scores = confusion_scores(**{k: float(v) for k, v in tot.items()})
        return {
            "slices": int(sum(tot.values())),
            "kept": int(tot["tp"] + tot["fp"]),
            **tot,
            **{k: scores[k] for k in ("recall", "precision", "specificity", "accuracy")},
            "threshold": self.inferer.threshold,
            "cases": self.records,
        }

    def completed(self, engine=None) -> dict:
        from shared_transforms.io import atomic_write

        summary = self.summary()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.output_dir / "slice_classification.json") as tmp:
            tmp.write_text(json.dumps(_json_safe(summary), indent=2))
        with atomic_write(self.output_dir / "slice_classification.csv") as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=["case_id", "tp", "fp", "fn", "tn", "recall", "precision"])
                w.writeheader()
                for r in self.records:
                    w.writerow(r)
        logger.info("slice classifier: recall %.3f, precision %.3f over %d slices", summary["recall"], summary["precision"], summary["slices"])
        return summary

