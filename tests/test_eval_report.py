"""evaluate_folders / npc-gtv evaluate, compare and agreement on tiny NIfTI folders."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from shared_transforms.io import InputError, save_nifti

from npc_gtv.evaluation.report import case_key, compare_runs, evaluate_folders, read_metrics_csv

SHAPE = (24, 20, 12)
# LPS-like affine as the phantoms use; the axial (S-I) axis is array axis 2
AFF = np.array([[-1.0, 0, 0, 60.0], [0, -1.5, 0, 40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1.0]])


def _cube(lo, hi, shape=SHAPE):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


@pytest.fixture()
def folders(tmp_path):
    """Truth folder with 3 cases, prediction folder (nested, suffixed names), image folder."""
    truth, pred, img = tmp_path / "truth", tmp_path / "pred", tmp_path / "images"
    t_a = _cube((5, 5, 3), (15, 15, 8))  # 10 x 10 x 5
    p_a = _cube((7, 5, 3), (17, 15, 8))  # shifted by 2 voxels in x: DSC 0.8
    save_nifti(t_a, AFF, truth / "case_a.nii.gz")
    save_nifti(p_a, AFF, pred / "sub" / "case_a_seg.nii.gz")
    save_nifti(_cube((4, 4, 4), (8, 8, 8)), AFF, truth / "case_b.nii.gz")
    save_nifti(np.zeros(SHAPE, np.uint8), AFF, pred / "case_b_pred.nii.gz")  # empty prediction
    save_nifti(np.zeros(SHAPE, np.uint8), AFF, truth / "case_c.nii.gz")
    save_nifti(np.zeros(SHAPE, np.uint8), AFF, pred / "case_c.nii.gz")  # both empty
    for c in ("case_a", "case_b", "case_c"):
        save_nifti(np.full(SHAPE, 40, np.int16), AFF, img / f"{c}_0000.nii.gz")
    return tmp_path


def _rows(path):
    with open(path) as f:
        return {r["case_id"]: r for r in csv.DictReader(f)}


def test_case_key_suffixes():
    assert case_key("x/npc_001_seg.nii.gz") == "npc_001"
    assert case_key("npc_001_0000.nii.gz") == "npc_001"
    assert case_key("npc_001_pred_seg.nii") == "npc_001"
    assert case_key("P7_GTV.nii.gz") == "P7"
    assert case_key("npc_002_t1_seg.nii.gz") == "npc_002"  # MONAI SaveImage name of an MRI case
    assert case_key("seg.nii.gz") == "seg"  # never strips a whole name


def test_evaluate_folders_writes_report(folders):
    out = folders / "report"
    before = sorted(p.name for p in (folders / "pred").rglob("*"))
    s = evaluate_folders(folders / "pred", folders / "truth", out, images=folders / "images", progress=False)
    assert s["n_cases"] == 3
    assert s["empty_cases"] == {"both_empty": 1, "pred_empty": 1, "truth_empty": 0}
    rows = _rows(out / "metrics.csv")
    assert set(rows) == {"case_a", "case_b", "case_c"}
    assert float(rows["case_a"]["dsc"]) == pytest.approx(0.8)
    assert float(rows["case_a"]["hd"]) == pytest.approx(2.0)  # 2 voxels of 1 mm along x
    assert float(rows["case_a"]["volume_truth_ml"]) == pytest.approx(500 * 3.0 / 1000)
    assert rows["case_b"]["empty_case"] == "pred_empty"
    diag = math.sqrt(24**2 + 30**2 + 24**2)
    assert float(rows["case_b"]["hd95"]) == pytest.approx(diag)
    assert float(rows["case_c"]["dsc"]) == 1.0
    # every case counts in the mean: (0.8 + 0 + 1) / 3
    assert s["metrics"]["dsc"]["mean"] == pytest.approx(0.6)
    assert s["metrics"]["dsc"]["median"] == pytest.approx(0.8)
    assert s["metrics"]["dsc"]["std"] == pytest.approx(np.std([0.8, 0.0, 1.0], ddof=1))
    # pooled over all slices (HCF's slice-classifier measure): truth slices 5 + 4, predicted 5, shared 5
    assert s["pooled_slices"]["slice_recall"] == pytest.approx(5 / 9)
    assert s["pooled_slices"]["slice_precision"] == pytest.approx(1.0)
    assert rows["case_b"]["slices_truth"] == "4" and rows["case_b"]["slices_pred"] == "0"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["metrics"]["hd95"]["n"] == 3 and on_disk["n_cases"] == 3
    md = (out / "summary.md").read_text()
    assert "| dsc ↑ | 0.6000 ± 0.5292 | 0.8000 |" in md
    assert "1 both empty" in md and "1 empty prediction" in md
    figs = out / "figures"
    assert (figs / "box_dsc.png").stat().st_size > 1000 and (figs / "box_hd95.png").exists()
    assert sorted(p.name for p in (figs / "overlays").iterdir()) == ["case_a.png", "case_b.png", "case_c.png"]
    # inputs untouched
    assert sorted(p.name for p in (folders / "pred").rglob("*")) == before


def test_rejects_mismatched_affine_and_shape(folders):
    bad = folders / "pred" / "case_c.nii.gz"
    aff = AFF.copy()
    aff[0, 3] += 5.0
    save_nifti(np.zeros(SHAPE, np.uint8), aff, bad)
    with pytest.raises(InputError, match=r"case_c\.nii\.gz: grid .*affine differs by up to 5.* not a lossless reorientation"
                                         r".* would have to be resampled"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    save_nifti(np.zeros((24, 20, 11), np.uint8), AFF, bad)
    with pytest.raises(InputError, match=r"case_c\.nii\.gz: grid \(shape \(24, 20, 11\)\) is not that of .*case_c\.nii\.gz "
                                         r"\(shape \(24, 20, 12\)"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    assert not (folders / "r" / "metrics.csv").exists()


def test_rejects_unmatched_duplicate_nonbinary_and_unsafe_out(folders):
    (folders / "pred" / "case_c.nii.gz").unlink()
    with pytest.raises(InputError, match="no prediction for 1 case.*case_c"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    save_nifti(np.zeros(SHAPE, np.uint8), AFF, folders / "pred" / "case_c.nii.gz")
    save_nifti(np.zeros(SHAPE, np.uint8), AFF, folders / "pred" / "case_c_mask.nii.gz")
    with pytest.raises(InputError, match="duplicate prediction for case 'case_c'"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    (folders / "pred" / "case_c_mask.nii.gz").unlink()
    save_nifti(np.full(SHAPE, 2, np.uint8), AFF, folders / "pred" / "case_c.nii.gz")
    with pytest.raises(InputError, match="must be binary"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    with pytest.raises(InputError, match="use --label N"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "r", figures=False, progress=False)
    with pytest.raises(InputError, match="inside the input folder"):
        evaluate_folders(folders / "pred", folders / "truth", folders / "pred" / "report", figures=False, progress=False)


def test_multi_label_maps_with_label_option(tmp_path):
    """SegRap-style maps (1 = GTVp, 2 = GTVnd): --label selects one structure on both sides."""
    t = _cube((2, 2, 2), (8, 8, 6))
    t[12:16, 12:16, 2:6] = 2
    p = _cube((2, 2, 2), (8, 8, 6))
    p[12:16, 12:14, 2:6] = 2  # half of the node
    save_nifti(t, AFF, tmp_path / "t" / "c1.nii.gz")
    save_nifti(p, AFF, tmp_path / "p" / "c1.nii.gz")
    s1 = evaluate_folders(tmp_path / "p", tmp_path / "t", tmp_path / "o1", figures=False, progress=False, label=1)
    s2 = evaluate_folders(tmp_path / "p", tmp_path / "t", tmp_path / "o2", figures=False, progress=False, label=2)
    assert s1["metrics"]["dsc"]["mean"] == pytest.approx(1.0)
    assert s2["metrics"]["dsc"]["mean"] == pytest.approx(2 * 32 / (64 + 32))
    assert s2["info"]["label"] == 2
    with pytest.raises(InputError, match="must be binary"):
        evaluate_folders(tmp_path / "p", tmp_path / "t", tmp_path / "o3", figures=False, progress=False)


def test_dataset_json_and_slice_axis_from_affine(tmp_path):
    """A Decathlon dataset.json as truth; the S-I axis is array axis 0 here (read from the affine)."""
    ds = tmp_path / "ds"
    aff = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])  # axis 0 -> world z
    t = np.zeros((10, 12, 12), np.uint8)
    t[2:8, 4:8, 4:8] = 1  # 6 axial slices along axis 0
    p = np.zeros_like(t)
    p[5:9, 4:8, 4:8] = 1  # slices 5..8: 3 shared, 1 extra
    save_nifti(t, aff, ds / "labelsTs" / "p1.nii.gz")
    save_nifti(np.zeros_like(t, dtype=np.int16), aff, ds / "imagesTs" / "p1.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"test": [{"case_id": "p1", "image": "imagesTs/p1.nii.gz",
                                                            "label": "labelsTs/p1.nii.gz"}]}))
    save_nifti(p, aff, tmp_path / "pred" / "p1" / "p1_seg.nii.gz")
    s = evaluate_folders(tmp_path / "pred", ds / "dataset.json", tmp_path / "out", progress=False)
    assert s["info"]["section"] == "test"
    row = _rows(tmp_path / "out" / "metrics.csv")["p1"]
    assert float(row["slice_recall"]) == pytest.approx(3 / 6)
    assert float(row["slice_precision"]) == pytest.approx(3 / 4)
    assert (tmp_path / "out" / "figures" / "overlays" / "p1.png").exists()
    # an image on another grid only loses the overlay background
    save_nifti(np.zeros((10, 12, 11), np.int16), aff, tmp_path / "imgs" / "p1_0000.nii.gz")
    with pytest.warns(UserWarning, match="p1 drawn without image"):
        evaluate_folders(tmp_path / "pred", ds / "dataset.json", tmp_path / "out3", images=tmp_path / "imgs", progress=False)
    assert (tmp_path / "out3" / "figures" / "overlays" / "p1.png").exists()
    # the json's folder itself is not an input folder (only its label folders are)
    evaluate_folders(tmp_path / "pred", ds / "dataset.json", ds / "reports", figures=False, progress=False)
    assert (ds / "reports" / "metrics.csv").exists()
    with pytest.raises(InputError, match="inside the input folder"):
        evaluate_folders(tmp_path / "pred", ds / "dataset.json", ds / "labelsTs" / "r", figures=False, progress=False)
    with pytest.raises(InputError, match="no 'training' list"):
        evaluate_folders(tmp_path / "pred", ds / "dataset.json", tmp_path / "out2", section="training", progress=False)


def test_phantom_dataset_json(small_ct_dataset, tmp_path):
    """The evaluation runs on the embedded phantom set; truth against itself is perfect."""
    import shutil

    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    pred = tmp_path / "pred"
    pred.mkdir()
    for e in ds["test"]:
        shutil.copy(small_ct_dataset / e["label"], pred / f"{e['case_id']}_seg.nii.gz")
    s = evaluate_folders(pred, small_ct_dataset / "dataset.json", tmp_path / "out", figures=False, progress=False)
    assert s["n_cases"] == len(ds["test"]) >= 1
    assert s["metrics"]["dsc"]["mean"] == pytest.approx(1.0)
    assert s["metrics"]["hd95"]["max"] == 0.0
    # volumes agree with the generator's own ground truth (cases.csv, the documented side file)
    rows = _rows(tmp_path / "out" / "metrics.csv")
    info = _rows(small_ct_dataset / "cases.csv")
    for e in ds["test"]:
        expected = float(info[e["case_id"]]["tumour_volume_ml"])
        assert float(rows[e["case_id"]]["volume_truth_ml"]) == pytest.approx(expected, abs=1e-3)


def _write_run(path, dsc):
    path.mkdir(parents=True)
    with open(path / "metrics.csv", "w") as f:
        f.write("case_id,dsc,hd95\n")
        for i, d in enumerate(dsc):
            f.write(f"c{i},{d},{10 * (1 - d)}\n")


def test_compare_runs_wilcoxon(tmp_path, capsys):
    from scipy.stats import wilcoxon

    a = [0.80, 0.75, 0.90, 0.85, 0.70, 0.88, 0.79, 0.83]
    b = [x - 0.05 - 0.01 * i for i, x in enumerate(a)]  # B always worse
    c = [x + (0.01 if i % 2 else -0.01) for i, x in enumerate(a)]  # no consistent difference
    for name, vals in (("A", a), ("B", b), ("C", c)):
        _write_run(tmp_path / name, vals)
    res = compare_runs([tmp_path / "A", tmp_path / "B", tmp_path / "C"])
    assert res["runs"] == ["A", "B", "C"]
    assert res["metrics"]["dsc"]["A"]["mean"] == pytest.approx(np.mean(a))
    tests = {(t["a"], t["b"]): t for t in res["tests"]}
    assert tests[("A", "B")]["p"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert tests[("A", "B")]["significant"] and tests[("A", "B")]["p"] < 0.01
    assert not tests[("A", "C")]["significant"]
    assert tests[("A", "B")]["n"] == 8

    from npc_gtv.cli import main

    main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    assert "| A | B | 8 |" in printed and " *" in printed
    assert (tmp_path / "cmp" / "compare.md").exists() and (tmp_path / "cmp" / "figures" / "box_dsc.png").exists()
    _write_run(tmp_path / "D", a[:6])  # a run on fewer cases: tested on the shared ones, and said so
    main(["compare", str(tmp_path / "A"), str(tmp_path / "D")])
    assert "2 case(s) only in A, 0 only in D" in capsys.readouterr().out
    name, cases = read_metrics_csv(tmp_path / "A" / "metrics.csv")
    assert name == "A" and cases["c2"]["dsc"] == 0.9


def test_agreement_dice_and_jaccard(tmp_path, capsys):
    from npc_gtv.cli import main

    save_nifti(_cube((2, 2, 2), (6, 6, 6)), AFF, tmp_path / "ra" / "p1.nii.gz")
    save_nifti(_cube((2, 2, 2), (6, 6, 8)), AFF, tmp_path / "rb" / "p1.nii.gz")  # 64 vs 96 voxels
    save_nifti(_cube((1, 1, 1), (3, 3, 3)), AFF, tmp_path / "ra" / "p2.nii.gz")
    save_nifti(_cube((1, 1, 1), (3, 3, 3)), AFF, tmp_path / "rb" / "p2.nii.gz")
    main(["agreement", str(tmp_path / "ra"), str(tmp_path / "rb"), "--out", str(tmp_path / "agr"), "--progress", "False"])
    assert "Inter-rater agreement" in capsys.readouterr().out
    rows = _rows(tmp_path / "agr" / "metrics.csv")
    assert float(rows["p1"]["dsc"]) == pytest.approx(2 * 64 / 160)
    assert float(rows["p1"]["iou"]) == pytest.approx(64 / 96)
    assert float(rows["p2"]["dsc"]) == 1.0
    assert "hd95" not in rows["p1"] and "slices_truth" not in rows["p1"]
    s = json.loads((tmp_path / "agr" / "summary.json").read_text())
    assert s["metrics"]["iou"]["mean"] == pytest.approx((64 / 96 + 1) / 2)
    assert (tmp_path / "agr" / "figures" / "cases_dsc.png").exists()


def test_cli_evaluate_end_to_end(folders, capsys):
    from npc_gtv.cli import main

    main(["evaluate", "--pred", str(folders / "pred"), "--truth", str(folders / "truth"), "--out", str(folders / "cli"),
          "--figures", "False", "--progress", "False"])
    out = capsys.readouterr().out
    assert "| dsc ↑ | 0.6000 ± 0.5292" in out
    assert (folders / "cli" / "metrics.csv").exists() and not (folders / "cli" / "figures").exists()


def test_cli_evaluate_mismatch_exits_with_clear_message(folders):
    aff = AFF.copy()
    aff[2, 2] = 2.5
    save_nifti(np.zeros(SHAPE, np.uint8), aff, folders / "pred" / "case_c.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "npc_gtv.cli", "evaluate", "--pred", str(folders / "pred"), "--truth", str(folders / "truth"),
         "--out", str(folders / "bad")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "case_c.nii.gz: grid" in proc.stderr and "would have to be resampled" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_write_report_counts_undefined_rve_and_draws_given_overlays(tmp_path):
    from npc_gtv.evaluation.metrics import compute_case_metrics
    from npc_gtv.evaluation.report import write_report

    t = _cube((5, 5, 3), (15, 15, 8)).astype(bool)
    e = np.zeros(SHAPE, bool)
    sp = (1.0, 1.5, 2.0)
    records = [{"case_id": "ok", **compute_case_metrics(t, t, sp)},
               {"case_id": "fp_only", **compute_case_metrics(t, e, sp)}]  # truth empty: rve undefined
    s = write_report(records, tmp_path / "rep", overlays={"fp_only": {"truth": e, "pred": t, "affine": AFF}})
    assert s["empty_cases"]["truth_empty"] == 1
    assert s["metrics"]["rve"]["n"] == 1 and s["metrics"]["rve"]["n_undefined"] == 1
    assert s["metrics"]["dsc"]["n"] == 2 and s["metrics"]["dsc"]["mean"] == pytest.approx(0.5)
    assert _rows(tmp_path / "rep" / "metrics.csv")["fp_only"]["rve"] == "nan"
    assert "| 1 (1 undefined) |" in (tmp_path / "rep" / "summary.md").read_text()
    assert (tmp_path / "rep" / "figures" / "overlays" / "fp_only.png").exists()
    json.loads((tmp_path / "rep" / "summary.json").read_text())  # strict JSON (no NaN)
    with pytest.raises(ValueError, match="at least one"):
        write_report([], tmp_path / "empty")
    with pytest.raises(ValueError, match="'x' lacks hd95"):
        write_report([{"case_id": "x", "dsc": 1.0}], tmp_path / "partial", metrics=("dsc", "hd95"))
    assert not (tmp_path / "empty").exists() and not (tmp_path / "partial").exists()


# ------------------------------------------------------------------ issue #18: safe report writing
def _dataset_json(root, case_ids):
    """A dataset.json whose test cases carry the given case ids (labels and images in labelsTs / imagesTs)."""
    entries = []
    for i, cid in enumerate(case_ids):
        lab = root / "labelsTs" / f"c{i}.nii.gz"
        save_nifti(_cube((5 + i, 5, 3), (15, 15, 8)), AFF, lab)
        img = root / "imagesTs" / f"c{i}.nii.gz"
        save_nifti(np.full(SHAPE, 40, np.int16), AFF, img)
        entries.append({"case_id": cid, "label": f"labelsTs/c{i}.nii.gz", "image": f"imagesTs/c{i}.nii.gz"})
    path = root / "dataset.json"
    path.write_text(json.dumps({"test": entries}))
    return path


def test_case_ids_never_leave_the_report_folder(tmp_path):
    """A case_id from dataset.json became the overlay file name: an absolute path or ../.. wrote outside --out."""
    from shared_transforms.io import safe_name

    victim = tmp_path / "elsewhere" / "victim.png"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    ids = [str(victim.with_suffix("")), "../../escaped"]
    ds = _dataset_json(tmp_path / "data", ids)
    pred = tmp_path / "pred"
    for cid in ids:  # the bundles name predictions after the (file-name safe) case id
        save_nifti(_cube((5, 5, 3), (15, 15, 8)), AFF, pred / f"{safe_name(cid)}_seg.nii.gz")
    out = tmp_path / "work" / "report"
    s = evaluate_folders(pred, ds, out, progress=False)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "work" / "escaped.png").exists()
    overlays = sorted(p.name for p in (out / "figures" / "overlays").iterdir())
    assert overlays == sorted(f"{safe_name(c)}.png" for c in ids)
    assert sorted(_rows(out / "metrics.csv")) == sorted(ids)  # the displayed ids are the dataset's own
    assert s["n_cases"] == 2
    # two ids that map to one file name are refused
    ds2 = _dataset_json(tmp_path / "data2", ["a/b", "a_b"])
    for cid in ("a_b",):
        save_nifti(_cube((5, 5, 3), (15, 15, 8)), AFF, tmp_path / "pred2" / f"{cid}_seg.nii.gz")
    with pytest.raises(InputError, match="duplicate case 'a_b'"):
        evaluate_folders(tmp_path / "pred2", ds2, tmp_path / "r2", progress=False)


def test_one_overwrite_rule_and_no_stale_overlays(folders):
    out = folders / "rep"
    evaluate_folders(folders / "pred", folders / "truth", out, images=folders / "images", progress=False)
    assert (out / "figures" / "overlays" / "case_c.png").exists()
    with pytest.raises(InputError, match=r"rep: already holds a report \(metrics.csv, summary.json, summary.md, figures\); "
                                         r"refusing to overwrite"):
        evaluate_folders(folders / "pred", folders / "truth", out, progress=False)
    # a rerun on fewer cases with overwrite: the whole earlier report goes, no overlay of case_c stays behind
    (folders / "truth" / "case_c.nii.gz").unlink()
    (folders / "pred" / "case_c.nii.gz").unlink()
    evaluate_folders(folders / "pred", folders / "truth", out, images=folders / "images", progress=False, overwrite=True)
    assert sorted(p.name for p in (out / "figures" / "overlays").iterdir()) == ["case_a.png", "case_b.png"]
    assert sorted(_rows(out / "metrics.csv")) == ["case_a", "case_b"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_full_disk_leaves_no_partial_report(folders, tiny_disk):
    from conftest import fill_disk

    fill_disk(tiny_disk)
    with pytest.raises(OSError) as info:
        evaluate_folders(folders / "pred", folders / "truth", tiny_disk / "rep", images=folders / "images", progress=False)
    assert "No space left on device" in str(info.value)
    assert sorted(p.name for p in tiny_disk.iterdir()) in (["filler.bin"], ["filler.bin", "rep"])
    assert not (tiny_disk / "rep").exists() or list((tiny_disk / "rep").iterdir()) == []


def test_reoriented_prediction_on_the_same_voxels_is_accepted(folders):
    """The same physical grid stored in another axis order / direction (RAS vs LPS) is brought over exactly."""
    t = _cube((5, 5, 3), (15, 15, 8))
    p = _cube((7, 5, 3), (17, 15, 8))
    # flip array axes 0 and 1 and move axis 2 first: the affine follows, so every voxel keeps its position
    flipped = np.transpose(p[::-1, ::-1, :], (2, 0, 1))
    m = np.array([[0, -1, 0, SHAPE[0] - 1], [0, 0, -1, SHAPE[1] - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    save_nifti(flipped, AFF @ m, folders / "pred" / "sub" / "case_a_seg.nii.gz")
    s = evaluate_folders(folders / "pred", folders / "truth", folders / "reo", figures=False, progress=False)
    rows = _rows(folders / "reo" / "metrics.csv")
    assert float(rows["case_a"]["dsc"]) == pytest.approx(0.8)  # as for the prediction stored on the truth's own grid
    assert s["info"]["hd95_definition"] == "max_directed"


def test_cli_states_the_hd95_definition(folders):
    proc = subprocess.run(
        [sys.executable, "-m", "npc_gtv.cli", "evaluate", str(folders / "pred"), str(folders / "truth"), str(folders / "dm"),
         "--hd95", "deepmind", "--figures", "False", "--progress", "False"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HD95 definition: deepmind (larger of the two directed 95th percentiles" in proc.stdout
    assert "- hd95 definition: `deepmind`" in (folders / "dm" / "summary.md").read_text()
    assert json.loads((folders / "dm" / "summary.json").read_text())["info"]["hd95_definition"] == "deepmind"


def test_summary_by_case_attribute_hand_computed(tmp_path):
    """A dataset.json's case_info (the phantoms record crosses_midline) splits the summary: here two
    mid-line cases with DSC 1 and 2/3 and one lateral case with DSC 0.5 (hand-computed)."""
    ds = tmp_path / "ds"
    (ds / "labelsTs").mkdir(parents=True)
    (ds / "imagesTs").mkdir()
    pred = tmp_path / "pred"
    pred.mkdir()
    truth = _cube((4, 4, 2), (8, 8, 6))  # 64 voxels
    half = _cube((4, 4, 2), (8, 8, 4))  # 32 of them: DSC 2*32/(64+32) = 2/3
    shifted = np.roll(truth, 2, axis=0)  # overlap 32 of 64 -> DSC 0.5
    cases = {"m1": truth, "m2": half, "l1": shifted}
    for c, p in cases.items():
        save_nifti(truth, AFF, ds / "labelsTs" / f"{c}.nii.gz")
        save_nifti(np.full(SHAPE, 40, np.int16), AFF, ds / "imagesTs" / f"{c}.nii.gz")
        save_nifti(p, AFF, pred / f"{c}_seg.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "test": [{"case_id": c, "image": f"imagesTs/{c}.nii.gz", "label": f"labelsTs/{c}.nii.gz"} for c in cases],
        "case_info": {"m1": {"crosses_midline": True, "tumour_side": "left"}, "m2": {"crosses_midline": True},
                      "l1": {"crosses_midline": False, "tumour_side": "right"}},
    }))
    s = evaluate_folders(pred, ds / "dataset.json", tmp_path / "out", figures=False, progress=False,
                         group_by=("crosses_midline", "tumour_side", "t_stage"))
    mid = s["groups"]["crosses_midline"]
    assert mid["True"]["n_cases"] == 2 and mid["True"]["metrics"]["dsc"]["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert mid["False"]["n_cases"] == 1 and mid["False"]["metrics"]["dsc"]["mean"] == pytest.approx(0.5)
    assert set(s["groups"]["tumour_side"]) == {"left", "right", "unknown"}  # m2 has no side
    assert "t_stage" not in s["groups"]  # no case has it
    assert s["metrics"]["dsc"]["mean"] == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "By `crosses_midline`:" in md and "| True | 2 | 0.8333" in md
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["groups"]["crosses_midline"]["False"]["n_cases"] == 1
    # a folder of masks as truth has no case_info: no groups
    s2 = evaluate_folders(pred, ds / "labelsTs", tmp_path / "out2", figures=False, progress=False)
    assert "groups" not in s2
