"""The DICOM node without a PACS: spool states and recovery, the Storage SCP's statuses, sending
with retries, and the node in-process between a pynetdicom sender and a pynetdicom receiver.

The model is the SATS bundle's quick network with constant-foreground weights
(:func:`npc_gtv.node.harness.constant_foreground_weights`): its prediction is the bundle's body
crop, non-empty and deterministic without any training. The integration test against a real
PACS (Orthanc) is ``tests/test_dicom_node_orthanc.py``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import BUNDLES_DIR
from rtstruct_checks import assert_references_ct

pytest.importorskip("pynetdicom")

from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # noqa: E402

from npc_gtv.dicom.commands import dice  # noqa: E402
from npc_gtv.dicom.rtstruct import rasterize_rtstruct  # noqa: E402
from npc_gtv.dicom.series import write_dicom_series  # noqa: E402
from npc_gtv.node.dimse import (  # noqa: E402
    STATUS_DATASET_MISMATCH,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    Destination,
    SendError,
    StorageSCP,
    send_files,
)
from npc_gtv.node.harness import constant_foreground_weights, free_port  # noqa: E402
from npc_gtv.node.spool import Spool, is_uid  # noqa: E402
from npc_gtv.phantoms import make_phantom  # noqa: E402
from shared_transforms.dicom import read_dicom_series  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")

SATS = BUNDLES_DIR / "sats_npc"
QUICK = ["configs/quick.yaml"]


def _ct_series(folder, seed: int, drop: int | None = None, **kwargs):
    """A small phantom CT written as a DICOM series; ``drop``: delete that slice's file."""
    ph = make_phantom(seed, size="small")
    files = write_dicom_series(ph.image, ph.affine, folder, patient_name="Secret^Patient", patient_id=f"SECRET{seed}", **kwargs)
    if drop is not None:
        files[drop].unlink()
        files = [f for i, f in enumerate(files) if i != drop]
    return files


def _send(files, port: int, calling: str = "PACS", called: str = "NPCGTV") -> list[int]:
    """C-STORE files with pynetdicom; returns the statuses."""
    ae = AE(ae_title=calling)
    for uid in {pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID for f in files}:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


class Receiver:
    """A minimal PACS stand-in: a pynetdicom Storage SCP keeping what it receives in memory."""

    def __init__(self, status: int = 0x0000):
        self.datasets = []
        self.status = status
        ae = AE(ae_title="PACS")
        ae.add_supported_context(RTStructureSetStorage)
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.66.4")  # Segmentation Storage
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event):
        if self.status == 0:
            self.datasets.append(event.dataset)
        return self.status

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return constant_foreground_weights(SATS, tmp_path_factory.mktemp("w") / "fg.pt", config=QUICK)


@pytest.fixture(scope="module")
def model(weights, tmp_path_factory):
    from npc_gtv.node.model import BundleModel

    # constant-output weights: the HU window needs no training fingerprint beside them
    return BundleModel(SATS, tmp_path_factory.mktemp("bundle_out"), config=QUICK, overrides={"ckpt_path": str(weights), "normalization": "window"})


# ------------------------------------------------------------------------------------ spool
def test_uid_check():
    assert is_uid("1.2.840.10008.5.1.4.1.1.2")
    for bad in ("", "../../etc", "1.2.x", "1..2", "1" * 65, None, "1.2/3"):
        assert not is_uid(bad), bad


