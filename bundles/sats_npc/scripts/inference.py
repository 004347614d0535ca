"""Inference helpers: sliding-window inferer with optional left-right mirror test-time augmentation."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from shared_transforms.flip import lr_axis

__all__ = ["MirrorTTAInferer"]


class MirrorTTAInferer(Inferer):
    """Wrap an inferer (e.g. ``SlidingWindowInferer``) with optional left-right mirror TTA.

    With ``mirror_tta`` the output is the mean of ``act(f(x))`` and ``flip(act(f(flip(x))))``,
    flipping along the left-right axis read from the input's affine, where ``act`` is the softmax over
    the channels (two or more output channels) or the sigmoid (one channel); without it the output is
    ``f(x)`` (``output="logits"``) or ``act(f(x))`` (``output="prob"``). With TTA the output is always
    probabilities, so the post-processing must not apply an activation again: use ``output="prob"``
    in both cases to keep one post-processing.

    Args:
        inferer: the wrapped inferer.
        mirror_tta: enable the mirror test-time augmentation.
        output: ``"prob"`` (probabilities) or ``"logits"`` (only without TTA).
        lr: fixed left-right spatial axis (0..2); None reads it from the MetaTensor input's affine.

    Shapes:
        ``inputs`` ``(B, C, X, Y, Z)`` -> ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(self, inferer: Inferer, mirror_tta: bool = False, output: str = "prob", lr: int | None = None):
        super().__init__()
        if output not in ("prob", "logits"):
            raise ValueError(f"output must be 'prob' or 'logits', got {output!r}")
        if mirror_tta and output == "logits":
            raise ValueError("mirror TTA averages probabilities; use output='prob'")
        self.inferer = inferer
        self.mirror_tta = bool(mirror_tta)
        self.output = output
        self.lr = lr

    def _axis(self, inputs) -> int:
        if self.lr is not None:
            return 2 + int(self.lr)
        if not isinstance(inputs, MetaTensor):
            raise ValueError("mirror TTA needs a MetaTensor input (affine) or a fixed `lr` axis")
        aff = inputs.affine
        if aff.ndim == 3:  # batched affines: all items must agree
            axes = {lr_axis(a) for a in aff}
            if len(axes) != 1:
                raise ValueError(f"batch items have different left-right axes {sorted(axes)}; use batch size 1")
            return 2 + axes.pop()
        return 2 + lr_axis(aff)

    @staticmethod
    def _prob(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        out = self.inferer(inputs, network, *args, **kwargs)
        if not self.mirror_tta:
            return self._prob(out) if self.output == "prob" else out
        axis = self._axis(inputs)
        out_f = self.inferer(torch.flip(inputs, dims=(axis,)), network, *args, **kwargs)
        return 0.5 * (self._prob(out) + torch.flip(self._prob(out_f), dims=(axis,)))
