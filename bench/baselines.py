#!/usr/bin/env python
"""Baselines of the learning benchmark: a plain MONAI UNet and nnU-Net v2 at fixed iteration budgets.

``bench/bench_learning.py`` compares each bundle against these two baselines at equal iteration
budgets on one fixed split, "the demo set": the phantoms ``npc-gtv demo`` trains on, generated with
``npc_gtv.phantoms.generate_dataset(DIR, cases=10, seed=0, modality="ct", size="small")`` (8
training cases ``npc_000``..``npc_007``, 2 test cases ``npc_008``, ``npc_009``; 96 x 96 x 32 voxels
at 2.4 x 2.4 x 3 mm, int16 HU, tumour 8 HU above muscle, noise 12 HU). Both baselines train on every
training case and are scored on the test cases. A missing or empty ``--data`` folder is filled with
that set; a folder with files is only read.

Evaluation (the same for every method): one NIfTI mask per test case, on the test image's own grid
(same shape and affine, checked), scored by the project's evaluator
(:func:`npc_gtv.evaluation.report.evaluate_folders` with the data set's ``dataset.json``, section
``test``), so the numbers are those ``npc-gtv evaluate`` prints for the bundles.

Commands::

    OMP_NUM_THREADS=1 python bench/baselines.py monai_unet --data /work/bench_data/demo_set \\
        --out /work/bench_runs/monai_unet --budgets 250,500,1000 --seed 0
    OMP_NUM_THREADS=1 nnUNet_n_proc_DA=0 python bench/baselines.py nnunet --data /work/bench_data/demo_set \\
        --out /work/bench_runs/nnunet --budgets 250,500,1000,2000 --seed 0

or from Python (``bench_learning.py``)::

    from baselines import run_monai_unet, run_nnunet, read_results
    rows = run_monai_unet(data_dir, out_dir, budgets=[250, 500, 1000], seed=0)

Each run trains once up to the largest budget and evaluates the model at every budget on the way.
``--out/results.json`` is a list of rows, rewritten (atomically) after every evaluated budget, so a
run that is still going or was stopped leaves its finished budgets readable. Rows of other seeds or
methods already in that file are kept; a row with the same method, seed and iterations is replaced::

    {"method": "monai_unet" | "nnunet_v2", "seed": 0, "iterations": 500,
     "train_wall_s": ...,    # training wall time from the first iteration to this budget
                             # (data loading + augmentation included, evaluation excluded)
     "s_per_iter": ...,      # train_wall_s / iterations
     "dsc_mean": ..., "dsc_per_case": {"npc_008": ..., "npc_009": ...},
     "hd95_mean": ..., "hd95_per_case": {...},   # mm
     "threads": 1, "checkpoint": ..., "eval_dir": ..., ...}  # extra keys per method

Wall times are measured on a shared machine (each row has the 1-minute load average when its
budget was reached, ``load_avg_1min``): compare them within one run, not across machines.

**Plain MONAI UNet** (``monai_unet``; the recipe of the benchmark's issue): ``monai.networks.nets.UNet``
(3D, 1 -> 2 channels, channels 16, 32, 64, 128, strides 2, 2, 2, 2 residual units, batch norm),
``DiceCELoss(to_onehot_y=True, softmax=True)``, Adam lr 1e-3 (constant), ``RandCropByPosNegLabeld``
64 x 64 x 32 with pos 1 : neg 1 and ``num_samples=2`` from one volume per step (2 patches per
optimiser step), HU window [-150, 350] scaled to [0, 1] with clipping, native spacing and orientation
(no resampling), sliding-window inference (roi 64 x 64 x 32, overlap 0.25), argmax. ``--seed`` goes
to ``monai.utils.set_determinism``. Outputs: ``--out/monai_unet_seed<S>/iter_<N>/{pred,eval}``.

**nnU-Net v2** (``nnunet``) with its own fingerprint, default ``ExperimentPlanner`` plans and
preprocessing (``3d_fullres``) and its own ``nnUNetTrainer`` (SGD momentum 0.99 Nesterov, lr 1e-2,
poly schedule, deep supervision, Dice + CE, its augmentation), trained on fold ``"all"`` (all
training cases) on the CPU. Install it with ``pip install -e ".[bench]" torch==2.13.0`` on a CPU
machine: without the torch pin pip picks the newest torchvision and a newer torch with it. nnunetv2
pulls timm and torchvision; PyPI's torchvision does not import with the CPU torch, and nothing here
imports it.

- The only changes are the run length and its bookkeeping, in a subclass (``nnUNetTrainerBudget``):
  ``num_iterations_per_epoch`` is the greatest common divisor of the budgets, capped at nnU-Net's
  250; ``num_epochs`` ends the run at the largest budget; ``num_val_iterations_per_epoch`` is
  ``--val_iterations`` (default 5, nnU-Net: 50; the validation cases of fold "all" are the training
  cases); at every budget a checkpoint ``checkpoint_iter<N>.pth`` is saved and evaluated right away.
- The poly schedule runs over the whole run, so the checkpoint at a smaller budget has not had its
  learning rate annealed (one run gives the whole curve; a separate run per budget would anneal
  earlier). Each row records ``lr_last_epoch``.
- Prediction: ``nnUNetPredictor`` with its defaults (Gaussian-weighted tiles, step 0.5, mirroring
  on) on the CPU, the network built from the plans and loaded from that checkpoint
  (``manual_initialization``: nnU-Net's trainer look-up by name imports every trainer module, among
  them the Primus trainers, which import timm and torchvision).
- Folders: ``--out/nnUNet_raw/Dataset501_NPCPhantom`` (the data set converted:
  ``imagesTr/<case>_0000.nii.gz``, ``labelsTr``, ``imagesTs``), ``--out/nnUNet_preprocessed``,
  ``--out/nnUNet_results/seed_<S>``; the environment variables ``nnUNet_raw``,
  ``nnUNet_preprocessed`` and ``nnUNet_results`` are set to them. Predictions and reports:
  ``--out/nnunet_seed<S>/iter_<N>/{pred,eval}``; settings: ``--out/run_config_seed<S>.json``.
- Processes: data augmentation runs in the training process (``nnUNet_n_proc_DA=0``) unless that
  variable is set; on these phantoms it takes 0.01-0.2 s of an iteration of more than 10 s, so a
  worker process would not speed it up. ``nnUNet_def_n_proc`` (nnU-Net's process and thread count
  for preprocessing and export) defaults to ``--threads``.
- ``--seed`` seeds Python, NumPy and torch before the network is built (nnU-Net itself does not
  seed; the run is reproducible only as far as its augmentation is).
- A run that stops can be continued with the same command: it resumes from the last budget
  checkpoint whose row is in ``results.json`` (network, optimiser, epoch, logger; the augmentation
  random state is not restored). Other settings in the same ``--out`` are refused.

Measured (2-core CPU shared with other jobs, load 3-6, 1 torch thread; demo set, 2 test cases):

- Plain MONAI UNet, seeds 0, 1, 2 (``/work/bench_runs/monai_unet/results.json``), test DSC mean
  over the seeds (sd) / HD95 mean: 200 it 0.395 (0.102) / 13.7 mm; 250 it 0.500 (0.152) / 9.5 mm;
  400 it 0.597 (0.064) / 10.3 mm; 500 it 0.538 (0.103) / 7.4 mm; 1000 it 0.685 (0.050) / 5.2 mm;
  1500 it 0.702 (0.021) / 6.9 mm; 2000 it 0.718 (0.011) / 7.8 mm. 0.38-0.57 s per iteration
  (864-913 s to 2000 iterations). Seed 0 gives 0.372 / 0.648 / 0.615 at 200 / 400 / 500 iterations
  against the issue's 0.48 / 0.65 / 0.70: 400 agrees, 200 and 500 are lower, and the seeds differ
  by up to 0.2 below 1000 iterations (constant learning rate, two test cases; the dip at 500 is
  under-segmentation of ``npc_009``, sensitivity 0.18-0.38). The same seed gives the same numbers
  in two runs.
- nnU-Net v2: the plans match what was expected: 5 stages (32-320 features), patch 32 x 96 x 96,
  batch 2, CTNormalization clipped to 26-88 HU. A 10-iteration smoke run (budgets 5 and 10, 1
  validation iteration per epoch) took 17 s per iteration (load 3.2-6; the forward and backward pass
  is 11.5-17 s of it, augmentation 0.01-0.2 s) and 35-55 s to predict and evaluate the two test
  cases per checkpoint; resuming after 5 iterations continued the poly schedule (lr 0.00536 in the
  second epoch, as without the interruption).

Not done here: GPU runs; more than one nnU-Net seed; nnU-Net's 5-fold cross-validation, ensembling
and post-processing selection (they need the cross-validation; the benchmark trains on fold "all").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

# plain MONAI UNet recipe (the benchmark issue)
HU_WINDOW = (-150.0, 350.0)
PATCH = (64, 64, 32)  # (X, Y, Z) voxels
UNET_CHANNELS = (16, 32, 64, 128)
UNET_STRIDES = (2, 2, 2)
LEARNING_RATE = 1e-3

# nnU-Net
NNUNET_DATASET_ID = 501
NNUNET_DATASET_NAME = f"Dataset{NNUNET_DATASET_ID:03d}_NPCPhantom"
NNUNET_MAX_ITERS_PER_EPOCH = 250  # nnU-Net's default epoch length
NNUNET_CONFIGURATION = "3d_fullres"
NNUNET_PLANS = "nnUNetPlans"

# the demo set (exactly as ``npc-gtv demo`` generates it)
DEMO_SET = {"cases": 10, "seed": 0, "modality": "ct", "size": "small"}


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def parse_budgets(budgets) -> list[int]:
    """Sorted, unique positive iteration budgets from ``"250,500,1000"`` or an iterable of ints.

    Raises:
        ValueError: an empty list, or a budget that is not a positive integer.
    """
    items = budgets.split(",") if isinstance(budgets, str) else list(budgets)
    out = set()
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"budget {text!r} is not an integer number of iterations") from None
        if value <= 0:
            raise ValueError(f"budget {value} is not a positive number of iterations")
        out.add(value)
    if not out:
        raise ValueError("no iteration budgets given (expected e.g. --budgets 250,500,1000)")
    return sorted(out)


def load_split(data_dir) -> tuple[Path, list[dict], list[dict]]:
    """The data set's ``dataset.json`` and its training and test cases with absolute paths.

    A missing or empty ``data_dir`` is first filled with the demo set (:data:`DEMO_SET`); a folder
    with files but no ``dataset.json`` is an error and is not written into.

    Returns:
        ``(dataset_json_path, training, test)``; each case is ``{"case_id", "image", "label"}``.

    Raises:
        FileNotFoundError: a non-empty folder without ``dataset.json``.
        ValueError: an empty ``training`` or ``test`` list, a case without image or label, or
            an image path that is not a single file (multi-sequence MRI is not supported here).
    """
    from npc_gtv.phantoms import ensure_dataset

    ds_path = Path(ensure_dataset(data_dir, **DEMO_SET)).resolve()
    ds = json.loads(ds_path.read_text())
    split = {}
    for section in ("training", "test"):
        cases = []
        for i, entry in enumerate(ds.get(section) or []):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise ValueError(f"{ds_path}: {section} entry {i} needs an 'image' and a 'label'")
            if not isinstance(entry["image"], str):
                raise ValueError(f"{ds_path}: {section} entry {i} has several images; the baselines take one CT")
            image, label = (ds_path.parent / entry["image"]), (ds_path.parent / entry["label"])
            case_id = entry.get("case_id") or _nifti_stem(image)
            cases.append({"case_id": case_id, "image": str(image), "label": str(label)})
        if not cases:
            raise ValueError(f"{ds_path}: the '{section}' list is empty (the baselines train on 'training' and score 'test')")
        split[section] = cases
    return ds_path, split["training"], split["test"]


def _nifti_stem(path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def check_prediction_grid(pred_path, image_path) -> None:
    """Raise :class:`shared_transforms.io.InputError` unless the mask is on the image's grid."""
    import nibabel as nib

    from shared_transforms.io import check_same_grid

    img, pred = nib.load(str(image_path)), nib.load(str(pred_path))
    check_same_grid(img.shape, img.affine, pred.shape, pred.affine, image_path, pred_path)


