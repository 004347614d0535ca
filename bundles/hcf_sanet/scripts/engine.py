"""Engine helpers of the HCF bundle: batch preparation, validation metrics, best-model keeping.

* :func:`prepare_classification_batch` feeds ``(image, has_gtv)`` to MONAI's ``SupervisedTrainer``
  / ``SupervisedEvaluator`` for the slice classifier.
* :class:`SliceConfusion` (ignite metric): recall, precision, specificity, balanced accuracy or F1
  of the slice classifier.
* :class:`GlobalDice` (ignite metric): Dice over all pixels of all validation slices (normal slices
  included, so false positives on slices without GTV lower it).
* :class:`BestModelKeeper`: after each validation, saves the network (CPU ``state_dict``,
  atomically) when the key metric improves and stops training after ``patience`` validations
  without improvement (the paper's early stopping with a tolerance of 30 epochs). It has
  ``state_dict`` / ``load_state_dict`` so that ``ResumableCheckpoint`` resumes it.
* :func:`train_classifier_first`: the slice-classifier training run inside SANet's ``train`` run
  (MONAI Label runs only ``train``), when no ``classifier.pt`` is there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.metrics import Metric

from npc_gtv.training import is_rank0, to_cpu, unwrap_module
from shared_transforms.io import atomic_write

__all__ = ["prepare_classification_batch", "SliceConfusion", "GlobalDice", "BestModelKeeper", "SCORES",
           "train_classifier_first", "CLASSIFIER_FIRST"]

logger = logging.getLogger(__name__)

SCORES = ("recall", "precision", "specificity", "balanced_accuracy", "f1", "accuracy")


def prepare_classification_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """``(image (B, 1, H, W), has_gtv (B,) long)`` from a collated slice batch (MONAI ``prepare_batch`` signature)."""
    image = batchdata["image"]
    target = torch.as_tensor(batchdata["has_gtv"]).long().reshape(-1)
    image = torch.as_tensor(image).to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    return image, target.to(device=device, non_blocking=non_blocking)


def confusion_scores(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Recall, precision, specificity, balanced accuracy, F1 and accuracy (NaN where undefined)."""
    nan = float("nan")
    recall = tp / (tp + fn) if tp + fn else nan
    precision = tp / (tp + fp) if tp + fp else nan
    specificity = tn / (tn + fp) if tn + fp else nan
    bal = (recall + specificity) / 2 if tp + fn and tn + fp else (recall if tp + fn else specificity)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    total = tp + fp + fn + tn
    return {
        "recall": recall,
        "precision": precision,
        "specificity": specificity,
        "balanced_accuracy": bal,
        "f1": f1,
        "accuracy": (tp + tn) / total if total else nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


class SliceConfusion(Metric):
    """Ignite metric of the slice classifier from ``(logits (B, 2), target (B,))`` outputs.

    Args:
        score: one of :data:`SCORES`.
        threshold: probability of class 1 above which a slice is kept ("contains GTV").
        output_transform: ignite output transform (e.g. ``monai.handlers.from_engine(["pred", "label"])``).
    """

    def __init__(self, score: str = "balanced_accuracy", threshold: float = 0.5, output_transform=lambda x: x, device="cpu"):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.score = score
        self.threshold = float(threshold)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._counts = torch.zeros(4, dtype=torch.float64)

    def update(self, output) -> None:
        logits, target = output
        logits, target = torch.as_tensor(logits).detach(), torch.as_tensor(target).detach().reshape(-1).long()
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"SliceConfusion expects (B, 2) logits, got shape {tuple(logits.shape)}")
        pred = (torch.softmax(logits.float(), 1)[:, 1] > self.threshold).long().cpu()
        target = target.cpu()
        self._counts += torch.tensor(
            [
                ((pred == 1) & (target == 1)).sum(),
                ((pred == 1) & (target == 0)).sum(),
                ((pred == 0) & (target == 1)).sum(),
                ((pred == 0) & (target == 0)).sum(),
            ],
            dtype=torch.float64,
        )

    def compute(self) -> float:
        counts = self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.clone()
            torch.distributed.all_reduce(counts)
        tp, fp, fn, tn = (float(c) for c in counts)
        return float(confusion_scores(tp, fp, fn, tn)[self.score])


class GlobalDice(Metric):
    """Dice of the foreground class pooled over all pixels of all slices seen.

    Outputs are ``(logits (B, K, H, W), label (B, 1, H, W))``; the prediction is the arg-max.
    An epoch without foreground in prediction and truth scores 1.
    """

    def __init__(self, output_transform=lambda x: x, device="cpu"):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._sums = torch.zeros(3, dtype=torch.float64)  # intersection, |pred|, |truth|

    def update(self, output) -> None:
        logits, label = output
        logits, label = torch.as_tensor(logits).detach(), torch.as_tensor(label).detach()
        pred = logits.argmax(1) > 0
        truth = (label[:, 0] if label.ndim == logits.ndim else label) > 0
        self._sums += torch.tensor([(pred & truth).sum(), pred.sum(), truth.sum()], dtype=torch.float64)

    def compute(self) -> float:
        sums = self._sums
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        inter, p, t = (float(s) for s in sums)
        return 1.0 if p + t == 0 else 2.0 * inter / (p + t)


