"""Mirror-consistent random patch sampling for the Siamese (image, mirrored image) pair.

After symmetric registration the mid-sagittal plane is the grid's central sagittal plane, and
``LRFlipPaird`` mirrors the whole volume about it. The flipped keys (``image_flipped``,
``label_flipped``, ``asym_mask``) are cropped with the *same* box as the image, so voxel ``v`` of the
patch and of the mirrored patch always show mirrored anatomy (``I'[a + v] = I[n - 1 - a - v]`` along
the left-right axis read from the affine with ``shared_transforms.flip.lr_axis``), wherever the box is.

The box is random along every axis by default (``lr_jitter=None``: tumour-centred with probability
``pos_fraction``, else uniform), so training sees every left-right position that the sliding-window
inference sweeps. ``lr_jitter=j`` keeps the left-right start within ``j`` voxels of the centred start
``(n - p) // 2`` (``j = 0``: the plane always at the patch centre; then ``flip(patch)`` is the
patch of the mirrored volume at the patch's own place when ``n - p`` is even, ``n`` the volume size
and ``p`` the patch size along left-right).

The crop is a MONAI :class:`~monai.transforms.SpatialCrop` per key (invertible, tracked in the
MetaTensor's applied operations).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialCrop

from shared_transforms.flip import lr_axis

__all__ = ["mirror_consistent_box", "MirrorConsistentCrop", "MirrorConsistentCropd"]


def mirror_consistent_box(shape: Sequence[int], roi_size: Sequence[int], lr: int, centre: Sequence[int], lr_offset: int | None = 0) -> list[slice]:
    """Crop box of size ``roi_size`` centred on ``centre`` in the non-LR axes and near the grid centre in LR.

    Args:
        shape: spatial shape ``(X, Y, Z)`` of the volume (each >= ``roi_size``).
        roi_size: patch size ``(X, Y, Z)``.
        lr: index of the left-right spatial axis.
        centre: wanted patch centre (voxel indices); the LR entry is used only when ``lr_offset`` is None.
            Boxes are shifted to stay inside the volume.
        lr_offset: shift of the LR start from the centred start ``(n - p) // 2`` (0: the mid-sagittal
            plane at the patch centre), or None to centre the LR axis on ``centre`` like the others.

    Returns:
        three slices.
    """
    if len(shape) != 3 or len(roi_size) != 3 or len(centre) != 3:
        raise ValueError(f"shape, roi_size and centre must have 3 entries, got {shape}, {roi_size}, {centre}")
    if lr not in (0, 1, 2):
        raise ValueError(f"lr must be 0, 1 or 2, got {lr}")
    box = []
    for ax, (n, p, c) in enumerate(zip(shape, roi_size, centre)):
        n, p = int(n), int(p)
        if p > n:
            raise ValueError(f"patch size {tuple(roi_size)} is larger than the volume {tuple(shape)} along axis {ax}; pad first")
        if ax == lr and lr_offset is not None:
            start = int(np.clip((n - p) // 2 + int(lr_offset), 0, n - p))
        else:
            start = int(np.clip(int(c) - p // 2, 0, n - p))
        box.append(slice(start, start + p))
    return box


class MirrorConsistentCrop(Randomizable):
    """Array version: random mirror-consistent patch of a ``(C, X, Y, Z)`` volume.

    Args:
        roi_size: patch size ``(X, Y, Z)``; ``-1`` entries use the full volume size.
        pos_fraction: probability of centring the patch on a random foreground voxel of ``label``
            (tumour oversampling; otherwise uniform).
        lr_jitter: how the LR position is drawn: None (default) like the other axes (tumour-centred or
            uniform), so training sees every left-right position that the sliding-window inference
            sweeps; an integer ``j``: the LR start within ``j`` voxels of the centred start (0: the
            mid-sagittal plane always at the patch centre). The pairing holds either way: voxel
            ``v`` of the patch and of the mirrored patch show mirrored anatomy.

    Call with ``img`` ``(C, X, Y, Z)`` (a MetaTensor, or give ``affine``) and optionally ``label``.
    Returns the patch ``(C, *roi_size)``.
    """

    def __init__(self, roi_size: Sequence[int], pos_fraction: float = 0.33, lr_jitter: int | None = None):
        if len(roi_size) != 3:
            raise ValueError(f"roi_size must have 3 entries, got {roi_size}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        if lr_jitter is not None and int(lr_jitter) < 0:
            raise ValueError(f"lr_jitter must be None or >= 0, got {lr_jitter}")
        self.roi_size = [int(r) for r in roi_size]
        self.pos_fraction = float(pos_fraction)
        self.lr_jitter = None if lr_jitter is None else int(lr_jitter)
        self._box: list[slice] | None = None

    def _roi(self, shape):
        return [n if r <= 0 else r for r, n in zip(self.roi_size, shape)]

    def randomize_box(self, shape, affine, label=None) -> list[slice]:
        """Draw a box for a volume of spatial ``shape`` (and optional ``label`` ``(C, X, Y, Z)``)."""
        shape = [int(s) for s in shape]
        lr = lr_axis(affine)
        centre = [int(self.R.randint(0, n)) for n in shape]
        if label is not None and self.R.rand() < self.pos_fraction:
            fg = np.argwhere(np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)[0] > 0)
            if len(fg):
                centre = [int(v) for v in fg[self.R.randint(len(fg))]]
        offset = None if self.lr_jitter is None else (int(self.R.randint(-self.lr_jitter, self.lr_jitter + 1)) if self.lr_jitter else 0)
        self._box = mirror_consistent_box(shape, self._roi(shape), lr, centre, offset)
        return self._box

    def randomize(self, data=None) -> None:  # Randomizable API; the box needs the shape, see randomize_box
        pass

    def __call__(self, img, label=None, affine=None, randomize: bool = True):
        if affine is None:
            if not isinstance(img, MetaTensor):
                raise ValueError("MirrorConsistentCrop needs an affine (a MetaTensor image or `affine`)")
            affine = img.affine
        if randomize or self._box is None:
            self.randomize_box(img.shape[1:], affine, label)
        return SpatialCrop(roi_slices=self._box)(img)


class MirrorConsistentCropd(Randomizable, MapTransform):
    """Dictionary version: crop every key with the same mirror-consistent random box.

    Args:
        keys: keys to crop with the same box, e.g. ``["image", "label", "image_flipped",
            "label_flipped", "asym_mask"]``; values ``(C, X, Y, Z)``.
        roi_size: patch size ``(X, Y, Z)`` (paper 56 x 192 x 192 -> ``[192, 192, 56]``).
        ref_key: key whose affine (MetaTensor) defines the left-right axis and the shape.
        label_key: key of the tumour mask used for foreground oversampling (None: uniform).
        pos_fraction: probability of a tumour-centred patch.
        lr_jitter: LR placement, see :class:`MirrorConsistentCrop` (None: like the other axes).
        num_samples: number of patches per volume (a list is returned when > 1).
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        ref_key: Hashable = "image",
        label_key: Hashable | None = "label",
        pos_fraction: float = 0.33,
        num_samples: int = 1,
        allow_missing_keys: bool = False,
        lr_jitter: int | None = None,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.cropper = MirrorConsistentCrop(roi_size, pos_fraction, lr_jitter)
        self.ref_key = ref_key
        self.label_key = label_key
        self.num_samples = int(num_samples)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]):
        d = dict(data)
        ref = d[self.ref_key]
        if not isinstance(ref, MetaTensor):
            raise ValueError(f"{self.ref_key!r} must be a MetaTensor (its affine gives the left-right axis)")
        label = d.get(self.label_key) if self.label_key is not None else None
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(f"key {key!r} has spatial shape {tuple(d[key].shape[1:])}, expected {tuple(ref.shape[1:])} like {self.ref_key!r}")
        out = []
        for _ in range(self.num_samples):
            box = self.cropper.randomize_box(ref.shape[1:], ref.affine, label)
            sample = dict(d)
            crop = SpatialCrop(roi_slices=box)
            for key in self.key_iterator(d):
                sample[key] = crop(d[key])
            out.append(sample)
        return out if self.num_samples > 1 else out[0]