def evaluate_predictions(pred_dir, dataset_json, eval_dir) -> dict:
    """Score a folder of test predictions with the project's evaluator.

    Args:
        pred_dir: one ``<case_id>.nii.gz`` per test case.
        dataset_json: the data set's ``dataset.json`` (its ``test`` list is the truth).
        eval_dir: report folder (``metrics.csv``, ``summary.json``, ``summary.md``; no figures).

    Returns:
        ``{"dsc_mean", "dsc_per_case", "hd95_mean", "hd95_per_case"}`` (HD95 in mm).
    """
    from npc_gtv.evaluation.report import evaluate_folders, read_metrics_csv

    summary = evaluate_folders(pred_dir, dataset_json, eval_dir, section="test", figures=False, progress=False)
    _, cases = read_metrics_csv(eval_dir)
    return {
        "dsc_mean": float(summary["metrics"]["dsc"]["mean"]),
        "dsc_per_case": {c: float(v["dsc"]) for c, v in sorted(cases.items())},
        "hd95_mean": float(summary["metrics"]["hd95"]["mean"]),
        "hd95_per_case": {c: float(v["hd95"]) for c, v in sorted(cases.items())},
    }


def read_results(out_dir) -> list[dict]:
    """Rows of ``out_dir/results.json`` (an empty list when the file does not exist yet)."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of result rows, found {type(rows).__name__}")
    return rows


def write_result_row(out_dir, row: dict) -> Path:
    """Add ``row`` to ``out_dir/results.json`` (replacing the row of the same method, seed, iterations).

    The file is rewritten atomically, rows sorted by method, seed and iterations.
    """
    from shared_transforms.io import atomic_write

    key = (row["method"], row["seed"], row["iterations"])
    rows = [r for r in read_results(out_dir) if (r.get("method"), r.get("seed"), r.get("iterations")) != key]
    rows.append(row)
    rows.sort(key=lambda r: (str(r.get("method")), int(r.get("seed", 0)), int(r.get("iterations", 0))))
    path = Path(out_dir) / "results.json"
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    return path


def _print_row(row: dict) -> None:
    cases = "  ".join(f"{c} {v:.3f}" for c, v in row["dsc_per_case"].items())
    print(f"[{row['method']} seed {row['seed']}] {row['iterations']:5d} it  train {row['train_wall_s']:8.1f} s "
          f"({row['s_per_iter']:.3f} s/it)  DSC {row['dsc_mean']:.3f} ({cases})  HD95 {row['hd95_mean']:.1f} mm", flush=True)


def torch_threads() -> int:
    """torch's current CPU thread count."""
    import torch

    return torch.get_num_threads()


