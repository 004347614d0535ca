"""k-fold cross-validation of a bundle in one command: every fold trained, evaluated, summarised.

The bundles' papers report means over fold models (HCF: five patient-level folds of the training
scans, a fixed test set, the five fold models averaged by majority vote; UNet-2.5D: seven folds,
each fold's model tested on its held-out fold). Each bundle's ``configs/cross_validation.yaml``
calls :func:`cross_validate` with its own config files; the steps are ordinary
``monai.bundle.run`` calls of those configs with the fold's overrides:

1. **train** fold ``k`` (``fold: k``; with the default layout also ``ckpt_dir: <ckpt_root>/fold<k>``
   and ``output_dir: <output_root>/fold<k>``); a fold whose training finished returns at once
   (resumable checkpoints), so rerunning the command after an interruption goes on where it stopped;
2. **evaluate** fold ``k``'s model on the bundle's test cases (its report in
   ``<output_root>/fold<k>/test``, or where the bundle's layout puts it); skipped when that report
   exists (``overwrite: true`` redoes it);
3. optionally **evaluate the fold ensemble** (``ckpt_dir: <ckpt_root>``, the folds listed in
   ``ensemble_folds``) into ``<output_root>/ensemble``;
4. write ``<output_root>/cross_validation.json``: each fold's mean metrics, their mean and sample
   standard deviation over the folds, and the ensemble's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shared_transforms.checks import setting_choice
from shared_transforms.io import InputError, atomic_write

__all__ = ["fold_dir", "read_summary", "summarize_folds", "cross_validate", "LAYOUTS", "SUMMARY_METRICS"]

logger = logging.getLogger(__name__)

#: the metrics summarised over folds (keys of the evaluation report's ``summary.json``)
#: how the fold runs find their folders (see :func:`cross_validate`)
LAYOUTS: tuple[str, ...] = ("fold_dirs", "bundle")
SUMMARY_METRICS: tuple[str, ...] = ("dsc", "iou", "sensitivity", "ppv", "rve", "hd95", "assd", "nsd")


def fold_dir(root, fold: int) -> str:
    """Folder of fold ``fold`` under ``root``: ``root/fold<k>`` (the bundles' ``model_dir`` layout)."""
    return str(Path(root) / f"fold{int(fold)}")


def read_summary(report_dir) -> dict:
    """The evaluation report's ``summary.json`` in ``report_dir``.

    Raises:
        InputError: the file is missing or is not a summary (names the file).
    """
    path = Path(report_dir) / "summary.json"
    if not path.is_file():
        raise InputError(path, "no evaluation summary here (did the evaluation run write its report elsewhere?)")
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise InputError(path, "not an evaluation summary (no 'metrics' mapping)")
    return summary


def _mean_of(summary: Mapping, metric: str):
    value = summary["metrics"].get(metric, {}).get("mean")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def summarize_folds(fold_summaries: Mapping[int, Mapping], ensemble: Mapping | None = None,
                    metrics: Sequence[str] = SUMMARY_METRICS) -> dict:
    """Mean and sample standard deviation (n - 1) over folds of each fold's mean test metrics.

    Args:
        fold_summaries: fold index -> that fold model's evaluation ``summary.json`` content.
        ensemble: the fold ensemble's ``summary.json`` content (optional).
        metrics: metric names to summarise (those missing from a summary are skipped).

    Returns:
        ``{"folds": {k: {metric: mean}}, "over_folds": {metric: {"mean", "std", "n"}},
        "ensemble": {metric: mean} | None}``.
    """
    if not fold_summaries:
        raise ValueError("summarize_folds needs at least one fold summary")
    folds = {int(k): {m: _mean_of(s, m) for m in metrics if m in s["metrics"]} for k, s in sorted(fold_summaries.items())}
    over: dict[str, dict] = {}
    for m in metrics:
        values = [f[m] for f in folds.values() if f.get(m) is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        over[m] = {"mean": mean, "std": std, "n": len(values)}
    ens = None if ensemble is None else {m: _mean_of(ensemble, m) for m in metrics if m in ensemble["metrics"]}
    return {"folds": folds, "over_folds": over, "ensemble": ens}


def cross_validate(
    train_configs: Sequence[str],
    evaluate_configs: Sequence[str],
    folds: Sequence[int],
    ckpt_root,
    output_root,
    *,
    overrides: Mapping | None = None,
    train_id: str = "training",
    evaluate_id: str = "evaluating",
    layout: str = "fold_dirs",
    ensemble_configs: Sequence[str] | None = None,
    ensemble_overrides: Mapping | None = None,
    overwrite: bool = False,
    runner: Callable | None = None,
) -> dict:
    """Train and evaluate every fold, optionally the fold ensemble, and write the summary.

    Args:
        train_configs: the training run's config files (``train.yaml`` plus any overrides).
        evaluate_configs: the evaluation run's config files (one fold model on the test cases).
        folds: fold indices to run (e.g. ``range(num_folds)``).
        ckpt_root: models of fold ``k`` go to ``fold_dir(ckpt_root, k)``.
        output_root: logs and reports of fold ``k`` go to ``fold_dir(output_root, k)``; the
            summary ``cross_validation.json`` to ``output_root``.
        overrides: plain-key overrides given to every run (data set, sizes, devices, ...).
        train_id / evaluate_id: the run ids of the two configs.
        layout: ``"fold_dirs"``: every run of fold ``k`` gets ``ckpt_dir: <ckpt_root>/fold<k>`` and
            ``output_dir: <output_root>/fold<k>``, its evaluation ``output_dir: <output_root>/fold<k>/test``
            (the report folder); ``"bundle"``: the runs get only ``fold: k`` and the bundle derives
            its fold folders itself (UNet-2.5D: ``model_dir`` and ``eval_dir`` =
            ``<ckpt_dir or output_dir>/fold<k>``), the report being in ``<output_root>/fold<k>``.
        ensemble_configs: config files of the fold-ensemble evaluation (``None``: no ensemble).
        ensemble_overrides: further overrides of the ensemble run (``ensemble_folds`` is set).
        overwrite: redo evaluations whose report exists (trainings always resume).
        runner: ``monai.bundle.run`` (tests may pass a recorder).

    Returns:
        the summary dict written to ``output_root/cross_validation.json``.
    """
    folds = [int(k) for k in folds]
    if not folds:
        raise ValueError("cross_validate needs at least one fold")
    if len(set(folds)) != len(folds) or min(folds) < 0:
        raise ValueError(f"folds must be distinct non-negative indices, got {folds}")
    layout = setting_choice(layout, LAYOUTS, "layout")
    if runner is None:
        from monai.bundle import run as runner
    base = dict(overrides or {})
    summaries: dict[int, dict] = {}
    timings: dict[int, dict] = {}
    for k in folds:
        if layout == "fold_dirs":
            fold_overrides = {**base, "fold": k, "ckpt_dir": fold_dir(ckpt_root, k), "output_dir": fold_dir(output_root, k)}
            report = str(Path(fold_dir(output_root, k)) / "test")
            eval_overrides = {**fold_overrides, "output_dir": report}
        else:
            fold_overrides = {**base, "fold": k, "ckpt_dir": str(ckpt_root), "output_dir": str(output_root)}
            report = fold_dir(output_root, k)
            eval_overrides = fold_overrides
        print(f"=== cross-validation: fold {k} ({folds.index(k) + 1} of {len(folds)}): training ===", flush=True)
        t0 = time.time()
        runner(run_id=train_id, config_file=[str(c) for c in train_configs], **fold_overrides)
        t_train = time.time() - t0
        t0 = time.time()
        if overwrite or not (Path(report) / "summary.json").is_file():
            print(f"=== cross-validation: fold {k}: evaluation on the test cases ===", flush=True)
            runner(run_id=evaluate_id, config_file=[str(c) for c in evaluate_configs], **{**eval_overrides, "overwrite": bool(overwrite)})
        summaries[k] = read_summary(report)
        timings[k] = {"train_s": round(t_train, 1), "evaluate_s": round(time.time() - t0, 1)}
    ensemble = None
    if ensemble_configs:
        report = str(Path(output_root) / "ensemble")
        if overwrite or not (Path(report) / "summary.json").is_file():
            print(f"=== cross-validation: the ensemble of folds {folds} on the test cases ===", flush=True)
            ens_overrides = {**base, **dict(ensemble_overrides or {}), "ensemble_folds": folds,
                             "ckpt_dir": str(ckpt_root), "output_dir": report, "overwrite": bool(overwrite)}
            runner(run_id=evaluate_id, config_file=[str(c) for c in ensemble_configs], **ens_overrides)
        ensemble = read_summary(report)
    result = {**summarize_folds(summaries, ensemble), "timings": timings, "ckpt_root": str(ckpt_root)}
    out = Path(output_root) / "cross_validation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    over = result["over_folds"].get("dsc")
    if over:
        sd = "" if over["std"] is None else f" +- {over['std']:.3f}"
        ens_dsc = (result["ensemble"] or {}).get("dsc")
        ens = "" if ens_dsc is None else f"; fold ensemble DSC {ens_dsc:.3f}"
        print(f"cross-validation: test DSC {over['mean']:.3f}{sd} over {over['n']} fold models{ens} ({out})", flush=True)
    return result
