"""Pipeline checks: bad input stops with an :class:`~shared_transforms.io.InputError` naming the file.

* :class:`SafeLoadImaged` is MONAI's ``LoadImaged`` with clear errors: a missing, truncated or
  otherwise unreadable file raises ``InputError("<file>: <problem>")`` instead of the reader's
  own exception (for a truncated ``.nii.gz`` MONAI/nibabel report "Cannot work out file type",
  which does not say the file is damaged).
* :class:`CheckImage` / :class:`CheckImaged` run right after loading (with or without
  ``EnsureChannelFirstd``) and reject NaN / inf voxels, a 2D or 4D image where a 3D volume is
  expected, a label with values other than 0/1, and a label whose grid (spatial shape or affine)
  differs from its image's. The data pass through unchanged.

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

from shared_transforms.io import AFFINE_TOLERANCE, InputError, check_label_array, check_same_grid, input_error_from, load_nifti  # noqa: F401 (input_error_from re-exported)

__all__ = ["source_name", "input_error_from", "CheckImage", "CheckImaged", "SafeLoadImaged"]


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

    Raises:
        InputError: (at call time) naming the file and the problem.
    """

    def __init__(self, ndim: int = 3, channels: int | None = 1, label: bool = False, allow_nan: bool = False, name: str | None = None) -> None:
        if ndim < 1:
            raise ValueError(f"ndim must be >= 1, got {ndim}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1 or None, got {channels}")
        self.ndim, self.channels, self.label, self.allow_nan, self.name = ndim, channels, label, allow_nan, name

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
    ) -> None:
        image_keys = [image_keys] if isinstance(image_keys, (str, int)) else list(image_keys)
        label_keys = [] if label_keys is None else ([label_keys] if isinstance(label_keys, (str, int)) else list(label_keys))
        super().__init__(image_keys + label_keys, allow_missing_keys)
        self.image_keys, self.label_keys = image_keys, label_keys
        self.image_check = CheckImage(ndim, channels, label=False, allow_nan=allow_nan)
        self.label_check = CheckImage(ndim, 1, label=True, allow_nan=False)
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


class SafeLoadImaged(MapTransform):
    """MONAI ``LoadImaged`` whose failures become :class:`InputError` naming the file and the problem.

    Args:
        keys: keys holding file paths (a list of paths for a stacked multi-file image).
        kwargs: passed to ``monai.transforms.LoadImaged`` (``image_only``, ``ensure_channel_first``,
            ``reader``, ...). ``allow_missing_keys`` is honoured.

    Raises:
        InputError: missing file, a directory where a file is expected, or a file that cannot be
            read (truncated, corrupt, not an image).
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
