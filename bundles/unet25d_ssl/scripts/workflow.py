"""Workflow helpers of the UNet-2.5D bundle: step decay, training all five scales, ensemble assembly.

* :func:`step_decay` -- the paper's schedule: Adam at 1e-3 with a decay of ``1e-4`` every 150
  epochs (stepped every iteration, so the step size is 150 epochs of ``epoch_length`` iterations). The paper's sentence ("decay factor of 1e-4 for every 150 epochs") has two readings:
  ``mode="subtract"`` (default) lowers the rate by 1e-4 every 150 epochs (1e-3, 9e-4, ... 5e-4 at
  epoch 750), which keeps training meaningful for all 900 epochs; ``mode="multiply"`` multiplies it
  by the factor (1e-3 -> 1e-7 after 150 epochs, i.e. training effectively stops there).
* :func:`train_all_scales` -- one command trains the five scale models in sequence (a fresh
  parser of the running config per scale, all overrides kept) and then :func:`assemble_ensemble`
  writes ``model.pt``.
* :func:`assemble_ensemble` -- the ensemble's single weights file: with a shared (frozen,
  pretrained) encoder, ONE copy of the encoder plus five decoders; otherwise five full networks.
  ``ckpt_dir/ensemble.json`` records the layout, read back by :func:`ensemble_layout`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from shared_transforms.io import InputError, atomic_write

from .network import PAPER_SLOPE
from .transforms import SCALES, scale_index

__all__ = [
    "StepDecay",
    "step_decay",
    "scale_dir",
    "assemble_ensemble",
    "ensemble_layout",
    "ensemble_slope",
    "train_all_scales",
    "running_config",
    "resolve_freeze",
    "fuse_batchnorm_",
    "FuseBatchNorm",
]


class StepDecay:
    """Learning-rate factor ``f(step)`` for ``torch.optim.lr_scheduler.LambdaLR`` (picklable).

    Args:
        base_lr: initial learning rate (1e-3).
        step_size: scheduler steps between decays: the paper's 150 epochs times the epoch length
            when the scheduler is stepped every iteration (as the configs do), or 150 when stepped
            every epoch.
        decay: the paper's decay value (1e-4).
        mode: ``"subtract"``: ``lr = base_lr - decay * floor(step / step_size)`` (floored at
            ``min_fraction * base_lr``); ``"multiply"``: ``lr = base_lr * decay ** floor(...)``.
        min_fraction: lower bound of the factor in ``subtract`` mode.
    """

    def __init__(self, base_lr: float = 1e-3, step_size: int = 150, decay: float = 1e-4, mode: str = "subtract", min_fraction: float = 0.01):
        if mode not in ("subtract", "multiply"):
            raise ValueError(f"mode must be 'subtract' or 'multiply', got {mode!r}")
        if step_size < 1 or base_lr <= 0 or decay < 0:
            raise ValueError(f"need step_size >= 1, base_lr > 0, decay >= 0 (got {step_size}, {base_lr}, {decay})")
        self.base_lr, self.step_size, self.decay, self.mode, self.min_fraction = float(base_lr), int(step_size), float(decay), mode, float(min_fraction)

    def __call__(self, step: int) -> float:
        k = int(step) // self.step_size
        if self.mode == "multiply":
            return self.decay**k
        return max(self.min_fraction, 1.0 - self.decay * k / self.base_lr)


def step_decay(optimizer, base_lr: float = 1e-3, step_size: int = 150, decay: float = 1e-4, mode: str = "subtract"):
    """``LambdaLR`` with :class:`StepDecay` (``step_size`` in scheduler steps: iterations in the configs)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, StepDecay(base_lr, step_size, decay, mode))


def scale_dir(ckpt_dir, scale) -> str:
    """Folder of one scale's checkpoints: ``ckpt_dir/<scale name>``."""
    return str(Path(ckpt_dir) / SCALES[scale_index(scale)])


def _load(path) -> dict:
    from npc_gtv.training import load_weights

    return dict(load_weights(path))


