"""Data lists of the UNet-2.5D bundle: reproducible k-fold splits and train/validation splits.

The paper uses 7-fold cross-validation (each fold: 1/7 of the patients for testing, the rest
split 80/20 into training and validation). :func:`write_fold_datalist` writes a Decathlon data
list for one fold: every labelled case carries its ``fold`` number, ``test`` holds the held-out
fold and ``training`` the others, paths are absolute so the list can live outside the data set
(the data set folder is never written into). The assignment depends only on the case ids, the
number of folds and the seed, so the same command always gives the same folds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared_transforms.io import InputError, atomic_write

__all__ = ["assign_folds", "write_fold_datalist", "fold_datalist", "train_val_split", "load_datalist", "subset_fraction", "unlabeled_images"]


def _read(dataset_json) -> dict:
    p = Path(dataset_json)
    if not p.is_file():
        raise InputError(p, "data list does not exist (run the bundle's initialize or `npc-gtv phantoms`)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(p, f"is not valid JSON ({exc})") from exc


def _absolute(entry: dict, base: Path) -> dict:
    out = dict(entry)
    for key in ("image", "label"):
        if key in out:
            v = out[key]
            out[key] = [str((base / x).resolve()) for x in v] if isinstance(v, list) else str((base / v).resolve())
    return out


def _case_id(entry: dict) -> str:
    if "case_id" in entry:
        return str(entry["case_id"])
    img = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
    return Path(img).name.split(".")[0]


def assign_folds(case_ids, num_folds: int = 7, seed: int = 0) -> dict[str, int]:
    """Map each case id to a fold 0..num_folds-1 (sizes differ by at most one), reproducibly."""
    ids = sorted(str(c) for c in case_ids)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if len(ids) < num_folds:
        raise ValueError(f"{len(ids)} labelled cases cannot make {num_folds} folds")
    order = np.random.RandomState(seed).permutation(len(ids))
    return {ids[j]: int(rank % num_folds) for rank, j in enumerate(order)}


def write_fold_datalist(dataset_json, out_json, fold: int, num_folds: int = 7, seed: int = 0) -> Path:
    """Write the data list of one cross-validation fold.

    All labelled cases (the data set's ``training`` and ``test`` lists together, as the paper
    cross-validates over all patients) get a ``fold`` key; ``test`` = cases of ``fold``,
    ``training`` = the others.

    Args:
        dataset_json: the data set's Decathlon ``dataset.json``.
        out_json: where to write the fold's list.
        fold: held-out fold, ``0 <= fold < num_folds``.
        num_folds: number of folds (paper: 7).
        seed: fold assignment seed.
    """
    if not 0 <= int(fold) < int(num_folds):
        raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
    src = Path(dataset_json)
    data = _read(src)
    base = src.parent
    entries = [_absolute(e, base) for key in ("training", "test") for e in data.get(key, []) if "label" in e]
    folds = assign_folds([_case_id(e) for e in entries], num_folds, seed)
    for e in entries:
        e["fold"] = folds[_case_id(e)]
    out = {k: v for k, v in data.items() if k not in ("training", "test", "case_info")}
    out.update(
        {
            "cross_validation": {"num_folds": int(num_folds), "seed": int(seed), "test_fold": int(fold), "source": str(src.resolve())},
            "training": [e for e in entries if e["fold"] != fold],
            "test": [e for e in entries if e["fold"] == fold],
        }
    )
    with atomic_write(out_json, inputs=[src]) as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    return Path(out_json)


def fold_datalist(dataset_json, fold: int = -1, num_folds: int = 7, seed: int = 0, out_dir=None) -> str:
    """Data list to use: ``dataset_json`` itself when ``fold < 0``, else the fold's list.

    The fold list is written to ``out_dir/datalist_fold<k>of<n>_seed<s>.json`` (``out_dir`` is
    required for a fold; the data set folder itself is never written into).
    """
    if int(fold) < 0:
        return str(dataset_json)
    if out_dir is None:
        raise ValueError("out_dir is needed to write a fold's data list")
    out = Path(out_dir) / f"datalist_fold{int(fold)}of{int(num_folds)}_seed{int(seed)}.json"
    write_fold_datalist(dataset_json, out, fold, num_folds, seed)
    return str(out)


def load_datalist(datalist_json, key: str = "training") -> list[dict]:
    """Entries of ``key`` with absolute paths (relative paths are taken from the list's folder)."""
    p = Path(datalist_json)
    data = _read(p)
    if key not in data:
        raise InputError(p, f"has no {key!r} list")
    return [_absolute(e, p.parent) for e in data[key]]


def train_val_split(entries: list[dict], part: str = "train", val_fraction: float = 0.2, seed: int = 0) -> list[dict]:
    """Reproducible split of a training list into training (``part='train'``) and validation (``'val'``).

    At least one case goes to each side when there are two or more cases; with one case both
    sides get it (a smoke-test data set).
    """
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    entries = sorted(entries, key=_case_id)
    n = len(entries)
    if n == 0:
        raise ValueError("empty training list")
    if n == 1:
        return list(entries)
    n_val = min(n - 1, max(1, int(round(n * val_fraction)))) if val_fraction > 0 else 0
    order = np.random.RandomState(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    return [e for i, e in enumerate(entries) if (i in val_idx) == (part == "val")]


def subset_fraction(entries: list[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """A reproducible subset with ``round(fraction * n)`` (at least one) of the entries.

    Used by the label-efficiency experiment (20 / 30 / 50 / 100 % of the labelled cases); smaller
    fractions are subsets of larger ones for the same seed.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    entries = sorted(entries, key=_case_id)
    k = max(1, int(round(fraction * len(entries))))
    order = np.random.RandomState(seed).permutation(len(entries))[:k]
    return [entries[i] for i in sorted(order.tolist())]


def unlabeled_images(dataset_json) -> list[dict]:
    """``[{"image": path}]`` of every case (training and test lists) of a data set; labels are ignored.

    The self-supervised pretraining reads its (tumour-free) CTs through this.
    """
    p = Path(dataset_json)
    data = _read(p)
    out = [{"image": _absolute(e, p.parent)["image"]} for key in ("training", "test") for e in data.get(key, [])]
    if not out:
        raise InputError(p, "lists no images")
    return out
