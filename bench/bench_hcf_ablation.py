#!/usr/bin/env python
"""Ablations of the HCF paper (Tables 3-6) at equal budget on small phantoms (CPU).

Every variant is trained from the same initial weights for the same number of optimiser steps
(``--steps``, batch ``--batch``) on the same training slices (the bundle's own pre-processing,
augmentation, Balance-Sampler, CR loss, AdamW + cosine warm restarts), then evaluated on the
held-out phantom cases with the 3D Dice of the mask stacked back on the pre-processed grid:

* classifier ratio (Table 3, "Recall"): the slice classifier trained with theta_1, theta_2,
  theta_4, theta_n; slice recall / precision on the test cases;
* SANet ratio (Table 3 columns): SANet trained with theta_0, theta_1, theta_2, theta_4, theta_n
  (CR loss), each evaluated inside the cascade with the theta_4 classifier;
* loss (Table 6): CR loss vs Dice + CE (alpha = 0), SANet theta_4, cascade;
* HCF (Tables 4-5, "w/o HCF"): SANet alone (every slice segmented) vs the cascade, same SANet.

This is a functional ablation on synthetic data with a tiny budget, not a reproduction of the
paper's numbers; the output says which differences are within run-to-run noise only when
``--repeats`` > 1 is used.

    OMP_NUM_THREADS=2 python bench/bench_hcf_ablation.py [--cases 12] [--steps 150] [--batch 16] \
        [--resize 64] [--seed 0] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "hcf_sanet"


def _volumes(datalist, resize):
    from scripts.data import volume_transforms

    t = volume_transforms(keys=["image", "label"], resize=resize)
    out = []
    for item in datalist:
        d = t(dict(item))
        out.append((d["image"].as_tensor(), d["label"].as_tensor()))
    return out


def _train(net, slices, flags, ratio, loss_fn, steps, batch, lr, seed, classify: bool, resize: int):
    """``steps`` optimiser steps on balance-sampled, augmented slices; returns the trained network."""
    import torch
    from monai.data import DataLoader, Dataset

    from scripts.data import augmentation
    from scripts.sampler import BalanceSampler

    torch.manual_seed(seed)
    ds = Dataset(slices, transform=augmentation(resize, prob=0.2))
    sampler = BalanceSampler(flags, ratio=ratio, seed=seed, num_replicas=1, rank=0)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=0, drop_last=False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4, foreach=True)
    epoch_steps = max(1, len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=max(1, steps // (3 * epoch_steps)) * epoch_steps)
    net.train()
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for b in loader:
            x = b["image"]
            y = torch.as_tensor(b["has_gtv"]).long() if classify else b["label"]
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    return net.eval()


def _evaluate(volumes, sanet, classifier, use_classifier: bool):
    """3D Dice per case + slice decisions of the cascade on pre-processed test volumes."""
    import torch

    from scripts.cascade import CascadeInferer
    from scripts.data import slice_has_gtv

    inferer = CascadeInferer(classifier if use_classifier else None, threshold=0.5, slice_batch_size=32)
    dices, tp, fp, fn = [], 0, 0, 0
    for img, lbl in volumes:
        prob = inferer(img[None], sanet)
        pred = prob[0].argmax(0) > 0
        truth = lbl[0] > 0
        denom = int(pred.sum() + truth.sum())
        dices.append(1.0 if denom == 0 else 2.0 * float((pred & truth).sum()) / denom)
        keep = inferer.last_keep[0].numpy().astype(bool)
        flags = slice_has_gtv(lbl).astype(bool)
        tp += int((keep & flags).sum())
        fp += int((keep & ~flags).sum())
        fn += int((~keep & flags).sum())
    return {
        "dice_mean": float(sum(dices) / len(dices)),
        "dice": dices,
        "slice_recall": tp / (tp + fn) if tp + fn else float("nan"),
        "slice_precision": tp / (tp + fp) if tp + fp else float("nan"),
        "kept_slices": tp + fp,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resize", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--tumour_contrast", type=float, default=8.0, help="phantom tumour contrast in HU (generator default 8)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)

    import torch
    from monai.data import load_decathlon_datalist

    from npc_gtv.phantoms import generate_dataset

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    from scripts.data import volumes_to_slices, volume_transforms
    from scripts.losses import CRLoss
    from scripts.networks import SANet, slice_classifier

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_hcf_abl_") as tmp:
        ds_json = generate_dataset(Path(tmp) / "data", cases=args.cases, seed=args.seed, modality="ct", size="small",
                                   tumour_contrast_hu=args.tumour_contrast)
        train_list = load_decathlon_datalist(str(ds_json), data_list_key="training")
        test_list = load_decathlon_datalist(str(ds_json), data_list_key="test")
        slices = volumes_to_slices(train_list, volume_transforms(keys=["image", "label"], resize=args.resize), image_dtype=torch.float32)
        flags = [s["has_gtv"] for s in slices]
        test_volumes = _volumes(test_list, args.resize)

    torch.manual_seed(args.seed)
    sanet0, cls0 = SANet(), slice_classifier()
    common = dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, resize=args.resize)
    timings = {}

    classifiers = {}
    for ratio in ("theta_1", "theta_2", "theta_4", "theta_n"):
        t0 = time.perf_counter()
        classifiers[ratio] = _train(copy.deepcopy(cls0), slices, flags, ratio, torch.nn.CrossEntropyLoss(), classify=True, **common)
        timings[f"classifier_{ratio}"] = time.perf_counter() - t0
        print(f"trained classifier {ratio} in {timings[f'classifier_{ratio}']:.0f} s", flush=True)

    sanets = {}
    for ratio in ("theta_0", "theta_1", "theta_2", "theta_4", "theta_n"):
        t0 = time.perf_counter()
        sanets[("cr", ratio)] = _train(copy.deepcopy(sanet0), slices, flags, ratio, CRLoss(alpha=0.1), classify=False, **common)
        timings[f"sanet_cr_{ratio}"] = time.perf_counter() - t0
        print(f"trained SANet (CR) {ratio} in {timings[f'sanet_cr_{ratio}']:.0f} s", flush=True)
    t0 = time.perf_counter()
    sanets[("dice_ce", "theta_4")] = _train(copy.deepcopy(sanet0), slices, flags, "theta_4", CRLoss(alpha=0.0), classify=False, **common)
    timings["sanet_dice_ce_theta_4"] = time.perf_counter() - t0

    results = {"classifier_ratio": {}, "sanet_ratio": {}, "loss": {}, "hcf": {}}
    with torch.no_grad():
        for ratio, cls in classifiers.items():
            r = _evaluate(test_volumes, sanets[("cr", "theta_4")], cls, True)
            results["classifier_ratio"][ratio] = {k: r[k] for k in ("slice_recall", "slice_precision", "dice_mean")}
        for (loss, ratio), net in sanets.items():
            if loss == "cr":
                results["sanet_ratio"][ratio] = _evaluate(test_volumes, net, classifiers["theta_4"], True)["dice_mean"]
        for loss in ("cr", "dice_ce"):
            results["loss"][loss] = _evaluate(test_volumes, sanets[(loss, "theta_4")], classifiers["theta_4"], True)["dice_mean"]
        results["hcf"]["sanet_alone"] = _evaluate(test_volumes, sanets[("cr", "theta_4")], None, False)["dice_mean"]
        results["hcf"]["cascade"] = results["loss"]["cr"]

    n_pos = sum(flags)
    meta = {
        "cases": args.cases, "train_cases": len(train_list), "test_cases": len(test_list), "train_slices": len(slices),
        "train_slices_with_gtv": n_pos, "steps": args.steps, "batch": args.batch, "resize": args.resize, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "tumour_contrast_hu": args.tumour_contrast,
        "total_s": time.perf_counter() - t_start, "train_s": timings,
    }
    out = {"meta": meta, **results}
    md = _markdown(out)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    if args.markdown:
        Path(args.markdown).write_text(md)
    return out


def _markdown(out: dict) -> str:
    m = out["meta"]
    lines = [
        f"Phantoms: {m['train_cases']} training / {m['test_cases']} test cases (small, {m['resize']}x{m['resize']} slices, "
        f"{m['train_slices']} training slices of which {m['train_slices_with_gtv']} with GTV); every variant "
        f"{m['steps']} AdamW steps of batch {m['batch']} from the same initial weights; seed {m['seed']}; "
        f"{m['total_s'] / 60:.1f} min on {m['threads']} CPU thread(s).",
        "",
        "| classifier ratio | slice recall | slice precision | cascade 3D Dice (SANet theta_4, CR) |",
        "|---|---|---|---|",
    ]
    for ratio, r in out["classifier_ratio"].items():
        lines.append(f"| {ratio} | {r['slice_recall']:.3f} | {r['slice_precision']:.3f} | {r['dice_mean']:.3f} |")
    lines += ["", "| SANet ratio (CR loss, classifier theta_4) | cascade 3D Dice |", "|---|---|"]
    for ratio, v in out["sanet_ratio"].items():
        lines.append(f"| {ratio} | {v:.3f} |")
    lines += ["", "| loss (SANet theta_4, cascade) | 3D Dice |", "|---|---|",
              f"| CR (alpha 0.1) | {out['loss']['cr']:.3f} |", f"| Dice + CE (alpha 0) | {out['loss']['dice_ce']:.3f} |",
              "", "| pipeline (SANet theta_4, CR) | 3D Dice |", "|---|---|",
              f"| SANet alone (every slice) | {out['hcf']['sanet_alone']:.3f} |", f"| HCF cascade | {out['hcf']['cascade']:.3f} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
