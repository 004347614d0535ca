"""Multi-sequence MRI: resample T1 / T2 / CE-T1 onto one reference grid and stack them as channels.

The sequences of one MRI examination are usually acquired on different grids (slice thickness,
field of view, matrix). The NPC MRI data set (paper 002) delineates the tumour on each sequence;
a 3-channel network needs the three sequences voxel-aligned. :class:`StackSequences` takes the
sequences (file paths, DICOM folders, or loaded ``MetaTensor`` images), resamples every
sequence onto the grid of the reference sequence (default: the last, CE-T1) in world
coordinates with MONAI's ``SpatialResample`` (linear interpolation, zero outside a sequence's
field of view), normalises each channel with its own settings
(:class:`shared_transforms.intensity.ChannelNormalize`), and returns a ``(C, X, Y, Z)``
``MetaTensor`` carrying the reference sequence's affine and metadata. Predictions made on the
stack are therefore on the reference sequence's grid, where its mask lives.

A bundle switches from 1-channel CT to 3-channel MRI by replacing ``LoadImaged`` +
``EnsureChannelFirstd`` + ``HUWindowd`` of ``image`` with :class:`StackSequencesd` and setting
``in_channels: 3`` (see ``docs/dicom.md``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, MapTransform, SpatialResample, Transform

from shared_transforms.checks import SafeLoadImaged, setting_choice
from shared_transforms.intensity import ChannelNormalize
from shared_transforms.io import InputError

__all__ = ["StackSequences", "StackSequencesd", "LoadVolumed", "input_modality", "INPUT_MODALITIES", "DEFAULT_SEQUENCES"]

DEFAULT_SEQUENCES = ("t1", "t2", "cet1")


def _normalizer(spec):
    if spec is None or spec == "none":
        return None
    if isinstance(spec, ChannelNormalize):
        return spec
    if isinstance(spec, str):
        return ChannelNormalize(mode=spec)
    if isinstance(spec, Mapping):
        return ChannelNormalize(**spec)
    raise ValueError(f"normalisation must be None, a mode name, a dict of ChannelNormalize arguments or a ChannelNormalize, got {spec!r}")


def _load(item, modality):
    """A path (NIfTI file or DICOM folder) -> (1, X, Y, Z) MetaTensor; tensors get a channel axis."""
    if isinstance(item, (str, os.PathLike)):
        from monai.transforms import LoadImage

        from shared_transforms.dicom import DicomSeriesReader

        img = LoadImage(reader=DicomSeriesReader(modality=modality), image_only=True, ensure_channel_first=True)(str(item))
        return img
    if not isinstance(item, MetaTensor):
        raise ValueError("sequences must be file paths or MetaTensors carrying an affine")
    if item.ndim == 3:
        item = item.unsqueeze(0)
    if item.ndim != 4 or item.shape[0] != 1:
        raise ValueError(f"each sequence must be one channel (1, X, Y, Z) or (X, Y, Z), got shape {tuple(item.shape)}")
    return item


class StackSequences(Transform):
    """Resample MRI sequences onto the reference sequence's grid and stack them as channels.

    Args:
        reference: index of the reference sequence in the input list (default ``-1``: CE-T1 in
            the order T1, T2, CE-T1).
        normalize: per-channel normalisation: one spec for all channels or a list with one spec
            per channel; a spec is ``None`` (none), a :class:`ChannelNormalize` mode name
            (``"zscore"``, ``"percentile"``) or a dict of its arguments, e.g.
            ``{"mode": "zscore", "nonzero": True}``.
        mode: interpolation of the non-reference sequences (``"bilinear"`` or ``"nearest"``).
        modality: allowed DICOM modality when sequences are DICOM folders (``"MR"``).
        names: sequence names for messages (default t1, t2, cet1).

    Input: a sequence of ``C`` items, each a NIfTI path, a DICOM folder or a ``MetaTensor``
    ``(X, Y, Z)`` / ``(1, X, Y, Z)`` with its affine.
    Output: float32 ``MetaTensor`` ``(C, X, Y, Z)`` on the reference grid (reference affine and
    metadata; ``meta["sequence_names"]`` lists the channels).

    Raises:
        ValueError: bad arguments or inputs. InputError: a sequence that does not overlap the
            reference field of view.
    """

    def __init__(self, reference: int = -1, normalize=("zscore",), mode: str = "bilinear", modality="MR", names: Sequence[str] | None = None):
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        self.reference = int(reference)
        specs = normalize if isinstance(normalize, (list, tuple)) else [normalize]
        self.normalizers = [_normalizer(s) for s in specs]
        self.mode = mode
        self.modality = modality
        self.names = list(names) if names is not None else None
        self.resampler = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64)

    def __call__(self, sequences) -> MetaTensor:
        if isinstance(sequences, (str, os.PathLike)) or len(sequences) == 0:
            raise ValueError("StackSequences needs a list of sequences")
        n = len(sequences)
        names = self.names or (list(DEFAULT_SEQUENCES) if n == 3 else [f"seq{i}" for i in range(n)])
        if len(self.normalizers) not in (1, n):
            raise ValueError(f"{len(self.normalizers)} normalisation specs for {n} sequences")
        norms = self.normalizers * n if len(self.normalizers) == 1 else self.normalizers
        if not -n <= self.reference < n:
            raise ValueError(f"reference index {self.reference} out of range for {n} sequences")
        imgs = [_load(s, self.modality) for s in sequences]
        ref = imgs[self.reference]
        ref_affine, ref_shape = ref.affine, ref.shape[1:]
        channels = []
        for i, (img, name) in enumerate(zip(imgs, names)):
            if img is ref:
                out = ref.as_tensor().to(torch.float64)
            else:
                moved = self.resampler(img, dst_affine=ref_affine, spatial_size=ref_shape)
                out = moved.as_tensor() if isinstance(moved, MetaTensor) else torch.as_tensor(moved)
                if float(img.abs().sum()) > 0 and float(out.abs().sum()) == 0:
                    raise InputError(
                        img.meta.get("filename_or_obj", name),
                        f"sequence {name} does not overlap the reference sequence's field of view",
                    )
            if norms[i] is not None:
                out = torch.as_tensor(norms[i](out))
            channels.append(out.to(torch.float32))
        meta = {k: v for k, v in ref.meta.items() if k != "affine"}
        stacked = MetaTensor(torch.cat(channels, dim=0), affine=ref_affine.clone(), meta=meta)
        stacked.meta["sequence_names"] = list(names)
        stacked.meta["original_channel_dim"] = 0
        return stacked


class StackSequencesd(MapTransform):
    """Dictionary wrapper of :class:`StackSequences`.

    Two ways to use it:

    - ``keys="image"`` where ``d["image"]`` is the list ``[t1, t2, cet1]`` (paths, e.g. from a
      Decathlon ``dataset.json``, or loaded images): the key is replaced by the stack.
    - ``keys=["t1", "t2", "cet1"]`` with ``output_key="image"``: one key per sequence (paths or
      loaded channel-first images), the stack is written to ``output_key``.

    Args:
        keys: see above.
        output_key: destination key for the multi-key form (default: the single key itself).
        reference, normalize, mode, modality, names: see :class:`StackSequences` (``names``
            defaults to the keys in the multi-key form).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str | None = None,
        reference: int = -1,
        normalize=("zscore",),
        mode: str = "bilinear",
        modality="MR",
        names: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) > 1 and output_key is None:
            raise ValueError("output_key is required when stacking several keys")
        self.output_key = output_key
        if names is None and len(self.keys) > 1:
            names = [str(k) for k in self.keys]
        self.stacker = StackSequences(reference, normalize, mode, modality, names)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        if len(self.keys) == 1:
            d[self.output_key or keys[0]] = self.stacker(d[keys[0]])
        else:
            d[self.output_key] = self.stacker([d[k] for k in keys])
        return d