def test_spool_store_take_finish_and_recover(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert (os.stat(spool.root).st_mode & 0o777) == 0o700  # holds patient images
    assert spool.store(b"one", "1.2", "1.2.3", "1.2.3.1") is True
    assert spool.store(b"again", "1.2", "1.2.3", "1.2.3.1") is False  # duplicate: first copy kept
    assert spool.store(b"two", "1.2", "1.2.3", "1.2.3.2") is True
    files = sorted((spool.root / "incoming" / "1.2" / "1.2.3" / "CT").iterdir())
    assert [f.read_bytes() for f in files] == [b"one", b"two"]
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        spool.store(b"x", "1.2", "../../escape", "1.2.3.3")
    assert not list((spool.root / "tmp").iterdir())
    assert spool.take(quiet_time=60) is None  # not quiet yet
    job = spool.take(quiet_time=0.0)
    assert job.path == spool.root / "work" / "1.2" / "1.2.3"
    state = spool.read_state(job)
    assert state["state"] == "processing" and state["images"] == 2
    assert [h["state"] for h in state["history"]] == ["received", "processing"]
    assert not (spool.root / "incoming" / "1.2").exists()

    # a restart finds the series in work/ and a stray partial transfer in tmp/
    (spool.root / "tmp" / ".partial.dcm").write_bytes(b"partial")
    spool2 = Spool(tmp_path / "spool")
    assert [j.series_uid for j in spool2.recover()] == ["1.2.3"]
    assert not list((spool2.root / "tmp").iterdir())
    assert spool2.take(quiet_time=60).path == job.path  # interrupted work comes first

    filed = spool2.finish(job, "failed", reason="test: bad series")
    assert filed.path == spool.root / "failed" / "1.2" / "1.2.3"
    # the same series again is filed beside the first, nothing overwritten
    spool2.store(b"three", "1.2", "1.2.3", "1.2.3.1")
    again = spool2.take(quiet_time=0.0)
    assert spool2.finish(again, "failed", reason="again").path.name == "1.2.3.1"
    events = spool2.events()
    assert [(e["series_uid"], e["state"], e["reason"]) for e in events] == [("1.2.3", "failed", "test: bad series"), ("1.2.3", "failed", "again")]
    with pytest.raises(ValueError, match="'sent' or 'failed'"):
        spool2.finish(again, "done")
    # one node per spool: a second process cannot take it
    assert spool2.lock() is True and spool2.lock() is False
    probe = subprocess.run(
        [sys.executable, "-c", f"from npc_gtv.node.spool import Spool; Spool({str(spool.root)!r}).lock()"],
        capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode != 0 and "in use by another running npc-gtv serve" in probe.stderr
    spool2.unlock()


# ------------------------------------------------------------------------------------ receiving
def test_scp_stores_ct_and_refuses_other_classes_with_status(tmp_path):
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(spool, port=0).start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NPCGTV")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
        # called AE title checked
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SOMEONE")
        assert assoc.is_rejected

        files = _ct_series(tmp_path / "ct", seed=1)[:3]
        assert _send(files, scp.port) == [0, 0, 0]
        ds = pydicom.dcmread(files[0])
        stored = spool.root / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID / "CT" / f"{ds.SOPInstanceUID}.dcm"
        assert stored.read_bytes()[128:132] == b"DICM"
        back = pydicom.dcmread(stored)
        assert back.SOPInstanceUID == ds.SOPInstanceUID and np.array_equal(back.pixel_array, ds.pixel_array)

        # another storage class (an RT structure set) is refused with 0x0122
        rs = copy.deepcopy(ds)
        rs.SOPClassUID = rs.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
        rs.SOPInstanceUID = rs.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        rs.Modality = "RTSTRUCT"
        rs.save_as(tmp_path / "rs.dcm")
        assert _send([tmp_path / "rs.dcm"], scp.port) == [STATUS_SOP_CLASS_NOT_SUPPORTED]

        # a CT whose series UID would lead out of the spool is refused with 0xA900, nothing written
        evil = copy.deepcopy(ds)
        evil.SeriesInstanceUID = "../../../../tmp/evil"
        evil.SOPInstanceUID = evil.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        evil.save_as(tmp_path / "evil.dcm")
        assert _send([tmp_path / "evil.dcm"], scp.port) == [STATUS_DATASET_MISMATCH]
        assert scp.received == 3 and scp.refused == 2
        written = [p for p in spool.root.rglob("*.dcm")]
        assert len(written) == 3 and all(spool.root in p.parents for p in written)
    finally:
        scp.stop()


def test_allowed_calling_aets(tmp_path):
    scp = StorageSCP(Spool(tmp_path / "spool"), port=0, allowed_aets=["ORTHANC"]).start()
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(CTImageStorage)
        assert ae.associate("127.0.0.1", scp.port, ae_title="NPCGTV").is_rejected
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="NPCGTV")
        assert assoc.is_established
        assoc.release()
    finally:
        scp.stop()


# ------------------------------------------------------------------------------------ sending
def test_send_retries_bounded_then_fails(tmp_path):
    from npc_gtv.dicom.rtstruct import write_rtstruct

    files = _ct_series(tmp_path / "ct", seed=2)
    ct = read_dicom_series(files[0].parent)
    mask = np.zeros(ct.array.shape, np.uint8)
    mask[40:50, 40:50, 10:12] = 1
    rs = write_rtstruct(ct, mask, tmp_path / "rs.dcm")
    closed = Destination("PACS", "127.0.0.1", free_port())  # nothing listens there
    t = time.monotonic()
    with pytest.raises(SendError, match="3 attempt"):
        send_files([rs], closed, attempts=3, retry_delay=0.2, timeout=5)
    assert time.monotonic() - t < 20

    refusing = Receiver(status=0xA700)
    try:
        with pytest.raises(SendError, match="status 0xA700"):
            send_files([rs], Destination("PACS", "127.0.0.1", refusing.port), attempts=2, retry_delay=0.1, timeout=5)
    finally:
        refusing.stop()
    # a destination that takes RT structure sets but not SEG: refused before anything is sent
    from npc_gtv.dicom.seg import write_seg

    seg = write_seg(ct, mask, tmp_path / "seg.dcm")
    ae = AE(ae_title="PACS")
    ae.add_supported_context(RTStructureSetStorage)
    received = []
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0)])
    try:
        with pytest.raises(SendError, match="does not accept SOP class.*1.2.840.10008.5.1.4.1.1.66.4"):
            send_files([rs, seg], Destination("PACS", "127.0.0.1", server.server_address[1]), attempts=1, timeout=5)
        assert received == []
    finally:
        server.shutdown()
    stop = threading.Event()
    stop.set()
    with pytest.raises(SendError, match="stopped"):
        send_files([rs], closed, attempts=5, retry_delay=30, timeout=5, stop=stop)
    with pytest.raises(ValueError):
        Destination("A" * 17, "127.0.0.1", 104)
    with pytest.raises(ValueError):
        Destination("PACS", "127.0.0.1", 70000)