def assemble_ensemble(ckpt_dir, scales: Sequence = SCALES, shared_encoder: bool = True, encoder_path=None, out_name: str = "model.pt",
                      negative_slope: float = PAPER_SLOPE) -> Path:
    """Write the ensemble's weights ``ckpt_dir/<out_name>`` from the per-scale ``model.pt`` files.

    Args:
        ckpt_dir: folder holding ``<scale>/model.pt`` for each scale.
        scales: the member scales, in ensemble order.
        shared_encoder: True: members are decoders (or full networks whose ``decoder.*`` part is
            taken) sharing the encoder in ``encoder_path``; False: members are full networks.
        encoder_path: the pretrained (frozen) encoder file (``encoder.pt`` of ``pretrain.yaml``).
        negative_slope: the activation the members were trained with (recorded for inference).

    Returns:
        the written path. ``ckpt_dir/ensemble.json`` records ``{"shared_encoder", "scales",
        "negative_slope", "in_channels"}`` (the input channels read from the weights).

    Raises:
        InputError: a missing member file or encoder file (named).
    """
    from .network import UNet25DEnsemble

    ckpt_dir = Path(ckpt_dir)
    names = [SCALES[scale_index(s)] for s in scales]
    states = [_load(ckpt_dir / n / "model.pt") for n in names]
    if shared_encoder and not encoder_path:
        raise ValueError("a shared-encoder ensemble needs encoder_path (the pretrained encoder.pt)")
    encoder = _load(encoder_path) if shared_encoder else None
    # the first convolution's weights tell the input channels (1: CT, 3: stacked MRI)
    first = encoder["block1.0.weight"] if shared_encoder else states[0]["encoder.block1.0.weight"]
    in_channels = int(first.shape[1])
    ens = UNet25DEnsemble(num_members=len(names), shared_encoder=bool(shared_encoder), in_channels=in_channels, negative_slope=negative_slope)
    ens.load_members(states, encoder)
    out = ckpt_dir / out_name
    with atomic_write(out) as tmp:
        torch.save({k: v.detach().cpu() for k, v in ens.state_dict().items()}, tmp)
    with atomic_write(ckpt_dir / "ensemble.json") as tmp:
        tmp.write_text(json.dumps({"shared_encoder": bool(shared_encoder), "scales": names, "negative_slope": float(negative_slope),
                                   "in_channels": in_channels}, indent=2))
    print(f"ensemble of {len(names)} scale models ({'one shared encoder' if shared_encoder else 'independent encoders'}) written to {out}", flush=True)
    return out


def ensemble_layout(ckpt_dir, key: str = "shared_encoder", default=True):
    """Read ``key`` of ``ckpt_dir/ensemble.json`` (written by :func:`assemble_ensemble`), else ``default``."""
    p = Path(ckpt_dir) / "ensemble.json"
    if not p.is_file():
        return default
    try:
        return json.loads(p.read_text()).get(key, default)
    except json.JSONDecodeError as exc:
        raise InputError(p, f"is not valid JSON ({exc})") from exc


#: the activation of ensembles assembled before ``ensemble.json`` recorded it (bundle < 0.4.0)
LEGACY_SLOPE = 0.01


def ensemble_slope(ckpt_dir) -> float:
    """The activation slope the ensemble in ``ckpt_dir`` was trained with (for inference).

    ``ensemble.json``'s ``negative_slope``; an ``ensemble.json`` without it was written by a bundle
    before 0.4.0, whose networks used LeakyReLU 0.01; without ``ensemble.json``, the paper's ReLU.
    """
    if not (Path(ckpt_dir) / "ensemble.json").is_file():
        return PAPER_SLOPE
    return float(ensemble_layout(ckpt_dir, "negative_slope", LEGACY_SLOPE))


def resolve_freeze(freeze_encoder, pretrained_encoder) -> bool:
    """Decide whether to load and freeze the pretrained encoder.

    Args:
        freeze_encoder: ``True`` (required: the file must exist), ``False`` (full model from
            scratch) or ``"auto"``: frozen pretrained encoder when ``pretrained_encoder`` exists,
            otherwise full model from scratch (a notice says which).
        pretrained_encoder: the ``encoder.pt`` written by ``pretrain.yaml``.
    """
    if isinstance(freeze_encoder, str):
        value = freeze_encoder.strip().lower()
        if value == "auto":
            found = bool(pretrained_encoder) and Path(pretrained_encoder).is_file()
            print(
                f"freeze_encoder=auto: {'using the frozen pretrained encoder ' + str(pretrained_encoder) if found else 'no pretrained encoder at ' + repr(pretrained_encoder) + ', training full models from scratch (run configs/pretrain.yaml first for the SSL method)'}",
                flush=True,
            )
            return found
        if value in ("true", "1", "yes"):
            freeze_encoder = True
        elif value in ("false", "0", "no", ""):
            freeze_encoder = False
        else:
            raise ValueError(f"freeze_encoder must be true, false or auto, got {freeze_encoder!r}")
    if freeze_encoder and not (pretrained_encoder and Path(pretrained_encoder).is_file()):
        raise InputError(pretrained_encoder, "freeze_encoder is true but the pretrained encoder file does not exist "
                                             "(run configs/pretrain.yaml first, or set --freeze_encoder false / auto)")
    return bool(freeze_encoder)