#: input modalities of the bundles' ``modality`` setting
INPUT_MODALITIES = ("ct", "mri")


def input_modality(value: str) -> str:
    """Check a bundle's ``modality`` setting (one of :data:`INPUT_MODALITIES`), lower case."""
    return setting_choice(value, INPUT_MODALITIES, "modality")


class LoadVolumed(MapTransform):
    """Load a case channel-first, CT or multi-sequence MRI: the one loading step the bundles share.

    * ``modality="ct"``: every key is one file (NIfTI) or a DICOM CT folder
      (:class:`~shared_transforms.checks.SafeLoadImaged` + ``EnsureChannelFirstd``): ``(1, X, Y, Z)``.
    * ``modality="mri"``: ``image_key`` holds the list of sequences (``[t1, t2, cet1]``, as the
      NPC MRI data set's ``dataset.json`` lists them), stacked by :class:`StackSequences` on the
      reference sequence's grid with per-channel normalisation: ``(C, X, Y, Z)``; the other keys
      (the mask, delineated on the reference sequence) are loaded as in CT.

    Args:
        keys: keys to load (the image and, for training / evaluation, the label).
        image_key: the image key.
        modality: ``"ct"`` or ``"mri"``.
        reference, normalize: of :class:`StackSequences` (MRI only; default CE-T1, z-score per channel).

    Raises:
        InputError: a file that cannot be read (named); for MRI an image that is not a list of sequences.
    """

    def __init__(self, keys: KeysCollection, image_key: str = "image", modality: str = "ct", reference: int = -1,
                 normalize=("zscore",), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.modality = input_modality(modality)
        file_keys = list(self.keys) if self.modality == "ct" else [k for k in self.keys if k != image_key]
        self.loader = SafeLoadImaged(file_keys, image_only=True, allow_missing_keys=allow_missing_keys) if file_keys else None
        self.channel_first = EnsureChannelFirstd(file_keys, allow_missing_keys=allow_missing_keys) if file_keys else None
        self.stacker = StackSequences(reference, normalize) if self.modality == "mri" else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.stacker is not None and self.image_key in d:
            seqs = d[self.image_key]
            if isinstance(seqs, (str, os.PathLike)) or not isinstance(seqs, (list, tuple)):
                raise InputError(seqs, "modality mri needs the image as a list of sequences (T1, T2, CE-T1), got one path")
            d[self.image_key] = self.stacker(list(seqs))
        if self.loader is not None:
            d = self.channel_first(self.loader(d))
        return d
