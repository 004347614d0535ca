"""Evaluation reports: match prediction and truth files, compute metrics, write tables and figures.

Public functions (also used by every bundle's ``evaluate.yaml``):

* :func:`evaluate_folders` -- a prediction folder against a truth folder or a Decathlon
  ``dataset.json``; writes ``metrics.csv``, ``summary.json``, ``summary.md`` and ``figures/``.
* :func:`write_report` -- the same report files from per-case metric records.
* :func:`compare_runs` -- side-by-side table of several evaluation outputs with paired Wilcoxon
  signed-rank tests on DSC.
* :func:`agreement_folders` -- inter-rater Dice and Jaccard per case.

Command-line wrappers: ``npc-gtv evaluate``, ``npc-gtv compare``, ``npc-gtv agreement``.

Writing: a report is built in a temporary folder inside ``out`` and moved into place only when
complete (a full disk or an unwritable folder leaves no partial report, and the earlier report,
if any, untouched). An ``out`` that already holds a report (``metrics.csv``, ``summary.*``,
``figures/``) is refused unless ``overwrite``; with it the whole earlier report is replaced, so no
stale overlay of an earlier run survives. File names derived from case ids are made file-name safe
(:func:`shared_transforms.io.safe_name`): a ``case_id`` from a ``dataset.json`` can never write
outside ``out``, and two cases mapping to one name are refused.

Grids: a prediction stored on the truth's voxel grid in another axis order / direction (e.g. RAS
instead of LPS) is brought over losslessly (:func:`shared_transforms.io.reorient_to_grid`); any
other difference is refused with a message that says it would need resampling.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from shared_transforms.io import (
    InputError,
    atomic_write,
    check_same_grid,
    fsync_path,
    load_nifti,
    lossless_reorientation,
    make_temp_dir,
    reorient_to_grid,
    safe_name,
)

from .metrics import (
    DEFAULT_HD95,
    EMPTY_BOTH,
    EMPTY_PRED,
    EMPTY_TRUTH,
    HD95_DEFINITIONS,
    HIGHER_IS_BETTER,
    METRICS,
    UNITS,
    compute_case_metrics,
    spacing_from_affine,
)

__all__ = [
    "CASE_SUFFIXES",
    "REPORT_FILES",
    "case_key",
    "find_niftis",
    "match_cases",
    "load_truth_cases",
    "summarize",
    "group_summaries",
    "DEFAULT_GROUP_BY",
    "write_report",
    "evaluate_pairs",
    "evaluate_folders",
    "read_metrics_csv",
    "compare_runs",
    "agreement_folders",
    "evaluate_command",
    "compare_command",
    "agreement_command",
]

#: file-name suffixes removed (repeatedly) from a file stem to get its case id: segmentation
#: suffixes (MONAI SaveImage writes ``<case>_seg``), nnU-Net's channel suffix ``_0000`` and the
#: MRI sequence suffixes of the phantom / multi-sequence layout (``<case>_t1`` ...), so that a
#: prediction saved from an MRI case's first sequence (``<case>_t1_seg``) matches ``<case>``
CASE_SUFFIXES: tuple[str, ...] = ("_seg", "_pred", "_prediction", "_mask", "_label", "_gtv", "_0000", "_t1", "_t2", "_cet1")

AGREEMENT_METRICS: tuple[str, ...] = ("dsc", "iou")

#: what a report consists of inside its folder (replaced together, refused without ``overwrite``)
REPORT_FILES: tuple[str, ...] = ("metrics.csv", "summary.json", "summary.md", "figures")

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# case matching
# ----------------------------------------------------------------------------------------------
def _stem(path) -> str:
    return _NIFTI.sub("", Path(path).name)


def case_key(path) -> str:
    """Case id of a NIfTI file: its name without ``.nii[.gz]`` and without the known suffixes.

    The suffixes of :data:`CASE_SUFFIXES` are removed repeatedly and case-insensitively, e.g.
    ``npc_001_seg.nii.gz -> npc_001``, ``npc_001_0000.nii.gz -> npc_001``,
    ``npc_001_pred_seg.nii.gz -> npc_001``.
    """
    stem = _stem(path)
    changed = True
    while changed:
        changed = False
        for suffix in CASE_SUFFIXES:
            if len(stem) > len(suffix) and stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                changed = True
    return stem


def find_niftis(folder) -> list[Path]:
    """All ``.nii`` / ``.nii.gz`` files under ``folder`` (recursively, hidden entries skipped), sorted."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "folder does not exist")
    if not folder.is_dir():
        raise InputError(folder, "is not a folder (expected a folder of NIfTI files)")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and _NIFTI.search(f):
                found.append(Path(root) / f)
    return sorted(found)


def _index(files: Sequence[Path], what: str, folder) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for f in files:
        key = case_key(f)
        if key in index:
            raise InputError(folder, f"duplicate {what} for case {key!r}: {index[key]} and {f}")
        index[key] = f
    return index


