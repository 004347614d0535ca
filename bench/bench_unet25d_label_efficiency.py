#!/usr/bin/env python
"""Label efficiency of the UNet-2.5D (paper Table 9): frozen SSL-pretrained encoder vs full model from scratch.

For each share of the labelled training cases (default 20, 30, 50, 100 %) the medium-scale model is
trained twice through the bundle's own configs (``train.yaml`` + ``quick.yaml`` + the options
below): with the encoder pretrained by ``pretrain.yaml`` and frozen (decoder only, 895,122
parameters) and from scratch (3,845,058 parameters). Each model is evaluated on the data set's
test list with ``evaluate.yaml`` (one-member ensemble, same pre/post-processing) and the mean DSC
is printed. Subsets are nested and reproducible (``scripts.data.subset_fraction``).

Reduced size by default (small phantoms, 4 x 4 x 3 mm, short training) so it runs on a 2-core CPU;
``--epochs``/``--cases``/``--full`` scale it up (``--full`` drops quick.yaml: full phantoms,
1 x 1 x 3 mm, the paper's settings -- a GPU job).

    OMP_NUM_THREADS=2 python bench/bench_unet25d_label_efficiency.py --epochs 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "unet25d_ssl"
CFG = BUNDLE / "configs"


def _run(workflow: str, configs: list[str], **overrides) -> None:
    from monai.bundle import run

    run(workflow, config_file=[str(CFG / c) for c in configs], meta_file=str(CFG / "metadata.json"),
        logging_file=str(CFG / "logging.conf"), bundle_root=str(BUNDLE), **overrides)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.2,0.3,0.5,1.0")
    ap.add_argument("--epochs", type=int, default=20, help="segmentation training epochs per run")
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--cases", type=int, default=16, help="labelled phantom cases (25 %% go to the test list)")
    ap.add_argument("--unlabeled", type=int, default=8, help="tumour-free phantoms for the pretraining")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="full-size configs (no quick.yaml)")
    ap.add_argument("--work", default=None, help="keep outputs here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    from npc_gtv.phantoms import generate_dataset

    size = "full" if args.full else "small"
    quick = [] if args.full else ["quick.yaml"]
    fractions = [float(f) for f in args.fractions.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench_unet25d_le_") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "labelled"
    if not (data / "dataset.json").is_file():
        generate_dataset(data, cases=args.cases, seed=args.seed + 100, modality="ct", size=size)
    common = {"dataset_dir": str(data), "dataset_size": size, "num_workers": 0}
    t0 = time.time()
    _run("run", ["pretrain.yaml", *quick], ckpt_dir=str(work / "ssl"), output_dir=str(work / "ssl_eval"),
         unlabeled_dir=str(work / "healthy"), unlabeled_cases=args.unlabeled, epochs=args.pretrain_epochs,
         dataset_size=size, num_workers=0)
    encoder = str(work / "ssl" / "pretrain" / "encoder.pt")
    print(f"pretraining done in {time.time() - t0:.0f} s", flush=True)

    results = []
    for fraction in fractions:
        for mode in ("frozen_pretrained", "scratch"):
            name = f"{mode}_{int(round(fraction * 100))}"
            ckpt = work / name
            frozen = mode == "frozen_pretrained"
            t = time.time()
            _run("train_one", ["train.yaml", *quick], ckpt_dir=str(ckpt), output_dir=str(work / f"{name}_tb"),
                 scale="medium", label_fraction=fraction, epochs=args.epochs, val_interval=args.epochs,
                 freeze_encoder=frozen, pretrained_encoder=encoder if frozen else "", **common)
            sys.path.insert(0, str(BUNDLE))
            from scripts.workflow import assemble_ensemble

            assemble_ensemble(ckpt, ["medium"], shared_encoder=frozen, encoder_path=encoder if frozen else None)
            _run("run", ["evaluate.yaml", *quick], ckpt_dir=str(ckpt), output_dir=str(work / f"{name}_eval"),
                 scales=["medium"], **common)
            summary = json.loads((work / f"{name}_eval" / "summary.json").read_text())
            dsc = _mean_dsc(summary)
            results.append({"labelled_fraction": fraction, "mode": mode, "dsc": dsc, "seconds": round(time.time() - t, 1)})
            print(f"{int(fraction * 100):3d} % labelled  {mode:18s} DSC {dsc:.4f}  ({time.time() - t:.0f} s)", flush=True)

    print("\n| labelled | frozen SSL encoder DSC | full model (scratch) DSC |\n|---|---|---|")
    for fraction in fractions:
        row = {r["mode"]: r["dsc"] for r in results if r["labelled_fraction"] == fraction}
        print(f"| {int(fraction * 100)} % | {row['frozen_pretrained']:.4f} | {row['scratch']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _mean_dsc(summary: dict) -> float:
    """Mean DSC from the evaluation report's summary (``metrics.dsc.mean`` or a flat ``dsc`` entry)."""
    for path in (("metrics", "dsc", "mean"), ("dsc", "mean"), ("mean", "dsc")):
        node = summary
        try:
            for key in path:
                node = node[key]
            return float(node)
        except (KeyError, TypeError):
            continue
    raise KeyError(f"no mean DSC in the summary (keys {list(summary)})")


if __name__ == "__main__":
    sys.exit(main())