def _set_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# baseline 1: plain MONAI UNet
# ----------------------------------------------------------------------------------------------
def monai_unet_network():
    """The issue's plain MONAI UNet (3D, 1 -> 2 channels, 16-128 features, 2 residual units, batch norm)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=UNET_CHANNELS, strides=UNET_STRIDES,
                num_res_units=2, norm="batch")


def _monai_transforms(train: bool):
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandCropByPosNegLabeld, ScaleIntensityRanged

    keys = ["image", "label"] if train else ["image"]
    t = [
        LoadImaged(keys=keys, reader="NibabelReader"),
        EnsureChannelFirstd(keys=keys),
        ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys=keys, dtype="float32", track_meta=False),
    ]
    if train:
        t.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=PATCH, pos=1, neg=1, num_samples=2))
    return Compose(t)


def _monai_predict(model, test_cases: list[dict], pred_dir: Path) -> None:
    """Sliding-window argmax masks of the test cases, saved on each image's own grid."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from shared_transforms.io import load_nifti, save_nifti

    pred_dir.mkdir(parents=True, exist_ok=True)
    pre = _monai_transforms(train=False)
    model.eval()
    with torch.no_grad():
        for case in test_cases:
            x = pre({"image": case["image"]})["image"][None]  # (1, 1, X, Y, Z)
            logits = sliding_window_inference(x, roi_size=PATCH, sw_batch_size=4, predictor=model, overlap=0.25)
            mask = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
            image, affine = load_nifti(case["image"])
            if mask.shape != image.shape:
                raise RuntimeError(f"{case['case_id']}: prediction shape {mask.shape} differs from the image's {image.shape}")
            out = save_nifti(mask, affine, pred_dir / f"{case['case_id']}.nii.gz", inputs=[case["image"], case["label"]])
            check_prediction_grid(out, case["image"])
    model.train()