def _listing(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def match_cases(pred_files: Mapping[str, Path], truth_files: Mapping[str, Path], pred_src="predictions", truth_src="truth") -> list[str]:
    """Check that both sides name the same cases; return the sorted case ids.

    Raises:
        InputError: a case has a prediction but no truth or the other way round.
    """
    only_pred = set(pred_files) - set(truth_files)
    only_truth = set(truth_files) - set(pred_files)
    problems = []
    if only_truth:
        problems.append(f"no prediction for {len(only_truth)} case(s) of {truth_src}: {_listing(only_truth)}")
    if only_pred:
        problems.append(f"no truth for {len(only_pred)} prediction(s): {_listing(only_pred)}")
    if problems:
        raise InputError(pred_src, "unmatched cases (files are matched by case id = file name without "
                         f"{', '.join(CASE_SUFFIXES)}): " + "; ".join(problems))
    if not truth_files:
        raise InputError(truth_src, "no NIfTI masks found")
    return sorted(truth_files)


def load_truth_cases(truth, *, section: str = "test", images=None) -> tuple[dict[str, Path], dict[str, Path], dict[str, str]]:
    """Ground-truth masks (and images for overlays) by case id.

    Args:
        truth: folder of NIfTI masks, or a Decathlon ``dataset.json`` (its ``section`` list gives
            ``label`` and ``image`` paths relative to the json's folder, and optionally ``case_id``).
        section: list of the dataset.json to use (``test``, ``training``, ``validation``...).
        images: optional folder of images matched by case id (for a dataset.json it replaces
            the images listed there).

    Returns:
        ``(labels, images, names)``: case key -> label path, case key -> image path (may be
        empty), case key -> displayed case id.
    """
    truth = Path(truth)
    if truth.is_file() and truth.suffix.lower() == ".json":
        try:
            data = json.loads(truth.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(truth, f"cannot be read as JSON ({exc})") from exc
        if not isinstance(data, dict) or section not in data:
            have = ", ".join(k for k, v in (data.items() if isinstance(data, dict) else []) if isinstance(v, list))
            raise InputError(truth, f"has no {section!r} list (lists present: {have or 'none'})")
        entries = data[section]
        if not isinstance(entries, list) or not entries:
            raise InputError(truth, f"{section!r} is not a non-empty list")
        labels: dict[str, Path] = {}
        imgs: dict[str, Path] = {}
        names: dict[str, str] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "label" not in entry:
                raise InputError(truth, f"{section}[{i}] has no 'label' (evaluation needs ground truth)")
            label = truth.parent / entry["label"]
            # the bundles name a prediction after the entry's case_id (file-name safe), else its file name
            key = safe_name(entry["case_id"], truth) if entry.get("case_id") not in (None, "") else case_key(label)
            if key in labels:
                raise InputError(truth, f"duplicate case {key!r} in {section!r}: {labels[key]} and {label}")
            labels[key] = label
            names[key] = str(entry.get("case_id", key))
            image = entry.get("image")
            if isinstance(image, (list, tuple)):
                image = image[0] if image else None
            if image:
                imgs[key] = truth.parent / image
        if images is not None:  # an explicit image folder overrides the json's images
            imgs = _index(find_niftis(images), "image", images)
        return labels, imgs, names
    if truth.is_file():
        raise InputError(truth, "truth must be a folder of NIfTI masks or a Decathlon dataset.json")
    labels = _index(find_niftis(truth), "truth mask", truth)
    imgs = _index(find_niftis(images), "image", images) if images is not None else {}
    return labels, imgs, {k: k for k in labels}


def _check_out(out, protected: Sequence) -> Path:
    out = Path(out)
    res = out.resolve()
    for item in protected:
        if item is None:
            continue
        folder = Path(item).resolve()
        if res == folder or folder in res.parents:
            raise InputError(out, f"output folder is inside the input folder {folder}; choose another --out (inputs are never written)")
    return out


def check_report_folder(out, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that already holds a report unless ``overwrite`` (one rule for every command).

    Raises:
        InputError: ``out`` is a file, or holds report files and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file; --out must be a folder")
    present = [name for name in REPORT_FILES if (out / name).exists()]
    if present and not overwrite:
        raise InputError(out, f"already holds a report ({', '.join(present)}); refusing to overwrite it (--overwrite "
                              "replaces the whole earlier report, or choose another --out)")
    return out


@contextlib.contextmanager
def report_stage(out, overwrite: bool = False):
    """Yield a temporary folder inside ``out``; on success move its report files into ``out``.

    The earlier report files (:data:`REPORT_FILES`) are replaced as a whole (``figures/`` with every
    old overlay). On failure nothing in ``out`` changes and the temporary folder is removed.
    """
    out = check_report_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    stage = make_temp_dir(out, ".report.")
    try:
        yield stage
        check_report_folder(out, overwrite)  # another run may have written meanwhile
        trash = make_temp_dir(out, ".old_report.")
        try:
            for name in REPORT_FILES:
                if (out / name).exists():
                    os.replace(out / name, trash / name)
            for name in REPORT_FILES:
                if (stage / name).exists():
                    os.replace(stage / name, out / name)
            fsync_path(out, directory=True)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def overlay_names(cases) -> dict[str, str]:
    """File-name-safe overlay name of each case id; two ids with one name are refused."""
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for case in cases:
        name = safe_name(case)
        if name in taken and taken[name] != str(case):
            raise InputError(case, f"maps to the same figure name {name!r} as case {taken[name]!r}; give the cases distinct ids")
        taken[name] = str(case)
        names[str(case)] = name
    return names


# ----------------------------------------------------------------------------------------------
# summaries and report files
# ----------------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    ok = arr[np.isfinite(arr)]
    n = int(ok.size)
    if n == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n": 0, "n_undefined": int(arr.size)}
    return {
        "mean": float(ok.mean()),
        "std": float(ok.std(ddof=1)) if n > 1 else 0.0,
        "median": float(np.median(ok)),
        "min": float(ok.min()),
        "max": float(ok.max()),
        "n": n,
        "n_undefined": int(arr.size - n),
    }


def summarize(records: Sequence[Mapping], metrics: Sequence[str] = METRICS) -> dict:
    """Mean, sample standard deviation (n-1), median, min, max and counts of each metric.

    Every case counts; only values that are undefined by definition (``rve`` with an empty
    truth) are left out of that metric's statistics and counted in ``n_undefined``. When the
    records carry slice counts, ``pooled_slices`` gives the slice recall and precision over all
    axial slices of all cases together (the HCF paper's slice-classifier measure).
    """
    summary = {
        "n_cases": len(records),
        "empty_cases": {
            EMPTY_BOTH: sum(r.get("empty_case") == EMPTY_BOTH for r in records),
            EMPTY_PRED: sum(r.get("empty_case") == EMPTY_PRED for r in records),
            EMPTY_TRUTH: sum(r.get("empty_case") == EMPTY_TRUTH for r in records),
        },
        "metrics": {m: _stats([float(r[m]) for r in records]) for m in metrics},
    }
    if all("slices_truth" in r for r in records):
        both = sum(int(r["slices_both"]) for r in records)
        n_pred = sum(int(r["slices_pred"]) for r in records)
        n_truth = sum(int(r["slices_truth"]) for r in records)
        summary["pooled_slices"] = {
            "slices_both": both,
            "slices_pred": n_pred,
            "slices_truth": n_truth,
            "slice_recall": both / n_truth if n_truth else (1.0 if not n_pred else 0.0),
            "slice_precision": both / n_pred if n_pred else (1.0 if not n_truth else 0.0),
        }
    return summary


#: case attributes reported separately when a dataset.json's ``case_info`` has them (the SATS
#: papers' failure mode: tumours that cross the mid-line)
DEFAULT_GROUP_BY: tuple[str, ...] = ("crosses_midline",)


def group_summaries(records: Sequence[Mapping], case_info: Mapping[str, Mapping], group_by: Sequence[str] = DEFAULT_GROUP_BY,
                    metrics: Sequence[str] = METRICS) -> dict:
    """:func:`summarize` per value of each case attribute in ``group_by``.

    Args:
        records: the evaluated cases (``case_id`` and the metrics).
        case_info: case id -> attributes (a ``dataset.json``'s ``case_info``, e.g. the phantoms'
            ``crosses_midline``, ``tumour_side``; a real data set may list T stage, centre, ...).
        group_by: attributes to group by; one missing for every evaluated case is left out, a case
            without it counts under ``"unknown"``.

    Returns:
        ``{attribute: {value (as text): summary}}``, e.g. ``{"crosses_midline": {"True": ..., "False": ...}}``.
    """
    out: dict[str, dict] = {}
    for key in group_by:
        values = [case_info.get(str(r["case_id"]), {}).get(key) for r in records]
        if all(v is None for v in values):
            continue
        groups: dict[str, list] = {}
        for r, v in zip(records, values):
            groups.setdefault("unknown" if v is None else str(v), []).append(r)
        out[key] = {v: summarize(rs, metrics) for v, rs in sorted(groups.items())}
    return out


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _summary_markdown(summary: Mapping, title: str) -> str:
    lines = [f"# {title}", ""]
    info = summary.get("info", {})
    for k in ("pred", "truth", "rater_a", "rater_b", "section", "label", "penalty", "nsd_tolerance_mm"):
        if k in info:
            lines.append(f"- {k}: `{info[k]}`")
    if "hd95_definition" in info:
        d = info["hd95_definition"]
        lines.append(f"- hd95 definition: `{d}`: {HD95_DEFINITIONS.get(d, d)}")
    lines.append(f"- cases: {summary['n_cases']}")
    e = summary["empty_cases"]
    lines.append(
        f"- empty-mask cases: {e[EMPTY_BOTH]} both empty (scored perfect), {e[EMPTY_PRED]} empty prediction, "
        f"{e[EMPTY_TRUTH]} empty truth (scored DSC 0, distances = penalty)"
    )
    lines += ["", "| metric | mean ± std | median | min | max | n |", "|---|---|---|---|---|---|"]
    for m, s in summary["metrics"].items():
        unit = f" ({UNITS[m]})" if m in UNITS else ""
        arrow = {True: " ↑", False: " ↓", None: ""}[HIGHER_IS_BETTER.get(m)]
        n = f"{s['n']}" + (f" ({s['n_undefined']} undefined)" if s["n_undefined"] else "")
        lines.append(
            f"| {m}{unit}{arrow} | {_fmt(s['mean'])} ± {_fmt(s['std'])} | {_fmt(s['median'])} | "
            f"{_fmt(s['min'])} | {_fmt(s['max'])} | {n} |"
        )
    pooled = summary.get("pooled_slices")
    if pooled:
        lines += ["", f"Pooled over all axial slices of all cases: slice recall {_fmt(pooled['slice_recall'])} "
                  f"({pooled['slices_both']}/{pooled['slices_truth']}), slice precision {_fmt(pooled['slice_precision'])} "
                  f"({pooled['slices_both']}/{pooled['slices_pred']})."]
    for key, groups in (summary.get("groups") or {}).items():
        lines += ["", f"By `{key}`:", "", f"| {key} | cases | dsc mean ± std | hd95 (mm) mean ± std |", "|---|---|---|---|"]
        for value, g in groups.items():
            dsc, hd = g["metrics"].get("dsc", {}), g["metrics"].get("hd95", {})
            lines.append(f"| {value} | {g['n_cases']} | {_fmt(dsc.get('mean'))} ± {_fmt(dsc.get('std'))} | "
                         f"{_fmt(hd.get('mean'))} ± {_fmt(hd.get('std'))} |")
    lines += ["", "Definitions: docs/evaluation.md of the NPC GTV toolkit.", ""]
    return "\n".join(lines)


def _write_text(path: Path, text: str, inputs: Sequence = ()) -> None:
    with atomic_write(path, inputs=inputs) as tmp:
        tmp.write_text(text)


def _csv_text(records: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = {}
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, float):
                v = "nan" if math.isnan(v) else repr(v)
            row[c] = v
        writer.writerow(row)
    return buf.getvalue()


def write_report(
    records: Sequence[Mapping],
    out,
    *,
    metrics: Sequence[str] = METRICS,
    title: str = "Evaluation",
    info: Mapping | None = None,
    figures: bool = True,
    overlays: Mapping[str, Mapping] | None = None,
    bar_plots: bool = False,
    inputs: Sequence = (),
    overwrite: bool = False,
) -> dict:
    """Write ``metrics.csv``, ``summary.json``, ``summary.md`` and ``figures/`` from case records.

    Args:
        records: one dict per case with ``case_id``, the ``metrics`` values and optionally
            ``pred``, ``truth``, ``empty_case``, ``penalty_mm``.
        out: output folder (created).
        metrics: metric columns to report.
        title: heading of ``summary.md``.
        info: extra provenance stored in ``summary.json["info"]`` (paths, options).
        figures: write ``figures/box_<metric>.png`` (and the overlays below).
        overlays: case id -> ``{"truth", "pred", "affine", "image"}`` arrays for
            ``figures/overlays/<case>.png`` (see :func:`npc_gtv.evaluation.figures.overlay_png`).
        bar_plots: also write ``figures/cases_<metric>.png`` per-case bar charts.
        inputs: paths that must never be written.
        overwrite: replace an earlier report in ``out`` (default: refuse, see :func:`check_report_folder`).

    Returns:
        the summary dict (also written to ``summary.json``).

    Raises:
        InputError: an earlier report without ``overwrite``, bad records.
        OSError: writing failed; no partial report is left.
    """
    _check_records(records, metrics)
    with report_stage(out, overwrite) as stage:
        return _write_report_files(records, stage, metrics=metrics, title=title, info=info, figures=figures,
                                   overlays=overlays, bar_plots=bar_plots, inputs=inputs)


def _check_records(records, metrics) -> None:
    if not records:
        raise ValueError("write_report needs at least one case record")
    for r in records:
        missing = [m for m in ("case_id", *metrics) if m not in r]
        if missing:
            raise ValueError(f"case record {r.get('case_id', '?')!r} lacks {', '.join(missing)}")


def _write_report_files(records, out: Path, *, metrics, title, info, figures, overlays, bar_plots, inputs, groups=None) -> dict:
    out = Path(out)
    _check_records(records, metrics)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, metrics)
    if groups:
        summary["groups"] = groups
    summary["info"] = dict(info or {})
    summary["files"] = {"metrics_csv": "metrics.csv", "summary_md": "summary.md", "figures": "figures" if figures else None}
    extra = [c for c in ("empty_case", "penalty_mm", "slices_both", "slices_pred", "slices_truth", "pred", "truth", "rater_a",
                         "rater_b") if any(c in r for r in records)]
    _write_text(out / "metrics.csv", _csv_text(records, ["case_id", *metrics, *extra]), inputs)
    _write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2, allow_nan=False, default=str) + "\n", inputs)
    _write_text(out / "summary.md", _summary_markdown(summary, title), inputs)
    if figures:
        from .figures import box_plots, case_bar_plot, overlay_png

        fig_dir = out / "figures"
        box_plots(records, metrics, fig_dir)
        if bar_plots:
            for m in metrics:
                case_bar_plot(records, m, fig_dir / f"cases_{m}.png")
        names = overlay_names(list(overlays or {}))
        for case, item in (overlays or {}).items():
            overlay_png(fig_dir / "overlays" / f"{names[str(case)]}.png", item["truth"], item["pred"], item["affine"],
                        image=item.get("image"), title=item.get("title", case), inputs=inputs)
    return summary