class BestModelKeeper:
    """Keep the best network by a validation metric; early stopping.

    Attach to the *trainer* after MONAI's ``ValidationHandler``. At each trainer
    ``EPOCH_COMPLETED`` that followed a validation run it reads ``evaluator.state.metrics[metric_name]``;
    if it beats the best so far (by more than ``min_delta``) the network's CPU ``state_dict`` is
    written atomically to ``save_path`` (rank 0 only). After ``patience`` validations without
    improvement it terminates the trainer (``patience=0``: never). Being attached to the trainer
    (not the evaluator) avoids a circular reference in the bundle config and lets
    ``ResumableCheckpoint`` save this handler's state with the rest.

    Args:
        network: the trained network (DDP-wrapped allowed).
        evaluator: the validation engine whose metric is read.
        save_path: weights file (e.g. ``ckpt_dir/model.pt``).
        metric_name: metric name in the evaluator's metrics.
        patience: validations without improvement before stopping (paper: 30 epochs).
        min_delta: minimal improvement.
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, network, evaluator, save_path, metric_name: str, patience: int = 0, min_delta: float = 0.0, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.network = network
        self.evaluator = evaluator
        self.save_path = save_path
        self.metric_name = metric_name
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_rounds = 0
        self.stopped_epoch = -1
        self._validated = False

    def attach(self, engine) -> None:
        self.evaluator.add_event_handler(Events.COMPLETED, self._mark)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._keep_last_if_never_validated)

    def _keep_last_if_never_validated(self, trainer) -> None:
        # no validation ran (an empty validation list, e.g. MONAI Label with two labelled studies):
        # the last weights are the only ones there are
        if self.best is None:
            logger.warning("no validation ran during training: the last weights are written to %s", self.save_path)
            self.save()

    def _mark(self, _engine=None) -> None:
        self._validated = True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_rounds": self.bad_rounds, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_epoch = int(state.get("best_epoch", -1))
        self.bad_rounds = int(state.get("bad_rounds", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", -1))

    def _improved(self, value: float) -> bool:
        if value != value:  # NaN never improves
            return False
        if self.best is None:
            return True
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def save(self) -> None:
        if not is_rank0():
            return
        state = to_cpu(unwrap_module(self.network).state_dict())
        with atomic_write(self.save_path) as tmp:
            torch.save(state, tmp)

    def __call__(self, trainer) -> None:
        if not self._validated:
            return
        self._validated = False
        metrics = self.evaluator.state.metrics
        if self.metric_name not in metrics:
            raise KeyError(f"metric {self.metric_name!r} not computed by the evaluator (has {sorted(metrics)})")
        value = float(metrics[self.metric_name])
        epoch = int(trainer.state.epoch)
        if self._improved(value):
            self.best, self.best_epoch, self.bad_rounds = value, epoch, 0
            self.save()
            if is_rank0():
                logger.info("new best %s = %.4f at epoch %d, saved %s", self.metric_name, value, epoch, self.save_path)
        else:
            self.bad_rounds += 1
            if self.patience and self.bad_rounds >= self.patience:
                self.stopped_epoch = epoch
                logger.info("early stopping at epoch %d: no %s improvement for %d validations (best %.4f at epoch %d)",
                            epoch, self.metric_name, self.bad_rounds, self.best if self.best is not None else float("nan"), self.best_epoch)
                trainer.terminate()


CLASSIFIER_FIRST = ("auto", "always", "never")


def train_classifier_first(mode: str, classifier_path, config_files: Sequence[str], train_data: Sequence[dict],
                           val_data: Sequence[dict], max_epochs: int, overrides: Mapping | None = None) -> bool:
    """Train the slice classifier (``train_classifier.yaml`` merged on ``train.yaml``) before SANet.

    MONAI Label (and anyone who runs only ``train``) would otherwise get a SANet without the gate
    that inference needs. The classifier is trained on the same cases as SANet (``train#dataset#data``
    / ``validate#dataset#data`` of the calling run), for the same number of epochs, in a nested
    ``monai.bundle.run`` of ``config_files``; its ``finalize`` calibrates the gate threshold.

    Args:
        mode: ``"auto"`` (train when ``classifier_path`` is missing), ``"always"`` or ``"never"``.
        classifier_path: ``ckpt_dir/classifier.pt``.
        config_files: the classifier run's configs (``train.yaml``, ``train_classifier.yaml`` and
            the overrides the calling run merged, e.g. ``quick.yaml``).
        train_data: training cases (3-D ``{"image", "label"}`` items).
        val_data: validation cases (may be empty: no validation, the last weights are kept).
        max_epochs: classifier epochs (the calling trainer's ``max_epochs``, which MONAI Label sets).
        overrides: further plain-key overrides (``bundle_root``, ``ckpt_dir``, pre-processing keys).

    Returns:
        True when the classifier was trained.

    Raises:
        ValueError: ``mode`` is not one of :data:`CLASSIFIER_FIRST`.
    """
    if mode not in CLASSIFIER_FIRST:
        raise ValueError(f"classifier_first must be one of {CLASSIFIER_FIRST}, got {mode!r}")
    if mode == "never" or (mode == "auto" and Path(classifier_path).is_file()):
        return False
    from monai.bundle import run

    logger.info("training the slice classifier first (%s: %s)", mode, classifier_path)
    extra = {**dict(overrides or {}), "classifier_first": "never", "train#dataset#data": list(train_data),
             "validate#dataset#data": list(val_data), "train#trainer#max_epochs": int(max_epochs)}
    run(run_id="run", config_file=[str(c) for c in config_files], **extra)
    if not Path(classifier_path).is_file():
        raise RuntimeError(f"{classifier_path}: the slice-classifier training wrote no weights")
    return True