def run_monai_unet(data_dir, out_dir, budgets, seed: int = 0, *, threads: int = 1, log_every: int = 50) -> list[dict]:
    """Train the plain MONAI UNet once up to the largest budget, evaluating at every budget.

    Args:
        data_dir: data set folder with a Decathlon ``dataset.json`` (the demo set is generated into a
            missing or empty folder).
        out_dir: output folder: ``results.json`` and ``monai_unet_seed<seed>/iter_<N>/{pred,eval}``.
        budgets: iteration budgets (optimiser steps, 2 patches each), e.g. ``[250, 500, 1000]``.
        seed: ``monai.utils.set_determinism`` seed.
        threads: torch CPU threads.
        log_every: print the mean loss every this many iterations (0: never).

    Returns:
        the rows written to ``results.json`` by this run, one per budget.
    """
    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    budgets = parse_budgets(budgets)
    _set_threads(threads)
    out_dir = Path(out_dir)
    ds_path, train_cases, test_cases = load_split(data_dir)
    run_dir = out_dir / f"monai_unet_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)

    set_determinism(seed=seed)
    dataset = CacheDataset(data=[{"image": c["image"], "label": c["label"]} for c in train_cases],
                           transform=_monai_transforms(train=True), progress=False)
    # one volume per step; RandCropByPosNegLabeld makes it 2 patches (the list collate stacks them)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0)
    model = monai_unet_network()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()

    rows, losses, it, train_s = [], [], 0, 0.0
    pending = list(budgets)
    t0 = time.perf_counter()
    while pending:
        for batch in loader:
            x, y = batch["image"], batch["label"]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
            it += 1
            losses.append(float(loss.detach()))
            if log_every and it % log_every == 0:
                print(f"[monai_unet seed {seed}] iteration {it}: mean loss of the last {log_every} {np.mean(losses[-log_every:]):.4f}",
                      flush=True)
            if it == pending[0]:
                train_s += time.perf_counter() - t0
                iter_dir = run_dir / f"iter_{it}"
                _monai_predict(model, test_cases, iter_dir / "pred")
                scores = evaluate_predictions(iter_dir / "pred", ds_path, iter_dir / "eval")
                row = {"method": "monai_unet", "seed": int(seed), "iterations": it, "train_wall_s": round(train_s, 2),
                       "s_per_iter": round(train_s / it, 4), **scores, "threads": threads,
                       "loss_last50": round(float(np.mean(losses[-50:])), 4), "patches_per_iter": int(x.shape[0]),
                       "load_avg_1min": round(os.getloadavg()[0], 2),
                       "eval_dir": str(iter_dir / "eval"), "data": str(ds_path)}
                write_result_row(out_dir, row)
                rows.append(row)
                _print_row(row)
                pending.pop(0)
                if not pending:
                    break
                t0 = time.perf_counter()
    return rows



