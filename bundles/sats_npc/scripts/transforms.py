"""Pipeline pieces that depend on a config switch."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import Identityd, MapTransform

__all__ = ["symmetric_alignment"]


def symmetric_alignment(keys: KeysCollection, enabled: bool = True, **kwargs) -> MapTransform:
    """Symmetric (mid-sagittal) registration of ``keys``, or a no-op when ``enabled`` is False.

    The SATS papers register every CT to a bilaterally symmetric pose before flipping, so the
    grid's central sagittal plane is the patient's mid-sagittal plane. Switch it off only for data
    that is already symmetric in its grid (``symmetric_align: false`` in the configs).

    Args:
        keys: keys to resample into the symmetric pose (image with linear, label with nearest
            interpolation, as ``shared_transforms.symmetry.SymmetricAlignd`` decides).
        enabled: False returns ``Identityd``.
        kwargs: passed to ``SymmetricAlignd``.
    """
    if isinstance(enabled, str):  # command-line overrides arrive as text ("false", "0", "no")
        if enabled.strip().lower() not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise ValueError(f"symmetric_align must be true or false, got {enabled!r}")
        enabled = enabled.strip().lower() in ("true", "1", "yes", "on")
    if not enabled:
        return Identityd(keys)
    try:
        from shared_transforms.symmetry import SymmetricAlignd
    except ImportError as exc:
        raise ImportError(
            "symmetric registration needs shared_transforms.symmetry.SymmetricAlignd, which is not available "
            f"({exc}); run with `--symmetric_align false` for data that is already symmetric in its grid"
        ) from exc
    return SymmetricAlignd(keys, **kwargs)
