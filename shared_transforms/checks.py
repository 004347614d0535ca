"""Pipeline checks: bad input stops with an :class:`~shared_transforms.io.InputError` naming the file.

* :class:`SafeLoadImaged` is MONAI's ``LoadImaged`` with clear errors: a missing, truncated or
  otherwise unreadable file raises ``InputError("<file>: <problem>")`` instead of the reader's
  own exception (for a truncated ``.nii.gz`` MONAI/nibabel report "Cannot work out file type",
  which does not say the file is damaged).
* :class:`CheckImage` / :class:`CheckImaged` run right after loading (with or without
  ``EnsureChannelFirstd``) and reject NaN / inf voxels, a 2D or 4D image where a 3D volume is
  expected, a label with values other than 0/1, a label whose grid (spatial shape or affine)
  differs from its image's, a singular or non-finite affine and a voxel spacing outside
  :data:`~shared_transforms.io.SPACING_RANGE_MM` (the same geometry checks as the ``npc-gtv``
  commands' :func:`~shared_transforms.io.load_nifti`). With ``modality="CT"`` (the bundles'
  inference configs, switch ``input_modality``) an image whose intensities are not those of a CT
  in Hounsfield units (no air near -1000 HU: a 0..1 normalised image, an MR) is refused
  (:func:`check_ct_intensities`). The data pass through unchanged.
* :func:`set_input_modality` sets that switch on every :class:`CheckImaged` of a pre-processing
  built by a function (e.g. a bundle's ``scripts.data.volume_transforms``).

The file name comes from the MetaTensor meta data (``filename_or_obj``); for plain arrays the key
name is used. Inside a MONAI ``Compose`` the InputError arrives wrapped in MONAI's
``RuntimeError("applying transform ...")`` (it is the ``__cause__``, printed in the traceback);
:func:`input_error_from` digs it out for a one-line message.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, Transform

from shared_transforms.io import (  # noqa: F401 (input_error_from re-exported)
    AFFINE_TOLERANCE,
    SPACING_RANGE_MM,
    InputError,
    check_affine,
    check_label_array,
    check_same_grid,
    input_error_from,
    load_nifti,
    nifti_header_problem,
)

__all__ = ["source_name", "input_error_from", "MODALITIES", "check_ct_intensities", "CheckImage", "CheckImaged",
           "set_input_modality", "SafeLoadImaged", "setting_choice"]

#: values of the ``modality`` switch: "CT" checks Hounsfield units, "MR" / "any" / None do not
MODALITIES = ("CT", "MR", "any")

# a CT in HU has air (about -1000 HU) around the head; below this many HU counts as air
_CT_AIR_HU = -500.0
# and tissue or bone above this (HU)
_CT_TISSUE_HU = -200.0


def setting_choice(value, choices: Sequence[str], name: str) -> str:
    """A config setting that must be one of ``choices``: stripped, lower case; ``ValueError`` naming it otherwise."""
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return text


def _normalise_modality(modality) -> str | None:
    if modality is None:
        return None
    text = str(modality).strip()
    for m in MODALITIES:
        if text.lower() == m.lower():
            return None if m == "any" else m
    raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")


def check_ct_intensities(array, source=None, *, max_samples: int = 1_000_000) -> tuple[float, float]:
    """Refuse an image that is not a CT in Hounsfield units.

    A planning CT of the head holds air (about -1000 HU) around the patient and soft tissue / bone
    (above -200 HU). The 0.5th percentile must lie below -500 HU and the 99.5th above -200 HU;
    the percentiles are taken on an evenly strided subsample of at most ``max_samples`` voxels.
    A normalised image (0..1), an MR (no negative values) or a CT in other units fails.

    Args:
        array: the image, any shape (numpy or torch).
        source: file name for the message.
        max_samples: largest number of voxels used for the percentiles.

    Returns:
        the ``(0.5th, 99.5th)`` percentiles.

    Raises:
        InputError: naming the file, the percentiles found and the switch for deliberate non-CT input.
    """
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    flat = a.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = flat[::step].astype(np.float32, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise InputError(source, "image has no finite voxel")
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if lo > _CT_AIR_HU or hi < _CT_TISSUE_HU:
        raise InputError(
            source,
            f"intensities do not look like a CT in Hounsfield units (0.5th-99.5th percentile {lo:.4g} to {hi:.4g}; a CT has "
            f"air below {_CT_AIR_HU:g} HU and tissue above {_CT_TISSUE_HU:g} HU): a normalised image or an MR? For deliberate "
            "non-CT input set input_modality to MR (--input_modality MR)",
        )
    return lo, hi


def source_name(img, default: str | None = None) -> str | None:
    """The source file of a MetaTensor (``meta["filename_or_obj"]``), else ``default``."""
    if isinstance(img, MetaTensor):
        src = img.meta.get("filename_or_obj")
        if isinstance(src, (list, tuple)):
            src = ", ".join(str(s) for s in src)
        if src not in (None, ""):
            return str(src)
    return default


def _layout(img, ndim: int):
    """Return ``(spatial_shape, n_channels)`` of a loaded image, from its meta data when available.

    ``LoadImage`` records the file's spatial shape in ``meta["spatial_shape"]``; a 4D file's extra
    axis becomes channels. Without meta data a ``ndim``-dimensional array has one channel and a
    ``ndim + 1``-dimensional one is channel-first.
    """
    shape = tuple(int(s) for s in img.shape)
    meta = img.meta if isinstance(img, MetaTensor) else {}
    file_spatial = meta.get("spatial_shape")
    if file_spatial is not None:
        file_spatial = tuple(int(v) for v in np.asarray(file_spatial).ravel())
        k = len(file_spatial)
        if k and shape[:k] == file_spatial:  # as loaded, channel-last (a 4D file's volumes come last)
            spatial, rest = shape[:k], shape[k:]
        else:  # channel-first (EnsureChannelFirst), possibly after a spatial transform
            spatial, rest = shape[len(shape) - k :], shape[: len(shape) - k]
        return spatial, int(np.prod(rest)) if rest else 1
    if len(shape) == ndim:
        return shape, 1
    if len(shape) == ndim + 1:
        return shape[1:], shape[0]
    return shape, 1


class CheckImage(Transform):
    """Check one loaded image or label and return it unchanged.

    Args:
        ndim: expected number of spatial dimensions (3).
        channels: expected number of channels / volumes: 1 for a CT (a 4D file with several
            volumes is rejected), 3 for a stacked T1/T2/CE-T1 MRI, None for any number.
        label: also require values 0/1 only.
        allow_nan: accept NaN / inf voxels.
        name: name used in messages when the input has no ``filename_or_obj``.
        modality: ``"CT"``: refuse intensities that are not Hounsfield units
            (:func:`check_ct_intensities`); ``"MR"``, ``"any"`` or None: no intensity check.
        spacing_range: accepted voxel spacing in mm, read from a MetaTensor's affine (the affine must
            also be finite and non-singular); None: no geometry check.

    Raises:
        InputError: (at call time) naming the file and the problem.
    """

    def __init__(self, ndim: int = 3, channels: int | None = 1, label: bool = False, allow_nan: bool = False, name: str | None = None,
                 modality: str | None = None, spacing_range=SPACING_RANGE_MM) -> None:
        if ndim < 1:
            raise ValueError(f"ndim must be >= 1, got {ndim}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1 or None, got {channels}")
        self.ndim, self.channels, self.label, self.allow_nan, self.name = ndim, channels, label, allow_nan, name
        self.modality = _normalise_modality(modality)
        self.spacing_range = None if spacing_range is None else tuple(float(v) for v in spacing_range)

    def __call__(self, img, name: str | None = None):
        """Args:
            img: loaded image, ``(X, Y, Z)`` or ``(C, X, Y, Z)`` (MetaTensor, torch or numpy).
            name: overrides the name used in messages for inputs without ``filename_or_obj``.

        Returns:
            ``img`` itself.
        """
        src = source_name(img, name or self.name)
        what = "label" if self.label else "image"
        spatial, channels = _layout(img, self.ndim)
        if len(spatial) != self.ndim:
            raise InputError(src, f"{what} is {len(spatial)}D (spatial shape {spatial}); a {self.ndim}D volume is expected")
        if min(spatial, default=0) == 0:
            raise InputError(src, f"{what} is empty (shape {tuple(img.shape)})")
        if self.channels is not None and channels != self.channels:
            if self.channels == 1:
                problem = f"{what} holds {channels} volumes (4D data, shape {tuple(img.shape)}); a single 3D volume is expected"
            else:
                problem = f"{what} has {channels} channels (shape {tuple(img.shape)}); {self.channels} are expected"
            raise InputError(src, problem)
        if isinstance(img, MetaTensor) and self.spacing_range is not None and self.ndim == 3:
            check_affine(img.affine, src, spacing_range=self.spacing_range)
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if isinstance(t, MetaTensor):
            t = t.as_tensor()
        if t.is_floating_point() and not self.allow_nan:
            bad = ~torch.isfinite(t)
            n_bad = int(bad.sum())
            if n_bad:
                first = tuple(int(i) for i in torch.nonzero(bad)[0])
                raise InputError(src, f"{what} has {n_bad} NaN/inf voxel(s), first at index {first}")
        if self.label:
            check_label_array(t.detach().cpu().numpy(), src)
        elif self.modality == "CT":
            check_ct_intensities(t, src)
        return img


class CheckImaged(MapTransform):
    """Check images and labels of a data dictionary after loading; the data pass through unchanged.

    Args:
        image_keys: keys of images (NaN, dimensionality, channel count).
        label_keys: keys of labels (also binary values and same grid as the first image key).
        ndim: expected spatial dimensions (3).
        channels: expected channels of the images (1: CT; 3: stacked MRI; None: any). Labels
            always have one.
        check_grid: require each label's spatial shape and affine to match the first image's.
        allow_nan: accept non-finite image voxels (labels never).
        affine_tol: largest accepted affine difference (mm).
        allow_missing_keys: skip missing keys (e.g. inference data without a label).
        modality: ``"CT"`` refuses image intensities that are not Hounsfield units; ``"MR"``,
            ``"any"`` or None (default) checks no intensities (see :class:`CheckImage`).
        spacing_range: accepted voxel spacing (mm) of images and labels; None: no geometry check.

    Raises:
        InputError: naming the offending file and the problem.
    """

    def __init__(
        self,
        image_keys: KeysCollection = "image",
        label_keys: KeysCollection | None = "label",
        ndim: int = 3,
        channels: int | None = 1,
        check_grid: bool = True,
        allow_nan: bool = False,
        affine_tol: float = AFFINE_TOLERANCE,
        allow_missing_keys: bool = False,
        modality: str | None = None,
        spacing_range=SPACING_RANGE_MM,
    ) -> None:
        image_keys = [image_keys] if isinstance(image_keys, (str, int)) else list(image_keys)
        label_keys = [] if label_keys is None else ([label_keys] if isinstance(label_keys, (str, int)) else list(label_keys))
        super().__init__(image_keys + label_keys, allow_missing_keys)
        self.image_keys, self.label_keys = image_keys, label_keys
        self.image_check = CheckImage(ndim, channels, label=False, allow_nan=allow_nan, modality=modality, spacing_range=spacing_range)
        self.label_check = CheckImage(ndim, 1, label=True, allow_nan=False, spacing_range=spacing_range)
        self.check_grid, self.affine_tol = check_grid, float(affine_tol)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        reference = None
        for key in self.image_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"image key {key!r} not found in the data (keys: {list(d)})")
            self.image_check(d[key], name=str(key))
            if reference is None:
                reference = (key, d[key])
        for key in self.label_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"label key {key!r} not found in the data (keys: {list(d)})")
            lab = d[key]
            self.label_check(lab, name=str(key))
            if self.check_grid and reference is not None:
                self._check_grid(reference, key, lab)
        return d

    def _check_grid(self, reference, key, lab) -> None:
        ref_key, img = reference
        ref_name = source_name(img, str(ref_key))
        lab_name = source_name(lab, str(key))
        ref_shape, _ = _layout(img, self.image_check.ndim)
        lab_shape, _ = _layout(lab, self.label_check.ndim)
        if tuple(ref_shape) != tuple(lab_shape):
            raise InputError(lab_name, f"label grid shape {tuple(lab_shape)} does not match image {ref_name} shape {tuple(ref_shape)}")
        if isinstance(img, MetaTensor) and isinstance(lab, MetaTensor):
            check_same_grid(ref_shape, img.affine.numpy(), lab_shape, lab.affine.numpy(), ref_name, lab_name, tol=self.affine_tol)


def set_input_modality(transform, modality):
    """Set the intensity switch of every :class:`CheckImaged` / :class:`CheckImage` inside ``transform``.

    For a pre-processing built by a function that does not take the switch itself (a ``Compose``,
    nested ``Compose`` and lists are searched). Returns ``transform``.
    """
    value = _normalise_modality(modality)
    seen: set[int] = set()

    def visit(obj) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, CheckImaged):
            obj.image_check.modality = value
        elif isinstance(obj, CheckImage) and not obj.label:
            obj.modality = value
        for child in getattr(obj, "transforms", None) or (obj if isinstance(obj, (list, tuple)) else ()):
            visit(child)

    visit(transform)
    return transform


class SafeLoadImaged(MapTransform):
    """MONAI ``LoadImaged`` whose failures become :class:`InputError` naming the file and the problem.

    Args:
        keys: keys holding file paths (a list of paths for a stacked multi-file image).
        kwargs: passed to ``monai.transforms.LoadImaged`` (``image_only``, ``ensure_channel_first``,
            ``reader``, ...). ``allow_missing_keys`` is honoured.

    Raises:
        InputError: missing file, a directory where a file is expected, a file that cannot be
            read (truncated, corrupt, not an image), or a NIfTI header with a zero voxel size.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loaders = {key: LoadImaged(key, allow_missing_keys=allow_missing_keys, **kwargs) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            for p in paths:
                if isinstance(p, (str, Path)):
                    _check_path(p)
            try:
                d = self.loaders[key](d)
            except InputError:
                raise
            except Exception as exc:
                raise _diagnose(paths, exc) from exc
        return d


def _check_path(p) -> None:
    path = Path(p)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir() and not any(path.iterdir()):
        raise InputError(path, "is an empty directory, expected an image file or a DICOM series")
    if path.is_file() and str(path).lower().endswith((".nii", ".nii.gz")):
        problem = nifti_header_problem(path)  # nibabel would read a zero voxel size as 1 mm
        if problem:
            raise InputError(path, problem)


def _diagnose(paths: Sequence, exc: Exception) -> InputError:
    """Turn a reader failure into an InputError naming the bad file (NIfTI files are re-read to find out why)."""
    for p in paths:
        if not isinstance(p, (str, Path)):
            continue
        name = str(p).lower()
        if name.endswith((".nii", ".nii.gz")):
            try:
                load_nifti(p, allow_nan=True, ndim=_file_ndim(p))
            except InputError as err:
                if "cannot be read" in err.problem or "affine" in err.problem:
                    return InputError(p, " ".join(f"{err.problem} (truncated or corrupt file?)".split()))
    shown = ", ".join(str(p) for p in paths)
    return InputError(shown, " ".join(f"cannot be loaded ({type(exc).__name__}: {exc})".split()))


def _file_ndim(p) -> int:
    """Number of dimensions declared in a NIfTI header, 3 when the header itself is unreadable."""
    try:
        import nibabel as nib

        return len(nib.load(str(p)).shape)
    except Exception:
        return 3