# ----------------------------------------------------------------------------------------------
# evaluation of folders
# ----------------------------------------------------------------------------------------------
def _load_mask(path: Path, label: int | None = None):
    """Read a binary mask; fast validity check, the shared checker only to word an error.

    With ``label`` the file may hold several integer labels and the mask is ``array == label``.
    """
    from shared_transforms.io import check_label_array

    arr, affine = load_nifti(path)
    if label is not None:
        if not (np.issubdtype(arr.dtype, np.integer) or np.all(arr == np.round(arr))):
            raise InputError(path, f"--label {label} needs an integer label map, found non-integer values")
        return arr == label, affine
    ok = arr.dtype == bool or (
        arr.size
        and (np.issubdtype(arr.dtype, np.integer) or np.all(np.isfinite(arr)))
        and arr.min() >= 0
        and arr.max() <= 1
        and (np.issubdtype(arr.dtype, np.integer) or not np.any((arr != 0) & (arr != 1)))
    )
    if not ok:
        try:
            check_label_array(np.ravel(arr, order="K"), path)  # raises InputError naming the values
        except InputError as exc:
            raise InputError(path, f"{exc.problem} (use --label N to evaluate label N of a multi-label map)") from None
        raise InputError(path, "label must be binary (0/1)")
    return arr.astype(bool), affine


