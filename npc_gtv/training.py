"""Resumable, atomic, CPU-tensor training checkpoints and safe weight loading for ignite engines.

Trainings of the NPC GTV bundles run for 800-1000 epochs, so a training killed at any moment
(power cut, pre-empted job, ``kill -9``) must continue when the same command is run again:

* :class:`ResumableCheckpoint` is an ignite handler for ``train#handlers``. It keeps one file,
  ``<save_dir>/checkpoint_last.pt``, written atomically (temporary file in the same folder,
  ``fsync``, then ``os.replace``), holding CPU copies of every ``state_dict`` in ``save_dict``
  (network, optimiser, scheduler, GradScaler, ...), the engine counters (epoch, iteration,
  epoch length, max epochs) and the random number generator states (python, numpy, torch, CUDA
  and the private ``RandomState`` of every MONAI random transform of the training data set).
  When attached and the file exists it restores everything before the engine runs. When the
  training completes it writes ``<save_dir>/<final_name>`` (``model.pt``), the bare network
  ``state_dict`` the model zoo expects.
* :func:`load_weights` reads any checkpoint with ``torch.load(weights_only=True)`` and turns a
  refused, corrupt or missing file into :class:`shared_transforms.io.InputError`.
* :class:`SafeCheckpointLoader` is the loading handler for ``inference.yaml`` /
  ``evaluate.yaml`` (``load_path`` + ``load_dict``, like MONAI's ``CheckpointLoader``) built on
  :func:`load_weights`.

Resume semantics (see also ``docs/operating.md``):

* Epoch-end checkpoints are written after every other ``EPOCH_COMPLETED`` handler (validation,
  epoch-level scheduler steps), because the saving handler registers itself only when the engine
  starts, i.e. after all handlers of the config are attached. Resuming from an epoch-end checkpoint
  with deterministic settings therefore reproduces the uninterrupted run exactly.
* Mid-epoch checkpoints (``every_n_iterations > 0``) restore the weights, optimiser and counters of
  that iteration; ignite then runs only the remaining ``epoch_length - j`` iterations of the partly
  seen epoch, drawing them from a *fresh* pass over the data loader. Some cases of that epoch are
  therefore seen twice and others not at all; from the next epoch on the run is normal again.
  Iteration saves are skipped on the last iteration of an epoch, since the epoch-end save (which
  follows validation) is the consistent one.
* Rerunning a training that already reached ``max_epochs`` does nothing (it is not restarted from
  epoch 0); raise ``max_epochs`` to train longer, or delete ``checkpoint_last.pt`` / set
  ``resume=False`` to start again.
* The checkpoint records a fingerprint of the training data list (``train#dataset#data``) keyed on
  *content*, not on the spelling of the paths: every entry that names an existing file (or folder) is
  replaced by the SHA-256 of its bytes (cached in ``save_dir/.data_hashes.json`` by resolved path,
  size and modification time), so the same data reached through a symlink, a relative path or a copy
  resume the training. When the data have changed (a different data set, MONAI Label retraining
  after new labels) the handler starts a new training instead of resuming a run made on other data,
  says so in the log, and keeps the earlier checkpoint as ``checkpoint_previous.pt``.
* Raising the epoch count of a finished (or running) training continues it with the learning-rate
  schedule extended to the new length: a restored ``torch.optim.lr_scheduler`` keeps its counters,
  base learning rates and progress, but takes the *configured* lengths (``total_iters``, ``T_max``,
  ``T_0``, ``step_size``, milestones, ``lr_lambda`` functions ...: every constructor argument of the
  freshly built scheduler), and the optimiser's learning rates are set to the new schedule's value at
  the restored step. This works for epoch- and iteration-level stepping alike.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import pickle
import random
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_transforms.io import InputError, atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
    "ResumableCheckpoint",
    "SafeCheckpointLoader",
    "load_weights",
    "unwrap_module",
    "to_cpu",
    "capture_rng_state",
    "restore_rng_state",
    "is_rank0",
    "data_fingerprint",
    "PREVIOUS_NAME",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_last.pt"
PREVIOUS_NAME = "checkpoint_previous.pt"
_HASH_CACHE = ".data_hashes.json"
#: what a checkpoint error tells the user to do
_RECOVER = "delete it to start over or point `ckpt_dir` elsewhere"
CHECKPOINT_FORMAT = "npc_gtv.resumable_checkpoint/1"
# reserved top-level keys of checkpoint_last.pt; the save_dict entries sit beside them at top level so
# that MONAI's own CheckpointLoader can also read e.g. the "model" entry from the file
_RESERVED = ("_format", "_engine", "_rng", "_transform_rng", "_data")


# ----------------------------------------------------------------------------------------------- helpers
def is_rank0() -> bool:
    """True unless running under an initialised ``torch.distributed`` group with rank != 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def no_validation(data) -> bool:
    """True, with a warning, when the validation list is empty: ``_disabled_`` of a bundle's ``ValidationHandler``.

    MONAI Label sends ``validate#dataset#data`` from its own split (``val_split`` 0.2 of two labelled
    studies is an empty list); the training then runs without validation instead of failing.

    Args:
        data: the validation data list (``validate#dataset#data``).
    """
    if data is None or len(data) == 0:
        logger.warning("the validation list is empty: training runs without validation")
        return True
    return False


