"""``npc-gtv demo``: the README's main job on the embedded phantom data.

It generates a small CT phantom set, draws what the shared transforms do (image, its left-right
mirror and the asymmetric tumour mask), then runs every bundle's own recipe -- the workflow steps
listed under ``"recipe"`` in the bundle's ``configs/metadata.json`` -- through
``python -m monai.bundle run`` exactly as a user would, with the bundle's ``configs/demo.yaml``
(a short schedule and a reduced network that learn the phantom tumour in a few minutes) merged
last. It prints Dice and HD95 per bundle and draws ``figures/demo_overview.png``: one row per
bundle, axial, coronal and sagittal planes through the tumour of a test case with the truth and
the prediction. Nothing in here knows a particular bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Step", "bundle_recipe", "bundle_command", "find_bundles", "draw_transforms_figure",
           "draw_overview_figure", "run_bundle_recipe", "demo_command"]

DEMO_CONFIG = "demo.yaml"


@dataclass
class Step:
    """One ``monai.bundle run`` call: a name, the workflow, config files (in ``configs/``) and overrides.

    ``budget`` (optional, for benchmarks) names the step whose length an iteration budget sets:
    ``{"knob": <epochs key>, "networks": <number of networks the budget is shared by>}``.
    """

    name: str
    workflow: str
    configs: list[str]
    overrides: dict = field(default_factory=dict)
    budget: dict | None = None


def find_bundles(root: Path | None = None) -> dict[str, Path]:
    """The bundles of this installation: ``{name: folder}`` for every ``bundles/<name>/configs/metadata.json``.

    Args:
        root: folder holding the bundle folders; default: ``NPC_GTV_BUNDLES`` or the repository's ``bundles/``.
    """
    if root is None:
        root = Path(os.environ.get("NPC_GTV_BUNDLES", Path(__file__).resolve().parents[1] / "bundles"))
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"npc-gtv demo: no bundle folder at {root} (set NPC_GTV_BUNDLES to the folder that holds the bundles)")
    return {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/metadata.json"))}


def bundle_recipe(bundle_dir: Path) -> list[Step]:
    """The workflow steps a bundle declares in ``configs/metadata.json`` under ``"recipe"``.

    Each entry is ``{"name", "workflow", "configs": [...]}`` (config files of ``configs/``, merged in
    order), optionally ``"overrides": {key: value}`` and ``"budget"`` (see :class:`Step`).

    Raises:
        ValueError: no recipe, or an entry without a workflow or configs, or a missing config file.
    """
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    entries = meta.get("recipe")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{meta_file}: no 'recipe' list of workflow steps")
    steps = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("workflow") or not e.get("configs"):
            raise ValueError(f"{meta_file}: recipe step {i} needs 'workflow' and 'configs', got {e!r}")
        missing = [c for c in e["configs"] if not (Path(bundle_dir) / "configs" / c).is_file()]
        if missing:
            raise ValueError(f"{meta_file}: recipe step {i} names missing config files {missing}")
        steps.append(Step(str(e.get("name", e["workflow"])), str(e["workflow"]), list(e["configs"]), dict(e.get("overrides", {})),
                          e.get("budget")))
    return steps


def bundle_command(bundle_dir: Path, step: Step, overrides: dict, extra_configs: list[str] = ()) -> list[str]:
    """The ``python -m monai.bundle run`` command line of one recipe step (``extra_configs`` merged last)."""
    cfg = Path(bundle_dir) / "configs"
    files = [str(cfg / c) for c in [*step.configs, *extra_configs]]
    cmd = [sys.executable, "-m", "monai.bundle", "run", step.workflow,
           "--config_file", json.dumps(files) if len(files) > 1 else files[0],
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf")]
    for key, value in {**overrides, **step.overrides}.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd


def draw_transforms_figure(dataset_json: Path, out_png: Path) -> Path:
    """Axial views of a phantom: image, its left-right mirror (from the affine), and m = s - (s AND s')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared_transforms.flip import asymmetric_mask, flip_lr, si_axis
    from shared_transforms.io import load_label, load_nifti

    meta = json.loads(dataset_json.read_text())
    entry = meta["training"][0]
    image, affine = load_nifti(dataset_json.parent / entry["image"])
    label, _ = load_label(dataset_json.parent / entry["label"], reference_affine=affine, reference_shape=image.shape)
    image_f, label_f = flip_lr(image, affine), flip_lr(label, affine)
    m = asymmetric_mask(label, label_f)
    z_axis = si_axis(affine)
    z = int(np.argmax(label.sum(axis=tuple(a for a in range(3) if a != z_axis)))) if label.any() else image.shape[z_axis] // 2

    def axial(a):
        return np.take(a, z, axis=z_axis).T

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (title, img, masks) in zip(axes, [
        ("image I, truth s", image, [(label, "red")]),
        ("mirror I', mirrored truth s'", image_f, [(label_f, "cyan")]),
        ("asymmetric mask m = s - (s AND s')", image, [(label, "red"), (m, "yellow")]),
    ]):
        ax.imshow(np.clip(axial(img), -150, 500), cmap="gray")
        for mask, colour in masks:
            if axial(mask).any():
                ax.contour(axial(mask), levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{entry['case_id']}: left-right flip pairing (axis from the affine)", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _prediction_file(pred_dir: Path, image_path: Path) -> Path | None:
    stem = image_path.name.split(".")[0]
    hits = sorted(Path(pred_dir).glob(f"{stem}*_seg.nii*")) if Path(pred_dir).is_dir() else []
    return hits[0] if hits else None


def draw_overview_figure(dataset_json: Path, rows: list[dict], out_png: Path, case_index: int = 0) -> Path | None:
    """One row per bundle: axial, coronal and sagittal planes through the tumour of one test case.

    The truth is drawn in green and each bundle's prediction in red, on the CT in a soft-tissue
    window; the planes go through the centre of the true tumour. Returns None when no bundle
    has a prediction for the case.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared_transforms.flip import lr_axis, si_axis
    from shared_transforms.io import load_label, load_nifti

    meta = json.loads(Path(dataset_json).read_text())
    entry = meta["test"][case_index]
    image_path = Path(dataset_json).parent / entry["image"]
    image, affine = load_nifti(image_path)
    truth, _ = load_label(Path(dataset_json).parent / entry["label"], reference_affine=affine, reference_shape=image.shape)
    with_pred = [(r, _prediction_file(Path(r["predictions"]), image_path)) for r in rows if r.get("predictions")]
    with_pred = [(r, p) for r, p in with_pred if p is not None]
    if not with_pred:
        return None
    centre = [int(round(c)) for c in np.argwhere(truth > 0).mean(0)] if truth.any() else [s // 2 for s in image.shape]
    z_ax, x_ax = si_axis(affine), lr_axis(affine)
    y_ax = 3 - z_ax - x_ax
    planes = [("axial", z_ax), ("coronal", y_ax), ("sagittal", x_ax)]
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))

    def cut(a, axis):
        """The plane through the tumour centre, rows and columns, and (column, row) spacing in mm."""
        plane = np.take(a, centre[axis], axis=axis)
        rest = [ax for ax in range(3) if ax != axis]
        if z_ax not in rest:  # axial: rows anterior-posterior, columns left-right
            return plane.T, (spacing[rest[0]], spacing[rest[1]])
        col = rest[1] if rest[0] == z_ax else rest[0]
        plane = plane if rest[0] == z_ax else plane.T  # rows: the superior-inferior axis
        if affine[2, z_ax] > 0:  # superior at the top
            plane = plane[::-1]
        return plane, (spacing[col], spacing[z_ax])

    fig, axes = plt.subplots(len(with_pred), 3, figsize=(11, 3.7 * len(with_pred)), squeeze=False)
    for i, (row, pred_file) in enumerate(with_pred):
        pred, _ = load_label(pred_file, reference_affine=affine, reference_shape=image.shape)
        dsc = row.get("dsc_per_case", {}).get(entry.get("case_id"))
        for j, (name, axis) in enumerate(planes):
            ax = axes[i][j]
            img, (sx, sy) = cut(image, axis)
            ax.imshow(np.clip(img, -150, 250), cmap="gray", aspect=sy / sx, interpolation="nearest")
            for mask, colour in ((truth, "lime"), (pred, "red")):
                m, _ = cut(mask, axis)
                if m.any():
                    ax.contour(m, levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{row['bundle']}" + (f"\nDSC {dsc:.2f}" if dsc is not None else ""), fontsize=10)
            if i == 0:
                ax.set_title(f"{name} (truth green, prediction red)", fontsize=9)
    fig.suptitle(f"npc-gtv demo: test case {entry.get('case_id', image_path.name)}", fontsize=11)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _case_dsc(eval_dir: Path) -> dict:
    from npc_gtv.evaluation.report import read_metrics_csv

    _, cases = read_metrics_csv(eval_dir)
    return {case: values.get("dsc") for case, values in cases.items()}


def run_bundle_recipe(bundle: str, bundle_dir: Path, dataset_dir: Path, work: Path, log, extra_configs=(DEMO_CONFIG,),
                      overrides: dict | None = None, step_overrides=None, indent: str = "      ") -> dict:
    """Run one bundle's recipe (``extra_configs`` merged last into every step); a result row for the table.

    Args:
        bundle, bundle_dir: the bundle's name and folder.
        dataset_dir: the data set folder (``dataset.json``).
        work: outputs go to ``work/<bundle>/{models,eval}``.
        log: open text file for the runs' output.
        extra_configs: config files merged last into every step.
        overrides: ``--key value`` pairs for every step.
        step_overrides: callable ``Step -> dict`` of further pairs for one step (e.g. a budget).
        indent: prefix of the progress lines.

    Returns:
        ``{"bundle", "status", "dsc", "hd95", "dsc_per_case", "cases", "seconds", "step_seconds", ...}``.
    """
    try:
        recipe = bundle_recipe(bundle_dir)
    except ValueError as exc:
        return {"bundle": bundle, "status": f"not runnable: {exc}"}
    missing = [c for c in extra_configs if not (bundle_dir / "configs" / c).is_file()]
    if missing:
        return {"bundle": bundle, "status": f"not runnable: no configs/{', '.join(missing)}"}
    out = work / bundle
    common = {"bundle_root": str(bundle_dir), "dataset_dir": str(dataset_dir),
              "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), **(overrides or {})}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    step_seconds = {}
    for k, step in enumerate(recipe, 1):
        cmd = bundle_command(bundle_dir, step, {**common, **(step_overrides(step) if step_overrides else {})}, list(extra_configs))
        print(f"{indent}{bundle} [{k}/{len(recipe)}] {step.name} ...", end="", flush=True)
        t0 = time.time()
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=str(bundle_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
        step_seconds[step.name] = time.time() - t0
        print(f" {'done' if proc.returncode == 0 else 'FAILED'} ({step_seconds[step.name]:.0f} s)", flush=True)
        if proc.returncode != 0:
            return {"bundle": bundle, "status": f"FAILED at {step.name} (see {log.name})", "seconds": time.time() - start,
                    "step_seconds": step_seconds}
    summary_path = out / "eval" / "summary.json"
    if not summary_path.is_file():
        return {"bundle": bundle, "status": f"FAILED: no {summary_path}", "seconds": time.time() - start}
    summary = json.loads(summary_path.read_text())
    metric = lambda name: (summary["metrics"].get(name) or {}).get("mean")  # noqa: E731
    return {"bundle": bundle, "status": "ok", "dsc": metric("dsc"), "hd95": metric("hd95"),
            "dsc_per_case": _case_dsc(out / "eval"), "cases": summary.get("n_cases"), "seconds": time.time() - start,
            "step_seconds": step_seconds, "report": str(out / "eval"), "predictions": str(out / "eval" / "predictions")}


def _fmt(value, spec):
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def demo_command(out: str = "demo_output", cases: int = 10, seed: int = 0, bundles: str = "all") -> None:
    """Run the demo: phantoms, shared transforms figure, and each bundle's recipe with its demo.yaml.

    Args:
        out: output folder (created; an existing folder is used only if it holds a previous demo, whose phantoms
            are reused and whose bundle outputs are replaced).
        cases: number of small phantom cases to generate.
        seed: phantom seed.
        bundles: comma-separated bundle names to run, or "all".
    """
    from npc_gtv.phantoms import generate_dataset

    available = find_bundles()
    names = list(available) if str(bundles).strip() == "all" else [b.strip() for b in str(bundles).split(",") if b.strip()]
    unknown = [b for b in names if b not in available]
    if unknown:
        raise SystemExit(f"npc-gtv demo: unknown bundle(s) {unknown}; choose from {list(available)}")
    work = Path(out).resolve()
    marker = work / ".npc_gtv_demo"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise SystemExit(f"npc-gtv demo: {work} exists and is not a demo folder; choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("npc-gtv demo output\n")
    t0 = time.time()

    dataset_dir = work / "data"
    dataset_json = dataset_dir / "dataset.json"
    if not dataset_json.is_file():
        print(f"[1/4] generating {cases} small CT phantoms in {dataset_dir}")
        generate_dataset(dataset_dir, cases=cases, seed=seed, modality="ct", size="small")
    else:
        print(f"[1/4] reusing phantoms in {dataset_dir}")
    fig = draw_transforms_figure(dataset_json, work / "figures" / "flip_pairing.png")
    print(f"[2/4] shared transforms figure: {fig}")

    rows = []
    print(f"[3/4] training, inference and evaluation of {len(names)} bundles with their configs/{DEMO_CONFIG} (log: {work / 'demo.log'})")
    with open(work / "demo.log", "w") as log:
        for b in names:
            if (work / b).exists():  # a rerun is a new demo: the previous demo's weights and reports of this bundle go
                print(f"      {b}: replacing the previous demo's outputs in {work / b}", flush=True)
                shutil.rmtree(work / b)
            rows.append(run_bundle_recipe(b, available[b], dataset_dir, work, log))
            print(f"      {b}: {rows[-1]['status']}" + (f", Dice {rows[-1]['dsc']:.3f}" if rows[-1].get("dsc") is not None else ""), flush=True)
    overview = draw_overview_figure(dataset_json, rows, work / "figures" / "demo_overview.png")
    print(f"[4/4] overview figure: {overview}")

    header = f"{'bundle':<14} {'Dice':>7} {'HD95 mm':>9} {'cases':>6} {'time s':>7}  status"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['bundle']:<14} {_fmt(r.get('dsc'), '7.3f')} {_fmt(r.get('hd95'), '9.2f')} "
                     f"{_fmt(r.get('cases'), '6d')} {_fmt(r.get('seconds'), '7.0f')}  {r['status']}")
    table = "\n".join(lines)
    (work / "demo_summary.md").write_text(
        "# npc-gtv demo\n\nEach bundle trained with its own configs plus `configs/demo.yaml` (short schedule, reduced "
        "network) on small synthetic CT phantoms (CPU), then inferred and evaluated on the test phantoms.\n\n```\n"
        + table + "\n```\n")
    (work / "demo_summary.json").write_text(json.dumps(rows, indent=2))
    print("\n" + table)
    print(f"\nDone in {time.time() - t0:.0f} s. Outputs in {work}:")
    print("  data/                       the phantom data set (dataset.json, imagesTr, labelsTr, ...)")
    print("  figures/demo_overview.png   each bundle's contour on a test case (truth green, prediction red)")
    print("  figures/flip_pairing.png    image, mirror and asymmetric mask")
    for r in rows:
        if r.get("report"):
            print(f"  {r['bundle']}/eval/   metrics.csv, summary.md, figures/ (overlays), predictions/")
    print("  demo_summary.md, demo.log")
