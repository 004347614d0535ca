"""SATS losses: the voxel-wise margin (contrastive) loss and the total loss.

Margin loss (papers 000 eq. 1 / 001 eq. 2). With ``d2 = ||E(v) - E'(v)||^2`` the squared distance
between the projected features of voxel ``v`` in the image I and in its mirror I' (same voxel
index, i.e. mirrored anatomy), and ``m`` the asymmetric mask:

* ``form="intent"`` (default, what both papers' text says: "minimise the voxel-wise distance between
  original and flipped areas without tumour and encourage a larger distance ... with tumour"):
  ``pull = d2`` where ``m = 0`` and ``push = max(t - d2, 0)`` where ``m = 1``.
* ``form="printed"`` (the formula as printed): ``pull = d2`` where ``m = 1`` and
  ``push = max(t - d2, 0)`` where ``m != 1``. This pulls the features of the asymmetric tumour
  towards its healthy mirror, the opposite of the stated goal; it is kept for reproduction only.

Scale of ``t``: the projection head's features have unit L2 norm, so ``d2 = 2 - 2 cos <= 4``. With
the papers' ``t = 20`` the hinge ``max(t - d2, 0)`` is never 0: it always equals ``t - d2 >= 16`` and
its gradient is always ``-1`` per unit ``d2``, i.e. it pushes the pair towards opposite features
(``d2 = 4``) with a constant force instead of stopping at a margin. ``t <= 4`` gives a true hinge.

Reduction (``reduction``):

* ``"balanced"`` (default): mean of the pull term over its voxels + mean of the push term over its
  voxels; a term without voxels contributes 0. The few asymmetric tumour voxels (``m = 1``, often
  < 1 % of a patch) then weigh as much as all the others together; with a plain mean they would be
  drowned out.
* ``"mean"``: (sum of both terms) / (number of voxels).
* ``"sum"``: the plain sum of eq. (1) over voxels (and batch). Scale depends on the patch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from npc_gtv.learning import DiceCETermsLoss, TermsMixin

__all__ = ["MarginLoss", "SATSLoss", "deep_supervision_weights"]


class MarginLoss(nn.Module):
    """Voxel-wise margin loss between features of an image and of its left-right mirror.

    Args:
        margin: the margin ``t`` (papers: 20; see the module docstring for its meaning with unit features).
        form: ``"intent"`` (default) or ``"printed"``; see the module docstring.
        reduction: ``"balanced"`` (default), ``"mean"`` or ``"sum"``.

    Shapes:
        ``emb``, ``emb_flipped``: ``(B, C, X, Y, Z)``; ``asym``: ``(B, 1, X, Y, Z)`` or
        ``(B, X, Y, Z)`` with values 0/1. Returns a scalar.
    """

    def __init__(self, margin: float = 20.0, form: str = "intent", reduction: str = "balanced"):
        super().__init__()
        if form not in ("intent", "printed"):
            raise ValueError(f"form must be 'intent' or 'printed', got {form!r}")
        if reduction not in ("balanced", "mean", "sum"):
            raise ValueError(f"reduction must be 'balanced', 'mean' or 'sum', got {reduction!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.form = form
        self.reduction = reduction

    def forward(self, emb: torch.Tensor, emb_flipped: torch.Tensor, asym: torch.Tensor) -> torch.Tensor:
        if emb.shape != emb_flipped.shape:
            raise ValueError(f"emb {tuple(emb.shape)} and emb_flipped {tuple(emb_flipped.shape)} differ in shape")
        if asym.ndim == emb.ndim:
            if asym.shape[1] != 1:
                raise ValueError(f"asym must have one channel, got shape {tuple(asym.shape)}")
            asym = asym[:, 0]
        if tuple(asym.shape) != (emb.shape[0], *emb.shape[2:]):
            raise ValueError(f"asym shape {tuple(asym.shape)} does not match the features' {tuple(emb.shape)}")
        d2 = ((emb - emb_flipped) ** 2).sum(dim=1)  # (B, X, Y, Z)
        m1 = asym.to(d2.device) > 0.5
        push_where, pull_where = (m1, ~m1) if self.form == "intent" else (~m1, m1)
        pull = torch.where(pull_where, d2, torch.zeros_like(d2))
        push = torch.where(push_where, torch.clamp(self.margin - d2, min=0.0), torch.zeros_like(d2))
        if self.reduction == "sum":
            return pull.sum() + push.sum()
        if self.reduction == "mean":
            return (pull.sum() + push.sum()) / d2.numel()
        n_pull = pull_where.sum()
        n_push = push_where.sum()
        loss = d2.new_zeros(())
        if n_pull > 0:
            loss = loss + pull.sum() / n_pull
        if n_push > 0:
            loss = loss + push.sum() / n_push
        return loss


def deep_supervision_weights(n: int, scheme: str = "nnunet", lowest: float = 0.0) -> list[float]:
    """Weights of ``n`` deep-supervision outputs (full resolution first).

    ``"nnunet"``: ``1 / 2**i``, the lowest resolution weighted ``lowest`` (0), normalised to sum 1
    (nnU-Net's ``nnUNetTrainer._build_loss``; under DDP nnU-Net weights it 1e-6 instead, so that every
    parameter gets a gradient, and so does :class:`SATSLoss`); ``"none"``: the full-resolution output
    only (``[1, 0, ...]``).
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    if scheme not in ("nnunet", "none"):
        raise ValueError(f"deep supervision scheme must be 'nnunet' or 'none', got {scheme!r}")
    if scheme == "none" or n == 1:
        return [1.0] + [0.0] * (n - 1)
    w = [1.0 / (2**i) for i in range(n)]
    w[-1] = float(lowest)
    total = sum(w)
    return [v / total for v in w]


