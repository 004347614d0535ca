"""`npc-gtv demo`'s folder rules, with the bundle runs replaced by a stand-in (the real runs: README, docs/learning.md)."""

from __future__ import annotations

import pytest

from npc_gtv import demo


def test_demo_folder_rules(tmp_path, monkeypatch):
    runs = []

    def fake_run(bundle, bundle_dir, dataset_dir, work, log, **kwargs):
        out = work / bundle / "eval"
        assert not out.exists()  # every run starts from an empty bundle folder
        out.mkdir(parents=True)
        (out / f"run{len(runs)}.txt").write_text("x")
        runs.append(bundle)
        return {"bundle": bundle, "status": "FAILED: stand-in"}

    monkeypatch.setattr(demo, "run_bundle_recipe", fake_run)
    monkeypatch.setattr(demo, "draw_transforms_figure", lambda ds, path: path)
    monkeypatch.setattr(demo, "draw_overview_figure", lambda ds, rows, path: path)
    out = tmp_path / "demo_output"
    demo.demo_command(out=str(out), cases=2, bundles="sats_npc")
    assert (out / "sats_npc" / "eval" / "run0.txt").is_file() and (out / "data" / "dataset.json").is_file()
    data_before = (out / "data" / "dataset.json").stat().st_mtime_ns
    # a rerun reuses the phantoms and replaces the previous demo's bundle outputs
    demo.demo_command(out=str(out), cases=2, bundles="sats_npc")
    assert not (out / "sats_npc" / "eval" / "run0.txt").exists() and (out / "sats_npc" / "eval" / "run1.txt").is_file()
    assert (out / "data" / "dataset.json").stat().st_mtime_ns == data_before
    # a folder that is not a demo's is never written into
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a demo folder"):
        demo.demo_command(out=str(other), cases=2, bundles="sats_npc")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    with pytest.raises(SystemExit, match="unknown bundle"):
        demo.demo_command(out=str(out), bundles="nope")