def unwrap_module(obj: Any) -> Any:
    """Return the wrapped module of ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Saving the unwrapped module keeps ``state_dict`` keys free of the ``module.`` prefix, so a
    checkpoint written by a multi-GPU run loads into a plain network and vice versa.
    """
    while True:
        if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            obj = obj.module
        elif hasattr(obj, "_orig_mod") and isinstance(obj, torch.nn.Module):
            obj = obj._orig_mod
        else:
            return obj


def to_cpu(obj: Any) -> Any:
    """Recursively copy tensors to CPU and turn numpy values into types ``weights_only`` accepts.

    Tensors become detached CPU tensors, numpy arrays become tensors, numpy scalars become python
    numbers; dicts (``OrderedDict`` kept), lists and tuples are rebuilt; other values are returned as is.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone() if obj.device.type != "cpu" else obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def _numpy_state_to_dict(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_dict(state: Mapping) -> tuple:
    keys = np.asarray(state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else state["keys"], dtype=np.uint32)
    return (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def capture_rng_state() -> dict:
    """Return the python, numpy, torch and CUDA global RNG states in a ``weights_only``-safe form."""
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": _numpy_state_to_dict(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore global RNG states saved by :func:`capture_rng_state` (CUDA only when present)."""
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "numpy" in state:
        np.random.set_state(_numpy_state_from_dict(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint holds %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(cuda_states), torch.cuda.device_count(),
            )


def _random_transforms(engine) -> list:
    """MONAI random transforms (objects with a ``numpy.random.RandomState`` ``R``) of the engine's data set.

    With ``num_workers=0`` MONAI seeds each random transform once when the data loader is built and the
    transform then draws from its own ``R``; these states are not part of the global RNG, so they are
    saved and restored separately. The order is the deterministic traversal order of the transform tree.
    """
    loader = getattr(engine, "data_loader", None)
    if loader is None:
        loader = getattr(getattr(engine, "state", None), "dataloader", None)
    dataset = getattr(loader, "dataset", None)
    root = getattr(dataset, "transform", None)
    found: list = []
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
            return
        if isinstance(obj, Mapping):
            for item in obj.values():
                visit(item, depth + 1)
            return
        if not hasattr(obj, "__call__") or isinstance(obj, (torch.nn.Module, torch.Tensor, np.ndarray, type)):
            return
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj)
        for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
            if isinstance(value, (list, tuple)) or (hasattr(value, "__dict__") and hasattr(value, "__call__")):
                visit(value, depth + 1)

    visit(root, 0)
    return found