def _resize_label(label: torch.Tensor, size) -> torch.Tensor:
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(size), mode="nearest-exact")


class SATSLoss(TermsMixin, nn.Module):
    """Total SATS loss ``Dice + CE + beta * margin`` on an image / mirror pair, with deep supervision.

    The segmentation term is computed on both branches (I with s, I' with s') and averaged, since
    the Siamese network is trained on the original and the flipped CT. With two or more output
    channels it is nnU-Net's: softmax Dice over the foreground classes (batch Dice, smooth 1e-5) plus
    softmax cross-entropy; with one channel, sigmoid Dice plus binary cross-entropy. Deep-supervision
    outputs are weighted with :func:`deep_supervision_weights` against the label resized (nearest)
    to each output.

    Args:
        beta: weight of the margin loss (papers: 1; 0 disables it, stage 1).
        margin: ``t`` of :class:`MarginLoss`.
        form: margin-loss form, ``"intent"`` or ``"printed"``.
        reduction: margin-loss reduction.
        deep_supervision: ``"nnunet"`` (nnU-Net's weights) or ``"none"`` (full resolution only).

    Returns:
        ``forward`` returns a dict with ``loss`` (for backward) and the detached terms ``dice``, ``ce``
        and ``margin``; the terms are also recorded in ``self.terms`` for logging.
    """

    term_names = ("dice", "ce", "margin")

    def __init__(self, beta: float = 1.0, margin: float = 20.0, form: str = "intent", reduction: str = "balanced", deep_supervision: str = "nnunet"):
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        deep_supervision_weights(1, deep_supervision)  # validates the scheme
        self.beta = float(beta)
        self.deep_supervision = deep_supervision
        self.seg_softmax = DiceCETermsLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.seg_sigmoid = DiceCETermsLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.margin = MarginLoss(margin=margin, form=form, reduction=reduction)

    def _seg(self, logits, label) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = list(logits) if isinstance(logits, (list, tuple)) else [logits]
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        weights = deep_supervision_weights(len(outputs), self.deep_supervision, lowest=1e-6 if ddp else 0.0)
        dice = ce = outputs[0].new_zeros(())
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            fn = self.seg_sigmoid if out.shape[1] == 1 else self.seg_softmax
            d, c = fn.dice_ce(out, _resize_label(label, out.shape[2:]))
            dice = dice + w * d
            ce = ce + w * c
        return dice, ce

    def forward(self, logits, logits_flipped, label, label_flipped, emb=None, emb_flipped=None, asym=None) -> dict:
        """Args:
            logits, logits_flipped: network outputs for I and I': ``(B, C, X, Y, Z)`` tensors or lists of
                deep-supervision outputs (full resolution first).
            label, label_flipped: ``(B, 1, X, Y, Z)`` masks s and s'.
            emb, emb_flipped: ``(B, E, X, Y, Z)`` embeddings or None (no margin term).
            asym: ``(B, 1, X, Y, Z)`` asymmetric mask m.
        """
        d1, c1 = self._seg(logits, label)
        d2, c2 = self._seg(logits_flipped, label_flipped)
        dice, ce = 0.5 * (d1 + d2), 0.5 * (c1 + c2)
        seg = dice + ce
        if emb is not None and self.beta > 0:
            if asym is None:
                raise ValueError("the margin loss needs the asymmetric mask `asym`")
            margin = self.margin(emb, emb_flipped, asym)
        else:
            margin = seg.new_zeros(())
        self.record(dice=dice, ce=ce, margin=margin)
        return {"loss": seg + self.beta * margin, "dice": dice.detach(), "ce": ce.detach(), "margin": margin.detach()}
