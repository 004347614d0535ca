"""Combined Regularisation (CR) loss of the HCF paper (section 3.3, eqs. 4-8).

``L_CR = L_dice + (1 - alpha) * L_ce + alpha * epsilon`` with

* ``L_dice = 1 - 1/K sum_k 2 sum_i p_ik q_ik / (sum_i p_ik + sum_i q_ik)`` (eq. 5, all K classes,
  background included, softmax probabilities ``p``),
* ``L_ce`` the cross-entropy (eq. 7),
* ``epsilon = 1/K sum_k 1/N sum_i -log p_ik`` (eq. 8), the mean of ``-log p`` over all classes and
  pixels: the cross-entropy against the uniform distribution, which pulls the prediction away from
  over-confident background.

Cross-entropy normalisation: the paper's text calls ``L_ce`` "the standard cross-entropy loss"
but its eq. 7 also divides by ``K``. ``ce_normalisation="standard"`` (default, the stated intent
and what ``nn.CrossEntropyLoss`` computes) sums over classes and averages over pixels;
``"eq7"`` reproduces eq. 7 literally (the standard value divided by ``K``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from npc_gtv.learning import TermsMixin

__all__ = ["CRLoss", "DiceCELoss2d", "CrossEntropyTermsLoss"]


def _one_hot_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, H, W)`` or ``(B, H, W)`` class indices, or ``(B, K, H, W)`` one-hot -> one-hot float."""
    if target.ndim == 4 and num_classes > 1 and target.shape[1] == num_classes:
        return target.float()
    if target.ndim == 4:
        if target.shape[1] != 1:
            raise ValueError(f"target must be (B, 1, H, W) class indices or (B, K, H, W) one-hot, got shape {tuple(target.shape)}")
        target = target[:, 0]
    if target.ndim != 3:
        raise ValueError(f"target must be (B, 1, H, W) or (B, H, W), got shape {tuple(target.shape)}")
    idx = target.long()
    if idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f"target values must be in [0, {num_classes - 1}], got range [{int(idx.min())}, {int(idx.max())}]")
    return F.one_hot(idx, num_classes).permute(0, 3, 1, 2).float()


class CRLoss(TermsMixin, nn.Module):
    """Combined Regularisation loss (Dice + (1 - alpha) CE + alpha * epsilon).

    Args:
        alpha: weight of the uniform-distribution regulariser (0.1 in the paper). ``alpha = 0``
            gives Dice + CE.
        smooth: added to numerator and denominator of each class Dice (avoids 0/0 on empty classes).
        batch_dice: pool the Dice sums over the batch (True) or average per-image Dice (False, eq. 5
            is written per image).
        ce_normalisation: ``"standard"`` or ``"eq7"`` (see the module docstring).
        use_dice / use_ce: switch terms off for ablations (Dice only, CE only).

    Shapes:
        ``input (B, K, H, W)`` logits, ``target (B, 1, H, W)`` class indices (or one-hot
        ``(B, K, H, W)``) -> scalar. Each call records ``dice``, ``ce`` and ``epsilon`` in ``terms``.
    """

    term_names = ("dice", "ce", "epsilon")

    def __init__(self, alpha: float = 0.1, smooth: float = 1e-5, batch_dice: bool = False, ce_normalisation: str = "standard", use_dice: bool = True, use_ce: bool = True):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if ce_normalisation not in ("standard", "eq7"):
            raise ValueError(f"ce_normalisation must be 'standard' or 'eq7', got {ce_normalisation!r}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        if not (use_dice or use_ce):
            raise ValueError("at least one of use_dice / use_ce must be True")
        self.alpha = float(alpha)
        self.smooth = float(smooth)
        self.batch_dice = bool(batch_dice)
        self.ce_normalisation = ce_normalisation
        self.use_dice = bool(use_dice)
        self.use_ce = bool(use_ce)

    def compute_terms(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The separate terms ``dice``, ``ce``, ``epsilon`` and the total ``loss`` (all scalars)."""
        if input.ndim != 4:
            raise ValueError(f"input must be (B, K, H, W) logits, got shape {tuple(input.shape)}")
        k = int(input.shape[1])
        q = _one_hot_target(target, k).to(input.device)
        if q.shape != input.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}")
        logp = F.log_softmax(input.float(), dim=1)
        p = logp.exp()
        dims = (0, 2, 3) if self.batch_dice else (2, 3)
        inter = (p * q).sum(dims)
        denom = p.sum(dims) + q.sum(dims)
        dice = 1.0 - ((2.0 * inter + self.smooth) / (denom + self.smooth)).mean()
        ce = -(q * logp).sum(1).mean()
        if self.ce_normalisation == "eq7":
            ce = ce / k
        eps = -logp.mean()
        loss = input.new_zeros(()).float()
        if self.use_dice:
            loss = loss + dice
        if self.use_ce:
            loss = loss + (1.0 - self.alpha) * ce + self.alpha * eps
        return {"dice": dice, "ce": ce, "epsilon": eps, "loss": loss}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.compute_terms(input, target)
        self.record(dice=t["dice"], ce=t["ce"], epsilon=t["epsilon"])
        return t["loss"]


class DiceCELoss2d(CRLoss):
    """Dice + CE (the paper's Table 6 baseline): :class:`CRLoss` with ``alpha = 0``."""

    def __init__(self, smooth: float = 1e-5, batch_dice: bool = False, ce_normalisation: str = "standard"):
        super().__init__(alpha=0.0, smooth=smooth, batch_dice=batch_dice, ce_normalisation=ce_normalisation)


class CrossEntropyTermsLoss(TermsMixin, nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (the slice classifier's loss) that records its value as ``terms["ce"]``."""

    term_names = ("ce",)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = super().forward(input, target)
        self.record(ce=loss)
        return loss