def _engine_data(engine):
    loader = getattr(engine, "data_loader", None)
    if loader is None:
        loader = getattr(getattr(engine, "state", None), "dataloader", None)
    data = getattr(getattr(loader, "dataset", None), "data", None)
    if data is None or isinstance(data, (torch.Tensor, np.ndarray)):
        return None
    return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _ContentHasher:
    """SHA-256 of files and folders, cached by (resolved path, size, mtime) in a small JSON file."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file
        self.cache: dict[str, list] = {}
        self.changed = False
        if cache_file is not None and cache_file.is_file():
            try:
                self.cache = dict(json.loads(cache_file.read_text()))
            except (OSError, ValueError):
                self.cache = {}

    def file(self, path: Path) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.cache.get(real)
        if hit and hit[:2] == stamp:
            return hit[2]
        value = _file_sha256(Path(real))
        self.cache[real] = [*stamp, value]
        self.changed = True
        return value

    def folder(self, path: Path) -> str:
        digest = hashlib.sha256()
        for root, dirs, files in os.walk(os.path.realpath(path)):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                digest.update(os.path.relpath(full, os.path.realpath(path)).encode())
                digest.update(self.file(full).encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.cache_file is None or not self.changed or not is_rank0():
            return
        try:
            from shared_transforms.io import atomic_write

            with atomic_write(self.cache_file) as tmp:
                tmp.write_text(json.dumps(self.cache))
        except (OSError, ValueError):  # only a cache
            pass


def _content_view(obj, hasher: _ContentHasher):
    """The data list with every existing file / folder path replaced by its content hash."""
    if isinstance(obj, Mapping):
        return {str(k): _content_view(v, hasher) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_content_view(v, hasher) for v in obj]
    if isinstance(obj, (str, os.PathLike)) and len(str(obj)) < 4096:
        path = Path(obj)
        try:
            if path.is_file():
                return "sha256:" + hasher.file(path)
            if path.is_dir():
                return "dir-sha256:" + hasher.folder(path)
        except OSError:
            return str(obj)
        return str(obj)
    return obj


def data_fingerprint(engine, cache_dir=None) -> str | None:
    """SHA-256 of the training data list (``engine.data_loader.dataset.data``) by content, or None.

    Each entry that names an existing file or folder counts by the SHA-256 of its bytes, not by the
    spelling of its path, so the same data reached through a symlink, a relative path or another copy
    give the same fingerprint. Lets a resume tell "the same training, rerun" from "a new training on
    other data" (e.g. MONAI Label retraining with new labels, which overrides ``train#dataset#data``).

    Args:
        engine: the trainer.
        cache_dir: folder of the hash cache (``.data_hashes.json``; None: no cache).
    """
    data = _engine_data(engine)
    if data is None:
        return None
    hasher = _ContentHasher(None if cache_dir is None else Path(cache_dir) / _HASH_CACHE)
    try:
        text = json.dumps(_content_view(data, hasher), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    hasher.save()
    return hashlib.sha256(text.encode()).hexdigest()


def _path_fingerprint(engine) -> str | None:
    """The fingerprint of earlier versions (path spelling), so their checkpoints still resume."""
    data = _engine_data(engine)
    if data is None:
        return None
    try:
        text = json.dumps(data, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _state_dict_of(obj: Any, key: str) -> Any:
    target = unwrap_module(obj)
    if not hasattr(target, "state_dict"):
        raise ValueError(f"save_dict[{key!r}] ({type(obj).__name__}) has no state_dict()")
    return to_cpu(target.state_dict())


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`shared_transforms.io.atomic_write`: temporary file, fsync, rename, umask mode."""
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


