#!/usr/bin/env python
"""What a MONAI Label train request costs on the full configurations: wall time and peak memory.

MONAI Label's ``POST /train/<model>`` runs ``monai.bundle.run(run_id="run")`` on the bundle's
``configs/train.*`` with its own overrides (``train#dataset#data``, ``validate#dataset#data`` from its
``val_split`` of the labelled studies, ``train#trainer#max_epochs``, ``device``). This script makes the
same call in a subprocess, on full-size CT phantoms (512 x 512 x 100-150 voxels) with MONAI Label's
default split of three labelled studies (two training cases, one validation case), one epoch, and
``iterations_per_epoch`` set to each of ``--iterations`` (the full configs' epochs are 250 iterations
for SATS, one pass over the data for the others: far too long to time on a CPU). It reports per run
the wall time and the peak resident memory of the process tree (sampled every 0.2 s) and per bundle
the marginal time of one iteration, ``(wall(K2) - wall(K1)) / (K2 - K1)``; the rest of a request
(start-up, caching and registering the volumes, validation, writing) is ``wall(K1) - K1 x that``.
A run that fails (out of memory: ``--mem_limit_gb`` turns the machine's OOM kill into an allocation
error of the run alone) is recorded with its peak memory and the reason.

    OMP_NUM_THREADS=2 python bench/bench_train_request.py --out /work/bench_runs/train_request \\
        --bundles sats_npc,unet25d_ssl,hcf_sanet --iterations 1,3

Outputs in ``--out``: ``results.json`` (one row per bundle and K, written after each run) and
``train_request.md`` (the table). Run it alone on the machine: other load changes the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from npc_gtv.resources import PeakRSS

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("sats_npc", "unet25d_ssl", "hcf_sanet")

RUN = r"""
import json, sys
import torch
import monai.bundle
from monai.data import partition_dataset

bundle, data_json, ckpt_dir, out_dir, k = sys.argv[1:6]
ds = json.load(open(data_json))
root = data_json.rsplit('/', 1)[0]
cases = [{"image": root + "/" + c["image"], "label": root + "/" + c["label"]} for c in ds["training"][:3]]
train, val = partition_dataset(cases, ratios=[0.8, 0.2], shuffle=False)  # MONAI Label's default val_split 0.2
sys.path.insert(0, bundle)
monai.bundle.run(run_id="run", meta_file=bundle + "/configs/metadata.json", config_file=bundle + "/configs/train.yaml",
                 logging_file=bundle + "/configs/logging.conf", bundle_root=bundle, ckpt_dir=ckpt_dir, output_dir=out_dir,
                 device=torch.device("cpu"), iterations_per_epoch=int(k), **{"train#trainer#max_epochs": 1,
                 "train#dataset#data": train, "validate#dataset#data": val})
print("TRAIN-REQUEST-DONE", len(train), len(val), flush=True)
"""


def _limit_memory(gb: float | None):
    if not gb:
        return None

    def apply():  # in the child: an allocation beyond the limit fails there instead of the machine's OOM killer
        import resource

        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_one(bundle: str, data_json: Path, work: Path, k: int, mem_limit_gb: float | None = None) -> dict:
    b = REPO / "bundles" / bundle
    ckpt, out = work / f"{bundle}_k{k}" / "models", work / f"{bundle}_k{k}" / "eval"
    for d in (ckpt, out):
        if d.exists() and any(d.iterdir()):
            raise FileExistsError(f"{d}: not empty (a previous run's outputs; give another --out)")
        d.mkdir(parents=True, exist_ok=True)
    log = work / f"{bundle}_k{k}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", NPC_GTV_DATA=str(work / "no_phantoms_here"))
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(b), str(data_json), str(ckpt), str(out), str(k)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(b),
                                preexec_fn=_limit_memory(mem_limit_gb))
        with PeakRSS(proc.pid) as rss:
            rc = proc.wait()
    wall = time.time() - t0
    text = log.read_text()
    row = {"bundle": bundle, "iterations": k, "wall_s": round(wall, 1), "peak_rss_gb": round(rss.peak / 2**30, 2),
           "model_pt": (ckpt / "model.pt").is_file(), "load_avg_1min": round(os.getloadavg()[0], 2),
           "mem_limit_gb": mem_limit_gb, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if rc == 0 and "TRAIN-REQUEST-DONE" in text:
        return row
    oom = rc == -9 or "out of memory" in text.lower() or "MemoryError" in text or "can't allocate memory" in text.lower()
    row["failed"] = f"out of memory (exit {rc})" if oom else f"exit {rc}: {text.strip().splitlines()[-1][:300] if text.strip() else ''}"
    print(f"  FAILED: {row['failed']} (log: {log})", flush=True)
    return row


def report(rows: list[dict]) -> str:
    lines = ["| bundle | K iterations | wall s | peak memory GB | result |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bundle']} | {r['iterations']} | {r['wall_s']} | {r['peak_rss_gb']} | {r.get('failed', 'model.pt written')} |")
    lines += ["", "| bundle | s per iteration (marginal) | rest of the request s |", "|---|---|---|"]
    for b in dict.fromkeys(r["bundle"] for r in rows):
        mine = sorted((r for r in rows if r["bundle"] == b and "failed" not in r), key=lambda r: r["iterations"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            per = (hi["wall_s"] - lo["wall_s"]) / (hi["iterations"] - lo["iterations"])
            lines.append(f"| {b} | {per:.1f} | {lo['wall_s'] - lo['iterations'] * per:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundles", default=",".join(BUNDLES))
    ap.add_argument("--iterations", default="1,3", help="iterations_per_epoch values (one epoch each)")
    ap.add_argument("--mem_limit_gb", type=float, default=None,
                    help="address-space limit of each run (a run beyond it fails with an allocation error instead of "
                         "waking the machine's OOM killer)")
    ap.add_argument("--data", type=Path, default=None, help="a full-size CT phantom set (default: 3 cases generated into --out/data)")
    args = ap.parse_args(argv)
    from npc_gtv.phantoms import ensure_dataset

    args.out.mkdir(parents=True, exist_ok=True)
    data_json = Path(args.data) / "dataset.json" if args.data else ensure_dataset(args.out / "data", size="full", cases=4)
    res_file = args.out / "results.json"
    rows = json.loads(res_file.read_text()) if res_file.is_file() else []
    done = {(r["bundle"], r["iterations"]) for r in rows}
    for bundle in [b for b in args.bundles.split(",") if b]:
        if bundle not in BUNDLES:
            raise SystemExit(f"--bundles: unknown bundle {bundle!r} (one of {', '.join(BUNDLES)})")
        for k in [int(x) for x in args.iterations.split(",") if x]:
            if (bundle, k) in done:
                continue
            print(f"{bundle}: one epoch of {k} iterations ...", flush=True)
            row = run_one(bundle, Path(data_json), args.out, k, args.mem_limit_gb)
            print(f"  {row['wall_s']} s, peak {row['peak_rss_gb']} GB", flush=True)
            rows.append(row)
            res_file.write_text(json.dumps(rows, indent=2))
            if "failed" in row:
                break  # a larger K of the same bundle fails too
    (args.out / "train_request.md").write_text(report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
