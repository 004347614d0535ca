"""Slice data of the HCF bundle: 3D CT -> pre-processed 2D axial slices, folds and augmentation.

Pre-processing (paper section 4.2), applied to each 3D volume by :func:`volume_transforms`:

1. ``LoadImaged`` + ``EnsureChannelFirstd`` (``shared_transforms.mri.LoadVolumed``; for MRI it stacks
   T1, T2 and CE-T1 on the CE-T1 grid, each channel z-scored, and steps 3 and 4 are left out);
2. ``Orientationd("RAS")``: the third array axis becomes the cranio-caudal axis whatever the file's
   orientation (read from the affine), so axial slices are ``[..., z]`` and the second in-plane
   axis is anterior-posterior (the image's vertical axis);
3. ``shared_transforms.spatial.BodyCropd``: body mask by HU threshold, erosion and largest
   connected component, crop to its bounding box (on HU, before windowing);
4. ``shared_transforms.intensity.HUWindowd``: HU window scaled to [0, 1];
5. ``Resized`` in-plane to ``resize x resize`` (512 in the paper), slice count unchanged.

Every step is invertible (MONAI ``InvertibleTransform``), so ``Invertd`` puts a prediction made on
the resized crop back on the original CT grid (shape and affine).

:func:`volumes_to_slices` runs the pipeline on every case of a data list and cuts the result into
2D items ``{"image": (1, S, S), "label": (1, S, S), "has_gtv": 0/1, "case_id", "slice"}``;
:func:`augmentation` is the on-line 2D augmentation (random erasing, zoom, elastic distortion,
rotation, vertical flip, Gaussian noise) built from MONAI transforms.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    Rand2DElasticd,
    RandCoarseDropoutd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    Resized,
)

from shared_transforms.checks import CheckImaged
from shared_transforms.intensity import CTNormalized, HUWindowd
from shared_transforms.io import InputError
from shared_transforms.mri import LoadVolumed, input_modality
from shared_transforms.spatial import BodyCropd

__all__ = ["volume_transforms", "volumes_to_slices", "SliceDataset", "augmentation", "split_fold", "slice_has_gtv"]

logger = logging.getLogger(__name__)


def volume_transforms(
    keys: Sequence[str] = ("image", "label"),
    resize: int = 512,
    hu_window: Sequence[float] = (-150.0, 500.0),
    body_threshold: float = -500.0,
    body_erosion: int = 2,
    load: bool = True,
    fingerprint=None,
    modality: str = "ct",
) -> Compose:
    """3D pre-processing of the HCF paper (see the module docstring).

    Args:
        keys: ``("image",)`` for inference, ``("image", "label")`` for training / evaluation. The
            image is resized bilinearly, any other key with (centre-aligned) nearest-neighbour interpolation.
        resize: in-plane size of the output (multiple of 16 for SANet).
        hu_window: ``(a_min, a_max)`` HU window mapped to [0, 1].
        body_threshold: HU threshold of the body mask.
        body_erosion: erosion iterations before the largest component.
        load: start with ``LoadImaged`` + ``EnsureChannelFirstd`` (False when the data are already
            channel-first MetaTensors).
        fingerprint: None (the HU window) or an intensity fingerprint (dict or JSON path): nnU-Net's
            CT normalisation instead of the window (``shared_transforms.intensity.CTNormalized``).
        modality: ``"ct"`` or ``"mri"``: the image is the list of sequences (T1, T2, CE-T1), stacked
            on the CE-T1 grid with each channel z-scored (``shared_transforms.mri.LoadVolumed``); the
            HU-threshold body crop and the HU window (CT steps) are left out, the full field of view
            is resized.

    Returns:
        a ``Compose`` mapping ``{"image": path, ...}`` to ``(1, resize, resize, Z')`` tensors.
    """
    keys = list(keys)
    if "image" not in keys:
        raise ValueError(f"keys must include 'image', got {keys}")
    if int(resize) < 16 or int(resize) % 16:
        raise ValueError(f"resize must be a positive multiple of 16 (SANet's output stride), got {resize}")
    if len(hu_window) != 2 or not hu_window[1] > hu_window[0]:
        raise ValueError(f"hu_window must be (a_min, a_max) with a_max > a_min, got {hu_window}")
    modality = input_modality(modality)
    if modality == "mri" and fingerprint is not None:
        raise ValueError("nnU-Net's CT normalisation (a fingerprint) is for CT; MRI channels are z-scored")
    modes = ["bilinear" if k == "image" else "nearest-exact" for k in keys]
    steps = []
    if load:
        steps += [
            LoadVolumed(keys=keys, modality=modality),
            CheckImaged(image_keys="image", label_keys=[k for k in keys if k != "image"] or None, channels=None if modality == "mri" else 1),
        ]
    steps.append(Orientationd(keys=keys, axcodes="RAS"))
    if modality == "ct":
        steps += [
            BodyCropd(keys=keys, source_key="image", threshold=body_threshold, erosion_iterations=body_erosion),
            HUWindowd(keys="image", a_min=float(hu_window[0]), a_max=float(hu_window[1])) if fingerprint is None
            else CTNormalized(keys="image", fingerprint=fingerprint),
        ]
    steps += [
        Resized(keys=keys, spatial_size=(int(resize), int(resize), -1), mode=modes, anti_aliasing=False),
        EnsureTyped(keys=keys, dtype=[torch.float32] + [torch.uint8] * (len(keys) - 1), track_meta=True),
    ]
    return Compose(steps)


def slice_has_gtv(label) -> np.ndarray:
    """Per-axial-slice flags of a ``(1, X, Y, Z)`` or ``(X, Y, Z)`` mask: 1 where the slice has GTV."""
    arr = torch.as_tensor(label)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a (1, X, Y, Z) or (X, Y, Z) mask, got shape {tuple(arr.shape)}")
    return (arr > 0).flatten(0, 1).any(0).cpu().numpy().astype(np.int64)


def volumes_to_slices(datalist: Sequence[dict], transform, keep_empty_cases: bool = True, image_dtype=torch.float16,
                      allow_empty: bool = False) -> list[dict]:
    """Pre-process every case and cut it into axial slices.

    Args:
        datalist: Decathlon items ``{"image": path, "label": path, "case_id": ...}``.
        transform: the 3D pipeline (:func:`volume_transforms` with keys image and label).
        keep_empty_cases: keep the slices of cases without any GTV (all normal slices).
        image_dtype: storage dtype of the slice images (float16 halves the memory of the cache;
            :func:`augmentation` converts back to float32).
        allow_empty: an empty ``datalist`` gives no slices instead of an error (a validation list
            may be empty; a training list may not).

    Returns:
        list of 2D items ``{"image": (1, S, S), "label": (1, S, S) uint8, "has_gtv": int,
        "case_id": str, "slice": int}``.

    Raises:
        InputError: a case that cannot be loaded or whose label does not fit its image (names it).
    """
    if not datalist:
        if allow_empty:
            return []
        raise ValueError("the data list is empty: no case to cut into slices")
    slices: list[dict] = []
    for item in datalist:
        case = item.get("case_id", item.get("image"))
        try:
            d = transform(dict(item))
        except InputError:
            raise
        except Exception as exc:  # MONAI wraps loader/transform errors in RuntimeError
            raise InputError(item.get("image"), f"pre-processing of case {case} failed: {exc}") from exc
        img, lbl = d["image"], d["label"]
        if tuple(img.shape[1:]) != tuple(lbl.shape[1:]):
            raise InputError(item.get("label"), f"label grid {tuple(lbl.shape[1:])} does not match image {tuple(img.shape[1:])}")
        flags = slice_has_gtv(lbl)
        if not keep_empty_cases and not flags.any():
            continue
        img_t = torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img).to(image_dtype)
        lbl_t = torch.as_tensor(lbl.as_tensor() if hasattr(lbl, "as_tensor") else lbl).to(torch.uint8)
        for z in range(img_t.shape[-1]):
            slices.append(
                {
                    "image": img_t[..., z].clone(),
                    "label": lbl_t[..., z].clone(),
                    "has_gtv": int(flags[z]),
                    "case_id": str(case),
                    "slice": int(z),
                }
            )
    n_pos = sum(s["has_gtv"] for s in slices)
    logger.info("%d slices from %d cases: %d with GTV, %d without", len(slices), len(datalist), n_pos, len(slices) - n_pos)
    return slices


class SliceDataset(Dataset):
    """2D slice data set built from a list of 3D cases (MONAI ``Dataset`` over the cut slices).

    ``data`` is the usual Decathlon list of 3D cases (``{"image", "label", "case_id"}``), so a bundle
    config (or MONAI Label, which overrides ``train#dataset#data``) passes volumes; the cases are
    pre-processed once with ``volume_transform`` and cut into axial slices by
    :func:`volumes_to_slices`; ``transform`` (the 2D augmentation) runs on each slice when it is read.

    Args:
        data: list of 3D cases.
        volume_transform: 3D pipeline (:func:`volume_transforms` with keys image and label).
        transform: 2D transform of each slice item.
        image_dtype: storage dtype of the slice images.
        allow_empty: accept an empty ``data`` (validation; see :func:`volumes_to_slices`).

    Attributes:
        volumes: the 3D case list.
        flags: per-slice 0/1 "contains GTV" (for :class:`scripts.sampler.BalanceSampler`).
    """

    def __init__(self, data: Sequence[dict], volume_transform, transform=None, image_dtype=torch.float16,
                 allow_empty: bool = False):
        self.volumes = list(data)
        slices = volumes_to_slices(self.volumes, volume_transform, image_dtype=image_dtype, allow_empty=allow_empty)
        super().__init__(slices, transform)
        self.flags = [s["has_gtv"] for s in slices]


def augmentation(
    size: int,
    prob: float = 0.2,
    keys: Sequence[str] = ("image", "label"),
    vertical_flip_axis: int = 1,
    rotate_deg: float = 15.0,
    zoom: Sequence[float] = (0.85, 1.15),
    noise_std: float = 0.02,
    erase_fraction: Sequence[float] = (0.05, 0.2),
    elastic_sigma_px: float | None = None,
    elastic_magnitude: Sequence[float] = (1.0, 2.0),
    enabled: bool = True,
) -> Compose:
    """On-line 2D augmentation of the paper: random erasing, zoom, distortion, rotation, vertical flip, noise.

    Args:
        size: slice size ``S`` (sets the elastic control-point spacing and the erased box size).
        prob: probability of each random transform.
        keys: image key first; the others are masks (nearest interpolation, never erased or noised).
        vertical_flip_axis: in-plane axis of the vertical flip. After ``Orientationd("RAS")`` axis 1
            is anterior-posterior, the vertical axis of an axial CT display.
        rotate_deg: maximum in-plane rotation (degrees, both directions).
        zoom: zoom range (output size kept).
        noise_std: standard deviation of the additive Gaussian noise (image in [0, 1]).
        erase_fraction: side of the erased rectangle as a fraction of ``S`` (min, max); erased
            pixels get random values (torchvision-style random erasing).
        elastic_sigma_px: control-point spacing of the elastic distortion (default ``S / 8``).
        elastic_magnitude: displacement magnitude range of the elastic distortion (pixels).
        enabled: False returns only the type conversion (validation / ablations).

    Returns:
        a ``Compose`` of MONAI dictionary transforms for items ``{"image": (1, S, S), "label": (1, S, S)}``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    keys = list(keys)
    image = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    to_float = EnsureTyped(keys=keys, dtype=[torch.float32] * len(keys), track_meta=False)
    if not enabled:
        return Compose([to_float])
    s = int(size)
    sigma = max(4, int(round(elastic_sigma_px if elastic_sigma_px is not None else s / 8)))
    return Compose(
        [
            to_float,
            RandZoomd(keys=keys, prob=prob, min_zoom=float(zoom[0]), max_zoom=float(zoom[1]), mode=modes, padding_mode="constant", keep_size=True),
            Rand2DElasticd(
                keys=keys, spacing=(sigma, sigma), magnitude_range=tuple(float(m) for m in elastic_magnitude), prob=prob, mode=modes, padding_mode="zeros"
            ),
            RandRotated(keys=keys, range_x=float(np.deg2rad(rotate_deg)), prob=prob, mode=modes, padding_mode="zeros", keep_size=True),
            RandFlipd(keys=keys, prob=prob, spatial_axis=int(vertical_flip_axis)),
            RandGaussianNoised(keys=image, prob=prob, mean=0.0, std=float(noise_std)),
            RandCoarseDropoutd(
                keys=image,
                holes=1,
                spatial_size=max(1, int(s * erase_fraction[0])),
                max_spatial_size=max(1, int(s * erase_fraction[1])),
                fill_value=(0.0, 1.0),
                prob=prob,
            ),
            EnsureTyped(keys=keys, dtype=[torch.float32] * len(keys), track_meta=False),
        ]
    )


def split_fold(datalist: Sequence[dict], fold: int = 0, num_folds: int = 5, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Patient-level ``num_folds``-fold split: returns ``(training cases, validation cases)`` of ``fold``.

    Cases are shuffled once with ``seed`` and dealt into ``num_folds`` nearly equal folds; all slices
    of a patient therefore stay on one side.

    Raises:
        ValueError: ``fold`` outside ``[0, num_folds)``, ``num_folds < 2`` or more folds than cases.
    """
    n = len(datalist)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= int(fold) < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
    if n < num_folds:
        raise ValueError(f"{num_folds}-fold cross-validation needs at least {num_folds} training cases, the data list has {n}")
    order = np.random.default_rng(int(seed)).permutation(n)
    folds = np.array_split(order, num_folds)
    val_idx = set(int(i) for i in folds[int(fold)])
    train = [datalist[i] for i in range(n) if i not in val_idx]
    val = [datalist[i] for i in sorted(val_idx)]
    return train, val
