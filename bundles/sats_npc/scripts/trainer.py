"""Siamese SATS training iteration on Ignite (a MONAI SupervisedTrainer subclass).

Each batch holds the patch of the image ``I``, of its left-right mirror ``I'`` (the mirrored volume
cropped with the same box, see ``scripts.sampling``), the two masks ``s``, ``s'`` and the
asymmetric mask ``m``. The shared encoder-decoder sees ``I`` and ``I'`` in one forward pass; the loss
is :class:`scripts.losses.SATSLoss`, which records its terms (Dice, cross-entropy, margin) for the
stats handlers (``npc_gtv.learning.LossTermsOutput`` / ``loss_term_metrics``). ``engine.state.output``
carries ``loss`` and image / label / pred (the full-resolution logits of ``I``).
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

__all__ = ["SATSTrainer"]


class SATSTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration trains the Siamese pair with the SATS loss.

    Args:
        network: a :class:`scripts.network.SATSSiamese` (optionally DDP-wrapped): called as
            ``network(image, image_flipped)`` and returning ``(logits, logits_flipped, emb, emb_flipped)``.
        loss_function: a :class:`scripts.losses.SATSLoss`.
        image_key, label_key, asym_key, flipped_suffix: batch keys (defaults match ``LRFlipPaird``).
        grad_clip: clip the gradient norm to this value before each step (nnU-Net: 12); None: off.
        kwargs: everything else of :class:`SupervisedTrainer` (device, max_epochs, train_data_loader,
            optimizer, amp, train_handlers, ...).
    """

    def __init__(self, *args, image_key: str = "image", label_key: str = "label", asym_key: str = "asym_mask",
                 flipped_suffix: str = "_flipped", grad_clip: float | None = None, **kwargs):
        if grad_clip is not None and float(grad_clip) <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        super().__init__(*args, **kwargs)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.image_key = image_key
        self.label_key = label_key
        self.asym_key = asym_key
        self.flipped_suffix = flipped_suffix

    def _get(self, batchdata, key, engine):
        if key not in batchdata:
            raise KeyError(
                f"batch has no {key!r} (keys: {sorted(batchdata)}); the SATS pre-processing must add the mirrored "
                "keys and the asymmetric mask (shared_transforms.flip.LRFlipPaird) before MirrorConsistentCropd"
            )
        return batchdata[key].to(engine.state.device, non_blocking=engine.non_blocking)

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        sfx = self.flipped_suffix
        image = self._get(batchdata, self.image_key, engine)
        label = self._get(batchdata, self.label_key, engine)
        image_f = self._get(batchdata, self.image_key + sfx, engine)
        label_f = self._get(batchdata, self.label_key + sfx, engine)
        asym = self._get(batchdata, self.asym_key, engine)
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: label}

        def _compute():
            logits, logits_f, emb, emb_f = engine.network(image, image_f)
            engine.state.output[Keys.PRED] = logits[0] if isinstance(logits, (list, tuple)) else logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function(logits, logits_f, label, label_f, emb, emb_f, asym)
            engine.state.output[Keys.LOSS] = terms["loss"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute()
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip is not None:
                engine.scaler.unscale_(engine.optimizer)
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            _compute()
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
