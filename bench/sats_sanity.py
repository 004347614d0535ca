#!/usr/bin/env python
"""SATS learning sanity check: can stage 1 learn an easy phantom tumour through the bundle's own configs?

Generates a few small CT phantoms with a straight pose (``pose="identity"``, so the symmetric
registration is switched off) and a high tumour contrast (``--contrast_hu``, default 100 HU against
muscle, noise 12 HU), then runs stage 1 exactly as a user does::

    python -m monai.bundle run training --config_file "['configs/train.yaml','configs/quick.yaml']" ...

with the papers' optimiser unchanged (SGD lr 1e-2, momentum 0.99, Nesterov, polynomial decay per
epoch, Dice + BCE) unless ``--learning_rate`` / ``--momentum`` are given. The training log is parsed
for the loss of every iteration, the learning rate of every epoch and the validation Dice (sliding
window on the validation cases, sigmoid, threshold 0.5, ``MeanDice``), and a table is printed.

    OMP_NUM_THREADS=2 python bench/sats_sanity.py --work /tmp/sats_sanity_run [--cases 10] [--epochs 150]
        [--val_interval 10] [--contrast_hu 100] [--pos_fraction 0.9] [--momentum 0.99] [--evaluate] [--json out.json]

With ``--evaluate`` the trained weights then go through ``inference.yaml + evaluate.yaml`` on the
held-out test phantom (the same route as the ablation) and the report's DSC is printed, which checks
the inference post-processing and the evaluation as well.

The work folder keeps the data set (reused when it exists), the checkpoints, ``train.log`` and
``eval.log``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sats_ablation import _metric, _run, phantom_set  # noqa: E402  (shared with the ablation bench)

_ITER = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss: ([0-9.eE+-]+)")
_LR = re.compile(r"Current learning rate: ([0-9.eE+-]+)")
_VAL = re.compile(r"Epoch\[(\d+)\] Metrics -- val_mean_dice: ([0-9.eE+-]+)")
_TRAIN_DICE = re.compile(r"Epoch\[(\d+)\] Metrics -- train_mean_dice: ([0-9.eE+-]+)")


def parse_log(text: str) -> dict:
    """Loss per iteration, lr after each epoch, training and validation Dice per epoch from a bundle training log."""
    losses, lrs, val, train_dice = [], [], {}, {}
    for line in text.splitlines():
        for m in _ITER.finditer(line):
            losses.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4))))
        for m in _LR.finditer(line):
            lrs.append(float(m.group(1)))
        for m in _VAL.finditer(line):
            val[int(m.group(1))] = float(m.group(2))
        for m in _TRAIN_DICE.finditer(line):
            train_dice[int(m.group(1))] = float(m.group(2))
    return {"losses": losses, "lrs": lrs, "val_dice": val, "train_dice": train_dice}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--cases", type=int, default=10, help="phantoms (1 goes to the test list, 20 %% of the rest to validation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contrast_hu", type=float, default=100.0)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--val_interval", type=int, default=10)
    ap.add_argument("--pos_fraction", type=float, default=0.9)
    ap.add_argument("--learning_rate", type=float, default=None, help="override of train.yaml's 1e-2 (default: not overridden)")
    ap.add_argument("--momentum", type=float, default=None, help="override of train.yaml's 0.99 (default: not overridden)")
    ap.add_argument("--evaluate", action="store_true", help="also run inference + evaluation on the test phantom")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    work = Path(args.work)
    data = phantom_set(work, args.cases, args.seed, args.contrast_hu, test_fraction=0.1)
    overrides = {"dataset_dir": str(data), "ckpt_dir": str(work / "models"), "output_dir": str(work / "out"),
                 "symmetric_align": False, "num_workers": 0, "epochs": args.epochs, "val_interval": args.val_interval,
                 "pos_fraction": args.pos_fraction}
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    if args.momentum is not None:
        overrides["momentum"] = args.momentum
    log = work / "train.log"
    wall = _run("training", ["train.yaml", "quick.yaml"], overrides, log)
    res = parse_log(log.read_text(errors="replace"))
    if not res["losses"]:
        raise SystemExit(f"no training loss found in {log}")
    iters_per_epoch = res["losses"][0][2]
    # mean loss per epoch, reported at the validation epochs
    per_epoch: dict[int, list[float]] = {}
    for ep, _, _, loss in res["losses"]:
        per_epoch.setdefault(ep, []).append(loss)
    print(f"{len(res['losses'])} iterations ({iters_per_epoch} per epoch) in {wall:.0f} s wall")
    print(f"{'epoch':>5} {'iter':>5} {'lr':>9} {'loss':>7} {'train Dice':>10} {'val Dice':>8}")
    rows = []
    for ep in sorted(res["val_dice"]):
        lr = res["lrs"][ep - 1] if ep - 1 < len(res["lrs"]) else float("nan")
        row = {"epoch": ep, "iteration": ep * iters_per_epoch, "lr_after_epoch": lr,
               "mean_loss": sum(per_epoch.get(ep, [float("nan")])) / max(len(per_epoch.get(ep, [])), 1),
               "train_dice": res["train_dice"].get(ep), "val_dice": res["val_dice"][ep]}
        rows.append(row)
        td = row["train_dice"]
        print(f"{ep:5d} {row['iteration']:5d} {lr:9.2e} {row['mean_loss']:7.4f} {td if td is not None else float('nan'):10.4f} {row['val_dice']:8.4f}")
    first = next((r for r in rows if r["val_dice"] > 0.5), None)
    print("first validation Dice > 0.5: " + (f"epoch {first['epoch']} (iteration {first['iteration']})" if first else "never"))
    out = {"settings": vars(args), "wall_s": round(wall, 1), "iterations": len(res["losses"]),
           "iterations_per_epoch": iters_per_epoch, "table": rows,
           "first_val_dice_above_0.5": first}
    if args.evaluate:
        ev = work / "eval"
        ev_over = {k: overrides[k] for k in ("dataset_dir", "ckpt_dir", "symmetric_align", "num_workers")}
        _run("evaluating", ["inference.yaml", "evaluate.yaml", "quick.yaml"],
             {**ev_over, "output_dir": str(ev), "evaluation_figures": False}, work / "eval.log")
        dsc = _metric(json.loads((ev / "summary.json").read_text()), "dsc")
        out["test_dsc"] = dsc
        print(f"test phantom(s), inference.yaml + evaluate.yaml: DSC {100 * dsc:.2f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
