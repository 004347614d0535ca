#!/usr/bin/env python
"""SATS ablation (papers' Table 3 / Table 2 of the short paper) at reduced size on low-contrast phantoms.

Three variants, trained at an equal budget from the same stage-1 encoder-decoder:

* ``plain``: stage 2 without margin loss (``embed: none``): the Siamese encoder-decoder with Dice + BCE;
* ``margin_no_head``: stage 2 with the margin loss on the decoder's last feature map
  (L2-normalised over channels, no projection head; ``embed: features``);
* ``head_margin``: SATS, stage 2 with the projection head and the margin loss (``embed: head``).

Every run goes through the bundle's own configs as a user runs them (``python -m monai.bundle run``):
one shared stage 1 (``train.yaml + quick.yaml``), then per variant ``train_stage2.yaml`` and
``evaluate.yaml``; DSC / ASD / HD95 come from the evaluation report (``summary.json``).

The phantoms are generated with a straight pose (``pose="identity"``: the mid-sagittal plane is
the grid's central plane, so the symmetric registration is switched off to save time) and a low
tumour contrast (``--contrast_hu``, default 6 HU against muscle; the phantoms default to 8).

    OMP_NUM_THREADS=2 python bench/bench_sats_ablation.py --work /tmp/sats_ablation [--cases 16]
        [--stage1_epochs 40] [--stage2_epochs 20] [--contrast_hu 6] [--pos_fraction 0.33] [--seed 0] [--json out.json]

Prints one line per variant: mean DSC (%), ASD (mm), HD95 (mm) over the test cases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sats_npc"
VARIANTS = {"plain": "none", "margin_no_head": "features", "head_margin": "head"}


def _run(workflow: str, configs: list[str], overrides: dict, log: Path) -> float:
    """``python -m monai.bundle run <workflow>`` from the bundle folder, output to ``log``; returns the wall time in s."""
    cfg = BUNDLE / "configs"
    files = repr([str(cfg / c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", files,
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=str(BUNDLE), stdout=fh, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{workflow} failed (exit {proc.returncode}), see {log}")
    return time.perf_counter() - t0


def phantom_set(work: Path, cases: int, seed: int, contrast_hu: float, **kwargs) -> Path:
    """Small straight-pose CT phantoms with the given tumour contrast in ``work/data`` (kept when present)."""
    from npc_gtv.phantoms import generate_dataset

    data = work / "data"
    if not (data / "dataset.json").is_file():
        generate_dataset(data, cases=cases, seed=seed, modality="ct", size="small",
                         tumour_contrast_hu=contrast_hu, pose="identity", **kwargs)
    return data


def _metric(summary: dict, *names):
    """Mean of the first metric of ``names`` found in the report's summary (layouts: flat or nested)."""
    stats = summary.get("metrics", summary)
    for n in names:
        if n in stats:
            v = stats[n]
            return float(v["mean"] if isinstance(v, dict) else v)
    raise KeyError(f"none of {names} in summary keys {sorted(stats)[:20]}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="working folder (data set, checkpoints, reports)")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--contrast_hu", type=float, default=6.0)
    ap.add_argument("--stage1_epochs", type=int, default=40)
    ap.add_argument("--stage2_epochs", type=int, default=20)
    ap.add_argument("--pos_fraction", type=float, default=0.33, help="probability of a tumour-centred training patch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    work = Path(args.work)
    data = phantom_set(work, args.cases, args.seed, args.contrast_hu)
    common = {"dataset_dir": str(data), "ckpt_dir": str(work / "models"), "symmetric_align": False, "num_workers": 0,
              "val_interval": 10**6, "pos_fraction": args.pos_fraction}  # no validation during training: the test cases are evaluated at the end
    results = {"settings": vars(args), "variants": {}}
    t1 = _run("training", ["train.yaml", "quick.yaml"], {**common, "epochs": args.stage1_epochs, "output_dir": str(work / "stage1")},
              work / "stage1.log")
    results["stage1_s"] = round(t1, 1)
    print(f"stage 1: {args.stage1_epochs} epochs in {t1:.0f} s", flush=True)
    for name, embed in VARIANTS.items():
        ckpt = work / f"models_{name}"
        ckpt.mkdir(parents=True, exist_ok=True)
        # each variant starts from the same stage-1 weights, in its own checkpoint folder
        over = {**common, "ckpt_dir": str(ckpt), "init_weights": str(work / "models" / "stage1" / "model.pt"),
                "embed": embed, "epochs": args.stage2_epochs, "output_dir": str(work / f"train_{name}")}
        t2 = _run("training", ["train.yaml", "train_stage2.yaml", "quick.yaml"], over, work / f"stage2_{name}.log")
        out = work / f"eval_{name}"
        _run("evaluating", ["inference.yaml", "evaluate.yaml", "quick.yaml"],
             {**common, "ckpt_dir": str(ckpt), "output_dir": str(out), "evaluation_figures": False}, work / f"eval_{name}.log")
        summary = json.loads((out / "summary.json").read_text())
        row = {"dsc_percent": round(100 * _metric(summary, "dsc"), 2), "asd_mm": round(_metric(summary, "assd", "asd"), 2),
               "hd95_mm": round(_metric(summary, "hd95"), 2), "stage2_s": round(t2, 1)}
        results["variants"][name] = row
        print(f"{name:15s} DSC {row['dsc_percent']:6.2f} %  ASD {row['asd_mm']:6.2f} mm  HD95 {row['hd95_mm']:6.2f} mm", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
