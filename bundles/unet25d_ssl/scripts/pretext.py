"""Self-supervised pretext tasks of the paper's section 2.4: 3D rotation and relative patch location.

* **Rotation** (10 classes): class 0 is the identity; classes 1-3 rotate by 90, 180, 270 degrees
  about the X axis (in the ``Y-Z`` plane), 4-6 about Y (``X-Z`` plane), 7-9 about Z (``X-Y`` plane).
  The patch must be a cube (``X = Y = Z`` voxels) so every rotation keeps its shape.
* **Relative patch location** (26 classes): a 3x3x3 grid of cells; in each cell a patch smaller
  than the cell is placed at a random offset (the jitter, so the network cannot use continuous
  edges). The centre patch is the anchor; the query is one of the 26 other patches, and its class
  is its index in :data:`RPL_OFFSETS` (grid offsets ``(i, j, k)`` in ``{-1, 0, 1}^3`` without
  ``(0, 0, 0)``, in lexicographic order).
* **Loss**: ``alpha * L_RPL + (1 - alpha) * L_rot`` (both cross-entropy).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from ignite.metrics import Metric
from monai.transforms import MapTransform, Randomizable, Transform

from npc_gtv.learning import TermsMixin

__all__ = [
    "ROTATIONS",
    "RPL_OFFSETS",
    "rotate",
    "unrotate",
    "rpl_patch_starts",
    "PretextSampler",
    "PretextSamplesd",
    "PretextLoss",
    "prepare_pretext_batch",
    "pretext_accuracy",
    "PretextAccuracy",
]

# (dims of a (C, X, Y, Z) array rotated by torch.rot90, number of quarter turns)
ROTATIONS: tuple[tuple[tuple[int, int] | None, int], ...] = (
    (None, 0),
    ((2, 3), 1), ((2, 3), 2), ((2, 3), 3),  # about X
    ((1, 3), 1), ((1, 3), 2), ((1, 3), 3),  # about Y
    ((1, 2), 1), ((1, 2), 2), ((1, 2), 3),  # about Z
)
RPL_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)
)


def _as_tensor(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def rotate(patch, cls: int) -> torch.Tensor:
    """Rotate a ``(C, N, N, N)`` cube by rotation class ``cls`` (0-9)."""
    if not 0 <= int(cls) < len(ROTATIONS):
        raise ValueError(f"rotation class must be 0-9, got {cls}")
    t = _as_tensor(patch)
    dims, k = ROTATIONS[int(cls)]
    if dims is not None and t.shape[dims[0]] != t.shape[dims[1]]:
        raise ValueError(f"rotation class {cls} needs equal sizes along dims {dims}, got shape {tuple(t.shape)}")
    return t.clone() if dims is None else torch.rot90(t, k, dims)


def unrotate(patch, cls: int) -> torch.Tensor:
    """Inverse of :func:`rotate`."""
    t = _as_tensor(patch)
    dims, k = ROTATIONS[int(cls)]
    return t.clone() if dims is None else torch.rot90(t, -k, dims)


def rpl_patch_starts(origin: Sequence[int], cell: Sequence[int], patch: Sequence[int], jitter: np.ndarray) -> np.ndarray:
    """Start index of each of the 27 patches of a 3x3x3 grid.

    Args:
        origin: start ``(x, y, z)`` of the grid region (size ``3 * cell``).
        cell: cell size per axis.
        patch: patch size per axis (``<= cell``).
        jitter: ``(27, 3)`` integer offsets of each patch inside its cell, ``0 <= jitter <= cell - patch``.

    Returns:
        ``(27, 3)`` starts, row ``9 * (i + 1) + 3 * (j + 1) + (k + 1)`` for grid offset ``(i, j, k)``.
    """
    origin, cell, patch = (np.asarray(v, int) for v in (origin, cell, patch))
    jitter = np.asarray(jitter, int)
    if jitter.shape != (27, 3):
        raise ValueError(f"jitter must be (27, 3), got {jitter.shape}")
    if np.any(patch > cell) or np.any(jitter < 0) or np.any(jitter > cell - patch):
        raise ValueError("patches must fit in their cells: 0 <= jitter <= cell - patch")
    grid = np.array(list(itertools.product((0, 1, 2), repeat=3)))  # same order as RPL offsets + 1
    return origin + grid * cell + jitter


def _grid_row(offset: Sequence[int]) -> int:
    i, j, k = offset
    return 9 * (i + 1) + 3 * (j + 1) + (k + 1)


class PretextSampler(Randomizable, Transform):
    """Draw pretext-task samples from one unlabeled image.

    Args:
        rot_size: edge of the rotation cube in voxels (divisible by 16 for the encoder).
        rpl_patch: RPL patch size ``(X, Y, Z)`` (``X, Y`` divisible by 16, ``Z`` by 2).
        rpl_jitter: maximum jitter per axis; cells are ``rpl_patch + rpl_jitter``.
        num_samples: samples drawn per image.
        min_std: a crop (the rotation cube; the RPL grid's centre and query patches) whose intensity
            standard deviation is below this is redrawn, up to ``max_tries`` times (the last draw is
            kept). 0 keeps every draw (uniformly random crops). A crop of uniform tissue looks the same
            in every orientation and at every grid position, so its label cannot be learnt.
        max_tries: draws per crop at most.

    ``__call__(img)`` with ``img`` ``(1, X, Y, Z)`` returns a list of ``num_samples`` dicts with
    ``rot_image (1, N, N, N)``, ``rot_label`` (int64 scalar), ``rpl_centre``, ``rpl_query``
    (``(1, *rpl_patch)``) and ``rpl_label`` (int64 scalar, 0-25). The image is zero-padded when it is
    smaller than a cube or the grid region.
    """

    def __init__(self, rot_size: int = 32, rpl_patch: Sequence[int] = (32, 32, 8), rpl_jitter: Sequence[int] = (4, 4, 2), num_samples: int = 4,
                 min_std: float = 0.0, max_tries: int = 10):
        if min_std < 0 or max_tries < 1:
            raise ValueError(f"min_std must be >= 0 and max_tries >= 1, got {min_std}, {max_tries}")
        self.min_std, self.max_tries = float(min_std), int(max_tries)
        if rot_size % 16:
            raise ValueError(f"rot_size must be divisible by 16, got {rot_size}")
        rpl_patch = tuple(int(v) for v in rpl_patch)
        if len(rpl_patch) != 3 or rpl_patch[0] % 16 or rpl_patch[1] % 16 or rpl_patch[2] % 2:
            raise ValueError(f"rpl_patch must be (X, Y, Z) with X, Y divisible by 16 and Z by 2, got {rpl_patch}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.rot_size = int(rot_size)
        self.patch = np.array(rpl_patch, int)
        self.jitter_max = np.array([int(v) for v in rpl_jitter], int)
        if self.jitter_max.shape != (3,) or np.any(self.jitter_max < 0):
            raise ValueError(f"rpl_jitter must be 3 non-negative integers, got {rpl_jitter}")
        self.cell = self.patch + self.jitter_max
        self.num_samples = int(num_samples)

    def randomize(self, data=None) -> None:  # randomness is drawn in __call__ (needs the image shape)
        pass

    @staticmethod
    def _pad_to(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        pads = []
        for n, s in zip(reversed(t.shape[1:]), reversed(list(size))):
            extra = max(0, int(s) - int(n))
            pads += [extra // 2, extra - extra // 2]
        return torch.nn.functional.pad(t, pads) if any(pads) else t

    def __call__(self, img) -> list[dict]:
        t = _as_tensor(img).float()
        if t.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) image, got shape {tuple(t.shape)}")
        region = 3 * self.cell
        t = self._pad_to(t, np.maximum(region, self.rot_size))
        shape = np.array(t.shape[1:])
        out = []
        n = self.rot_size
        p = self.patch

        def crop(start, size):
            return t[:, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]

        for _ in range(self.num_samples):
            rot_cls = int(self.R.randint(len(ROTATIONS)))
            for _try in range(self.max_tries):
                cube = crop([int(self.R.randint(0, shape[a] - n + 1)) for a in range(3)], (n, n, n))
                if float(cube.std()) >= self.min_std:
                    break
            label = int(self.R.randint(len(RPL_OFFSETS)))
            for _try in range(self.max_tries):
                origin = [int(self.R.randint(0, shape[a] - region[a] + 1)) for a in range(3)]
                jitter = np.stack([self.R.randint(0, self.jitter_max[a] + 1, size=27) for a in range(3)], axis=1)
                starts = rpl_patch_starts(origin, self.cell, self.patch, jitter)
                centre, query = crop(starts[_grid_row((0, 0, 0))], p), crop(starts[_grid_row(RPL_OFFSETS[label])], p)
                if min(float(centre.std()), float(query.std())) >= self.min_std:
                    break
            out.append(
                {
                    "rot_image": rotate(cube, rot_cls).contiguous(),
                    "rot_label": torch.tensor(rot_cls, dtype=torch.long),
                    "rpl_centre": centre.clone(),
                    "rpl_query": query.clone(),
                    "rpl_label": torch.tensor(label, dtype=torch.long),
                }
            )
        return out


class PretextSamplesd(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`PretextSampler`: returns a list of sample dicts.

    Args:
        keys: the image key (one key).
        other arguments: as :class:`PretextSampler`.
    """

    def __init__(self, keys, rot_size: int = 32, rpl_patch: Sequence[int] = (32, 32, 8), rpl_jitter: Sequence[int] = (4, 4, 2), num_samples: int = 4,
                 min_std: float = 0.0, max_tries: int = 10, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"PretextSamplesd takes exactly one image key, got {self.keys}")
        self.sampler = PretextSampler(rot_size, rpl_patch, rpl_jitter, num_samples, min_std, max_tries)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        samples = self.sampler(d[self.keys[0]])
        keep = {k: v for k, v in d.items() if k != self.keys[0] and isinstance(v, (str, int, float))}
        return [{**keep, **s} for s in samples]


class PretextLoss(TermsMixin, nn.Module):
    """``alpha * CE(rpl_logits, rpl_label) + (1 - alpha) * CE(rot_logits, rot_label)``.

    ``forward(preds, targets)`` with ``preds = (rot_logits (B, 10), rpl_logits (B, 26))`` and
    ``targets = (rot_label (B,), rpl_label (B,))``; returns a scalar. Records the two cross-entropies
    and the batch accuracies in ``terms`` (``rot_ce``, ``rpl_ce``, ``rot_acc``, ``rpl_acc``; chance
    accuracy is 1/10 and 1/26).
    """

    term_names = ("rot_ce", "rpl_ce", "rot_acc", "rpl_acc")

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.ce = nn.CrossEntropyLoss()

    def forward(self, preds, targets) -> torch.Tensor:
        rot_logits, rpl_logits = preds
        rot_label, rpl_label = targets
        rot, rpl = self.ce(rot_logits, rot_label), self.ce(rpl_logits, rpl_label)
        self.record(rot_ce=rot, rpl_ce=rpl, rot_acc=(rot_logits.argmax(1) == rot_label).float().mean(),
                    rpl_acc=(rpl_logits.argmax(1) == rpl_label).float().mean())
        return self.alpha * rpl + (1.0 - self.alpha) * rot


def prepare_pretext_batch(batchdata, device=None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for MONAI's SupervisedTrainer: ``((rot, centre, query), (rot_label, rpl_label))``."""

    def mv(key):
        v = batchdata[key]
        v = v.as_tensor() if hasattr(v, "as_tensor") else v
        return v.to(device=device, non_blocking=non_blocking)

    return (mv("rot_image"), mv("rpl_centre"), mv("rpl_query")), (mv("rot_label"), mv("rpl_label"))


def pretext_accuracy(output) -> tuple[float, float]:
    """Rotation and RPL accuracies of a trainer output dict (for logging)."""
    rot_logits, rpl_logits = output["pred"]
    rot_label, rpl_label = output["label"]
    rot = (rot_logits.argmax(1) == rot_label).float().mean().item()
    rpl = (rpl_logits.argmax(1) == rpl_label).float().mean().item()
    return rot, rpl


class _TaskOutput:
    """Engine output (``decollate=False``) -> ``(logits (B, K), label (B,))`` of one pretext head."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, output):
        return output["pred"][self.index], output["label"][self.index]


class PretextAccuracy(Metric):
    """Ignite metric: accuracy of one pretext head (``task`` ``"rot"`` or ``"rpl"``) over an epoch.

    Reads ``pred = (rot_logits, rpl_logits)`` and ``label = (rot_label, rpl_label)`` of an engine run
    with ``decollate=False`` and ``prepare_pretext_batch``.
    """

    def __init__(self, task: str = "rot", device="cpu"):
        if task not in ("rot", "rpl"):
            raise ValueError(f"task must be 'rot' or 'rpl', got {task!r}")
        super().__init__(output_transform=_TaskOutput(0 if task == "rot" else 1), device=device)

    def reset(self) -> None:
        self._correct = 0
        self._total = 0

    def update(self, output) -> None:
        logits, label = output
        label = torch.as_tensor(label).detach().reshape(-1)
        self._correct += int((logits.detach().argmax(1).cpu() == label.cpu()).sum())
        self._total += int(label.numel())

    def compute(self) -> float:
        counts = torch.tensor([self._correct, self._total], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] else float("nan")


def save_pretext_report(evaluator, path, samples_per_volume: int = 1) -> dict:
    """Run ``evaluator`` (the held-out pretext evaluation of ``pretrain.yaml``) and write its accuracies.

    Writes ``{"rot_acc", "rpl_acc", "rot_chance": 0.1, "rpl_chance": 1/26, "samples"}`` as JSON to
    ``path`` (rank 0 only, atomically) and prints them next to chance, so the encoder that the
    segmentation training freezes is known to have learnt the pretext tasks.
    """
    import json

    from npc_gtv.training import is_rank0
    from shared_transforms.io import atomic_write

    evaluator.run()
    metrics = evaluator.state.metrics
    report = {
        "rot_acc": float(metrics.get("val_rot_acc", float("nan"))),
        "rpl_acc": float(metrics.get("val_rpl_acc", float("nan"))),
        "rot_chance": 1.0 / len(ROTATIONS),
        "rpl_chance": 1.0 / len(RPL_OFFSETS),
        "samples": int(len(evaluator.data_loader.dataset)) * int(samples_per_volume),
    }
    if is_rank0():
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        print(
            f"pretext accuracy on held-out volumes ({report['samples']} samples): rotation {report['rot_acc']:.3f} "
            f"(chance {report['rot_chance']:.3f}), relative patch location {report['rpl_acc']:.3f} (chance {report['rpl_chance']:.3f})",
            flush=True,
        )
    return report