# ------------------------------------------------------------------------------------ the node
def _node(spool, model, port, **kwargs):
    from npc_gtv.node.service import Node

    kwargs.setdefault("quiet_time", 0.5)
    return Node(spool, model, Destination("PACS", "127.0.0.1", port), retry_delay=0.2, **kwargs)


def _run(node, **kwargs):
    stop = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.update(node.run(stop, **kwargs)), daemon=True)
    thread.start()
    return stop, thread, result


def test_node_in_process_good_and_bad_series(model, tmp_path):
    """Two good series and one with a missing slice, sent back to back through the node."""
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(spool, port=0).start()
    pacs = Receiver()
    try:
        good = [_ct_series(tmp_path / "a", seed=11), _ct_series(tmp_path / "b", seed=12)]
        bad = _ct_series(tmp_path / "m", seed=13, drop=15)
        stop, thread, result = _run(_node(spool, model, pacs.port, dicom_seg=True), max_series=3)
        for files in (good[0], bad, good[1]):
            assert set(_send(files, scp.port)) == {0}
        thread.join(timeout=240)
        assert not thread.is_alive()
        assert result == {"sent": 2, "failed": 1}
    finally:
        scp.stop()
        pacs.stop()

    events = {e["series_uid"]: e for e in spool.events()}
    bad_uid = pydicom.dcmread(bad[0]).SeriesInstanceUID
    assert events[bad_uid]["state"] == "failed" and "1 missing slice" in events[bad_uid]["reason"]
    assert (spool.root / "failed" / pydicom.dcmread(bad[0]).StudyInstanceUID / bad_uid / "state.json").is_file()
    by_class = {}
    for ds in pacs.datasets:
        by_class.setdefault(ds.SOPClassUID, []).append(ds)
    assert len(by_class[RTStructureSetStorage]) == 2 and len(by_class["1.2.840.10008.5.1.4.1.1.66.4"]) == 2
    for files in good:
        ct = read_dicom_series(files[0].parent)
        first = ct.headers[0]
        (rs,) = [d for d in by_class[RTStructureSetStorage] if d.StudyInstanceUID == first.StudyInstanceUID]
        assert_references_ct(rs, ct)
        path = tmp_path / f"{first.SeriesInstanceUID}_rs.dcm"
        rs.save_as(path, enforce_file_format=True)
        back = rasterize_rtstruct(path, ct)
        ev = events[first.SeriesInstanceUID]
        pred = read_nifti_pred(spool, ev)
        assert pred.sum() > 1000  # the body crop: non-empty
        assert dice(back, pred) >= 0.97
        assert ev["state"] == "sent" and ev["contours"]["slices"] == int(pred.any(axis=(0, 1)).sum())
        assert ev["timings"]["inference_s"] > 0 and ev["timings"]["since_last_image_s"] >= 0.5  # quiet time
    # no patient name or ID in the node's records
    text = spool.events_path.read_text() + "".join(p.read_text() for p in spool.root.rglob("state.json"))
    assert "SECRET" not in text.upper()


