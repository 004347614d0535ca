#!/usr/bin/env python
"""Speed and memory of the SATS bundle: end-to-end inference on a full-size phantom CT vs the network's
own forward passes in the same run, and a Siamese training step (time, peak memory).

Inference runs the bundle's ``configs/inference.yaml`` end to end in this process (read the NIfTI,
symmetric registration and resampling to 1 x 1 x 3 mm, body crop, HU window, sliding window over the
head region, [mirror TTA], invert to the input grid, threshold, write the mask); forward hooks on
the network add up the time of its forward passes, so the ratio end-to-end / forward is measured
in the same run, per case. The same CT goes through ``--cases`` times (default 2): the first case
also pays the one-off loading of ITK's registration modules (about 10 s per process, like importing
torch or MONAI, which happens before the clock); the last case is the per-case cost that the
targets are checked on. Both are printed. Weights: ``--ckpt`` (a trained ``model.pt``) or random
(speed does not depend on the weights' values).

The training step (stage 2: Siamese forward of I and I', projection head, Dice + BCE + margin loss,
backward, SGD step) is measured in a child process so that its peak memory is its own: peak RSS
on CPU, ``torch.cuda.max_memory_allocated`` (with mixed precision) on a GPU.

    OMP_NUM_THREADS=2 python bench/bench_sats_speed.py [--threads 2] [--seed 5] [--tta] [--ckpt models/model.pt]
        [--train_patch 96 96 24] [--train_steps 3] [--skip_inference] [--json out.json]

On a shared machine the wall time depends on the load (the 1-minute load average is printed);
the CPU time divided by the thread count is what an idle machine would need at best.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sats_npc"


def _bundle_on_path():
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))


class ForwardTimer:
    """Forward pre/post hooks that add up the wall time of a module's forward calls."""

    def __init__(self, module, cuda: bool):
        self.total = 0.0
        self.calls = 0
        self._t0 = None
        self.cuda = cuda
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, module, args, out):
        self._sync()
        self.total += time.perf_counter() - self._t0
        self.calls += 1


def bench_inference(args, work: Path) -> dict:
    import numpy as np
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from npc_gtv.phantoms import make_phantom
    from shared_transforms.io import save_nifti

    _bundle_on_path()
    ph = make_phantom(args.seed, size="full", modality="ct")
    ct = work / "ct_full.nii.gz"
    save_nifti(ph.image, ph.affine, ct)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    parser.update({
        "bundle_root": str(BUNDLE), "output_dir": str(work / "out"), "dataset_dir": str(work),
        "datalist": [{"image": str(ct)}] * args.cases, "num_workers": 0, "mirror_tta": bool(args.tta),
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
    })
    if args.ckpt:
        parser["ckpt_path"] = str(args.ckpt)
    else:
        parser["handlers"] = []  # random weights
    parser.parse()
    parser.get_parsed_content("initialize")
    network = parser.get_parsed_content("network")
    timer = ForwardTimer(network, torch.cuda.is_available())
    evaluator = parser.get_parsed_content("evaluator")
    per_case, mark = [], {}

    @evaluator.on(Events.GET_BATCH_STARTED)
    def _case_start(engine):  # the case's loading and pre-processing start here (num_workers 0)
        mark.update(t=time.perf_counter(), c=time.process_time(), fwd=timer.total)

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _case_end(engine):  # after the bundle's post-processing (inversion, saving), attached before this
        wall = time.perf_counter() - mark["t"]
        fwd = timer.total - mark["fwd"]
        per_case.append({"end_to_end_s": round(wall, 2), "end_to_end_cpu_s": round(time.process_time() - mark["c"], 2),
                         "network_forward_s": round(fwd, 2), "ratio_end_to_end_over_forward": round(wall / max(fwd, 1e-9), 3)})

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    evaluator.run()
    total = time.perf_counter() - t0
    pred = next((work / "out" / "predictions").glob("*_seg.nii.gz"))
    import nibabel as nib

    out_img = nib.load(str(pred))
    assert out_img.shape == ph.image.shape and np.allclose(out_img.affine, ph.affine, atol=1e-4), "prediction not on the input grid"
    steady = per_case[-1]
    return {
        "input_shape": list(ph.image.shape), "input_spacing_mm": [round(float(s), 3) for s in ph.spacing],
        "cases": per_case, "run_total_s": round(total, 2), "forward_calls": timer.calls,
        "first_case_note": "includes loading ITK's registration modules (once per process)",
        "end_to_end_s": steady["end_to_end_s"], "network_forward_s": steady["network_forward_s"],
        "ratio_end_to_end_over_forward": steady["ratio_end_to_end_over_forward"],
        "target_end_to_end_under_120_s": steady["end_to_end_s"] < 120,
        "target_ratio_at_most_1_3": steady["ratio_end_to_end_over_forward"] <= 1.3,
        "mirror_tta": bool(args.tta), "load_avg_1min_at_start": round(load0, 2),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
    }


