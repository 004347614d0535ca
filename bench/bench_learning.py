#!/usr/bin/env python
"""Learning benchmark: every bundle against a plain MONAI UNet and nnU-Net v2 at equal iteration budgets.

All methods train on the same fixed split, the demo set (``npc-gtv demo``'s phantoms: 8 training
and 2 test cases of 96 x 96 x 32 voxels at 2.4 x 2.4 x 3 mm, the default 8 HU tumour contrast;
``bench/baselines.py`` documents it) and are scored on its test cases with the project's
evaluator (DSC, HD95).

* **Bundles** run their own recipe (``metadata.json`` ``"recipe"``, each step a
  ``python -m monai.bundle run``) with their ``configs/demo.yaml`` merged last (reduced network and
  patch, the phantoms' spacing), once per budget. A budget of ``B`` iterations sets the length of the
  recipe step marked ``"budget"`` (SATS stage 1, UNet-2.5D's five scale models together: ``B / 5``
  each, HCF's SANet) to ``B`` optimiser steps through its epochs knob; the other steps (SATS stage 2,
  UNet-2.5D pretraining, HCF's slice classifier) keep their demo length. Wall time is that of the
  whole recipe (all steps, process start-up and evaluation included).
* **Two recipes per bundle**: ``fast``, ``configs/demo.yaml`` as it is, and ``paper``, the same with
  the keys listed in demo.yaml's ``fast_recipe_keys`` reset to the values of the bundle's training
  config (the papers' settings: SATS's optimiser and foreground share, UNet-2.5D's scale-crop
  inputs). A bundle whose demo.yaml changes none of the paper's training settings
  (``fast_recipe_keys`` empty or absent) has one recipe, reported as both.
* **Baselines** come from ``bench/baselines.py`` (one run per seed with its checkpoints evaluated at
  each budget): ``--baselines DIR`` reads ``DIR/monai_unet/results.json`` and
  ``DIR/nnunet/results.json``; ``--run_monai_unet`` trains the MONAI UNet here when its rows are
  missing.

* **MRI** (``--modality mri``): the same runs on the three-sequence MRI version of the demo set
  (``generate_dataset(DIR, cases=10, seed=0, modality="mri", size="small")``), each bundle's
  ``configs/mri.yaml`` merged after ``demo.yaml``; its rows are named ``<bundle> (mri)``. The
  baselines take one CT and have no MRI rows.

Outputs (``--out``): ``results.json`` (one row per method, recipe, seed and budget, written after each
run, so a stopped benchmark keeps what it measured and a rerun skips it), ``learning.md`` (the table)
and ``learning_curves.png`` (test DSC against iterations and against wall time). The command and the
measured tables are in ``docs/learning.md``.

    OMP_NUM_THREADS=2 python bench/bench_learning.py --out /work/bench_runs/learning \\
        --data /work/bench_data/demo_set --baselines /work/bench_runs --budgets 250,500,1000 \\
        --seeds 0 --extra_seeds 1,2 --extra_seed_budget 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from npc_gtv.demo import DEMO_CONFIG, bundle_recipe, find_bundles, run_bundle_recipe  # noqa: E402
from shared_transforms.io import atomic_write  # noqa: E402

BUNDLES = ("sats_npc", "unet25d_ssl", "hcf_sanet")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def recipe_overrides(bundle_dir: Path, recipe: str) -> dict:
    """The ``--key value`` overrides that turn demo.yaml's fast recipe into the papers' (``recipe="paper"``)."""
    if recipe == "fast":
        return {}
    if recipe != "paper":
        raise ValueError(f"recipe must be 'fast' or 'paper', got {recipe!r}")
    demo = _yaml(bundle_dir / "configs" / DEMO_CONFIG)
    keys = demo.get("fast_recipe_keys") or []
    defaults = {}
    for name in ("train.yaml", "pretrain.yaml"):
        path = bundle_dir / "configs" / name
        if path.is_file():
            defaults = {**_yaml(path), **defaults}
    missing = [k for k in keys if k not in defaults]
    if missing:
        raise ValueError(f"{bundle_dir.name}: fast_recipe_keys {missing} have no default in the training configs")
    return {k: defaults[k] for k in keys}


def recipes_of(bundle_dir: Path) -> list[str]:
    """``["fast", "paper"]``, or ``["fast"]`` when demo.yaml changes no optimiser setting."""
    return ["fast", "paper"] if _yaml(bundle_dir / "configs" / DEMO_CONFIG).get("fast_recipe_keys") else ["fast"]


def budget_overrides(bundle_dir: Path, budget: int):
    """``Step -> overrides`` that give the recipe's budget step ``budget`` iterations in all."""
    ipe = _yaml(bundle_dir / "configs" / DEMO_CONFIG).get("iterations_per_epoch")
    if not isinstance(ipe, int) or ipe < 1:
        raise ValueError(f"{bundle_dir.name}: configs/{DEMO_CONFIG} needs an integer iterations_per_epoch")
    steps = [s for s in bundle_recipe(bundle_dir) if s.budget]
    if len(steps) != 1:
        raise ValueError(f"{bundle_dir.name}: the recipe needs exactly one step with a 'budget', found {len(steps)}")
    networks = int(steps[0].budget.get("networks", 1))
    epochs, rest = divmod(int(budget), networks * ipe)
    if rest or epochs < 1:
        raise ValueError(f"{bundle_dir.name}: budget {budget} is not a multiple of {networks} networks x {ipe} iterations per epoch")

    def for_step(step):
        return {step.budget["knob"]: epochs} if step.budget else {}

    return for_step