def _load_pair(pred_path: Path, truth_path: Path, label: int | None = None):
    truth, t_aff = _load_mask(truth_path, label)
    pred, p_aff = _load_mask(pred_path, label)
    # same grid, or the same voxel centres in another axis order / direction (lossless); else refused
    pred = reorient_to_grid(pred, p_aff, truth.shape, t_aff, pred_path, truth_path)
    return pred, truth, t_aff


def _slice_axis(affine) -> int:
    from shared_transforms.flip import si_axis

    return int(si_axis(affine))


def _precheck(pairs: Sequence[tuple[str, Path, Path]]) -> None:
    """Check every pair's grid from the NIfTI headers before any computation (fail early, cheaply)."""
    import nibabel as nib

    def header(path: Path):
        if not Path(path).exists():
            raise InputError(path, "file does not exist")
        try:
            img = nib.load(str(path))
            return tuple(img.shape), np.asarray(img.affine, dtype=float)
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc

    for case, pred_path, truth_path in pairs:
        t_shape, t_aff = header(truth_path)
        p_shape, p_aff = header(pred_path)
        try:
            check_same_grid(t_shape[:3], t_aff, p_shape[:3], p_aff, truth_path, pred_path)
        except InputError:
            if lossless_reorientation(p_shape[:3], p_aff, t_shape[:3], t_aff) is None:
                reorient_to_grid(np.empty(p_shape[:3], bool), p_aff, t_shape[:3], t_aff, pred_path, truth_path)