# ----------------------------------------------------------------------------------------------
# baseline 2: nnU-Net v2
# ----------------------------------------------------------------------------------------------
def nnunet_folders(out_dir, seed: int) -> dict[str, Path]:
    """nnU-Net's three folders under ``out_dir`` (results per seed, raw and preprocessed shared)."""
    out_dir = Path(out_dir).resolve()
    return {"nnUNet_raw": out_dir / "nnUNet_raw", "nnUNet_preprocessed": out_dir / "nnUNet_preprocessed",
            "nnUNet_results": out_dir / "nnUNet_results" / f"seed_{seed}"}


def convert_to_nnunet_raw(ds_path: Path, train_cases: list[dict], test_cases: list[dict], raw_root: Path) -> Path:
    """Write the data set in nnU-Net's raw layout as ``raw_root/Dataset501_NPCPhantom``.

    ``imagesTr/<case>_0000.nii.gz`` (CT), ``labelsTr/<case>.nii.gz``, ``imagesTs/<case>_0000.nii.gz``
    and nnU-Net's ``dataset.json`` (``channel_names {"0": "CT"}``, ``labels {"background": 0, "GTVp": 1}``).
    The files are byte copies of the data set's own files.

    Raises:
        ValueError: the folder already holds a conversion of another data set.
    """
    import shutil

    root = raw_root / NNUNET_DATASET_NAME
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTVp": 1}, "numTraining": len(train_cases),
            "file_ending": ".nii.gz", "name": NNUNET_DATASET_NAME, "source": str(ds_path),
            "training_cases": [c["case_id"] for c in train_cases], "test_cases": [c["case_id"] for c in test_cases]}
    existing = root / "dataset.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{root}: holds a conversion of another data set ({old.get('source')}); use another --out")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for c in train_cases:
        shutil.copyfile(c["image"], root / "imagesTr" / f"{c['case_id']}_0000.nii.gz")
        shutil.copyfile(c["label"], root / "labelsTr" / f"{c['case_id']}.nii.gz")
    for c in test_cases:
        shutil.copyfile(c["image"], root / "imagesTs" / f"{c['case_id']}_0000.nii.gz")
    existing.write_text(json.dumps(meta, indent=2) + "\n")
    return root


