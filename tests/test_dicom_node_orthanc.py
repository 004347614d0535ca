"""``npc-gtv serve`` against a real PACS: Orthanc (Debian package ``orthanc``).

Orthanc is started on free loopback ports with a generated configuration that knows the node
as modality ``node``; ``npc-gtv serve`` runs as a subprocess sending back to Orthanc. The CT
series are uploaded through Orthanc's REST API and Orthanc is asked to send them to the node
(``/modalities/node/store``); the RT structure sets are then found in Orthanc through its REST
API. The model is the SATS bundle's quick network with constant-foreground weights: its
prediction is the bundle's body crop (non-empty, deterministic, independent of any training),
and the reference for the Dice is the bundle's own NIfTI output for the same CT from
``python -m monai.bundle run inference``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import BUNDLES_DIR, run_bundle
from rtstruct_checks import assert_references_ct

pytest.importorskip("pynetdicom")

from npc_gtv.dicom.commands import dice  # noqa: E402
from npc_gtv.dicom.rtstruct import rasterize_rtstruct  # noqa: E402
from npc_gtv.dicom.series import write_dicom_series  # noqa: E402
from npc_gtv.node.harness import NodeProcess, Orthanc, constant_foreground_weights, free_port, orthanc_binary  # noqa: E402
from npc_gtv.phantoms import make_phantom  # noqa: E402
from shared_transforms.dicom import read_dicom_series  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        orthanc_binary() is None,
        reason="Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it when run as root): "
        "the DICOM node's integration test against a real PACS is skipped",
    ),
]

SATS = BUNDLES_DIR / "sats_npc"


def _series(folder, seed: int, drop: int | None = None) -> list:
    ph = make_phantom(seed, size="small")
    files = write_dicom_series(ph.image, ph.affine, folder, patient_name="Secret^Patient", patient_id=f"SECRET{seed}")
    if drop is not None:
        files.pop(drop).unlink()
    return files


def _uids(files) -> tuple[str, str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _wait_rtstructs(pacs: Orthanc, study_uid: str, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pacs.find_series("RTSTRUCT", study_uid)
        if found:
            return found
        time.sleep(0.3)
    return []


def _node_args(spool, pacs: Orthanc, port: int, weights, *extra) -> list:
    return [
        # constant-output weights: the HU window needs no training fingerprint beside them
        "--bundle", SATS, "--config", "configs/quick.yaml", "--ckpt_path", weights, "--normalization", "window", "--spool", spool,
        "--dest_aet", pacs.aet, "--dest_port", pacs.dicom_port, "--port", port, "--allowed_aets", pacs.aet, *extra,
    ]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return constant_foreground_weights(SATS, tmp_path_factory.mktemp("w") / "fg.pt", config=["configs/quick.yaml"])


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc on loopback, knowing the node (AE NPCGTV) at a free port."""
    node_port = free_port()
    with Orthanc({"node": ["NPCGTV", "127.0.0.1", node_port]}, workdir=tmp_path_factory.mktemp("orthanc")) as server:
        server.node_port = node_port
        yield server


@pytest.fixture(scope="module")
def delivered(pacs, weights, tmp_path_factory):
    """Two good series and one with a missing slice sent back to back through Orthanc to the node."""
    root = tmp_path_factory.mktemp("node_run")
    series = {"A": _series(root / "caseA", 41), "M": _series(root / "caseM", 42, drop=12), "B": _series(root / "caseB", 43)}
    ids = {name: pacs.upload(files) for name, files in series.items()}
    node = NodeProcess(_node_args(root / "spool", pacs, pacs.node_port, weights, "--quiet_time", 1.5, "--max_series", 3), root / "node.log", calling_aet=pacs.aet)
    node.start()
    try:
        pacs.post("/modalities/node/echo", {})  # Orthanc reaches the node (an HTTP error otherwise)
        for name in ("A", "M", "B"):
            answer = pacs.send("node", [ids[name]])
            assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == len(series[name])
        rc = node.wait(timeout=240)
    finally:
        node.kill()
    found = {name: pacs.find_series("RTSTRUCT", _uids(files)[0]) for name, files in series.items()}
    return {"root": root, "series": series, "found": found, "rc": rc, "log": node.output()}