def evaluate_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    *,
    images: Mapping[str, Path] | None = None,
    penalty="diagonal",
    nsd_tolerance_mm: float = 1.0,
    overlay_dir=None,
    inputs: Sequence = (),
    progress: bool = True,
    desc: str = "evaluate",
    metrics_only: Sequence[str] | None = None,
    label: int | None = None,
    hd95: str = DEFAULT_HD95,
) -> list[dict]:
    """Metrics of ``(case_id, pred_path, truth_path)`` pairs, one record per case.

    All grids are checked from the headers first. With ``overlay_dir``, each case's overlay PNG is
    written as soon as the case is computed (volumes are not kept in memory), on the image of
    ``images[case]`` when given (an unreadable image or one on another grid only loses the
    background, with a warning).
    """
    from tqdm.auto import tqdm

    _precheck(pairs)
    names = overlay_names([case for case, _, _ in pairs]) if overlay_dir is not None else {}
    records = []
    for case, pred_path, truth_path in tqdm(pairs, desc=desc, unit="case", disable=not progress):
        pred, truth, affine = _load_pair(pred_path, truth_path, label)
        m = compute_case_metrics(
            pred, truth, spacing_from_affine(affine), slice_axis=_slice_axis(affine), penalty=penalty, nsd_tolerance_mm=nsd_tolerance_mm,
            hd95=hd95,
        )
        rec = {"case_id": case, **m, "pred": str(pred_path), "truth": str(truth_path)}
        if metrics_only is not None:
            drop = set(METRICS) - set(metrics_only)
            if "slice_recall" not in metrics_only:
                drop |= {"slices_both", "slices_pred", "slices_truth"}
            rec = {k: v for k, v in rec.items() if k not in drop}
        records.append(rec)
        if overlay_dir is not None:
            from .figures import overlay_png

            image = None
            if images and case in images:
                try:  # the image is only a background: a problem with it costs the background, not the case
                    image, i_aff = load_nifti(images[case], allow_nan=True)
                    check_same_grid(truth.shape, affine, image.shape, i_aff, truth_path, images[case])
                except InputError as exc:
                    warnings.warn(f"overlay of case {case} drawn without image: {exc}", stacklevel=2)
                    image = None
            overlay_png(Path(overlay_dir) / f"{names[case]}.png", truth, pred, affine, image=image,
                        title=f"{case}: DSC {m['dsc']:.3f}, HD95 {m['hd95']:.1f} mm", inputs=inputs)
    return records


def _match_with_fallback(preds, labels, pred, truth, by_label_file: bool):
    """Match by case id; for a dataset.json also by the label files' names (predictions of other tools)."""
    try:
        return match_cases(preds, labels, pred, truth), labels
    except InputError as first:
        if not by_label_file:
            raise
        by_file = {case_key(path): path for path in labels.values()}
        if len(by_file) != len(labels) or set(by_file) == set(labels):
            raise
        try:
            return match_cases(preds, by_file, pred, truth), by_file
        except InputError:
            raise first from None