def nnunet_plan_and_preprocess() -> dict:
    """nnU-Net's fingerprint, default ``ExperimentPlanner`` plans and ``3d_fullres`` preprocessing (1 process).

    Skipped when the plans and the preprocessed ``3d_fullres`` data already exist. Called with the
    ``nnUNet_*`` environment variables set.

    Returns:
        a summary of the ``3d_fullres`` plans (see :func:`_plans_summary`).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

    pre = Path(os.environ["nnUNet_preprocessed"]) / NNUNET_DATASET_NAME
    plans_file = pre / f"{NNUNET_PLANS}.json"
    if not plans_file.exists() or not (pre / f"{NNUNET_PLANS}_{NNUNET_CONFIGURATION}").is_dir():
        # the API functions, not the CLI or the class look-up by name (which imports every module)
        extract_fingerprint_dataset(NNUNET_DATASET_ID, DatasetFingerprintExtractor, num_processes=1,
                                    check_dataset_integrity=True, clean=True, verbose=False, show_progress_bar=False)
        # the planner sets torch's thread count to nnUNet_n_proc_DA while it sizes the network (0 is
        # refused by torch); it restores the count afterwards, and planning does no augmentation
        da = os.environ.get("nnUNet_n_proc_DA")
        os.environ["nnUNet_n_proc_DA"] = str(max(1, torch_threads()))
        try:
            plan_experiment_dataset(NNUNET_DATASET_ID, ExperimentPlanner)
        finally:
            if da is None:
                os.environ.pop("nnUNet_n_proc_DA")
            else:
                os.environ["nnUNet_n_proc_DA"] = da
        preprocess_dataset(NNUNET_DATASET_ID, NNUNET_PLANS, configurations=(NNUNET_CONFIGURATION,), num_processes=[1],
                           show_progress_bar=False)
    return _plans_summary(load_json(str(plans_file)))


def _plans_summary(plans: dict) -> dict:
    """Patch, batch, stages, features, spacing and CT normalisation clip of the ``3d_fullres`` plans."""
    cfg = plans["configurations"][NNUNET_CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    fg = plans["foreground_intensity_properties_per_channel"]["0"]
    return {"patch_size_zyx": list(cfg["patch_size"]), "batch_size": int(cfg["batch_size"]),
            "n_stages": int(arch["n_stages"]), "features_per_stage": list(arch["features_per_stage"]),
            "spacing_zyx": list(cfg["spacing"]), "normalization": list(cfg["normalization_schemes"]),
            "ct_clip_hu": [round(float(fg["percentile_00_5"]), 2), round(float(fg["percentile_99_5"]), 2)]}


_TRAINER_CLASS = None


def budget_trainer_class():
    """``nnUNetTrainerBudget``: nnU-Net's default trainer with a run length in iterations.

    The subclass changes no training setting; it adds, at the end of every epoch whose iteration
    count is one of ``budgets``, a checkpoint ``checkpoint_iter<N>.pth`` (same content as nnU-Net's
    checkpoints) and a call of ``on_budget(trainer, iterations, checkpoint_path)``, and it times the
    training: ``train_s`` sums the epochs (training iterations, nnU-Net's validation iterations
    and its end-of-epoch logging), ``setup_s`` is ``on_train_start`` (data loaders, unpacking).
    Configure it with :meth:`configure_budget` before ``run_training()``.
    """
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801  (nnU-Net's trainer naming)
        """nnUNetTrainer with a run length in iterations and a checkpoint at each budget."""

        def configure_budget(self, budgets, iterations_per_epoch: int, val_iterations: int, on_budget=None,
                             train_s: float = 0.0) -> None:
            """Set the epoch length, the number of epochs (largest budget) and the budget callback."""
            budgets = parse_budgets(budgets)
            bad = [b for b in budgets if b % iterations_per_epoch]
            if bad:
                raise ValueError(f"budgets {bad} are not multiples of the epoch length {iterations_per_epoch}")
            self.num_iterations_per_epoch = int(iterations_per_epoch)
            self.num_val_iterations_per_epoch = int(val_iterations)
            self.num_epochs = budgets[-1] // iterations_per_epoch  # the poly schedule runs over the whole run
            self.budgets = budgets
            self.on_budget = on_budget
            self.train_s = float(train_s)
            self.setup_s = 0.0

        def on_train_start(self):
            t = time.perf_counter()
            super().on_train_start()
            self.setup_s = time.perf_counter() - t

        def on_epoch_start(self):
            self._epoch_t0 = time.perf_counter()
            super().on_epoch_start()

        def on_epoch_end(self):
            done = (self.current_epoch + 1) * self.num_iterations_per_epoch
            super().on_epoch_end()  # nnU-Net's logging and checkpoints; increments current_epoch
            self.train_s += time.perf_counter() - self._epoch_t0
            if done in self.budgets:
                path = os.path.join(self.output_folder, f"checkpoint_iter{done}.pth")
                self.current_epoch -= 1  # save_checkpoint stores current_epoch + 1 (as in on_train_end)
                self.save_checkpoint(path)
                self.current_epoch += 1
                if self.on_budget is not None:
                    self.on_budget(self, done, path)

    _TRAINER_CLASS = nnUNetTrainerBudget
    return _TRAINER_CLASS


def nnunet_predict(checkpoint, model_dir, images: dict[str, str], pred_dir) -> None:
    """Predict ``{case_id: image}`` with ``nnUNetPredictor`` (defaults, mirroring on, CPU) from a checkpoint.

    The network is built from the plans in ``model_dir`` by the trainer's own
    ``build_network_architecture`` and handed to the predictor with ``manual_initialization``
    (``initialize_from_trained_model_folder`` looks the trainer up by name, which imports every
    trainer module). Writes ``pred_dir/<case_id>.nii.gz`` on each image's grid (checked).
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir, pred_dir = Path(model_dir), Path(pred_dir)
    pred_dir.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=False)  # nnU-Net's own checkpoint format
    plans, dataset_json = load_json(str(model_dir / "plans.json")), load_json(str(model_dir / "dataset.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(ckpt["init_args"]["configuration"])
    network = budget_trainer_class().build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset_json), pm.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, pm, cm, [ckpt["network_weights"]], dataset_json, ckpt["trainer_name"],
                                    ckpt.get("inference_allowed_mirroring_axes"))
    cases = sorted(images)
    predictor.predict_from_files_sequential([[str(images[c])] for c in cases], [str(pred_dir / c) for c in cases],
                                            save_probabilities=False, overwrite=True)
    for c in cases:
        check_prediction_grid(pred_dir / f"{c}.nii.gz", images[c])


