"""Benchmark: per-case metrics of a full-size CT case with and without the union-bounding-box crop.

Builds a 512 x 512 x 130 case (0.98 x 0.98 x 3 mm, LPS-like grid) with an irregular GTV-sized
truth and a prediction that is shifted, eroded on one side and has a small false-positive blob,
then times :func:`npc_gtv.evaluation.metrics.compute_case_metrics` on one CPU thread with
``crop=True`` (the default) and ``crop=False`` (the same computation on the whole volume), checks
that both give identical values, and prints the times and their ratio. It also times the worst
case for the crop (a false positive in the far corner of the volume, so the union box is large)
and optionally the whole per-case evaluation from gzipped NIfTI files (reading included).

Usage::

    OMP_NUM_THREADS=1 python bench/bench_metrics.py            # cropped vs uncropped
    OMP_NUM_THREADS=1 python bench/bench_metrics.py --repeats 5 --with-io

Exit status 1 when the values differ or the cropped case takes longer than ``--budget`` s (2 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def make_case(shape=(512, 512, 130), spacing=(0.98, 0.98, 3.0), seed=0):
    """Truth and prediction masks ``(X, Y, Z)`` of a nasopharynx-sized tumour (~20 ml)."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    rng = np.random.default_rng(seed)
    centre = np.array([256, 230, 70])
    radii_mm = np.array([22.0, 18.0, 15.0])
    half = np.ceil(radii_mm / np.asarray(spacing) * 1.6).astype(int)
    lo, hi = centre - half, centre + half
    axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / radii_mm[0]) ** 2 + (y / radii_mm[1]) ** 2 + (z / radii_mm[2]) ** 2)
    noise = gaussian_filter(rng.standard_normal(r.shape), 3.0)
    blob = r + 1.5 * noise < 1.0
    truth = np.zeros(shape, dtype=bool)
    truth[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = blob
    pred = np.zeros(shape, dtype=bool)
    pred[lo[0] + 3:hi[0] + 3, lo[1]:hi[1], lo[2] + 1:hi[2] + 1] = blob  # shifted 3 voxels / 1 slice
    pred = binary_dilation(pred, iterations=1) if pred.sum() < truth.sum() else pred
    pred[:, : centre[1] - 10, :] &= truth[:, : centre[1] - 10, :] | (rng.random() > 2)  # under-segment one side
    pred[300:306, 150:156, 40:42] = True  # false-positive blob elsewhere
    return pred, truth, tuple(float(s) for s in spacing)


def _time(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds allowed for the cropped case")
    parser.add_argument("--with-io", action="store_true", help="also time reading two .nii.gz files")
    parser.add_argument("--skip-uncropped", action="store_true", help="only time the cropped computation")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from npc_gtv.evaluation.metrics import METRICS, compute_case_metrics

    pred, truth, spacing = make_case()
    print(f"case: {truth.shape} voxels, spacing {spacing} mm, truth {truth.sum()} voxels, pred {pred.sum()} voxels; "
          f"1 CPU thread (torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    compute_case_metrics(pred[250:262, 220:240, 60:80], truth[250:262, 220:240, 60:80], spacing)  # warm-up imports

    best_c, med_c, cropped = _time(lambda: compute_case_metrics(pred, truth, spacing, crop=True), args.repeats)
    print(f"cropped   : best {best_c:.3f} s, median {med_c:.3f} s  (budget {args.budget:.1f} s)")
    status = 0
    if best_c > args.budget:
        print(f"FAIL: cropped evaluation slower than the {args.budget} s budget")
        status = 1
    if not args.skip_uncropped:
        best_u, med_u, full = _time(lambda: compute_case_metrics(pred, truth, spacing, crop=False), max(1, args.repeats - 1))
        print(f"uncropped : best {best_u:.3f} s, median {med_u:.3f} s")
        print(f"speed-up  : {best_u / best_c:.1f}x")
        diff = {k: (cropped[k], full[k]) for k in METRICS if not np.isclose(cropped[k], full[k], rtol=1e-9, atol=1e-9)}
        if diff:
            print(f"FAIL: cropped and uncropped values differ: {diff}")
            status = 1
        else:
            print("identical values (cropped == uncropped) for: " + ", ".join(METRICS))
    print("values: " + ", ".join(f"{k}={cropped[k]:.4g}" for k in METRICS))

    # worst case for the crop: a false positive in the far corner makes the union box ~20 % of the volume
    far = pred.copy()
    far[10:14, 10:14, 5:7] = True
    box = [np.flatnonzero((far | truth).any(axis=tuple(a for a in range(3) if a != i))) for i in range(3)]
    frac = float(np.prod([b[-1] - b[0] + 1 for b in box])) / truth.size
    best_f, med_f, _ = _time(lambda: compute_case_metrics(far, truth, spacing, crop=True), args.repeats)
    print(f"cropped, far false positive (union box {frac:.0%} of the volume): best {best_f:.3f} s, median {med_f:.3f} s")

    if args.with_io:
        from shared_transforms.io import save_nifti

        from npc_gtv.evaluation.report import evaluate_pairs

        aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        with tempfile.TemporaryDirectory() as tmp:
            save_nifti(truth.astype(np.uint8), aff, os.path.join(tmp, "t.nii.gz"))
            save_nifti(pred.astype(np.uint8), aff, os.path.join(tmp, "p.nii.gz"))
            best_io, med_io, _ = _time(lambda: evaluate_pairs([("c", os.path.join(tmp, "p.nii.gz"), os.path.join(tmp, "t.nii.gz"))],
                                                              progress=False), args.repeats)
        print(f"with I/O  : best {best_io:.3f} s, median {med_io:.3f} s (reading two gzipped NIfTI files + checks + metrics)")
    return status


if __name__ == "__main__":
    sys.exit(main())
