"""Data-list helpers of the SATS bundle: reproducible split, data-set preparation, weight publishing."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared_transforms.io import InputError, atomic_write

__all__ = ["split_datalist", "prepare_dataset", "publish_weights", "image_list", "init_network"]


def split_datalist(datalist: Sequence[dict], val_fraction: float = 0.2, seed: int = 0, part: str = "train") -> list[dict]:
    """Reproducible train / validation split of a Decathlon data list.

    The cases are sorted by ``case_id`` (or image path) and shuffled with ``seed``, so the split does
    not depend on the order of ``dataset.json``. At least one case goes to each part when there
    are two or more cases; with one case it is used for both.

    Args:
        datalist: list of ``{"image", "label", ...}`` dicts.
        val_fraction: fraction of cases for validation, in [0, 1).
        seed: shuffling seed.
        part: ``"train"`` or ``"val"``.

    Returns:
        the requested part, a list of dicts.
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    items = sorted(datalist, key=lambda d: str(d.get("case_id", d.get("image"))))
    if not items:
        raise InputError(None, "the training data list is empty (dataset.json has no 'training' cases)")
    if len(items) == 1:
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(max(1, int(round(val_fraction * len(items)))), len(items) - 1) if val_fraction > 0 else 0
    val_idx = set(order[:n_val].tolist())
    chosen = [d for i, d in enumerate(items) if (i in val_idx) == (part == "val")]
    return chosen if chosen else list(items)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def prepare_dataset(dataset_dir, size: str = "full", modality: str = "ct") -> str:
    """Make sure ``dataset_dir/dataset.json`` exists (phantoms are generated into a missing/empty folder).

    Under ``torch.distributed`` only rank 0 generates; the other ranks wait at a barrier.

    Returns:
        the path of ``dataset.json``.
    """
    from npc_gtv.phantoms import ensure_dataset

    if _distributed() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        path = Path(dataset_dir) / "dataset.json"
        if not path.is_file():
            raise InputError(path, "missing after rank 0 prepared the data set")
        return str(path)
    path = ensure_dataset(dataset_dir, modality=modality, size=size)
    if _distributed():
        torch.distributed.barrier()
    return str(path)


def publish_weights(src, dst) -> str | None:
    """Copy a stage's final weights (``src``) to the bundle's ``models/model.pt`` (``dst``) atomically.

    Only rank 0 writes under ``torch.distributed``. Returns ``dst`` (None on other ranks).
    """
    if _distributed() and torch.distributed.get_rank() != 0:
        return None
    src = Path(src)
    if not src.is_file():
        raise InputError(src, "final weights not found (did the training complete?)")
    with atomic_write(dst, inputs=[src]) as tmp:
        shutil.copyfile(src, tmp)
    return str(dst)


def image_list(folder, pattern: str = "*.nii.gz") -> list[dict]:
    """``[{"image": path}, ...]`` for the files of ``folder`` matching ``pattern`` (sorted)."""
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise InputError(folder, f"no input image matching {pattern!r}")
    return [{"image": str(f)} for f in files]


def init_network(network, weights=None, strict: bool = True):
    """Return ``network`` after loading ``weights`` (a ``state_dict`` file, e.g. stage 1's ``model.pt``) if given.

    Used for ``network`` in the training configs so that stage 2 starts from stage 1. A resumed run
    (``checkpoint_last.pt`` in the stage folder) then replaces these weights when the checkpoint
    handler is attached.
    """
    if weights is None or str(weights) in ("", "None", "none", "null"):
        return network
    from npc_gtv.training import load_weights

    network.load_state_dict(load_weights(weights), strict=strict)
    return network