def running_config() -> dict:
    """The raw (unresolved) merged config, overrides included, of the bundle workflow now running.

    Found on the call stack: the ``ConfigWorkflow`` (``monai.bundle run`` or the Python API) whose
    parser is evaluating the current expression.
    """
    import copy
    import inspect

    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        parser = obj if isinstance(obj, ConfigParser) else getattr(obj, "parser", None)
        if isinstance(parser, ConfigParser):
            return copy.deepcopy(parser.get())
        frame = frame.f_back
    raise RuntimeError("train_all_scales must be called from a running bundle config (python -m monai.bundle run ...)")


def train_all_scales(scales: Sequence = SCALES, model_dir=None, shared_encoder: bool = True, encoder_path=None, train_id: str = "train_one", config: dict | None = None,
                     negative_slope: float = PAPER_SLOPE) -> Path:
    """Train the scale models one after the other (in this process), then assemble the ensemble.

    Called from ``train.yaml`` (``run`` / ``train_all``). For each scale a fresh parser of the
    running config (every command-line override kept) with ``scale`` set runs ``initialize`` and
    ``train_id``. A scale whose training already finished returns at once (resumable checkpoint),
    so rerunning the command after an interruption continues where it stopped.

    Args:
        scales: scales to train, in ensemble order.
        model_dir: folder of the per-scale folders and the ensemble file.
        shared_encoder: assemble one shared encoder (frozen-encoder training) or full members.
        encoder_path: pretrained encoder file for ``shared_encoder``.
        train_id: id of the single-scale training workflow.
        config: raw config to use (default: :func:`running_config`).
        negative_slope: the members' activation (recorded in ``ensemble.json``).
    """
    import copy
    import gc

    from monai.bundle import ConfigParser

    raw = running_config() if config is None else config
    for s in scales:
        name = SCALES[scale_index(s)]
        print(f"=== training scale {name} ===", flush=True)
        t0 = time.time()
        parser = ConfigParser(copy.deepcopy(raw))
        parser["scale"] = name
        parser.parse()
        if "initialize" in parser:
            parser.get_parsed_content("initialize")
        parser.get_parsed_content(train_id)
        del parser
        gc.collect()
        print(f"=== scale {name} done in {time.time() - t0:.1f} s ===", flush=True)
    return assemble_ensemble(model_dir, scales, shared_encoder, encoder_path, negative_slope=negative_slope)


def fuse_batchnorm_(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every ``Conv3d/ConvTranspose3d -> BatchNorm3d`` pair of ``nn.Sequential`` blocks, in place.

    For inference only (the module must be in eval mode): the convolution takes the BatchNorm's
    affine map and running statistics and the BatchNorm becomes ``nn.Identity``. Outputs are
    unchanged up to float rounding; CPU inference is about twice as fast. The state dict changes
    (no BatchNorm entries), so fuse after the weights are loaded and never save a fused model as a
    checkpoint.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("fuse_batchnorm_ needs a module in eval mode")
    for child in module.modules():
        if isinstance(child, torch.nn.Sequential):
            for i in range(len(child) - 1):
                conv, bn = child[i], child[i + 1]
                if isinstance(conv, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and isinstance(bn, torch.nn.BatchNorm3d):
                    child[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, torch.nn.ConvTranspose3d))
                    child[i + 1] = torch.nn.Identity()
    return module


class FuseBatchNorm:
    """Ignite handler for inference configs: speed up the loaded network for CPU/GPU inference.

    At ``Events.STARTED`` (attach it AFTER the checkpoint loader; handlers of the same event run in
    attach order) it puts the network in eval mode, folds BatchNorm into the convolutions
    (``enabled``) and stores the weights in ``channels_last_3d`` memory format (``channels_last``),
    which oneDNN runs 1.2-1.9x faster on CPU for these (3, 3, 1) convolutions. Outputs are unchanged
    up to float rounding.
    """

    def __init__(self, network: torch.nn.Module, enabled: bool = True, channels_last: bool = True):
        self.network = network
        self.enabled = bool(enabled)
        self.channels_last = bool(channels_last)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        net = self.network.module if hasattr(self.network, "module") else self.network
        net.eval()
        if self.enabled:
            fuse_batchnorm_(net)
        if self.channels_last:
            net.to(memory_format=torch.channels_last_3d)