def test_rtstruct_in_orthanc_references_the_ct_and_matches_the_bundle_output(delivered, pacs, weights, small_ct_dataset, tmp_path):
    assert delivered["rc"] == 0, delivered["log"][-3000:]
    # the bundle's own NIfTI output for the same CT folders, as a user runs it
    ref_dir = tmp_path / "reference"
    datalist = [{"image": str(delivered["series"][name][0].parent)} for name in ("A", "B")]
    run_bundle(
        "sats_npc", "inference", ["inference.yaml", "quick.yaml"],
        {"datalist": datalist, "ckpt_path": str(weights), "normalization": "window", "output_dir": str(ref_dir),
         "dataset_dir": str(small_ct_dataset)},
    )
    for name in ("A", "B"):
        files = delivered["series"][name]
        ct = read_dicom_series(files[0].parent)
        (series_id,) = delivered["found"][name]
        (data,) = pacs.series_files(series_id)
        rs_path = tmp_path / f"{name}_rs.dcm"
        rs_path.write_bytes(data)
        rs = pydicom.dcmread(rs_path)
        assert_references_ct(rs, ct)  # study, series, frame of reference, every slice
        assert rs.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"

        pred_img = nib.load(str(ref_dir / "predictions" / f"case{name}_seg.nii.gz"))
        np.testing.assert_allclose(pred_img.affine, ct.affine, atol=1e-3)
        pred = np.asarray(pred_img.dataobj) > 0
        assert pred.sum() > 1000  # non-empty: the body crop of the phantom
        back = rasterize_rtstruct(rs_path, ct)
        assert dice(back, pred) >= 0.97


def test_two_series_back_to_back_both_come_back(delivered):
    assert len(delivered["found"]["A"]) == 1 and len(delivered["found"]["B"]) == 1
    assert "npc-gtv serve: 2 series sent, 1 failed" in delivered["log"]
    events = [json.loads(line) for line in (delivered["root"] / "spool" / "events.jsonl").read_text().splitlines()]
    assert sorted(e["state"] for e in events) == ["failed", "sent", "sent"]
    for e in events:
        assert e["timings"]["check_s"] >= 0
    # names and IDs of the patient are never in the node's log or records
    text = delivered["log"] + (delivered["root"] / "spool" / "events.jsonl").read_text() + (delivered["root"] / "spool" / "node.log").read_text()
    assert "SECRET" not in text.upper()


def test_series_with_a_missing_slice_gets_no_rtstruct_and_is_reported(delivered):
    files = delivered["series"]["M"]
    study_uid, series_uid = _uids(files)
    assert delivered["found"]["M"] == []
    spool = delivered["root"] / "spool"
    (event,) = [e for e in map(json.loads, (spool / "events.jsonl").read_text().splitlines()) if e["series_uid"] == series_uid]
    assert event["state"] == "failed" and "1 missing slice" in event["reason"]
    state = json.loads((spool / "failed" / study_uid / series_uid / "state.json").read_text())
    assert state["state"] == "failed" and state["reason"] == event["reason"]
    assert len(list((spool / "failed" / study_uid / series_uid / "CT").glob("*.dcm"))) == len(files)
    assert f"series {series_uid} (study {study_uid}): failed" in delivered["log"]


def test_node_killed_after_receiving_delivers_after_restart_exactly_once(pacs, weights, tmp_path):
    files = _series(tmp_path / "caseR", 44)
    study_uid, series_uid = _uids(files)
    series_id = pacs.upload(files)
    spool = tmp_path / "spool"
    # 1: receives the series, then dies (SIGKILL) before its quiet time is over
    first = NodeProcess(_node_args(spool, pacs, pacs.node_port, weights, "--quiet_time", 600), tmp_path / "node1.log", calling_aet=pacs.aet).start()
    try:
        assert pacs.send("node", [series_id])["FailedInstancesCount"] == 0
        incoming = spool / "incoming" / study_uid / series_uid / "CT"
        assert len(list(incoming.glob("*.dcm"))) == len(files)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    finally:
        first.kill()
    assert pacs.find_series("RTSTRUCT", study_uid) == []

    # 2: the restarted node picks the series up from the spool and delivers it
    second = NodeProcess(_node_args(spool, pacs, pacs.node_port, weights, "--quiet_time", 1.5, "--max_series", 1), tmp_path / "node2.log", calling_aet=pacs.aet).start()
    try:
        assert second.wait(timeout=180) == 0, second.output()[-3000:]
    finally:
        second.kill()
    found = _wait_rtstructs(pacs, study_uid, timeout=10)
    assert len(found) == 1 and len(pacs.get(f"/series/{found[0]}/instances")) == 1

    # 3: another restart has nothing to send; SIGTERM stops it cleanly
    third = NodeProcess(_node_args(spool, pacs, pacs.node_port, weights, "--quiet_time", 1.5), tmp_path / "node3.log", calling_aet=pacs.aet).start()
    try:
        time.sleep(2.0)
        third.signal(signal.SIGTERM)
        assert third.wait(timeout=60) == 0, third.output()[-3000:]
    finally:
        third.kill()
    assert "npc-gtv serve: 0 series sent, 0 failed" in third.output()
    events = [json.loads(line) for line in (spool / "events.jsonl").read_text().splitlines()]
    assert [(e["series_uid"], e["state"]) for e in events] == [(series_uid, "sent")]
    assert len(pacs.find_series("RTSTRUCT", study_uid)) == 1
    assert not (spool / "incoming" / study_uid).exists() and not os.listdir(spool / "work")
