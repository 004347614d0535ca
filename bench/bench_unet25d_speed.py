#!/usr/bin/env python
"""Speed of the UNet-2.5D five-model ensemble on a full-size phantom CT (CPU by default).

Runs the bundle's own ``configs/inference.yaml`` end to end (read the NIfTI, body crop, resample to
1 x 1 x 3 mm, HU window, ensemble, invert to the input grid, post-processing, write the mask) twice
in the same process on the same CT:

* ``shared``: one encoder + five decoders (the frozen-SSL-encoder ensemble), encoder run once;
* ``independent``: five complete UNet-2.5D networks (the ensemble of five full models).

Weights are random (speed does not depend on their values). Prints both times, the ratio and the
network-only time; ``--json`` writes them. Needs about 3 GB of memory.

    OMP_NUM_THREADS=2 python bench/bench_unet25d_speed.py [--threads 2] [--seed 3] [--json out.json]
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


def _run_config(ckpt_dir: Path, out_dir: Path, image: str, fuse: bool) -> tuple[float, float]:
    """Run inference.yaml on one image; returns (end-to-end seconds, network seconds)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "ckpt_dir": str(ckpt_dir), "output_dir": str(out_dir),
                   "datalist": [{"image": image}], "num_workers": 0, "fuse_batchnorm": fuse})
    parser.parse()
    parser.get_parsed_content("initialize")
    evaluator = parser.get_parsed_content("evaluator")
    net = parser.get_parsed_content("network")
    net_time = [0.0]

    def pre(_module, _inp):
        net_time.append(time.perf_counter())

    def post(_module, _inp, _out):
        net_time[0] += time.perf_counter() - net_time.pop()

    net.register_forward_pre_hook(pre)
    net.register_forward_hook(post)
    t0 = time.perf_counter()
    with torch.inference_mode():
        evaluator.run()
    return time.perf_counter() - t0, net_time[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3, help="phantom seed")
    ap.add_argument("--image", default=None, help="use this CT (NIfTI, HU) instead of a generated full-size phantom")
    ap.add_argument("--no-fuse", action="store_true", help="keep BatchNorm separate (inference.yaml fuse_batchnorm false)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(BUNDLE))
    from scripts.network import UNet25DEnsemble

    with tempfile.TemporaryDirectory(prefix="bench_unet25d_") as tmp:
        tmp = Path(tmp)
        image = args.image
        if image is None:
            from npc_gtv.phantoms import make_phantom
            from shared_transforms.io import save_nifti

            t = time.perf_counter()
            ph = make_phantom(args.seed, size="full", modality="ct")
            image = str(save_nifti(ph.image, ph.affine, tmp / "ct_full.nii.gz"))
            print(f"full-size phantom {ph.image.shape} at {ph.spacing} mm generated in {time.perf_counter() - t:.1f} s")
        results = {}
        for name, shared in (("shared", True), ("independent", False)):
            torch.manual_seed(0)
            ckpt = tmp / name
            ckpt.mkdir()
            torch.save(UNet25DEnsemble(5, shared_encoder=shared).state_dict(), ckpt / "model.pt")
            total, network = _run_config(ckpt, tmp / f"out_{name}", image, fuse=not args.no_fuse)
            results[name] = {"end_to_end_s": round(total, 2), "network_s": round(network, 2)}
            print(f"{name:12s} ensemble: end to end {total:7.1f} s   (network {network:6.1f} s)", flush=True)
        ratio = results["independent"]["end_to_end_s"] / results["shared"]["end_to_end_s"]
        results.update({"independent_over_shared": round(ratio, 2), "threads": args.threads, "device": "cpu",
                        "budget_s": 120.0, "shared_within_budget": results["shared"]["end_to_end_s"] < 120.0,
                        "fused_batchnorm": not args.no_fuse})
        print(f"independent / shared = {ratio:.2f}x; shared ensemble {'within' if results['shared_within_budget'] else 'OVER'} the 120 s budget")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
