"""Optimisation helpers shared by the bundles: epoch length, output-bias prior, per-term loss logging.

Three things decide whether a segmentation network leaves the empty-mask plateau in reasonable
time, and every bundle handles them the same way:

* **Epoch length.** An "epoch" is ``iterations_per_epoch`` optimiser steps (nnU-Net's convention:
  250), not one pass over however many cases a data set happens to have. :func:`epoch_length`
  resolves the setting (``None`` / ``0`` / ``"auto"``: one pass over the data loader, the meaning
  some papers give it) and the trainers get it as ignite's ``epoch_length`` (the data loader is
  restarted when it runs out inside an epoch). Learning-rate schedules are stepped per iteration
  with a length of ``epochs * epoch_length`` iterations, so a budget means the same whatever the
  number of training cases.
* **Output bias at the foreground prior.** A freshly initialised output layer predicts
  ``p = 0.5`` everywhere. With a tumour covering well under 1 % of a patch, the mean
  cross-entropy then drives every logit negative first, and with SGD momentum 0.99 the network
  sits on the all-background solution for hundreds of iterations although it already ranks
  tumour above background. :func:`init_output_bias` sets the output bias so that the initial
  prediction equals the foreground prior (the focal-loss / RetinaNet remedy);
  :func:`foreground_prior` measures that prior on batches of the real training data loader.
  :func:`init_output_bias_from_data` combines the two and is what the training configs call in
  ``initialize`` (``output_bias_prior: auto``; a number fixes the prior; ``null`` keeps the
  framework's initialisation).
* **Every loss term visible.** Losses record their terms (Dice, cross-entropy, margin, pretext
  cross-entropies, ...) in ``loss.terms`` each iteration (:class:`TermsMixin`);
  :class:`LossTermsOutput` makes the stats / TensorBoard handlers print every term per iteration
  and the :class:`LossTermMetrics` handler adds their epoch means to ``engine.state.metrics``
  (``train_<term>``), which the console, TensorBoard and MLflow handlers (``--tracking mlflow``)
  all log at epoch level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss

__all__ = [
    "make_optimizer",
    "epoch_length",
    "foreground_prior",
    "init_output_bias",
    "init_output_bias_from_data",
    "TermsMixin",
    "DiceCETermsLoss",
    "LossTermsOutput",
    "LossTermAverage",
    "loss_term_metrics",
    "LossTermMetrics",
]


# ----------------------------------------------------------------------------------------------- optimiser
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(name: str, params, lr: float, momentum: float = 0.99, nesterov: bool = True, weight_decay: float = 0.0):
    """The optimiser a config names: ``"sgd"`` (momentum, Nesterov), ``"adam"`` or ``"adamw"``.

    Lets an override switch a bundle's optimiser with one key (``optimizer_name``) while the other
    settings keep their names; ``momentum`` and ``nesterov`` are used by SGD only.

    Args:
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        params: parameters or parameter groups (groups may carry their own ``lr``).
        lr: default learning rate.
        momentum, nesterov: SGD settings.
        weight_decay: L2 penalty (decoupled for AdamW).
    """
    key = str(name).strip().lower()
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=bool(nesterov), weight_decay=weight_decay)
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer_name must be one of {OPTIMIZERS}, got {name!r}")


# ----------------------------------------------------------------------------------------------- epochs
def epoch_length(iterations_per_epoch: int | str | None, dataloader: Any = None) -> int:
    """Number of iterations in one training epoch.

    Args:
        iterations_per_epoch: a positive number of iterations, or ``None`` / ``0`` / ``"auto"`` for one
            pass over ``dataloader`` (``len(dataloader)``).
        dataloader: the training data loader (needed only for one pass).

    Returns:
        the epoch length, >= 1.

    Raises:
        ValueError: a negative or non-numeric setting, or ``"auto"`` without a sized data loader.
    """
    if iterations_per_epoch is None or (isinstance(iterations_per_epoch, str) and iterations_per_epoch.strip().lower() in ("auto", "none", "null", "")):
        value = 0
    else:
        try:
            value = int(iterations_per_epoch)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"iterations_per_epoch must be a positive integer or 'auto', got {iterations_per_epoch!r}") from exc
        if value < 0 or value != float(iterations_per_epoch):
            raise ValueError(f"iterations_per_epoch must be a positive integer or 'auto', got {iterations_per_epoch!r}")
    if value > 0:
        return value
    if dataloader is None or not hasattr(dataloader, "__len__"):
        raise ValueError("iterations_per_epoch 'auto' (one pass over the data) needs a data loader with a length")
    n = len(dataloader)
    if n < 1:
        raise ValueError("the training data loader is empty: no case to train on")
    return int(n)


# ----------------------------------------------------------------------------------------------- bias
def foreground_prior(
    dataloader: Iterable,
    label_key: str = "label",
    batches: int = 16,
    per: str = "voxel",
    min_prior: float = 1e-4,
    max_prior: float = 0.5,
) -> float:
    """Foreground share of the training batches, measured on ``batches`` batches of ``dataloader``.

    Args:
        dataloader: the training data loader (its sampler, crops and balance sampling included, so
            the value is what the network really sees).
        label_key: key of the label in each batch (a dict, or a list of dicts for multi-sample crops).
        batches: number of batches to draw (the loader is restarted when it runs out).
        per: ``"voxel"`` (share of foreground voxels: segmentation) or ``"sample"`` (share of samples
            with any foreground: a slice or patch classifier).
        min_prior, max_prior: the result is clipped to this range (an empty draw gives ``min_prior``).

    Returns:
        the prior in ``[min_prior, max_prior]``.
    """
    if per not in ("voxel", "sample"):
        raise ValueError(f"per must be 'voxel' or 'sample', got {per!r}")
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    fg = total = 0.0
    drawn = 0
    while drawn < batches:
        empty = True
        for batch in dataloader:
            empty = False
            items = batch if isinstance(batch, (list, tuple)) else [batch]
            for item in items:
                label = item[label_key] if isinstance(item, Mapping) else item
                lab = torch.as_tensor(label).detach().float()
                if per == "voxel":
                    fg += float((lab > 0).sum())
                    total += float(lab.numel())
                else:
                    flat = (lab > 0).reshape(lab.shape[0], -1) if lab.ndim > 1 else (lab > 0)[:, None]
                    fg += float(flat.any(dim=1).sum())
                    total += float(flat.shape[0])
            drawn += 1
            if drawn >= batches:
                break
        if empty:
            raise ValueError("the training data loader is empty: cannot measure the foreground prior")
    prior = fg / total if total else 0.0
    return float(min(max(prior, min_prior), max_prior))


def _output_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The last convolution or linear layer with a bias, in registration order."""
    found = None
    for sub in module.modules():
        if isinstance(sub, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and sub.bias is not None:
            found = sub
    if found is None:
        raise ValueError(f"{type(module).__name__} has no convolution or linear layer with a bias to initialise")
    return found


def init_output_bias(layer: torch.nn.Module, prior: float, activation: str = "auto") -> torch.nn.Module:
    """Set the bias of an output layer so that the untrained prediction equals ``prior``.

    * one output channel (sigmoid): ``b = log(prior / (1 - prior))``;
    * ``C >= 2`` channels (softmax, channel 0 background): ``b_0 = log(1 - prior)`` and
      ``b_c = log(prior / (C - 1))`` for the others, so the softmax gives ``1 - prior`` to the
      background and shares ``prior`` among the foreground classes.

    Args:
        layer: the output convolution / linear layer, or a module whose last biased convolution /
            linear layer is the output layer.
        prior: foreground probability in (0, 1).
        activation: ``"sigmoid"``, ``"softmax"`` or ``"auto"`` (sigmoid for one channel).

    Returns:
        the modified layer.
    """
    if not 0.0 < float(prior) < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    if activation not in ("auto", "sigmoid", "softmax"):
        raise ValueError(f"activation must be 'auto', 'sigmoid' or 'softmax', got {activation!r}")
    if not (isinstance(layer, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and layer.bias is not None):
        layer = _output_layer(layer)
    bias = layer.bias
    channels = bias.numel()
    p = float(prior)
    with torch.no_grad():
        if channels == 1 or activation == "sigmoid":
            bias.fill_(math.log(p / (1.0 - p)))
        else:
            bias.fill_(math.log(p / (channels - 1)))
            bias[0] = math.log(1.0 - p)
    return layer


def init_output_bias_from_data(
    layer: torch.nn.Module | Sequence[torch.nn.Module],
    prior: float | str | None = "auto",
    dataloader: Iterable | None = None,
    label_key: str = "label",
    per: str = "voxel",
    batches: int = 16,
    activation: str = "auto",
) -> float | None:
    """``initialize`` step of the training configs: output bias at the measured (or given) prior.

    Args:
        layer: output layer or the network (see :func:`init_output_bias`), or a list of output layers
            (deep-supervision heads): each gets the same bias.
        prior: ``"auto"`` (measure it on ``batches`` training batches), a number in (0, 1), or
            ``None`` / ``"none"`` / ``False`` (leave the framework's initialisation).
        dataloader, label_key, per, batches: see :func:`foreground_prior`.
        activation: see :func:`init_output_bias`.

    Returns:
        the prior used, or None when nothing was changed. A resumed training then restores the
        checkpoint's weights over it.
    """
    if prior is None or prior is False or (isinstance(prior, str) and prior.strip().lower() in ("none", "null", "false", "off", "")):
        return None
    if isinstance(prior, str) and prior.strip().lower() == "auto":
        if dataloader is None:
            raise ValueError("output_bias_prior 'auto' needs the training data loader")
        value = foreground_prior(dataloader, label_key=label_key, batches=batches, per=per)
    else:
        try:
            value = float(prior)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"output_bias_prior must be 'auto', a number in (0, 1) or null, got {prior!r}") from exc
    for one in layer if isinstance(layer, (list, tuple)) else [layer]:
        init_output_bias(one, value, activation=activation)
    print(f"output bias initialised to the foreground prior {value:.5f} ({'measured on the training batches' if isinstance(prior, str) else 'given'})", flush=True)
    return value


# ----------------------------------------------------------------------------------------------- terms
class TermsMixin:
    """Losses that record their terms: ``self.terms`` maps term names to the latest values (floats).

    ``term_names`` lists the terms in logging order; :meth:`record` stores detached values.
    """

    term_names: Sequence[str] = ()

    def record(self, **values: torch.Tensor | float) -> None:
        self.terms = {name: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for name, v in values.items()}


class DiceCETermsLoss(TermsMixin, DiceCELoss):
    """MONAI ``DiceCELoss`` that records its two terms as ``terms = {"dice": ..., "ce": ...}``.

    Same arguments and value as :class:`monai.losses.DiceCELoss` (``ce`` is the binary
    cross-entropy with logits for one output channel, the softmax cross-entropy otherwise).

    Shapes:
        ``input`` ``(B, C, *spatial)`` logits, ``target`` ``(B, 1 or C, *spatial)``; returns a scalar.
    """

    term_names = ("dice", "ce")

    def dice_ce(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two unweighted terms ``(dice, ce)`` (tensors with gradient), without recording them."""
        if input.dim() != target.dim():
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} need the same number of dimensions")
        if target.shape[1] not in (1, input.shape[1]):
            raise ValueError(f"target has {target.shape[1]} channels, expected 1 or {input.shape[1]}")
        dice = self.dice(input, target)
        ce = self.ce(input, target) if input.shape[1] != 1 else self.bce(input, target)
        return dice, ce

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice, ce = self.dice_ce(input, target)
        self.record(dice=dice, ce=ce)
        return self.lambda_dice * dice + self.lambda_ce * ce


def _first_loss(output: Any) -> float | None:
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if isinstance(item, Mapping) and "loss" in item:
        value = item["loss"]
        return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return None


class LossTermsOutput:
    """``output_transform`` for ``StatsHandler`` / ``TensorBoardStatsHandler``: the loss and every term.

    Returns ``{"loss": total, **loss.terms}`` (the total from the engine output, the terms from the
    loss module, which records them during the iteration), so each term is printed and plotted
    per iteration.

    Args:
        loss: a loss with :class:`TermsMixin`'s ``terms``.
        prefix: put before every term name (e.g. ``"train_"``).
    """

    def __init__(self, loss: Any, prefix: str = ""):
        self.loss = loss
        self.prefix = prefix

    def __call__(self, output: Any) -> dict:
        out = {}
        total = _first_loss(output)
        if total is not None:
            out[f"{self.prefix}loss"] = total
        for name, value in (getattr(self.loss, "terms", None) or {}).items():
            out[f"{self.prefix}{name}"] = value
        return out


class LossTermAverage:
    """Ignite metric: the epoch mean of one recorded loss term (``loss.terms[name]``)."""

    def __new__(cls, loss: Any, name: str):
        from ignite.metrics import Average

        return Average(output_transform=_TermReader(loss, name))


class _TermReader:
    def __init__(self, loss: Any, name: str):
        self.loss, self.name = loss, name

    def __call__(self, _output: Any) -> float:
        terms = getattr(self.loss, "terms", None) or {}
        if self.name not in terms:
            raise ValueError(f"the loss {type(self.loss).__name__} recorded no term {self.name!r} this iteration (it has {sorted(terms)})")
        return terms[self.name]


def loss_term_metrics(loss: Any, prefix: str = "train_") -> dict:
    """``{prefix + term: epoch-mean metric}`` for every term of ``loss`` (trainer ``additional_metrics``)."""
    names = list(getattr(loss, "term_names", ()) or ())
    if not names:
        raise ValueError(f"{type(loss).__name__} declares no term_names; use a loss with TermsMixin")
    return {f"{prefix}{name}": LossTermAverage(loss, name) for name in names}


class LossTermMetrics:
    """Ignite handler: attach the epoch mean of every term of ``loss`` as a metric ``<prefix><term>``.

    A handler rather than ``additional_metrics`` because MONAI engines attach additional metrics
    only together with a key metric. List it before the stats / TensorBoard handlers in
    ``train#handlers`` so the means are ready when they log the epoch.

    Args:
        loss: a loss with :class:`TermsMixin` (``term_names`` and ``terms``).
        prefix: metric name prefix.
    """

    def __init__(self, loss: Any, prefix: str = "train_"):
        self.metrics = loss_term_metrics(loss, prefix)

    def attach(self, engine) -> None:
        for name, metric in self.metrics.items():
            metric.attach(engine, name)
