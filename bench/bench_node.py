#!/usr/bin/env python
"""Latency of the DICOM node through a real PACS: N CT series sent back to back from Orthanc to
``npc-gtv serve``; per series the time from the last slice received by the node to the RT structure
set stored in Orthanc, against the bundle's inference time for that series.

Set-up (all on 127.0.0.1): Orthanc (the harness of ``npc_gtv.node.harness``: generated config,
free ports), the node as a subprocess (``--max_series N``, sending back to Orthanc), N phantom CTs
(``--size full``: 512 x 512 x 124 slices, as a planning CT of the head) uploaded to Orthanc through
its REST API, then sent to the node one after the other (``/modalities/node/store``, synchronous,
no pause between them). A thread polls Orthanc's REST API every 0.1 s for the RT structure set of
each study.

Per series (clock: this machine's wall clock, shared by the node and this script):

- ``latency``: from the last slice received by the node (``last_received`` in its spool state) to
  the RTSTRUCT found in Orthanc (an upper bound by the 0.1 s polling; the node's own "sent" time,
  i.e. Orthanc's C-STORE success answer, is also reported);
- of which ``quiet`` (the configured quiet time, by which the node decides the series is complete),
  ``queue`` (waiting for the previous series to finish), ``read`` (reading the series with the
  project's checks, ``read_dicom_series``), ``inference`` (the bundle's preprocessing, inferer and
  postprocessing on the warm network; its ``LoadImaged`` gets the volume the node has just read, see
  ``shared_transforms.dicom.prefetched_series``), ``write`` (RTSTRUCT [+ SEG]) and ``send``;
- ``bundle`` = read + inference: the bundle's inference time alone for that series (run by itself
  the bundle reads the DICOM series once, with the same function, then runs the same steps);
- ``overhead`` = latency - bundle - queue: what the node adds to the bundle for one series (the
  quiet time included; ``overhead - quiet`` is the node's own processing: write, send, scheduling).

``--cold`` also times ``python -m monai.bundle run inference`` on the first series (a fresh process
per series: start-up, parsing, weights, the same inference), for comparison with the warm node.

Weights: ``--ckpt_path`` (a trained ``model.pt``) or, by default, constant-foreground weights for the
bundle's network (the node's cost does not depend on the weights' values; the RTSTRUCT then holds
the body crop, a contour on every slice).

    OMP_NUM_THREADS=2 python bench/bench_node.py [--series 3] [--size full|small] [--quiet_time 2]
        [--bundle bundles/sats_npc] [--config configs/quick.yaml] [--ckpt_path PATH] [--cold] [--json out.json] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def _phantom_series(root: Path, n: int, size: str) -> list[list[Path]]:
    from npc_gtv.dicom.series import write_dicom_series
    from npc_gtv.phantoms import make_phantom

    out = []
    for i in range(n):
        ph = make_phantom(100 + i, size=size)
        out.append(write_dicom_series(ph.image, ph.affine, root / f"series{i}" / "CT"))
    return out


def _cold_inference(bundle: Path, config: list[str], ckpt: str, image: Path, work: Path, extra: list[str] = ()) -> float:
    """Wall time of ``python -m monai.bundle run inference`` on one DICOM series folder."""
    from npc_gtv.phantoms import generate_dataset

    dataset = work / "cold_dataset"  # `initialize` of the bundle wants a data set; a tiny one
    generate_dataset(dataset, cases=2, seed=0, size="small")
    files = [str(bundle / "configs" / "inference.yaml"), *[str(bundle / c) for c in config]]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", repr(files) if len(files) > 1 else files[0],
        "--bundle_root", str(bundle), "--datalist", repr([{"image": str(image)}]), "--ckpt_path", ckpt,
        "--output_dir", str(work / "cold_out"), "--dataset_dir", str(dataset), *extra,
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(bundle), capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"cold bundle run failed: {proc.stderr[-3000:]}")
    return seconds


def run(args) -> dict:
    from npc_gtv.node.harness import NodeProcess, Orthanc, constant_foreground_weights, free_port

    bundle = Path(args.bundle).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_node_"))
    ckpt = args.ckpt_path or str(constant_foreground_weights(bundle, work / "fg.pt", config=args.config))
    # constant-output weights have no training fingerprint beside them: the HU window then
    extra = [] if args.ckpt_path else ["--normalization", "window"]
    t = time.perf_counter()
    series = _phantom_series(work, args.series, args.size)
    print(f"{args.series} phantom series ({args.size}, {'/'.join(str(len(f)) for f in series)} slices) written in {time.perf_counter() - t:.1f} s", flush=True)
    node_port = free_port()
    with Orthanc({"node": ["NPCGTV", "127.0.0.1", node_port]}, workdir=work / "orthanc") as pacs:
        t = time.perf_counter()
        ids = [pacs.upload(files) for files in series]
        studies = [pacs.get(f"/series/{i}")["ParentStudy"] for i in ids]
        study_uids = [pacs.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] for s in studies]
        print(f"uploaded to Orthanc in {time.perf_counter() - t:.1f} s (loopback-only bind: {pacs.loopback_only})", flush=True)
        node_args = [
            "--bundle", bundle, "--spool", work / "spool", "--dest_aet", pacs.aet, "--dest_port", pacs.dicom_port,
            "--port", node_port, "--quiet_time", args.quiet_time, "--max_series", args.series, "--ckpt_path", ckpt,
            "--allowed_aets", pacs.aet, *extra,
        ]
        if args.config:
            node_args += ["--config", args.config[0] if len(args.config) == 1 else repr(list(args.config))]
        t = time.perf_counter()
        node = NodeProcess(node_args, work / "node.log", calling_aet=pacs.aet).start()
        print(f"node ready (model loaded, listening) {time.perf_counter() - t:.1f} s after start", flush=True)

        found: dict[str, float] = {}
        done = threading.Event()

        def poll():
            deadline = time.monotonic() + 3600
            while not done.is_set() and time.monotonic() < deadline and len(found) < len(study_uids):
                for uid in study_uids:
                    if uid not in found and pacs.find_series("RTSTRUCT", uid):
                        found[uid] = time.time()
                done.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        store_s = []
        try:
            for sid in ids:
                t = time.perf_counter()
                answer = pacs.send("node", [sid])
                store_s.append(time.perf_counter() - t)
                if answer.get("FailedInstancesCount"):
                    raise RuntimeError(f"Orthanc could not send {answer['FailedInstancesCount']} instance(s)")
            rc = node.wait(timeout=3600)
        finally:
            node.kill()
        poller.join(timeout=30)
        done.set()
        if rc != 0:
            raise RuntimeError(f"the node exited with {rc}: {node.output()[-3000:]}")

    events = {e["study_uid"]: e for e in map(json.loads, (work / "spool" / "events.jsonl").read_text().splitlines())}
    rows = []
    for i, uid in enumerate(study_uids):
        e = events[uid]
        if e["state"] != "sent":
            raise RuntimeError(f"series {i} was not sent: {e.get('reason')}")
        state = json.loads((work / "spool" / e["filed_as"] / "state.json").read_text())
        at = {h["state"]: _ts(h["at"]) for h in state["history"]}
        last = _ts(e["last_received"])
        tm = e["timings"]
        latency = found[uid] - last
        waited = at["processing"] - last
        queue = max(0.0, waited - args.quiet_time)
        rows.append({
            "series": i, "slices": e["images"], "orthanc_store_s": round(store_s[i], 2),
            "latency_s": round(latency, 2), "latency_node_s": round(at["sent"] - last, 2),
            "quiet_s": round(min(waited, args.quiet_time), 2), "queue_s": round(queue, 2),
            "read_s": tm["check_s"], "inference_s": tm["inference_s"], "bundle_s": round(tm["check_s"] + tm["inference_s"], 2),
            "write_s": tm["write_s"], "send_s": tm["send_s"],
            "overhead_s": round(latency - tm["check_s"] - tm["inference_s"] - queue, 2),
        })
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "bundle": bundle.name, "config": list(args.config), "size": args.size, "quiet_time_s": args.quiet_time,
        "threads": os.environ.get("OMP_NUM_THREADS"), "load_1min": os.getloadavg()[0], "rows": rows,
        "overhead_mean_s": round(statistics.mean(r["overhead_s"] for r in rows), 2),
        "overhead_max_s": round(max(r["overhead_s"] for r in rows), 2),
    }
    if args.cold:
        result["cold_bundle_run_s"] = round(_cold_inference(bundle, list(args.config), ckpt, series[0][0].parent, work, extra), 2)
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def table(result: dict) -> str:
    cols = [
        ("series", "series"), ("slices", "slices"), ("latency_s", "last slice -> RTSTRUCT in Orthanc (s)"),
        ("quiet_s", "quiet (s)"), ("queue_s", "queue (s)"), ("read_s", "read + check (s)"), ("inference_s", "inference (s)"),
        ("bundle_s", "bundle alone (s)"), ("write_s", "write (s)"), ("send_s", "send (s)"), ("overhead_s", "overhead (s)"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r[c[0]]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=3)
    ap.add_argument("--size", choices=["full", "small"], default="full")
    ap.add_argument("--quiet_time", type=float, default=2.0)
    ap.add_argument("--bundle", default=str(REPO / "bundles" / "sats_npc"))
    ap.add_argument("--config", nargs="*", default=["configs/quick.yaml"])
    ap.add_argument("--ckpt_path", default=None)
    ap.add_argument("--cold", action="store_true", help="also time one cold `monai.bundle run inference`")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (spool, logs, Orthanc database)")
    args = ap.parse_args(argv)
    if args.series < 1:
        ap.error("--series must be >= 1")
    result = run(args)
    print(table(result))
    print(f"overhead per series: mean {result['overhead_mean_s']} s, max {result['overhead_max_s']} s "
          f"(quiet time {args.quiet_time} s included); 1-min load {result['load_1min']:.2f}")
    if "cold_bundle_run_s" in result:
        print(f"cold `monai.bundle run inference` on series 0 (a new process: start-up, parsing, weights, read, inference, NIfTI): {result['cold_bundle_run_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
