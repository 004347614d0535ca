#!/usr/bin/env python
"""SATS ablation (Table 3 of paper 001, Table 2 of paper 000) on default-contrast phantoms, with seeds.

Four stage-2 variants, each trained from the same stage-1 encoder-decoder of its seed:

* ``neither``: stage 2 without projection head and margin loss (``embed: none``): the Siamese
  encoder-decoder with Dice + CE only, trained for the same stage-2 budget;
* ``head_only``: the projection head without the margin loss (``embed: head``, ``beta: 0``);
* ``margin_only``: the margin loss on the decoder's last feature map, L2-normalised, no head
  (``embed: features``);
* ``both``: SATS (``embed: head``, ``beta: 1``).

Every run goes through the bundle's own configs as a user runs them (``python -m monai.bundle run``),
with ``configs/demo.yaml`` merged last (the demo network and patch; ``--recipe paper`` resets its
``fast_recipe_keys`` to the papers' SGD): per seed one stage 1 (``train.yaml``), then per variant
``train_stage2.yaml`` and the evaluation (``inference.yaml + evaluate.yaml``) on the test cases.
A quarter of the training cases is held out for validation every epoch of both stages, and the
validation Dice curve of every run is kept (``curves``) and drawn, so that one can see whether a run
has flattened. Per variant: DSC / ASD / HD95 as mean ± sd over the seeds (each seed's mean over the
test cases), the two-sided Wilcoxon signed-rank test of each variant's per-case DSC against
``both`` (pairs: seed x test case), and the DSC of tumours that cross the mid-line and of those that
do not (the papers' stated failure mode), from the phantoms' ``case_info``.

    OMP_NUM_THREADS=2 python bench/bench_sats_ablation.py --work /work/bench_runs/sats_ablation \\
        [--cases 16] [--seeds 0,1,2] [--stage1_iterations 1000] [--stage2_iterations 250] [--recipe fast]

Writes ``WORK/ablation.json`` (every run's per-case metrics, curves, timings; rerunning skips finished
runs), ``WORK/ablation.md`` (the table) and ``WORK/ablation_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "sats_npc"
sys.path.insert(0, str(REPO / "bench"))

from bench_learning import mean_sd, recipe_overrides  # noqa: E402

#: stage-2 overrides of each variant (paper 001 Table 3 / paper 000 Table 2)
VARIANTS = {
    "neither": {"embed": "none"},
    "head_only": {"embed": "head", "beta": 0.0},
    "margin_only": {"embed": "features"},
    "both": {"embed": "head", "beta": 1.0},
}
REFERENCE = "both"
ITERATIONS_PER_EPOCH = 50  # demo.yaml's
_VAL_DICE = re.compile(r"Epoch\[\d+\] Metrics -- .*?val_mean_dice: ([0-9.]+)")


def _run(workflow: str, configs: list[str], overrides: dict, log: Path) -> float:
    """``python -m monai.bundle run <workflow>`` from the bundle folder, output to ``log``; the wall time in s."""
    cfg = BUNDLE / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", repr([str(cfg / c) for c in configs]),
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf")]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else repr(v)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=str(BUNDLE), stdout=fh, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{workflow} failed (exit {proc.returncode}), see {log}")
    return time.perf_counter() - t0


def validation_curve(log: Path) -> list[float]:
    """The validation Dice after each epoch, in order, from a training log."""
    return [float(v) for v in _VAL_DICE.findall(log.read_text())]


def read_cases(report: Path) -> dict[str, dict[str, float]]:
    """Per-case ``dsc``, ``assd``, ``hd95`` of an evaluation report (its ``metrics.csv``)."""
    from npc_gtv.evaluation.report import read_metrics_csv

    _, cases = read_metrics_csv(report)
    return {c: {m: float(v[m]) for m in ("dsc", "assd", "hd95")} for c, v in cases.items()}


def paired_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired samples (None for fewer than two pairs; 1 when all equal)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different lengths: {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b)]
    if all(abs(d) < 1e-12 for d in diffs):
        return 1.0
    from scipy.stats import wilcoxon

    return float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue)


def summarize(runs: dict, case_info: dict) -> dict:
    """The table: per variant mean ± sd over seeds, paired p against ``both``, mid-line split.

    Args:
        runs: ``{variant: {seed (str): {"cases": {case: {dsc, assd, hd95}}}}}``.
        case_info: case id -> attributes (``crosses_midline``).
    """
    ref = runs.get(REFERENCE, {})
    table = {}
    for variant, by_seed in runs.items():
        row = {"seeds": len(by_seed)}
        for m in ("dsc", "assd", "hd95"):
            row[m] = mean_sd([sum(c[m] for c in r["cases"].values()) / len(r["cases"]) for r in by_seed.values()])
        pairs = [(s, c) for s, r in sorted(by_seed.items()) for c in sorted(r["cases"]) if s in ref and c in ref[s]["cases"]]
        row["p_vs_both"] = None if variant == REFERENCE else paired_p(
            [by_seed[s]["cases"][c]["dsc"] for s, c in pairs], [ref[s]["cases"][c]["dsc"] for s, c in pairs])
        for crossing in (True, False):
            sel = [r["cases"][c]["dsc"] for r in by_seed.values() for c in r["cases"]
                   if bool(case_info.get(c, {}).get("crosses_midline")) is crossing and c in case_info]
            row["dsc_midline" if crossing else "dsc_lateral"] = {"mean": mean_sd(sel)[0], "n": len(sel)}
        table[variant] = row
    return table


def _fmt(ms, scale=1.0, digits=2):
    m, s = ms
    if m is None:
        return "-"
    return f"{m * scale:.{digits}f}" + ("" if s is None else f" ± {s * scale:.{digits}f}")


def markdown(table: dict, settings: dict) -> str:
    lines = [f"SATS ablation, {settings}", "",
             "| variant | seeds | DSC (%) | ASD (mm) | HD95 (mm) | p (DSC vs both) | DSC mid-line (n) | DSC lateral (n) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        if v not in table:
            continue
        r = table[v]
        p = "-" if r["p_vs_both"] is None else f"{r['p_vs_both']:.3f}"
        mid, lat = r["dsc_midline"], r["dsc_lateral"]
        cell = lambda g: "-" if g["mean"] is None else f"{100 * g['mean']:.1f} ({g['n']})"  # noqa: E731
        lines.append(f"| {v} | {r['seeds']} | {_fmt(r['dsc'], 100)} | {_fmt(r['assd'])} | {_fmt(r['hd95'])} | {p} | "
                     f"{cell(mid)} | {cell(lat)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed, curve in sorted(results.get("stage1", {}).items()):
        axes[0].plot([ITERATIONS_PER_EPOCH * (i + 1) for i in range(len(curve["curve"]))], curve["curve"], label=f"seed {seed}")
    axes[0].set(title="stage 1: validation DSC", xlabel="iterations", ylabel="DSC")
    for variant, by_seed in results.get("runs", {}).items():
        for seed, r in sorted(by_seed.items()):
            axes[1].plot([ITERATIONS_PER_EPOCH * (i + 1) for i in range(len(r["curve"]))], r["curve"],
                         label=f"{variant} s{seed}", color=f"C{list(VARIANTS).index(variant)}", alpha=0.8)
    axes[1].set(title="stage 2: validation DSC", xlabel="stage-2 iterations", ylabel="DSC")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (data set, checkpoints, reports, results)")
    ap.add_argument("--cases", type=int, default=16, help="phantoms generated into WORK/data when missing (20 %% test)")
    ap.add_argument("--data_seed", type=int, default=0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--stage1_iterations", type=int, default=1000)
    ap.add_argument("--stage2_iterations", type=int, default=250)
    ap.add_argument("--val_fraction", type=float, default=0.25, help="training cases held out for the validation curves")
    ap.add_argument("--recipe", choices=("fast", "paper"), default="fast")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    for flag in ("stage1_iterations", "stage2_iterations"):
        if getattr(args, flag) % ITERATIONS_PER_EPOCH or getattr(args, flag) < ITERATIONS_PER_EPOCH:
            ap.error(f"--{flag} must be a positive multiple of {ITERATIONS_PER_EPOCH} (demo.yaml's epoch)")
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= set(VARIANTS):
        ap.error(f"--variants: some of {list(VARIANTS)}")
    from npc_gtv.phantoms import ensure_dataset

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = Path(ensure_dataset(work / "data", modality="ct", size="small", cases=args.cases, seed=args.data_seed)).parent
    case_info = json.loads((data / "dataset.json").read_text()).get("case_info", {})
    out_json = work / "ablation.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results.setdefault("stage1", {})
    results.setdefault("runs", {})
    common = {"dataset_dir": str(data), "num_workers": 0, "val_fraction": args.val_fraction, "val_interval": 1,
              **recipe_overrides(BUNDLE, args.recipe)}
    demo = ["demo.yaml"]
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        sdir = work / f"seed{seed}"
        sdir.mkdir(exist_ok=True)
        stage1 = sdir / "models" / "stage1" / "model.pt"
        if str(seed) not in results["stage1"]:
            t = _run("training", ["train.yaml", *demo], {**common, "seed": seed, "ckpt_dir": str(sdir / "models"), "output_dir": str(sdir / "stage1"),
                                                         "stage1_epochs": args.stage1_iterations // ITERATIONS_PER_EPOCH}, sdir / "stage1.log")
            results["stage1"][str(seed)] = {"seconds": round(t, 1), "curve": validation_curve(sdir / "stage1.log")}
            out_json.write_text(json.dumps(results, indent=1))
            print(f"seed {seed}: stage 1 {args.stage1_iterations} iterations in {t:.0f} s", flush=True)
        for variant in variants:
            if str(seed) in results["runs"].get(variant, {}):
                continue
            ckpt = sdir / variant
            over = {**common, "seed": seed, "ckpt_dir": str(ckpt), "init_weights": str(stage1), **VARIANTS[variant],
                    "stage2_epochs": args.stage2_iterations // ITERATIONS_PER_EPOCH, "output_dir": str(sdir / f"train_{variant}")}
            t2 = _run("training", ["train.yaml", "train_stage2.yaml", *demo], over, sdir / f"stage2_{variant}.log")
            report = sdir / f"eval_{variant}"
            _run("evaluating", ["inference.yaml", "evaluate.yaml", *demo],
                 {**common, "ckpt_dir": str(ckpt), "output_dir": str(report), "evaluation_figures": False, "overwrite": True},
                 sdir / f"eval_{variant}.log")
            results["runs"].setdefault(variant, {})[str(seed)] = {
                "cases": read_cases(report), "curve": validation_curve(sdir / f"stage2_{variant}.log"), "stage2_s": round(t2, 1)}
            out_json.write_text(json.dumps(results, indent=1))
            dsc = [c["dsc"] for c in results["runs"][variant][str(seed)]["cases"].values()]
            print(f"seed {seed}: {variant:12s} test DSC {100 * sum(dsc) / len(dsc):.1f} %  (stage 2 {t2:.0f} s)", flush=True)
    results["table"] = summarize({v: results["runs"][v] for v in variants if v in results["runs"]}, case_info)
    out_json.write_text(json.dumps(results, indent=1))
    md = markdown(results["table"], {k: results["settings"][k] for k in ("cases", "seeds", "stage1_iterations", "stage2_iterations", "recipe")})
    (work / "ablation.md").write_text(md)
    plot(results, work / "ablation_curves.png")
    print(md)
    return results


if __name__ == "__main__":
    main()