# ----------------------------------------------------------------------------------------------- loading
def load_weights(path, map_location="cpu") -> dict:
    """Load a checkpoint or weights file safely with ``torch.load(weights_only=True)``.

    Args:
        path: ``.pt`` file: a bare ``state_dict`` (``models/model.pt``) or a dict of state dicts
            (``checkpoint_last.pt``).
        map_location: passed to ``torch.load``.

    Returns:
        the loaded mapping (tensors on ``map_location``).

    Raises:
        InputError: the file is missing or a directory, is truncated/corrupt or not a checkpoint at all,
            is a pickle holding arbitrary Python objects (refused: it could run code), or is not a
            mapping. The message says how to recover (delete the file or point ``ckpt_dir`` elsewhere).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "checkpoint file does not exist (train the bundle first or point load_path / ckpt_dir at it)")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a checkpoint file (.pt)")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # a well-formed pickle holding objects other than weights: loading it could run code
            raise InputError(
                path,
                f"refused to load: the file holds Python objects other than weights ({found.group(1)}), which could run "
                f"code when loaded; it is not a checkpoint of this toolkit: {_RECOVER} (load checkpoints only from trusted "
                "sources)",
            ) from exc
        raise InputError(path, f"file is corrupt or not a checkpoint of this toolkit; {_RECOVER}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        detail = " ".join(str(exc).strip().split(".")[0].split())[:120]
        raise InputError(path, f"file is corrupt or not a checkpoint of this toolkit ({type(exc).__name__}: {detail}); "
                               f"{_RECOVER}") from exc
    if not isinstance(obj, Mapping):
        raise InputError(path, f"expected a state_dict (mapping) but the file holds a {type(obj).__name__}")
    return obj


def _strip_prefix(state: Mapping, prefix: str = "module.") -> Mapping:
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix):], v) for k, v in state.items())
    return state


def _load_into(obj: Any, state: Any, key: str, source, strict: bool = True) -> None:
    target = unwrap_module(obj)
    if not hasattr(target, "load_state_dict"):
        raise ValueError(f"load_dict[{key!r}] ({type(obj).__name__}) has no load_state_dict()")
    try:
        if isinstance(target, torch.nn.Module):
            result = target.load_state_dict(_strip_prefix(state), strict=strict)
            if not strict and (result.missing_keys or result.unexpected_keys):
                logger.warning(
                    "%s: %r loaded non-strictly (missing %d, unexpected %d keys)",
                    source, key, len(result.missing_keys), len(result.unexpected_keys),
                )
        else:
            target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InputError(source, f"entry {key!r} does not fit {type(target).__name__}: {str(exc).strip()[:500]}") from exc


# ----------------------------------------------------------------------------------------------- schedules
# attributes of a scheduler that hold its progress (restored); everything else it was built with comes from
# the configuration, so a longer training gets a longer schedule
_SCHEDULE_PROGRESS = {"optimizer", "last_epoch", "_step_count", "base_lrs", "_last_lr", "_get_lr_called_within_step",
                      "_is_initial", "T_cur", "T_i", "_initial_step", "verbose", "lr_lambdas"}


def _is_lr_scheduler(obj) -> bool:
    base = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler
    return isinstance(unwrap_module(obj), base)


def _schedule_config(obj) -> dict:
    """The configured lengths / hyper-parameters of a freshly built scheduler (before its state is loaded)."""
    import copy

    sched = unwrap_module(obj)
    if hasattr(sched, "_schedulers"):  # SequentialLR / ChainedScheduler: containers of schedulers, left as restored
        return {}
    names = set()
    for cls in type(sched).__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            try:
                names |= set(inspect.signature(init).parameters)
            except (TypeError, ValueError):
                pass
    names |= {"_schedule_phases", "total_steps", "lr_lambda"}
    names -= _SCHEDULE_PROGRESS | {"self", "args", "kwargs"}
    config = {name: copy.deepcopy(sched.__dict__[name]) for name in names if name in sched.__dict__}
    lambdas = getattr(sched, "lr_lambdas", None)
    if isinstance(lambdas, list):  # callable objects get their __dict__ restored by load_state_dict: keep the fresh one
        config["__lr_lambda_dicts__"] = [copy.deepcopy(vars(f)) if hasattr(f, "__dict__") else None for f in lambdas]
    return config


def _differs(a, b) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - e.g. tensors: compare their values
        try:
            return not torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        except Exception:  # noqa: BLE001
            return True


def _scheduled_lrs(sched) -> list | None:
    """The learning rates ``sched`` gives at its current step, from the closed form of its schedule."""
    import math

    from torch.optim import lr_scheduler as lrs

    if isinstance(sched, (lrs.LambdaLR,)):
        return [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    if isinstance(sched, lrs.CosineAnnealingWarmRestarts):
        return [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * sched.T_cur / sched.T_i)) / 2
                for base in sched.base_lrs]
    if hasattr(sched, "_get_closed_form_lr"):
        return list(sched._get_closed_form_lr())
    return None


def _extend_schedule(sched, config: Mapping, source) -> None:
    """Put the configured schedule (lengths, lambdas) back on a restored scheduler and its optimiser's lrs."""
    from torch.optim import lr_scheduler as lrs

    changed = [name for name, value in config.items() if not name.startswith("__") and _differs(sched.__dict__.get(name), value)]
    for name, value in config.items():
        if not name.startswith("__"):
            sched.__dict__[name] = value
    for fn, fresh in zip(getattr(sched, "lr_lambdas", None) or [], config.get("__lr_lambda_dicts__", [])):
        if fresh is not None and hasattr(fn, "__dict__") and vars(fn) != fresh:
            vars(fn).clear()
            vars(fn).update(fresh)
            changed.append("lr_lambda")
    if isinstance(sched, lrs.CosineAnnealingWarmRestarts) and sched.T_mult == 1 and sched.T_i != sched.T_0:
        sched.T_i = sched.T_0
        changed.append("T_i")
    if not changed and not isinstance(sched, lrs.LambdaLR):
        return  # the same schedule: the restored learning rates are exact (bit-identical resume)
    lrs_now = _scheduled_lrs(sched)
    if lrs_now is None:
        logger.warning("%s: the schedule changed (%s) but %s has no closed form; the learning rate continues from the "
                       "restored value", source, ", ".join(changed), type(sched).__name__)
        return
    for group, lr in zip(sched.optimizer.param_groups, lrs_now):
        group["lr"] = lr
    sched._last_lr = list(lrs_now)
    if changed:
        logger.info("%s: schedule taken from the configuration (%s changed); learning rate at step %d: %s", source,
                    ", ".join(sorted(set(changed))), sched.last_epoch, ", ".join(f"{v:.4g}" for v in lrs_now))


