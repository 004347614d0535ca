"""bench/bench_sats_ablation.py: its statistics and log parsing on hand-made inputs (the runs are CPU hours)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("bench_sats_ablation", REPO_ROOT / "bench" / "bench_sats_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def test_variants_are_the_papers_four(ablation):
    assert list(ablation.VARIANTS) == ["neither", "head_only", "margin_only", "both"]
    assert ablation.VARIANTS["head_only"] == {"embed": "head", "beta": 0.0}
    assert ablation.VARIANTS["margin_only"] == {"embed": "features"}


def test_validation_curve_reads_the_epoch_metrics_only(ablation, tmp_path):
    log = tmp_path / "stage2.log"
    log.write_text("x - Got new best metric of val_mean_dice: 0.5\n"
                   "x - INFO - Epoch[1] Metrics -- val_mean_dice: 0.5000 \n"
                   "x - INFO - Key metric: val_mean_dice best value: 0.5 at epoch: 1\n"
                   "x - INFO - Epoch[1] Metrics -- train_dice: 0.3000 train_ce: 0.1000 \n"
                   "x - INFO - Epoch[2] Metrics -- val_mean_dice: 0.6250 \n")
    assert ablation.validation_curve(log) == [0.5, 0.625]


def test_table_hand_computed(ablation):
    # two seeds, two test cases: a (crosses the mid-line) and b (lateral)
    runs = {
        "both": {"0": {"cases": {"a": {"dsc": 0.8, "assd": 1.0, "hd95": 2.0}, "b": {"dsc": 0.6, "assd": 2.0, "hd95": 4.0}}},
                 "1": {"cases": {"a": {"dsc": 0.9, "assd": 1.0, "hd95": 2.0}, "b": {"dsc": 0.7, "assd": 2.0, "hd95": 4.0}}}},
        "neither": {"0": {"cases": {"a": {"dsc": 0.7, "assd": 1.0, "hd95": 2.0}, "b": {"dsc": 0.6, "assd": 2.0, "hd95": 4.0}}},
                    "1": {"cases": {"a": {"dsc": 0.8, "assd": 1.0, "hd95": 2.0}, "b": {"dsc": 0.5, "assd": 2.0, "hd95": 6.0}}}},
    }
    info = {"a": {"crosses_midline": True}, "b": {"crosses_midline": False}}
    t = ablation.summarize(runs, info)
    # seed means: both 0.7 and 0.8 -> 0.75 +- 0.0707; neither 0.65 and 0.65 -> 0.65 +- 0
    assert t["both"]["dsc"][0] == pytest.approx(0.75) and t["both"]["dsc"][1] == pytest.approx(0.0707107, abs=1e-6)
    assert t["neither"]["dsc"] == (pytest.approx(0.65), pytest.approx(0.0))
    assert t["neither"]["hd95"][0] == pytest.approx(3.5)  # seed means 3 and 4
    assert t["both"]["p_vs_both"] is None
    # differences neither - both: -0.1, 0, -0.1, -0.2 (one zero dropped): Wilcoxon on 3 pairs, all negative
    from scipy.stats import wilcoxon

    expected = wilcoxon([0.7, 0.6, 0.8, 0.5], [0.8, 0.6, 0.9, 0.7], zero_method="wilcox").pvalue
    assert t["neither"]["p_vs_both"] == pytest.approx(expected)
    assert t["both"]["dsc_midline"] == {"mean": pytest.approx(0.85), "n": 2}
    assert t["neither"]["dsc_lateral"] == {"mean": pytest.approx(0.55), "n": 2}
    md = ablation.markdown(t, {"seeds": "0,1"})
    assert "| both | 2 | 75.00 ± 7.07 |" in md and "| neither | 2 | 65.00 ± 0.00 |" in md
    assert ablation.paired_p([0.5, 0.5], [0.5, 0.5]) == 1.0 and ablation.paired_p([0.5], [0.4]) is None
    with pytest.raises(ValueError, match="different lengths"):
        ablation.paired_p([0.1, 0.2], [0.1])