def default_iterations_per_epoch(budgets) -> int:
    """The greatest common divisor of the budgets, at most nnU-Net's 250, that divides every budget."""
    g = math.gcd(*parse_budgets(budgets))
    return max(d for d in range(1, min(g, NNUNET_MAX_ITERS_PER_EPOCH) + 1) if g % d == 0)


def run_nnunet(data_dir, out_dir, budgets, seed: int = 0, *, threads: int = 1, val_iterations: int = 5,
               iterations_per_epoch: int | None = None) -> list[dict]:
    """Plan, preprocess and train nnU-Net v2 (``3d_fullres``, fold ``"all"``, CPU), evaluating at every budget.

    Args:
        data_dir: data set folder with a Decathlon ``dataset.json`` (the demo set is generated into a
            missing or empty folder).
        out_dir: output folder: ``results.json``, ``run_config_seed<seed>.json``, nnU-Net's folders
            (:func:`nnunet_folders`) and ``nnunet_seed<seed>/iter_<N>/{pred,eval}``.
        budgets: iteration budgets (nnU-Net iterations: one batch of the planned size each).
        seed: seeds Python, NumPy and torch before the network is built.
        threads: torch CPU threads.
        val_iterations: nnU-Net validation iterations per epoch (nnU-Net: 50).
        iterations_per_epoch: epoch length; default :func:`default_iterations_per_epoch`.

    Returns:
        the rows of this seed in ``results.json`` (earlier rows included when the run resumed).

    Raises:
        ValueError: bad budgets or epoch length, or an ``out_dir`` run of this seed with other
            settings (use another ``out_dir``).
    """
    budgets = parse_budgets(budgets)
    ipe = default_iterations_per_epoch(budgets) if iterations_per_epoch is None else int(iterations_per_epoch)
    if ipe < 1 or any(b % ipe for b in budgets):
        raise ValueError(f"the epoch length {ipe} must divide every budget {budgets}")
    if val_iterations < 0:
        raise ValueError(f"val_iterations must be >= 0, got {val_iterations}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = nnunet_folders(out_dir, seed)
    for name, path in folders.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in the training process (single core)
    # nnU-Net's process and thread count for resampling at export (read when nnunetv2 is first imported)
    os.environ.setdefault("nnUNet_def_n_proc", str(threads))
    _set_threads(threads)

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    ds_path, train_cases, test_cases = load_split(data_dir)
    raw = convert_to_nnunet_raw(ds_path, train_cases, test_cases, folders["nnUNet_raw"])
    t = time.perf_counter()
    plans_summary = nnunet_plan_and_preprocess()
    print(f"[nnunet] plans ({time.perf_counter() - t:.0f} s): {json.dumps(plans_summary)}", flush=True)

    config = {"budgets": budgets, "iterations_per_epoch": ipe, "val_iterations": int(val_iterations), "seed": int(seed),
              "data": str(ds_path), "configuration": NNUNET_CONFIGURATION, "plans": plans_summary}
    config_path = out_dir / f"run_config_seed{seed}.json"
    if config_path.exists():
        old = json.loads(config_path.read_text())
        if old != config:
            raise ValueError(f"{config_path}: this --out already holds a seed {seed} run with other settings "
                             f"({ {k: old.get(k) for k in config if old.get(k) != config[k]} }); use another --out")
    else:
        config_path.write_text(json.dumps(config, indent=2) + "\n")

    trainer_cls = budget_trainer_class()
    pre_base = folders["nnUNet_preprocessed"] / NNUNET_DATASET_NAME
    fold_dir = folders["nnUNet_results"] / NNUNET_DATASET_NAME / f"{trainer_cls.__name__}__{NNUNET_PLANS}__{NNUNET_CONFIGURATION}" / "fold_all"

    # resume from the last budget already evaluated (its checkpoint and row exist)
    done_rows = {r["iterations"]: r for r in read_results(out_dir) if r.get("method") == "nnunet_v2" and r.get("seed") == seed}
    resume = max((b for b in budgets if b in done_rows and (fold_dir / f"checkpoint_iter{b}.pth").exists()), default=None)
    if resume == budgets[-1]:
        print(f"[nnunet seed {seed}] every budget is already evaluated in {out_dir / 'results.json'}", flush=True)
        return [done_rows[b] for b in budgets]

    test_images = {c["case_id"]: str(raw / "imagesTs" / f"{c['case_id']}_0000.nii.gz") for c in test_cases}
    rows = [done_rows[b] for b in budgets if resume is not None and b <= resume]

    def on_budget(trainer, iterations: int, checkpoint: str) -> None:
        iter_dir = out_dir / f"nnunet_seed{seed}" / f"iter_{iterations}"
        t_eval = time.perf_counter()
        nnunet_predict(checkpoint, trainer.output_folder_base, test_images, iter_dir / "pred")
        scores = evaluate_predictions(iter_dir / "pred", ds_path, iter_dir / "eval")
        losses = trainer.logger.get_value("train_losses", step=-1)
        row = {"method": "nnunet_v2", "seed": int(seed), "iterations": iterations, "train_wall_s": round(trainer.train_s, 2),
               "s_per_iter": round(trainer.train_s / iterations, 4), **scores, "threads": threads,
               "n_proc_DA": int(os.environ["nnUNet_n_proc_DA"]), "iterations_per_epoch": ipe,
               "val_iterations_per_epoch": int(val_iterations), "epochs_total": trainer.num_epochs,
               "lr_last_epoch": float(trainer.optimizer.param_groups[0]["lr"]), "train_loss_last_epoch": round(float(losses), 4),
               "setup_s": round(trainer.setup_s, 2), "predict_eval_s": round(time.perf_counter() - t_eval, 2),
               "load_avg_1min": round(os.getloadavg()[0], 2),
               "resumed_from": resume, "checkpoint": checkpoint, "eval_dir": str(iter_dir / "eval"), "data": str(ds_path),
               "plans": plans_summary}
        write_result_row(out_dir, row)
        rows.append(row)
        _print_row(row)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    plans = load_json(str(pre_base / f"{NNUNET_PLANS}.json"))
    plans["continue_training"] = resume is not None  # read (and removed) by nnUNetTrainer.__init__
    trainer = trainer_cls(plans=plans, configuration=NNUNET_CONFIGURATION, fold="all",
                          dataset_json=load_json(str(pre_base / "dataset.json")), device=torch.device("cpu"))
    trainer.configure_budget(budgets, ipe, val_iterations, on_budget,
                             train_s=done_rows[resume]["train_wall_s"] if resume is not None else 0.0)
    if resume is not None:
        trainer.load_checkpoint(str(fold_dir / f"checkpoint_iter{resume}.pth"))
        if trainer.current_epoch * ipe != resume:
            raise ValueError(f"{fold_dir}: checkpoint_iter{resume}.pth is at epoch {trainer.current_epoch}, "
                             f"not {resume // ipe} (epoch length {ipe}); use another --out")
        print(f"[nnunet seed {seed}] resuming after {resume} iterations", flush=True)
    trainer.run_training()
    return rows


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> list[dict]:
    """Command line: ``baselines.py {monai_unet,nnunet} --data DIR --out DIR --budgets ... --seed S``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="method", required=True)
    for name, text in (("monai_unet", "plain MONAI UNet"), ("nnunet", "nnU-Net v2 (3d_fullres, fold all, CPU)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data", required=True, help="data set folder (dataset.json); the demo set is generated into a missing or empty one")
        p.add_argument("--out", required=True, help="output folder (results.json and the run's files)")
        p.add_argument("--budgets", default="250,500,1000", help="comma-separated iteration budgets (default 250,500,1000)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        if name == "nnunet":
            p.add_argument("--val_iterations", type=int, default=5,
                           help="nnU-Net validation iterations per epoch (default 5; nnU-Net: 50)")
            p.add_argument("--iterations_per_epoch", type=int, default=None,
                           help="epoch length (default: gcd of the budgets, at most 250); must divide every budget")
    args = ap.parse_args(argv)
    if args.method == "monai_unet":
        return run_monai_unet(args.data, args.out, args.budgets, args.seed, threads=args.threads)
    return run_nnunet(args.data, args.out, args.budgets, args.seed, threads=args.threads,
                      val_iterations=args.val_iterations, iterations_per_epoch=args.iterations_per_epoch)


if __name__ == "__main__":
    main()