class SafeCheckpointLoader:
    """Ignite handler that loads a checkpoint at ``Events.STARTED`` with ``weights_only=True``.

    Drop-in for MONAI's ``CheckpointLoader`` in bundle configs::

        - _target_: npc_gtv.training.SafeCheckpointLoader
          load_path: "$@ckpt_dir + '/model.pt'"
          load_dict: {model: "@network"}

    Args:
        load_path: checkpoint file: a bare ``state_dict`` (used whole when ``load_dict`` has one
            entry) or a dict whose keys include every key of ``load_dict``.
        load_dict: ``{name: object with load_state_dict}``; networks may be DDP-wrapped.
        map_location: ``torch.load`` map location.
        strict: strict ``load_state_dict`` for networks.
    """

    def __init__(self, load_path, load_dict: Mapping, map_location="cpu", strict: bool = True):
        if not isinstance(load_dict, Mapping) or not load_dict:
            raise ValueError("load_dict must be a non-empty mapping of name -> object with load_state_dict")
        self.load_path = Path(load_path)
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.strict = strict

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def load(self) -> None:
        """Load now (the handler calls this at ``STARTED``)."""
        checkpoint = load_weights(self.load_path, self.map_location)
        if all(k in checkpoint for k in self.load_dict):
            entries = {k: checkpoint[k] for k in self.load_dict}
        elif len(self.load_dict) == 1:
            entries = {next(iter(self.load_dict)): checkpoint}
        else:
            missing = [k for k in self.load_dict if k not in checkpoint]
            raise InputError(self.load_path, f"checkpoint has no entries {missing} (it has {sorted(map(str, checkpoint))[:10]})")
        for key, obj in self.load_dict.items():
            _load_into(obj, entries[key], key, self.load_path, self.strict)
        logger.info("loaded %s from %s", ", ".join(self.load_dict), self.load_path)

    def __call__(self, engine=None) -> None:
        self.load()