def read_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2))


def _key(row: dict) -> tuple:
    return (row["method"], row.get("recipe", ""), int(row["seed"]), int(row["iterations"]))


def run_bundles(args, rows: list[dict], results: Path) -> list[dict]:
    bundles = find_bundles()
    done = {_key(r) for r in rows}
    plan = []
    for name in args.bundles:
        bdir = bundles[name]
        method = name + METHOD_SUFFIX[args.modality] + "".join(f" [{k}={v}]" for k, v in args.set.items())
        for recipe in (r for r in recipes_of(bdir) if r in args.recipes):
            for seed in args.seeds:
                plan += [(method, recipe, seed, b) for b in args.budgets]
            for seed in args.extra_seeds:
                plan.append((method, recipe, seed, args.extra_seed_budget))
    log_path = args.out / "bench_learning.log"
    with open(log_path, "a") as log:
        for method, recipe, seed, budget in plan:
            if (method, recipe, seed, budget) in done:
                continue
            name = method.split(" ")[0]
            bdir = bundles[name]
            tag = ("_mri" if args.modality == "mri" else "") + "".join(f"_{k}{hashlib.md5(str(v).encode()).hexdigest()[:6]}" for k, v in args.set.items())
            work = args.out / "runs" / f"{name}{tag}_{recipe}_seed{seed}_it{budget}"
            if work.exists():
                import shutil

                shutil.rmtree(work)
            print(f"{method} {recipe} seed {seed}, {budget} iterations:", flush=True)
            t0 = time.time()
            row = run_bundle_recipe(name, bdir, args.data, work, log, extra_configs=EXTRA_CONFIGS[args.modality],
                                    overrides={"seed": seed, **recipe_overrides(bdir, recipe), **args.set},
                                    step_overrides=budget_overrides(bdir, budget), indent="  ")
            if row.get("status") != "ok":
                print(f"  {row['status']}", flush=True)
                continue
            out = {"method": method, "recipe": recipe, "modality": args.modality, "seed": seed, "iterations": budget, "wall_s": round(time.time() - t0, 1),
                   "step_seconds": {k: round(v, 1) for k, v in row["step_seconds"].items()},
                   "dsc_mean": row["dsc"], "dsc_per_case": row["dsc_per_case"], "hd95_mean": row["hd95"],
                   "load_avg_1min": round(os.getloadavg()[0], 2), "eval_dir": row["report"]}
            print(f"  DSC {out['dsc_mean']:.3f} {out['dsc_per_case']}, {out['wall_s']:.0f} s", flush=True)
            rows = [r for r in rows if _key(r) != _key(out)] + [out]
            write_rows(results, rows)
    return rows


#: config files merged last into every step, and the suffix of the rows' method name, per modality
EXTRA_CONFIGS = {"ct": (DEMO_CONFIG,), "mri": (DEMO_CONFIG, "mri.yaml")}
METHOD_SUFFIX = {"ct": "", "mri": " (mri)"}


def baseline_rows(args) -> list[dict]:
    from baselines import read_results, run_monai_unet

    rows = []
    if args.baselines:
        for sub in ("monai_unet", "nnunet"):
            rows += read_results(Path(args.baselines) / sub)
    have = {(r["method"], int(r["seed"]), int(r["iterations"])) for r in rows}
    if args.run_monai_unet:
        for seed in sorted(set(args.seeds) | set(args.extra_seeds)):
            budgets = args.budgets if seed in args.seeds else [args.extra_seed_budget]
            if any(("monai_unet", seed, b) not in have for b in budgets):
                rows += run_monai_unet(args.data, args.out / "monai_unet", budgets, seed)
    out = []
    for r in rows:
        method = "nnunet_v2" if r["method"].startswith("nnunet") else r["method"]
        out.append({"method": method, "recipe": "", "seed": int(r["seed"]), "iterations": int(r["iterations"]),
                    "wall_s": r.get("train_wall_s"), "dsc_mean": r["dsc_mean"], "dsc_per_case": r["dsc_per_case"],
                    "hd95_mean": r.get("hd95_mean"), "load_avg_1min": r.get("load_avg_1min")})
    return out