def bench_train_step(patch, batch: int, steps: int, threads: int) -> dict:
    import torch

    _bundle_on_path()
    from scripts.losses import SATSLoss
    from scripts.network import ProjectionHead, SATSNet, SATSSiamese, count_parameters

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    net = SATSNet().to(device)
    head = ProjectionHead(net.feature_channels, 16).to(device)
    model = SATSSiamese(net, head, embed="head")
    loss_fn = SATSLoss()
    opt = torch.optim.SGD([{"params": head.parameters(), "lr": 1e-2}, {"params": net.parameters(), "lr": 1e-5}], momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *patch, generator=g).to(device)
    s = (torch.rand(batch, 1, *patch, generator=g) > 0.97).float().to(device)
    xf, sf = torch.flip(x, dims=(2,)), torch.flip(s, dims=(2,))
    m = ((s > 0) & (sf == 0)).float()
    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=cuda):
            lo, lof, e, ef = model(x, xf)
            out = loss_fn(lo, lof, s, sf, e, ef, m)
        if scaler is not None:
            scaler.scale(out["loss"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            out["loss"].backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t0)
    res = {
        "device": str(device), "patch": list(patch), "batch": batch, "steps": steps, "threads": threads,
        "step_s_mean": round(sum(times) / len(times), 2), "step_s_min": round(min(times), 2),
        "parameters_encoder_decoder": count_parameters(net), "parameters_head": count_parameters(head),
        "mixed_precision": cuda,
    }
    if cuda:
        res["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux: KiB
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--tta", action="store_true", help="mirror test-time augmentation (two passes)")
    ap.add_argument("--cases", type=int, default=2, help="times the CT is run through the pipeline (the first is cold)")
    ap.add_argument("--ckpt", default=None, help="trained model.pt (default: random weights)")
    ap.add_argument("--train_patch", type=int, nargs=3, default=[96, 96, 24], help="training patch (X Y Z); paper: 192 192 56")
    ap.add_argument("--train_batch", type=int, default=2)
    ap.add_argument("--train_steps", type=int, default=3)
    ap.add_argument("--skip_inference", action="store_true")
    ap.add_argument("--skip_training", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_train_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args._train_child:
        print(json.dumps(bench_train_step(args.train_patch, args.train_batch, args.train_steps, args.threads)))
        return {}
    results = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if not torch.cuda.is_available():
        results["gpu"] = "not measured: no GPU on this machine"
    if not args.skip_training:
        cmd = [sys.executable, __file__, "--_train_child", "--threads", str(args.threads), "--train_patch", *map(str, args.train_patch),
               "--train_batch", str(args.train_batch), "--train_steps", str(args.train_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"training-step child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results["train_step"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("training step:", json.dumps(results["train_step"]), flush=True)
    if not args.skip_inference:
        with tempfile.TemporaryDirectory(prefix="sats_speed_") as tmp:
            results["inference"] = bench_inference(args, Path(tmp))
        print("inference:", json.dumps(results["inference"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