# ----------------------------------------------------------------------------------------------- saving
class ResumableCheckpoint:
    """Ignite handler: atomic CPU-tensor ``checkpoint_last.pt`` with full resume, plus the final ``model.pt``.

    Args:
        save_dir: folder of ``checkpoint_last.pt`` and the final weights (the bundle's ``ckpt_dir``).
        save_dict: ``{name: object}``; every object has ``state_dict`` / ``load_state_dict``
            (network, optimizer, lr_scheduler, GradScaler, another engine ...). Networks may be
            wrapped in ``DistributedDataParallel``: the ``module`` is saved, keys carry no ``module.``.
        every_n_iterations: also save every N iterations (0: never; skipped on an epoch's last
            iteration, where the epoch-end save takes over).
        every_n_epochs: save every N epochs (0: never; the state is always saved at ``COMPLETED``).
        final_name: file written at ``COMPLETED`` with ``save_dict[final_key]``'s ``state_dict``
            (``None``: none written).
        resume: restore from ``save_dir/checkpoint_last.pt`` when it exists.
        final_key: entry of ``save_dict`` written to ``final_name``.

    Raises:
        ValueError: bad arguments.
        InputError: (at attach) an existing ``checkpoint_last.pt`` that cannot be loaded safely or does
            not fit the objects (e.g. a different network): the message names the file.
    """

    def __init__(
        self,
        save_dir,
        save_dict: Mapping,
        every_n_iterations: int = 0,
        every_n_epochs: int = 1,
        final_name: str | None = "model.pt",
        resume: bool = True,
        final_key: str = "model",
    ):
        if not isinstance(save_dict, Mapping) or not save_dict:
            raise ValueError("save_dict must be a non-empty mapping of name -> object with state_dict/load_state_dict")
        for key, obj in save_dict.items():
            if not isinstance(key, str) or key in _RESERVED:
                raise ValueError(f"save_dict key {key!r} is not allowed (must be a str, not one of {_RESERVED})")
            target = unwrap_module(obj)
            if not (hasattr(target, "state_dict") and hasattr(target, "load_state_dict")):
                raise ValueError(f"save_dict[{key!r}] ({type(obj).__name__}) needs state_dict() and load_state_dict()")
        for name, value in (("every_n_iterations", every_n_iterations), ("every_n_epochs", every_n_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if final_name is not None and final_key not in save_dict:
            raise ValueError(f"final_key {final_key!r} is not a key of save_dict {list(save_dict)}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.every_n_iterations = every_n_iterations
        self.every_n_epochs = every_n_epochs
        self.final_name = final_name
        self.resume = bool(resume)
        self.final_key = final_key
        self.resumed_from: dict | None = None  # engine counters restored at attach (None: fresh start)
        self._pending_transform_rng: list | None = None
        self._already_complete = False
        self._check_complete = False
        self._savers_registered = False
        self._fingerprint: str | None = None

    @property
    def last_path(self) -> Path:
        """``save_dir/checkpoint_last.pt``."""
        return self.save_dir / CHECKPOINT_NAME

    @property
    def final_path(self) -> Path | None:
        return None if self.final_name is None else self.save_dir / self.final_name

    # -- attach / resume
    def attach(self, engine) -> None:
        """Restore from ``checkpoint_last.pt`` (if any and ``resume``) and register the saving events."""
        from ignite.engine import Events

        if is_rank0():
            self._remove_stale_temporaries()
        if self.resume and self.last_path.exists():
            self._restore(engine)
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _remove_stale_temporaries(self) -> None:
        # a SIGKILL during a save leaves ".checkpoint_last.pt.XXXX.pt"; the real file is intact
        if self.save_dir.is_dir():
            for name in (CHECKPOINT_NAME, self.final_name, _HASH_CACHE):
                if name:
                    for stale in self.save_dir.glob(f".{name.lstrip('.')}.*"):
                        stale.unlink(missing_ok=True)

    def _data_print(self, engine) -> str | None:
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(engine, cache_dir=self.save_dir if self.save_dir.is_dir() else None)
        return self._fingerprint

    def _restore(self, engine) -> None:
        path = self.last_path
        checkpoint = load_weights(path, "cpu")
        if checkpoint.get("_format") != CHECKPOINT_FORMAT:
            raise InputError(path, f"file is not a resumable checkpoint of this toolkit (format {checkpoint.get('_format')!r}); "
                                   f"{_RECOVER}, or set resume=False")
        saved_print = checkpoint.get("_data")
        current_print = self._data_print(engine)
        if saved_print and current_print and saved_print not in (current_print, _path_fingerprint(engine)):
            if is_rank0():
                os.replace(path, self.save_dir / PREVIOUS_NAME)
            logger.warning(
                "%s: the training data (by content) differ from those this checkpoint was trained on; starting a new "
                "training instead of resuming (the earlier checkpoint is kept as %s)", path, self.save_dir / PREVIOUS_NAME,
            )
            return
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise InputError(path, f"checkpoint has no entries {missing} (has {[k for k in checkpoint if k not in _RESERVED]}); "
                                   f"it was written by a different training config: {_RECOVER}")
        schedules = {key: _schedule_config(obj) for key, obj in self.save_dict.items() if _is_lr_scheduler(obj)}
        for key, obj in self.save_dict.items():
            _load_into(obj, checkpoint[key], key, path, strict=True)
        for key, config in schedules.items():  # after the optimiser, whose learning rates it sets
            _extend_schedule(unwrap_module(self.save_dict[key]), config, f"{path} [{key}]")

        saved = dict(checkpoint["_engine"])
        saved_len = int(saved["epoch_length"]) if saved.get("epoch_length") else None
        iteration = int(saved["iteration"])
        cur_len = getattr(engine.state, "epoch_length", None)
        epoch_length = cur_len or saved_len
        if cur_len and saved_len and cur_len != saved_len:
            done_epochs = iteration // saved_len
            logger.warning(
                "%s: epoch length changed from %d to %d (data set changed); resuming at the start of epoch %d",
                path, saved_len, cur_len, done_epochs + 1,
            )
            iteration = done_epochs * cur_len
        max_epochs = getattr(engine.state, "max_epochs", None) or saved.get("max_epochs")
        engine.load_state_dict({"iteration": iteration, "epoch_length": epoch_length, "max_epochs": max_epochs})
        restore_rng_state(checkpoint.get("_rng", {}))
        self._pending_transform_rng = list(checkpoint.get("_transform_rng", []))
        self.resumed_from = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        self._check_complete = engine.state.iteration > 0
        msg = (f"resumed from {path}: epoch {engine.state.epoch} (completed), iteration {engine.state.iteration}, "
               f"max_epochs {max_epochs}")
        logger.info(msg)
        if getattr(engine, "logger", None) is not None and engine.logger is not logger:
            engine.logger.info(msg)

    def _on_started(self, engine) -> None:
        from ignite.engine import Events

        if self._check_complete:
            self._check_complete = False
            if engine.state.iteration == 0:
                # ignite found the restored state done (iteration >= max_epochs * epoch_length) and reset it to
                # start again from epoch 0; a rerun of a finished training must not retrain, so stop here
                self._already_complete = True
                logger.info(
                    "%s: training already complete (%s); nothing to run. Raise max_epochs to train longer, or "
                    "delete the file / set resume=False to start again.", self.last_path, self.resumed_from,
                )
                engine.terminate()
                return
        if self._pending_transform_rng:
            transforms = _random_transforms(engine)
            if len(transforms) == len(self._pending_transform_rng):
                for t, s in zip(transforms, self._pending_transform_rng):
                    t.R.set_state(_numpy_state_from_dict(s))
            else:
                logger.warning("random transform states not restored: checkpoint has %d, data set has %d",
                               len(self._pending_transform_rng), len(transforms))
        self._pending_transform_rng = None
        if not self._savers_registered:
            # registered now, after every handler of the config, so the saved state follows validation and
            # scheduler steps of the same event
            if self.every_n_iterations:
                engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self._on_iteration)
            if self.every_n_epochs:
                engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_n_epochs), self.save)
            self._savers_registered = True

    def _on_iteration(self, engine) -> None:
        length = engine.state.epoch_length
        if length and engine.state.iteration % length == 0:
            return
        self.save(engine)

    def _on_completed(self, engine) -> None:
        if self._already_complete:
            self._already_complete = False  # a later run() of the same engine trains normally
            return
        self.save(engine)
        if self.final_path is not None and is_rank0():
            _atomic_torch_save(_state_dict_of(self.save_dict[self.final_key], self.final_key), self.final_path)
            logger.info("final weights (%s) written to %s", self.final_key, self.final_path)

    # -- saving
    def state(self, engine) -> dict:
        """The checkpoint content for ``engine``'s current state (CPU tensors, ``weights_only``-loadable)."""
        payload: dict[str, Any] = {key: _state_dict_of(obj, key) for key, obj in self.save_dict.items()}
        payload["_format"] = CHECKPOINT_FORMAT
        payload["_engine"] = {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "epoch_length": None if engine.state.epoch_length is None else int(engine.state.epoch_length),
            "max_epochs": None if engine.state.max_epochs is None else int(engine.state.max_epochs),
        }
        payload["_rng"] = capture_rng_state()
        payload["_transform_rng"] = [_numpy_state_to_dict(t.R.get_state()) for t in _random_transforms(engine)]
        payload["_data"] = self._data_print(engine)
        return payload

    def save(self, engine) -> None:
        """Write ``checkpoint_last.pt`` atomically (rank 0 only)."""
        if not is_rank0():
            return
        _atomic_torch_save(self.state(engine), self.last_path)
        logger.debug("checkpoint saved: epoch %d iteration %d -> %s", engine.state.epoch, engine.state.iteration, self.last_path)