def evaluate_folders(
    pred,
    truth,
    out,
    *,
    images=None,
    section: str = "test",
    penalty="diagonal",
    figures: bool = True,
    progress: bool = True,
    nsd_tolerance_mm: float = 1.0,
    label: int | None = None,
    hd95: str = DEFAULT_HD95,
    overwrite: bool = False,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
) -> dict:
    """Evaluate a folder of NIfTI predictions against ground truth and write the report.

    Args:
        pred: folder of predicted masks (searched recursively), matched to the truth by case id
            (:func:`case_key`; for a dataset.json, its entries' ``case_id``, else the label's name).
        truth: folder of true masks, or a Decathlon ``dataset.json`` whose ``section`` list gives
            the label (and image) paths.
        out: report folder; must not be inside ``pred`` or ``truth``.
        images: folder of images for the overlays, matched by case id (optional; by default a
            dataset.json's own images are used).
        section: dataset.json list to evaluate.
        penalty: distance for cases with exactly one empty mask: ``"diagonal"`` (image diagonal
            in mm) or a number of mm.
        figures: write box plots and per-case overlays.
        progress: show a tqdm progress bar.
        nsd_tolerance_mm: normalised surface Dice tolerance (SegRap2023: 1 mm).
        label: evaluate the structure ``array == label`` of multi-label maps (both sides);
            default: masks must be binary 0/1.
        hd95: HD95 definition, one of :data:`~npc_gtv.evaluation.metrics.HD95_DEFINITIONS`
            (default ``max_directed``); recorded in the report.
        overwrite: replace an earlier report in ``out`` (default: refuse).
        group_by: with a ``dataset.json`` whose ``case_info`` lists these case attributes, the
            summary also holds the statistics per value (``summary["groups"]``, see
            :func:`group_summaries`; default: ``crosses_midline``, which the phantoms record).

    Returns:
        the summary dict (as written to ``out/summary.json``).

    Raises:
        InputError: missing/unmatched/duplicate cases, pairs on different grids, non-binary masks,
            unreadable files, ``out`` inside an input folder, or an earlier report in ``out``.
        OSError: writing failed (no partial report is left).
    """
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {', '.join(HD95_DEFINITIONS)}, got {hd95!r}")
    pred, truth = Path(pred), Path(truth)
    labels, imgs, names = load_truth_cases(truth, section=section, images=images)
    # never write into an input folder: the predictions, the truth folder (for a dataset.json: the
    # folders of its label files, not the json's whole parent), the image folder
    truth_dirs = sorted({str(p.parent) for p in labels.values()}) if truth.is_file() else [truth]
    out = _check_out(out, [pred, *truth_dirs, images])
    check_report_folder(out, overwrite)  # before any computation
    preds = _index(find_niftis(pred), "prediction", pred)
    if not preds:
        raise InputError(pred, "no NIfTI predictions (.nii / .nii.gz) found")
    keys, matched = _match_with_fallback(preds, labels, pred, truth, truth.is_file())
    if matched is not labels:  # matched by label file names: carry names and images over
        by_path = {str(v): k for k, v in labels.items()}
        names = {k: names[by_path[str(v)]] for k, v in matched.items()}
        imgs = {k: imgs[by_path[str(v)]] for k, v in matched.items() if by_path[str(v)] in imgs}
        labels = matched
    pairs = [(names[k], preds[k], labels[k]) for k in keys]
    img_by_name = {names[k]: imgs[k] for k in keys if k in imgs}
    protected = [pred, truth] + ([images] if images else [])
    info = {"pred": str(pred), "truth": str(truth), "penalty": penalty, "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "hd95_definition": hd95}
    if label is not None:
        info["label"] = int(label)
    if truth.suffix.lower() == ".json":
        info["section"] = section
    with report_stage(out, overwrite) as stage:
        records = evaluate_pairs(
            pairs, images=img_by_name, penalty=penalty, nsd_tolerance_mm=nsd_tolerance_mm,
            overlay_dir=(stage / "figures" / "overlays") if figures else None, inputs=protected, progress=progress,
            label=label, hd95=hd95,
        )
        groups = group_summaries(records, _case_info(truth), group_by) if group_by else None
        return _write_report_files(records, stage, metrics=METRICS, title="Evaluation", info=info, figures=figures,
                                   overlays=None, bar_plots=False, inputs=protected, groups=groups)


def _case_info(truth: Path) -> dict:
    """A ``dataset.json``'s ``case_info`` (case id -> attributes), or nothing for a folder / without one."""
    if not truth.is_file() or truth.suffix.lower() != ".json":
        return {}
    info = json.loads(truth.read_text()).get("case_info")
    return {str(k): v for k, v in info.items() if isinstance(v, Mapping)} if isinstance(info, Mapping) else {}


def agreement_folders(rater_a, rater_b, out, *, figures: bool = True, progress: bool = True, all_metrics: bool = False,
                      label: int | None = None, overwrite: bool = False) -> dict:
    """Inter-rater agreement: Dice and Jaccard (IoU) per case between two raters' mask folders.

    Rater B is taken as the reference grid (the metrics used are symmetric). With
    ``all_metrics=True`` every metric of :data:`METRICS` is reported, with rater B as "truth".
    ``overwrite`` replaces an earlier report in ``out`` (default: refuse).
    """
    a, b = Path(rater_a), Path(rater_b)
    out = _check_out(out, [a, b])
    check_report_folder(out, overwrite)
    files_a = _index(find_niftis(a), "mask of rater A", a)
    files_b = _index(find_niftis(b), "mask of rater B", b)
    if not files_a:
        raise InputError(a, "no NIfTI masks found")
    keys = match_cases(files_a, files_b, a, b)
    metrics = METRICS if all_metrics else AGREEMENT_METRICS
    records = evaluate_pairs([(k, files_a[k], files_b[k]) for k in keys], progress=progress, desc="agreement",
                             metrics_only=metrics, label=label)
    for r in records:
        r["rater_a"] = r.pop("pred")
        r["rater_b"] = r.pop("truth")
    info = {"rater_a": str(a), "rater_b": str(b)}
    if all_metrics:
        info["hd95_definition"] = DEFAULT_HD95
    return write_report(records, out, metrics=metrics, title="Inter-rater agreement", info=info, figures=figures,
                        bar_plots=True, inputs=[a, b], overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# comparing runs
# ----------------------------------------------------------------------------------------------
def read_metrics_csv(run) -> tuple[str, dict[str, dict[str, float]]]:
    """Read an evaluation output (folder with ``metrics.csv``, or the csv itself).

    Returns:
        ``(run name, {case_id: {metric: value}})``.
    """
    run = Path(run)
    path = run / "metrics.csv" if run.is_dir() else run
    if not path.exists():
        raise InputError(run, "has no metrics.csv (expected an `npc-gtv evaluate` output folder)")
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, csv.Error) as exc:
        raise InputError(path, f"cannot be read as CSV ({exc})") from exc
    if not rows or "case_id" not in rows[0]:
        raise InputError(path, "has no 'case_id' column or no rows")
    cases: dict[str, dict[str, float]] = {}
    for row in rows:
        values = {}
        for k, v in row.items():
            if k in METRICS:
                try:
                    values[k] = float(v)
                except (TypeError, ValueError):
                    raise InputError(path, f"case {row['case_id']!r}: {k} = {v!r} is not a number") from None
        if row["case_id"] in cases:
            raise InputError(path, f"duplicate case {row['case_id']!r}")
        cases[row["case_id"]] = values
    name = (path.parent.name if run.is_dir() or path.name == "metrics.csv" else path.stem) or str(path)
    return name, cases


def _wilcoxon(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import wilcoxon

    d = x - y
    if d.size == 0:
        return float("nan"), float("nan")
    if np.all(d == 0):
        return 0.0, 1.0
    res = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def compare_runs(runs: Sequence, *, metric: str = "dsc", alpha: float = 0.05) -> dict:
    """Side-by-side statistics of several runs and paired Wilcoxon signed-rank tests on ``metric``.

    Each pair of runs is tested on the cases both contain (two-sided, ``zero_method="wilcox"``:
    zero differences are dropped, as in the classical test; identical runs give p = 1).

    Returns:
        ``{"runs": [names], "metrics": {metric: {run: stats}}, "tests": [{"a", "b", "metric",
        "n", "statistic", "p", "significant"}]}``.
    """
    if len(runs) < 2:
        raise ValueError("compare needs at least two evaluation outputs")
    loaded = [read_metrics_csv(r) for r in runs]
    names, seen = [], {}
    for (name, _), run in zip(loaded, runs):
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
        names.append(name)
    data = {n: cases for n, (_, cases) in zip(names, loaded)}
    present = [m for m in METRICS if any(m in v for cases in data.values() for v in cases.values())]
    if metric not in present:
        raise InputError(runs[0], f"metric {metric!r} not found in the metrics.csv files")
    table = {m: {n: _stats([v[m] for v in data[n].values() if m in v]) for n in names} for m in present}
    tests = []
    for a, b in combinations(names, 2):
        common = sorted(set(data[a]) & set(data[b]))
        x = np.array([data[a][c][metric] for c in common], dtype=float)
        y = np.array([data[b][c][metric] for c in common], dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        stat, p = _wilcoxon(x[ok], y[ok])
        tests.append({"a": a, "b": b, "metric": metric, "n": int(ok.sum()), "statistic": stat, "p": p,
                      "only_a": len(set(data[a]) - set(data[b])), "only_b": len(set(data[b]) - set(data[a])),
                      "significant": bool(math.isfinite(p) and p < alpha),
                      "mean_difference": float(np.mean(x[ok] - y[ok])) if ok.any() else float("nan")})
    return {"runs": names, "paths": [str(r) for r in runs], "metrics": table, "tests": tests, "alpha": alpha}


def _compare_markdown(result: Mapping) -> str:
    names = result["runs"]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m, by_run in result["metrics"].items():
        cells = []
        for n in names:
            s = by_run[n]
            cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} (median {_fmt(s['median'])}, n={s['n']})")
        unit = f" ({UNITS[m]})" if m in UNITS else ""
        lines.append(f"| {m}{unit} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired Wilcoxon signed-rank tests on {result['tests'][0]['metric'] if result['tests'] else 'dsc'} "
              f"(* = p < {result['alpha']}):", "", "| A | B | n | mean(A-B) | p |", "|---|---|---|---|---|"]
    notes = []
    for t in result["tests"]:
        star = " *" if t["significant"] else ""
        p = "n/a" if not math.isfinite(t["p"]) else f"{t['p']:.4g}"
        lines.append(f"| {t['a']} | {t['b']} | {t['n']} | {_fmt(t['mean_difference'])} | {p}{star} |")
        if t.get("only_a") or t.get("only_b"):
            notes.append(f"- {t['a']} vs {t['b']}: tested on the {t['n']} shared cases; {t['only_a']} case(s) only in "
                         f"{t['a']}, {t['only_b']} only in {t['b']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def evaluate_command(pred: str, truth: str, out: str, images: str | None = None, section: str = "test", penalty="diagonal",
                     figures: bool = True, progress: bool = True, nsd_tolerance_mm: float = 1.0, label=None,
                     hd95: str = DEFAULT_HD95, overwrite: bool = False) -> None:
    """Evaluate predicted NIfTI masks against ground truth (DSC, IoU, HD95, ASSD, NSD ... in mm).

    Args:
        pred: folder of predicted masks (searched recursively; files matched by case id).
        truth: folder of true masks, or a Decathlon dataset.json.
        out: report folder (metrics.csv, summary.json, summary.md, figures/); not inside an input.
        images: folder of images for the overlay figures (default: a dataset.json's images).
        section: dataset.json list to use (default test).
        penalty: distance for one-empty-mask cases: "diagonal" (image diagonal, mm) or a number (mm).
        figures: write box plots and per-case overlays.
        progress: show a progress bar.
        nsd_tolerance_mm: tolerance of the normalised surface Dice (mm).
        label: evaluate label N of multi-label maps (default: masks must be binary 0/1).
        hd95: HD95 definition: max_directed (default: larger of the two directed 95th percentiles over
            surface-voxel centres), deepmind (surface-area weighted, DeepMind surface-distance) or
            medpy (95th percentile of both directions pooled, medpy.metric.hd95); see docs/evaluation.md.
        overwrite: replace an earlier report in OUT (default: refuse).
    """
    try:
        summary = evaluate_folders(pred, truth, out, images=images, section=section, penalty=penalty, figures=figures,
                                   progress=progress, nsd_tolerance_mm=nsd_tolerance_mm, label=label, hd95=hd95,
                                   overwrite=overwrite)
    except InputError as exc:
        raise SystemExit(f"npc-gtv evaluate: error: {exc}") from None
    print((Path(out) / "summary.md").read_text())
    print(f"HD95 definition: {hd95} ({HD95_DEFINITIONS[hd95]})")
    print(f"wrote {Path(out) / 'metrics.csv'} ({summary['n_cases']} cases), summary.json, summary.md"
          + (", figures/" if figures else ""))


def compare_command(*runs: str, out: str | None = None, metric: str = "dsc", alpha: float = 0.05, overwrite: bool = False) -> None:
    """Compare several evaluation outputs side by side, with paired Wilcoxon tests on DSC.

    Args:
        runs: two or more `npc-gtv evaluate` output folders (or their metrics.csv files).
        out: optional folder for compare.md, compare.json and box plots per metric.
        metric: metric of the paired tests (default dsc).
        alpha: significance level for the * mark (default 0.05).
        overwrite: replace an earlier comparison in OUT (default: refuse).
    """
    try:
        result = compare_runs(list(runs), metric=metric, alpha=alpha)
        if out is not None:
            out = _check_out(out, [Path(r) if Path(r).is_dir() else Path(r).parent for r in runs])
            present = [n for n in ("compare.md", "compare.json", "figures") if (Path(out) / n).exists()]
            if present and not overwrite:
                raise InputError(out, f"already holds a comparison ({', '.join(present)}); refusing to overwrite it "
                                      "(--overwrite replaces it, or choose another --out)")
    except (InputError, ValueError) as exc:
        raise SystemExit(f"npc-gtv compare: error: {exc}") from None
    text = _compare_markdown(result)
    print(text)
    if out is not None:
        from .figures import box_plot

        out.mkdir(parents=True, exist_ok=True)
        stage = make_temp_dir(out, ".compare.")
        try:
            _write_text(stage / "compare.md", "# Comparison\n\n" + text)
            _write_text(stage / "compare.json", json.dumps(_json_safe(result), indent=2) + "\n")
            for m in result["metrics"]:
                values = {}
                for n, r in zip(result["runs"], runs):
                    _, cases = read_metrics_csv(r)
                    values[n] = [v[m] for v in cases.values() if m in v]
                box_plot(values, m, stage / "figures" / f"box_{m}.png")
            if (out / "figures").exists():
                shutil.rmtree(out / "figures")
            for name in ("compare.md", "compare.json", "figures"):
                os.replace(stage / name, out / name)
            fsync_path(out, directory=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        print(f"wrote {out / 'compare.md'}, compare.json, figures/")


def agreement_command(rater_a: str, rater_b: str, out: str, figures: bool = True, progress: bool = True, all_metrics: bool = False,
                      label=None, overwrite: bool = False) -> None:
    """Inter-rater agreement (Dice and Jaccard per case) between two folders of masks.

    Args:
        rater_a: folder of rater A's masks.
        rater_b: folder of rater B's masks (same cases, same grids).
        out: report folder (metrics.csv, summary.json, summary.md, figures/).
        figures: write box plots and per-case bar charts.
        progress: show a progress bar.
        all_metrics: report every evaluation metric instead of Dice and Jaccard only.
        label: compare label N of multi-label maps (default: masks must be binary 0/1).
        overwrite: replace an earlier report in OUT (default: refuse).
    """
    try:
        summary = agreement_folders(rater_a, rater_b, out, figures=figures, progress=progress, all_metrics=all_metrics,
                                    label=label, overwrite=overwrite)
    except InputError as exc:
        raise SystemExit(f"npc-gtv agreement: error: {exc}") from None
    print((Path(out) / "summary.md").read_text())
    print(f"wrote {Path(out) / 'metrics.csv'} ({summary['n_cases']} cases)")
