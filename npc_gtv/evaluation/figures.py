"""Report figures: one box plot per metric and per-case overlays of truth and prediction outlines.

Matplotlib is used through :class:`matplotlib.figure.Figure` with the Agg canvas directly, so the
global backend is never touched (safe in servers, tests and bundle runs without a display).

Overlays show three orthogonal planes through the centre of the true tumour (the prediction's
centre when the truth is empty, the volume centre when both are), reoriented to RAS from the
affine and displayed in radiological convention (patient's right on the viewer's left, anterior
up in axial, superior up in coronal and sagittal) with millimetre axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from shared_transforms.io import atomic_write

from .metrics import UNITS

__all__ = ["TRUTH_COLOUR", "PRED_COLOUR", "box_plot", "box_plots", "case_bar_plot", "overlay_png", "display_window"]

TRUTH_COLOUR = "#00d000"  # green
PRED_COLOUR = "#ff2020"  # red


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, inputs: Sequence = ()) -> Path:
    path = Path(path)
    with atomic_write(path, inputs=inputs) as tmp:
        fig.savefig(str(tmp), format="png")
    return path


def _label(metric: str) -> str:
    unit = UNITS.get(metric)
    return f"{metric} ({unit})" if unit else metric


def box_plot(values: Mapping[str, Sequence[float]], metric: str, path, *, title: str | None = None) -> Path:
    """Box plot of one metric for one or several runs.

    Args:
        values: run name -> per-case values (NaN values are left out of the box and counted in
            the tick label).
        metric: metric name (axis label).
        path: output PNG.
        title: figure title (default: the metric).

    Returns:
        the PNG path.
    """
    names = list(values)
    if not names:
        raise ValueError("box_plot needs at least one run")
    data, labels = [], []
    for name in names:
        arr = np.asarray(values[name], dtype=float)
        ok = arr[np.isfinite(arr)]
        data.append(ok if ok.size else np.array([np.nan]))
        n_bad = arr.size - ok.size
        labels.append(f"{name}\n(n={ok.size}{', ' + str(n_bad) + ' undefined' if n_bad else ''})")
    fig = _new_figure(max(3.0, 1.6 * len(names) + 1.2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(labels, fontsize=8)
    for i, d in enumerate(data, start=1):
        d = d[np.isfinite(d)]
        if d.size:
            jitter = np.linspace(-0.12, 0.12, d.size) if d.size > 1 else np.zeros(1)
            ax.plot(i + jitter, d, "o", ms=3, alpha=0.5, color="0.3")
    ax.set_ylabel(_label(metric))
    ax.set_title(title or metric)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def box_plots(records: Sequence[Mapping], metrics: Sequence[str], out_dir, *, run_name: str = "cases") -> list[Path]:
    """Write ``box_<metric>.png`` for every metric of per-case ``records`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = []
    for metric in metrics:
        vals = [float(r[metric]) for r in records]
        paths.append(box_plot({run_name: vals}, metric, out_dir / f"box_{metric}.png"))
    return paths


def case_bar_plot(records: Sequence[Mapping], metric: str, path, *, title: str | None = None) -> Path:
    """Per-case bar chart of one metric (as the data-set paper's inter-rater Figs. 2-3)."""
    ids = [str(r["case_id"]) for r in records]
    vals = np.asarray([float(r[metric]) for r in records], dtype=float)
    fig = _new_figure(max(4.0, 0.35 * len(ids) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(ids)), np.nan_to_num(vals, nan=0.0), color="#4c72b0")
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(ids, rotation=90, fontsize=7)
    ax.set_ylabel(_label(metric))
    finite = vals[np.isfinite(vals)]
    if finite.size:
        ax.axhline(float(finite.mean()), color="k", lw=1, ls="--", label=f"mean {finite.mean():.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or metric)
    fig.tight_layout()
    return _save(fig, path)


def display_window(image: np.ndarray) -> tuple[float, float]:
    """Grey-level window: soft-tissue CT window (W 400, L 40 HU) for CT-like data, else 1-99 %."""
    img = np.asarray(image, dtype=float)
    lo, hi = np.percentile(img, [1, 99])
    if img.min() < -500:  # Hounsfield units (air at -1000)
        return -160.0, 240.0
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _to_ras(arr: np.ndarray, affine: np.ndarray):
    from nibabel.orientations import apply_orientation, io_orientation

    ornt = io_orientation(np.asarray(affine, dtype=float))
    return apply_orientation(arr, ornt), ornt


def overlay_png(
    path,
    truth: np.ndarray,
    pred: np.ndarray,
    affine,
    *,
    image: np.ndarray | None = None,
    title: str = "",
    inputs: Sequence = (),
) -> Path:
    """Axial, coronal and sagittal planes through the tumour centre with both outlines.

    Args:
        path: output PNG.
        truth: binary truth ``(X, Y, Z)``.
        pred: binary prediction ``(X, Y, Z)`` on the same grid.
        affine: 4x4 voxel-to-RAS affine of the grid.
        image: optional image ``(X, Y, Z)`` on the same grid shown in grey (CT: W 400 / L 40 HU).
        title: figure title (case id and e.g. its DSC).
        inputs: paths that must never be written.

    Returns:
        the PNG path.
    """
    from matplotlib.lines import Line2D

    from .metrics import spacing_from_affine

    truth = np.asarray(truth) > 0
    pred = np.asarray(pred) > 0
    if truth.shape != pred.shape or truth.ndim != 3:
        raise ValueError(f"truth and pred must be 3D of one shape, got {truth.shape} and {pred.shape}")
    if image is not None and np.asarray(image).shape != truth.shape:
        raise ValueError(f"image shape {np.asarray(image).shape} differs from mask shape {truth.shape}")
    sp = np.asarray(spacing_from_affine(affine))
    t_ras, ornt = _to_ras(truth, affine)
    p_ras, _ = _to_ras(pred, affine)
    sp_ras = np.empty(3)
    for i in range(3):
        sp_ras[int(ornt[i, 0])] = sp[i]
    if image is not None:
        img_ras, _ = _to_ras(np.asarray(image, dtype=np.float32), affine)
        vmin, vmax = display_window(img_ras)
    else:
        img_ras, (vmin, vmax) = None, (0.0, 1.0)
    ref = t_ras if t_ras.any() else p_ras
    if ref.any():
        centre = np.round(np.argwhere(ref).mean(axis=0)).astype(int)
    else:
        centre = np.asarray(t_ras.shape) // 2
    nx, ny, nz = t_ras.shape
    planes = [
        ("axial", lambda a: a[:, :, centre[2]], (0, 1)),
        ("coronal", lambda a: a[:, centre[1], :], (0, 2)),
        ("sagittal", lambda a: a[centre[0], :, :], (1, 2)),
    ]
    fig = _new_figure(12.0, 4.6)
    for k, (name, take, (ha, va)) in enumerate(planes):
        ax = fig.add_subplot(1, 3, k + 1)
        extent = (0.0, t_ras.shape[ha] * sp_ras[ha], 0.0, t_ras.shape[va] * sp_ras[va])
        if img_ras is not None:
            ax.imshow(take(img_ras).T, cmap="gray", origin="lower", extent=extent, vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            ax.imshow(np.zeros((t_ras.shape[va], t_ras.shape[ha])), cmap="gray", origin="lower", extent=extent, vmin=0, vmax=1)
        for mask, colour in ((t_ras, TRUTH_COLOUR), (p_ras, PRED_COLOUR)):
            sl = take(mask).T.astype(float)
            if sl.any():
                # contour coordinates are voxel centres in mm
                xs = (np.arange(sl.shape[1]) + 0.5) * sp_ras[ha]
                ys = (np.arange(sl.shape[0]) + 0.5) * sp_ras[va]
                ax.contour(xs, ys, sl, levels=[0.5], colors=[colour], linewidths=1.2)
        if name in ("axial", "coronal"):
            ax.invert_xaxis()  # radiological: patient's right on the viewer's left
        if name == "sagittal":
            ax.invert_xaxis()  # anterior on the left
        index = {"axial": centre[2], "coronal": centre[1], "sagittal": centre[0]}[name]
        ax.set_title(f"{name} (slice {int(index)})", fontsize=9)
        ax.set_xlabel("mm", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_aspect("equal")
    handles = [Line2D([], [], color=TRUTH_COLOUR, lw=2, label="truth"), Line2D([], [], color=PRED_COLOUR, lw=2, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save(fig, path, inputs)