def read_nifti_pred(spool, event):
    """The bundle's own NIfTI prediction, filed with the series."""
    import nibabel as nib

    (path,) = (spool.root / event["filed_as"] / "output" / "bundle").rglob("*_seg.nii.gz")
    return np.asarray(nib.load(str(path)).dataobj) > 0


def test_node_resumes_an_unsent_series_after_restart(model, tmp_path):
    """Outputs written but the destination down: a stop leaves the series 'done'; the next node
    instance on the same spool sends it once, and a third one sends nothing."""
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(spool, port=0).start()
    files = _ct_series(tmp_path / "ct", seed=21)
    try:
        node = _node(spool, model, free_port(), send_attempts=1000)  # a destination that is down
        node.retry_delay = 0.5
        stop, thread, _ = _run(node)
        assert set(_send(files, scp.port)) == {0}
        deadline = time.monotonic() + 120
        work = None
        while time.monotonic() < deadline:
            work = next(iter(spool.pending()), None)
            if work is not None and spool.read_state(work).get("state") == "done":
                break
            time.sleep(0.2)
        assert work is not None and spool.read_state(work)["state"] == "done"
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive() and spool.read_state(work)["state"] == "done"
        rtstruct_uid = pydicom.dcmread(work.path / spool.read_state(work)["outputs"][0]).SOPInstanceUID
    finally:
        scp.stop()

    pacs = Receiver()
    try:
        spool2 = Spool(tmp_path / "spool")
        _, thread, result = _run(_node(spool2, model, pacs.port), max_series=1)
        thread.join(timeout=60)
        assert result == {"sent": 1, "failed": 0}
        assert [d.SOPInstanceUID for d in pacs.datasets] == [rtstruct_uid]  # the file written before the stop
        _, thread, result = _run(_node(Spool(tmp_path / "spool"), model, pacs.port), exit_after_idle=1.0)
        thread.join(timeout=60)
        assert result == {"sent": 0, "failed": 0} and len(pacs.datasets) == 1
    finally:
        pacs.stop()
    sent = [e for e in spool2.events() if e["state"] == "sent"]
    assert len(sent) == 1 and sent[0]["series_uid"] == pydicom.dcmread(files[0]).SeriesInstanceUID
    history = [h["state"] for h in json.loads((spool2.root / sent[0]["filed_as"] / "state.json").read_text())["history"]]
    assert history == ["received", "processing", "done", "sent"]


def test_model_overrides_are_checked(weights, tmp_path):
    from npc_gtv.node.model import BundleModel

    with pytest.raises(ValueError, match="no such id"):
        BundleModel(SATS, tmp_path, config=QUICK, overrides={"ckpt_pth": str(weights)})
    with pytest.raises(ValueError, match="set by the node"):
        BundleModel(SATS, tmp_path, config=QUICK, overrides={"write_rtstruct": True})
    from shared_transforms.io import InputError

    with pytest.raises(InputError, match="does not exist"):
        BundleModel(SATS, tmp_path, config=QUICK, overrides={"ckpt_path": str(tmp_path / "missing.pt")})
    with pytest.raises(InputError, match="not a bundle folder"):
        BundleModel(tmp_path, tmp_path)


def test_prefetched_series_is_served_to_the_bundle_reader_once_checked(tmp_path, monkeypatch):
    """The node's checked read is handed to the bundle's LoadImaged instead of a second read."""
    import shared_transforms.dicom as sd
    from monai.transforms import LoadImaged

    files = _ct_series(tmp_path / "CT", seed=3)
    vol = read_dicom_series(files[0].parent)
    reads = []
    real = sd.read_dicom_series
    monkeypatch.setattr(sd, "read_dicom_series", lambda *a, **k: reads.append(a) or real(*a, **k))
    load = LoadImaged(keys="image", image_only=False)
    with sd.prefetched_series(files[0].parent, vol):
        d = load({"image": str(files[0].parent)})
        assert reads == []
        np.testing.assert_array_equal(np.asarray(d["image"]), vol.array)
        assert d["image"].meta["SeriesInstanceUID"] == vol.series.uid and d["image"].meta["dicom_dir"] == str(files[0].parent)
        np.testing.assert_allclose(d["image"].affine, vol.affine)
        d["image"][:] = 0  # the bundle may change its input in place: the node's volume is not touched
        assert vol.array.max() > 0
        # a reader asking for another series, or for stricter checks, reads the folder itself
        sd.DicomSeriesReader(spacing_tolerance=0.001).get_data(sd.DicomSeriesReader().read(str(files[0].parent)))
        assert len(reads) == 1
    load({"image": str(files[0].parent)})
    assert len(reads) == 2  # outside the block: read as usual