def mean_sd(values):
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not v.size:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def table(rows: list[dict], budgets: list[int]) -> str:
    """Markdown table: test DSC (mean over seeds, sd when several) and wall time per method and budget."""
    methods = []
    for r in rows:
        m = (r["method"], r.get("recipe", ""))
        if m not in methods:
            methods.append(m)
    all_budgets = sorted({int(r["iterations"]) for r in rows} | set(budgets))
    head = "| method | recipe | " + " | ".join(f"{b} it: DSC (seeds) / wall s" for b in all_budgets) + " |"
    lines = [head, "|" + "---|" * (2 + len(all_budgets))]
    for method, recipe in methods:
        cells = []
        for b in all_budgets:
            sel = [r for r in rows if (r["method"], r.get("recipe", "")) == (method, recipe) and int(r["iterations"]) == b]
            if not sel:
                cells.append("-")
                continue
            mean, sd = mean_sd([r["dsc_mean"] for r in sel])
            wall, _ = mean_sd([r.get("wall_s") for r in sel])
            dsc = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") + f" (n={len(sel)})"
            cells.append(dsc + (f" / {wall:.0f}" if wall is not None else ""))
        lines.append(f"| {method} | {recipe or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("recipe", "")), []).append(r)
    for (method, recipe), sel in sorted(groups.items()):
        label = method + (f" ({recipe})" if recipe else "")
        by_budget = {}
        for r in sel:
            by_budget.setdefault(int(r["iterations"]), []).append(r)
        xs = sorted(by_budget)
        ys = [mean_sd([r["dsc_mean"] for r in by_budget[x]])[0] for x in xs]
        ws = [mean_sd([r.get("wall_s") for r in by_budget[x]])[0] for x in xs]
        line = axes[0].plot(xs, ys, marker="o", label=label)[0]
        for x in xs:  # single seeds as dots
            for r in by_budget[x]:
                axes[0].plot([x], [r["dsc_mean"]], ".", color=line.get_color(), alpha=0.4)
        if all(w is not None for w in ws):
            axes[1].plot(ws, ys, marker="o", color=line.get_color(), label=label)
    axes[0].set_xlabel("iterations (optimiser steps of the segmentation network)")
    axes[1].set_xlabel("wall time of the run (s, 2-core CPU)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("test DSC (demo set, 2 cases)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning on the demo phantoms: bundles (their configs + demo.yaml) against MONAI UNet and nnU-Net v2")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("/work/bench_data/demo_set"), help="the demo set (generated when missing)")
    ap.add_argument("--bundles", default=",".join(BUNDLES))
    ap.add_argument("--budgets", default="250,500,1000")
    ap.add_argument("--recipes", default="fast,paper", help="which of the bundles' recipes to run (fast, paper)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--extra_seeds", default="", help="seeds run at --extra_seed_budget only")
    ap.add_argument("--extra_seed_budget", type=int, default=1000)
    ap.add_argument("--baselines", default=None, help="folder with monai_unet/ and nnunet/ results of bench/baselines.py")
    ap.add_argument("--run_monai_unet", action="store_true", help="train the MONAI UNet baseline where its rows are missing")
    ap.add_argument("--report_only", action="store_true", help="only rebuild learning.md and the plot from results.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further override of every step (repeatable), e.g. rotate_range_deg=[0,0,15]; the rows' method name records it")
    ap.add_argument("--modality", choices=("ct", "mri"), default="ct",
                    help="mri: the three-sequence MRI demo set (--data is generated as such when missing), configs/mri.yaml merged last")
    args = ap.parse_args(argv)
    args.bundles = [b for b in args.bundles.split(",") if b]
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        ap.error(f"--set needs KEY=VALUE, got {bad}")
    args.set = dict(kv.split("=", 1) for kv in args.set)
    args.budgets = [int(b) for b in args.budgets.split(",") if b]
    args.recipes = [r for r in args.recipes.split(",") if r]
    if not set(args.recipes) <= {"fast", "paper"}:
        ap.error(f"--recipes: fast and/or paper, got {args.recipes}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    from baselines import DEMO_SET, load_split

    if args.modality == "mri":
        from npc_gtv.phantoms import ensure_dataset

        ensure_dataset(args.data, **{**DEMO_SET, "modality": "mri"})  # the MRI demo set into a missing or empty folder
    else:
        load_split(args.data)  # generates the demo set into a missing or empty folder, checks it otherwise
    args.data = args.data.resolve()
    results = args.out / "results.json"
    rows = read_rows(results)
    if not args.report_only:
        rows = run_bundles(args, rows, results)
    all_rows = rows + baseline_rows(args)
    md = table(all_rows, args.budgets)
    (args.out / "learning.md").write_text(md + "\n")
    plot(all_rows, args.out / "learning_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
