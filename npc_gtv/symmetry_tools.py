"""``npc-gtv symmetrize`` and ``npc-gtv make-atlas``: symmetric (mid-sagittal) alignment of one volume.

``symmetrize`` aligns a CT (or an MRI sequence) so that the head's mid-sagittal plane is the
central sagittal plane of the output grid, atlas-free by default or to a symmetric atlas with
``--atlas``; it writes the aligned volume (and optionally the aligned label) and a JSON report.
``make-atlas`` turns one chosen CT into a symmetric atlas for the atlas mode.
See :mod:`shared_transforms.symmetry` for the method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from shared_transforms.io import InputError, atomic_write, ensure_not_input, load_label, load_nifti, save_nifti

__all__ = ["symmetrize_command", "make_atlas_command"]


def _cast_like(array: np.ndarray, dtype) -> np.ndarray:
    """Cast a resampled float volume back to the input's dtype (integers are rounded and clipped)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(np.float32 if dtype.itemsize <= 4 else dtype)


def _write_report(path, report: dict, inputs, overwrite: bool = False) -> None:
    with atomic_write(path, inputs=inputs, overwrite=overwrite) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")


def _refuse_existing(paths, overwrite: bool) -> None:
    """One overwrite rule for every command: existing outputs are refused (before any work) unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if path and Path(path).exists():
            raise InputError(path, "already exists; refusing to overwrite (--overwrite replaces it, or choose another output)")


def _summary(rep: dict) -> str:
    rot = rep["rotation_deg"]
    return (
        f"{rep['case']}: {rep['mode']}, plane yaw {rep['plane_yaw_deg']:+.2f} deg, roll {rep['plane_roll_deg']:+.2f} deg; "
        f"applied rotation (pitch, roll, yaw) = ({rot['pitch_lr_axis']:+.2f}, {rot['roll_ap_axis']:+.2f}, "
        f"{rot['yaw_si_axis']:+.2f}) deg, translation {rep['translation_mm']} mm; {rep['metric']} = {rep['final_metric']:.4f}; "
        f"asymmetry {rep['asymmetry_before']:.2f} -> {rep['asymmetry_after']:.2f} (x{rep['asymmetry_ratio']:.2f}); "
        f"{'OK' if rep['ok'] else 'FAILED'} in {rep['runtime_s']:.1f} s"
    )


def symmetrize_command(
    input: str,
    output: str,
    atlas: str | None = None,
    report: str | None = None,
    label: str | None = None,
    label_output: str | None = None,
    metric: str | None = None,
    atlas_transform: str = "affine",
    output_affine: str = "grid",
    on_failure: str = "raise",
    working_spacing_mm: float = 4.0,
    max_angle_deg: float = 25.0,
    overwrite: bool = False,
) -> None:
    """Make one head CT/MRI volume bilaterally symmetric about its grid's central sagittal plane.

    Args:
        input: NIfTI volume (CT in HU or one MRI sequence).
        output: aligned volume (same dtype as the input; atlas-free: input grid, atlas: atlas grid).
        atlas: symmetric atlas NIfTI (from ``npc-gtv make-atlas``); omit for the atlas-free mode.
        report: JSON report path (angles, translation, metric, asymmetry before/after, ok flag).
        label: optional binary mask on the input grid, resampled with nearest neighbour.
        label_output: where to write the aligned label (required with ``--label``).
        metric: ``correlation`` (atlas-free default), ``mattes`` (atlas default) or ``meansquares``.
        atlas_transform: atlas mode: ``affine`` (rigid then affine, default) or ``rigid``.
        output_affine: ``grid`` (output keeps the grid's affine, default) or ``physical`` (scanner position).
        on_failure: ``raise`` (default: report written, no volume, exit status 1) or ``warn``
            (write the volume anyway, flagged in the report).
        working_spacing_mm: voxel size of the down-sampled copy the registration runs on.
        max_angle_deg: a plane tilted more than this from the grid's sagittal plane is a failure.
        overwrite: replace existing outputs (default: refuse, before any work).
    """
    try:
        _symmetrize(input, output, atlas, report, label, label_output, metric, atlas_transform, output_affine,
                    on_failure, working_spacing_mm, max_angle_deg, overwrite)
    except InputError as exc:  # bad input: one clear line naming the file, exit status 1
        print(f"npc-gtv symmetrize: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _symmetrize(input, output, atlas, report, label, label_output, metric, atlas_transform, output_affine,
                on_failure, working_spacing_mm, max_angle_deg, overwrite=False) -> None:
    from shared_transforms.symmetry import apply_symmetry, estimate_symmetry

    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")
    if output_affine not in ("grid", "physical"):
        raise ValueError(f"output_affine must be 'grid' or 'physical', got {output_affine!r}")
    if (label is None) != (label_output is None):
        raise ValueError("--label and --label_output go together")
    inputs = [p for p in (input, atlas, label) if p]
    for out_path in (output, label_output, report):
        if out_path:
            ensure_not_input(out_path, inputs)  # before any work
    _refuse_existing((output, label_output, report), overwrite)
    arr, aff = load_nifti(input)
    lab = None
    if label is not None:
        lab, _ = load_label(label, reference=input, reference_affine=aff, reference_shape=arr.shape)
    result = estimate_symmetry(arr.astype(np.float32), aff, atlas=atlas, case=str(input), metric=metric,
                               atlas_transform=atlas_transform, working_spacing_mm=working_spacing_mm,
                               max_angle_deg=max_angle_deg)
    rep = result.report()
    rep.update({"input": str(input), "output": str(output), "atlas": atlas, "output_affine": output_affine})
    for w in result.warnings:
        print(f"warning: {input}: {w}", file=sys.stderr)
    if report:
        _write_report(report, rep, inputs, overwrite)
    print(_summary(rep))
    if not result.ok:
        msg = f"{input}: symmetric registration failed: {'; '.join(result.problems)}"
        if on_failure == "raise":
            print(f"npc-gtv symmetrize: {msg} (no output written; --on_failure warn writes it anyway)", file=sys.stderr)
            raise SystemExit(1)
        print(f"warning: {msg}; writing the output anyway (--on_failure warn)", file=sys.stderr)
    out_aff = result.output_affine if output_affine == "grid" else result.transform @ result.output_affine
    moved = apply_symmetry(arr, result.transform, aff, result.output_shape, result.output_affine, "bilinear",
                           cval=float(arr.min()))
    save_nifti(_cast_like(moved, arr.dtype), out_aff, output, inputs=inputs, overwrite=overwrite)
    print(f"wrote {output}")
    if lab is not None:
        moved_lab = apply_symmetry(lab, result.transform, aff, result.output_shape, result.output_affine, "nearest")
        save_nifti(moved_lab.astype(np.uint8), out_aff, label_output, inputs=inputs + [output], overwrite=overwrite)
        print(f"wrote {label_output}")
    if report:
        print(f"wrote {report}")


def make_atlas_command(input: str, output: str, report: str | None = None, working_spacing_mm: float = 4.0,
                       overwrite: bool = False) -> None:
    """Build a symmetric atlas from one CT: align it to its own mirror, then average it with its mirror.

    Choose a CT without large asymmetric disease or artefacts, with the whole head in view.

    Args:
        input: the chosen CT (NIfTI, HU).
        output: atlas NIfTI (same grid and dtype as the input), exactly symmetric about its grid's
            central sagittal plane; pass it to ``npc-gtv symmetrize --atlas`` or ``SymmetricAlignd(atlas=...)``.
        report: optional JSON report of the alignment.
        working_spacing_mm: voxel size of the down-sampled copy the registration runs on.
        overwrite: replace existing outputs (default: refuse, before any work).
    """
    from shared_transforms.symmetry import SymmetryError, make_symmetric_atlas

    try:
        ensure_not_input(output, [input])
        _refuse_existing((output, report), overwrite)
        arr, aff = load_nifti(input)
        atlas, atlas_aff, result = make_symmetric_atlas(arr.astype(np.float32), aff, case=str(input),
                                                        working_spacing_mm=working_spacing_mm)
    except (SymmetryError, InputError) as exc:
        print(f"npc-gtv make-atlas: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    rep = result.report()
    rep.update({"input": str(input), "output": str(output), "atlas": True})
    print(_summary(rep))
    save_nifti(_cast_like(atlas, arr.dtype), atlas_aff, output, inputs=[input], overwrite=overwrite)
    print(f"wrote {output}")
    if report:
        _write_report(report, rep, [input, output], overwrite)
        print(f"wrote {report}")
