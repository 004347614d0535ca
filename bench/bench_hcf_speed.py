#!/usr/bin/env python
"""Speed of the HCF cascade on a full-size phantom CT (CPU by default), and the time the gate saves.

Runs the bundle's own ``configs/inference.yaml`` end to end (read the NIfTI, RAS orientation, body
crop, HU window, in-plane resize to 512 x 512, classifier on every slice, SANet on the kept slices,
invert to the input grid, arg-max, write the mask) twice in the same process on the same CT:

* ``cascade``: the classifier gates the slices, SANet runs on the kept ones only;
* ``sanet_all``: SANet on every slice (``use_classifier: false``), the "SANet alone" baseline.

Weights: ``--ckpt_dir`` with trained ``model.pt`` and ``classifier.pt`` (gate threshold 0.5), or, by
default, random weights. Speed does not depend on the weights' values, only on how many slices
the gate keeps; with random weights the threshold is therefore calibrated so that the gate keeps
as many slices as the phantom has slices with GTV (the number a perfect classifier keeps), and the
kept count is printed. Prints both end-to-end wall times, the CPU (process) times, the network times and the saving;
``--json`` writes them. On a shared machine the wall time depends on the load (printed); the CPU
time divided by the thread count is the wall time an idle machine would need at best.

    OMP_NUM_THREADS=2 python bench/bench_hcf_speed.py [--threads 2] [--seed 3] [--ckpt_dir DIR] [--json out.json]
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
BUNDLE = REPO / "bundles" / "hcf_sanet"


def _parser(ckpt_dir: Path, out_dir: Path, data_dir: Path, image: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(ckpt_dir), "output_dir": str(out_dir), "dataset_dir": str(data_dir),
                   "datalist": [{"image": image}], "num_workers": 0, **overrides})
    parser.parse()
    return parser


def _run(parser) -> dict:
    """Run the evaluator of a parsed inference config; returns timings."""
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    inferer = parser.get_parsed_content("inferer")
    inferer.reset_timings()
    t0, c0 = time.perf_counter(), time.process_time()
    evaluator.run()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"end_to_end_s": total, "end_to_end_cpu_s": cpu, **inferer.timings}


def calibrated_threshold(parser, image: str, label: str) -> tuple[float, int]:
    """Threshold that makes the (random) classifier keep as many slices as have GTV in ``label``."""
    import torch

    sys.path.insert(0, str(BUNDLE))
    from scripts.data import slice_has_gtv, volume_transforms

    parser.get_parsed_content("initialize")
    classifier = parser.get_parsed_content("classifier")  # loaded from ckpt_dir/classifier.pt when parsed
    t = volume_transforms(keys=["image", "label"], resize=parser.get_parsed_content("resize"))
    d = t({"image": image, "label": label})
    n_gtv = int(slice_has_gtv(d["label"]).sum())
    x = d["image"].as_tensor()[None].permute(0, 4, 1, 2, 3)[0]  # (Z, 1, S, S)
    classifier.eval()
    with torch.inference_mode():
        prob = torch.cat([torch.softmax(classifier(x[i : i + 16]), 1)[:, 1] for i in range(0, x.shape[0], 16)])
    order = torch.sort(prob, descending=True).values
    if n_gtv <= 0:
        return float(order[0]) + 1e-6, 0
    if n_gtv >= len(order):
        return 0.0, n_gtv
    return float((order[n_gtv - 1] + order[n_gtv]) / 2), n_gtv


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--ckpt_dir", default=None, help="trained model.pt + classifier.pt (default: random weights)")
    ap.add_argument("--no_optimize", action="store_true", help="run the eager networks (no frozen TorchScript)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from npc_gtv.phantoms import generate_dataset

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    from scripts.networks import SANet, slice_classifier

    with tempfile.TemporaryDirectory(prefix="bench_hcf_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ds = json.loads(generate_dataset(tmp / "data", cases=1, seed=args.seed, modality="ct", size="full").read_text())
        case = ds["training"][0]
        image, label = str(tmp / "data" / case["image"]), str(tmp / "data" / case["label"])
        gen_s = time.perf_counter() - t0
        if args.ckpt_dir:
            ckpt = Path(args.ckpt_dir)
        else:
            ckpt = tmp / "models"
            ckpt.mkdir()
            torch.manual_seed(args.seed)
            torch.save(SANet().state_dict(), ckpt / "model.pt")
            torch.save(slice_classifier().state_dict(), ckpt / "classifier.pt")
        common = {"optimize_cpu_inference": not args.no_optimize}
        threshold, n_gtv = 0.5, None
        if not args.ckpt_dir:
            threshold, n_gtv = calibrated_threshold(_parser(ckpt, tmp / "cal", tmp / "data", image, **common), image, label)
        cascade = _run(_parser(ckpt, tmp / "cascade", tmp / "data", image, cls_threshold=threshold, **common))
        alone = _run(_parser(ckpt, tmp / "alone", tmp / "data", image, use_classifier=False, **common))
        import nibabel as nib

        shape = nib.load(image).shape
        result = {
            "device": "cpu",
            "threads": args.threads,
            "load_average": os.getloadavg()[0],
            "ct_shape": list(shape),
            "phantom_generation_s": gen_s,
            "weights": "trained" if args.ckpt_dir else "random (gate threshold calibrated to the GTV slice count)",
            "gtv_slices": n_gtv,
            "threshold": threshold,
            "optimized": not args.no_optimize,
            "cascade": cascade,
            "sanet_all": alone,
            "saved_s": alone["end_to_end_s"] - cascade["end_to_end_s"],
            "speedup": alone["end_to_end_s"] / cascade["end_to_end_s"],
        }
    print(f"CT {shape}, {args.threads} thread(s), load average {result['load_average']:.1f}, weights: {result['weights']}")
    for name in ("cascade", "sanet_all"):
        r = result[name]
        print(f"{name:>10}: end to end {r['end_to_end_s']:6.1f} s (CPU time {r['end_to_end_cpu_s']:6.1f} s) | classifier {r['classifier_s']:5.1f} s | "
              f"SANet {r['segmenter_s']:5.1f} s on {r['kept']} of {r['slices']} slices")
    print(f"gate saves {result['saved_s']:.1f} s ({result['speedup']:.2f}x faster than SANet on every slice)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
