"""Balance-Sampling Strategy (BSS, HCF paper section 3.4).

Every slice with tumour ("abnormal") is kept in every epoch; the slices without tumour ("normal")
are randomly under-sampled to ``ratio`` normal slices per abnormal slice, redrawn each epoch:

=========  ===============================================  ============
name       meaning                                          normal kept
=========  ===============================================  ============
theta_0    abnormal slices only (for SANet)                 0
theta_1    1 : 1                                            1 x abnormal
theta_2    1 : 2                                            2 x abnormal
theta_4    1 : 4                                            4 x abnormal
theta_n    original ratio (every slice)                     all
=========  ===============================================  ============

(when fewer normal slices exist than the ratio asks for, all of them are used).

:class:`BalanceSampler` subclasses ``torch.utils.data.DistributedSampler`` so that MONAI's
trainer calls ``set_epoch`` at every epoch start (which selects that epoch's draw) and so that,
under ``torchrun``, each rank gets an equal, disjoint share of the same draw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler

__all__ = ["BalanceSampler", "parse_ratio", "slice_flags", "RATIOS"]

RATIOS = {"theta_0": 0, "theta_1": 1, "theta_2": 2, "theta_4": 4, "theta_n": None}

logger = logging.getLogger(__name__)


def parse_ratio(ratio) -> int | None:
    """``"theta_k"`` / ``k`` / ``"theta_n"`` / ``"n"`` / ``None`` -> normal-per-abnormal count or ``None`` (all)."""
    if ratio is None:
        return None
    if isinstance(ratio, str):
        key = ratio.strip().lower()
        if key in RATIOS:
            return RATIOS[key]
        if key in ("n", "all"):
            return None
        if key.startswith("theta_"):
            key = key[len("theta_"):]
        try:
            ratio = int(key)
        except ValueError:
            raise ValueError(f"unknown sampling ratio {ratio!r}; use one of {sorted(RATIOS)} or a non-negative integer") from None
    if isinstance(ratio, bool) or int(ratio) != ratio or ratio < 0:
        raise ValueError(f"sampling ratio must be a non-negative integer, 'theta_k' or 'theta_n', got {ratio!r}")
    return int(ratio)


def slice_flags(items: Sequence[dict], key: str = "has_gtv") -> list[int]:
    """Per-item 0/1 flags read from ``item[key]`` (e.g. the slice data list built by ``scripts.data``)."""
    return [int(bool(int(np.asarray(it[key]).reshape(-1)[0]))) for it in items]


class BalanceSampler(DistributedSampler):
    """Per-epoch balanced under-sampling of normal (label 0) vs abnormal (label 1) items.

    Args:
        flags: one 0/1 flag per dataset item (1 = the slice contains GTV).
        ratio: ``"theta_0" | "theta_1" | "theta_2" | "theta_4" | "theta_n"`` or an integer.
        seed: base seed; epoch ``e`` uses ``seed + e`` so every epoch redraws and every rank draws alike.
        shuffle: shuffle the epoch's selection.
        num_replicas / rank: distributed sharding (default: the initialised process group, else 1 / 0).

    Raises:
        ValueError: bad ratio, or no abnormal item while the ratio is not ``theta_n``.
    """

    def __init__(self, flags: Sequence[int], ratio="theta_1", seed: int = 0, shuffle: bool = True, num_replicas: int | None = None, rank: int | None = None):
        flags_arr = np.asarray([int(f) for f in flags], dtype=np.int64)
        if flags_arr.size == 0:
            raise ValueError("BalanceSampler needs at least one item")
        if not np.isin(flags_arr, (0, 1)).all():
            raise ValueError("BalanceSampler flags must be 0 or 1")
        if num_replicas is None or rank is None:
            dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if dist_on else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if dist_on else 0)
        super().__init__(range(len(flags_arr)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.flags = flags_arr
        self.ratio = parse_ratio(ratio)
        self.positive = np.flatnonzero(flags_arr == 1)
        self.negative = np.flatnonzero(flags_arr == 0)
        if self.ratio is not None and self.positive.size == 0:
            raise ValueError(f"sampling ratio {ratio!r} keeps slices relative to the tumour slices, but no slice contains GTV")
        n_neg = self.negative.size if self.ratio is None else min(self.negative.size, self.ratio * self.positive.size)
        self.epoch_size = int(self.positive.size + n_neg)
        self.num_samples = math.ceil(self.epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def draw(self, epoch: int | None = None) -> np.ndarray:
        """The whole (un-sharded) selection of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng(self.seed + epoch)
        n_neg = self.epoch_size - self.positive.size
        neg = self.negative if n_neg >= self.negative.size else rng.choice(self.negative, size=n_neg, replace=False)
        chosen = np.concatenate([self.positive, np.sort(neg)])
        if self.shuffle:
            chosen = rng.permutation(chosen)
        return chosen

    def __iter__(self):
        chosen = self.draw().tolist()
        n_pos = int(self.flags[chosen].sum()) if chosen else 0
        logger.info("balance sampling (ratio %s): epoch %d draws %d tumour + %d normal slices of %d (%d + %d available)",
                    "all" if self.ratio is None else self.ratio, self.epoch, n_pos, len(chosen) - n_pos, len(chosen),
                    self.positive.size, self.negative.size)
        if len(chosen) < self.total_size:  # pad so every rank gets the same count
            chosen += chosen[: self.total_size - len(chosen)]
        return iter(chosen[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
