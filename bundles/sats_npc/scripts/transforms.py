"""Pipeline pieces that depend on a config switch."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import Identityd, MapTransform

__all__ = ["symmetric_alignment"]


def _as_bool(enabled) -> bool:
    if isinstance(enabled, str):  # command-line overrides arrive as text ("false", "0", "no")
        text = enabled.strip().lower()
        if text not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise ValueError(f"symmetric_align must be true or false, got {enabled!r}")
        return text in ("true", "1", "yes", "on")
    return bool(enabled)


def symmetric_alignment(keys: KeysCollection, enabled: bool = True, pixdim=None, mode=None, **kwargs) -> MapTransform:
    """Resampling to ``pixdim`` and symmetric (mid-sagittal) registration of ``keys``, in one resampling.

    The SATS papers register every CT to a bilaterally symmetric pose before flipping, so the
    grid's central sagittal plane is the patient's mid-sagittal plane. Switch the registration off
    only for data that is already symmetric in its grid (``symmetric_align: false`` in the
    configs); the volume is then only resampled to ``pixdim``.

    Args:
        keys: keys to resample (image with linear, label with nearest interpolation by default).
        enabled: registration on (``SymmetricAlignd`` with ``pixdim``: one interpolation) or off
            (``ResampleToSpacingd``, or ``Identityd`` when ``pixdim`` is None too).
        pixdim: output voxel size in mm, or None to keep the input grid.
        mode: interpolation per key; None: both transforms' default, bilinear for the first key
            (the image) and nearest for the others (labels).
        kwargs: passed to ``SymmetricAlignd`` (``atlas``, ``on_failure``, ...).
    """
    if not _as_bool(enabled):
        if pixdim is None:
            return Identityd(keys)
        from shared_transforms.spatial import ResampleToSpacingd

        return ResampleToSpacingd(keys, pixdim=pixdim, mode=mode)
    try:
        from shared_transforms.symmetry import SymmetricAlignd
    except ImportError as exc:
        raise ImportError(
            "symmetric registration needs shared_transforms.symmetry.SymmetricAlignd, which is not available "
            f"({exc}); run with `--symmetric_align false` for data that is already symmetric in its grid"
        ) from exc
    return SymmetricAlignd(keys, mode=mode, pixdim=pixdim, **kwargs)
