"""``npc-gtv serve``: the auto-contouring DICOM node.

CT series come in over DICOM (:class:`~npc_gtv.node.dimse.StorageSCP`) into the spool
(:class:`~npc_gtv.node.spool.Spool`); :class:`Node` takes one complete series at a time (no image
for ``quiet_time`` seconds), checks it with the project's series checks
(:func:`shared_transforms.dicom.read_dicom_series`, the checks of ``npc-gtv dicom2nifti``), runs
the bundle's inference with the network kept in memory (:class:`~npc_gtv.node.model.BundleModel`),
writes the RT structure set (and a DICOM SEG if asked) referencing the series
(:meth:`npc_gtv.dicom.transforms.SaveDicomRTd.write`) and sends it to the destination
(:func:`~npc_gtv.node.dimse.send_files`). A bad series is filed under ``failed/`` with its reason
and the node goes on; after a restart the spool resumes where it stopped.

The log names series by their UIDs and gives timings; it never contains patient names or IDs.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from shared_transforms.io import input_error_from

from .dimse import Destination, SendError, StorageSCP, check_ae_title, echo, send_files
from .spool import SeriesJob, Spool

__all__ = ["Node", "serve_command"]

logger = logging.getLogger("npc_gtv.node")


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    """Record the duration of the block in ``timings[key]`` (seconds), also when it fails."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - start, 3)


def _reason(exc: BaseException) -> str:
    """One line: the InputError behind ``exc`` (file and problem) or the exception itself."""
    clear = input_error_from(exc)
    text = str(clear if clear is not None else f"{type(exc).__name__}: {exc}")
    return " ".join(text.split())[:1000]


class Node:
    """The node's worker: one series at a time from the spool to the destination.

    Args:
        spool: the spool (receiving is done by a :class:`StorageSCP` on the same spool).
        model: the loaded bundle (anything with ``predict(image, case_id) -> {"pred": ...}``,
            ``output_dir`` and ``roi_name``, normally a :class:`~npc_gtv.node.model.BundleModel`).
        destination: where the results are sent.
        ae_title: the node's AE title (calling AE title when sending).
        quiet_time: seconds without a new image after which a series counts as complete.
        dicom_seg: also write and send a DICOM SEG.
        roi_name: ROI / segment name (default: the bundle's ``roi_name``).
        send_attempts, retry_delay, send_timeout: see :func:`~npc_gtv.node.dimse.send_files`.

    Raises:
        ValueError: bad arguments.
    """

    def __init__(self, spool: Spool, model, destination: Destination, *, ae_title: str = "NPCGTV", quiet_time: float = 10.0, dicom_seg: bool = False, roi_name: str | None = None, send_attempts: int = 3, retry_delay: float = 10.0, send_timeout: float = 30.0):
        if float(quiet_time) <= 0:
            raise ValueError(f"quiet_time must be > 0 seconds, got {quiet_time}")
        if int(send_attempts) < 1:
            raise ValueError(f"send_attempts must be >= 1, got {send_attempts}")
        self.spool = spool
        self.model = model
        self.destination = destination
        self.ae_title = check_ae_title(ae_title)
        self.quiet_time = float(quiet_time)
        self.dicom_seg = bool(dicom_seg)
        self.roi_name = roi_name or getattr(model, "roi_name", None) or "GTVp"
        self.send_attempts = int(send_attempts)
        self.retry_delay = float(retry_delay)
        self.send_timeout = float(send_timeout)
        self.finished = {"sent": 0, "failed": 0}

    # ----------------------------------------------------------------- one series
    def _infer_and_write(self, job: SeriesJob, timings: dict) -> dict:
        """Check, infer, write; returns the state fields of a ``done`` series."""
        from npc_gtv.dicom.rtstruct import read_rtstruct_rois
        from npc_gtv.dicom.transforms import SaveDicomRTd
        from shared_transforms.dicom import prefetched_series, read_dicom_series

        self.spool.clear_output(job)  # outputs of an interrupted run were never sent
        with _timed(timings, "check_s"):
            ct = read_dicom_series(job.images_dir, job.series_uid, modality=("CT",))
        if str(getattr(ct.headers[0], "StudyInstanceUID", "")) != job.study_uid:
            raise ValueError(f"{job.images_dir}: StudyInstanceUID of the images differs from the spool folder")
        with _timed(timings, "inference_s"), prefetched_series(job.images_dir, ct):  # the bundle reads the checked volume
            item = self.model.predict(job.images_dir, case_id=job.series_uid)
        with _timed(timings, "write_s"):
            job.output_dir.mkdir(parents=True, exist_ok=True)
            writer = SaveDicomRTd(keys="pred", output_dir=job.output_dir, roi_name=self.roi_name, write_rtstruct=True, write_seg=self.dicom_seg, overwrite=True)  # the job folder is this series's own
            written = writer.write(item["pred"], ct, "CT", source=f"prediction of series {job.series_uid}")
            self._collect_bundle_outputs(job)
        rois = read_rtstruct_rois(written[0])
        contours = rois.get(self.roi_name, [])
        return {
            "outputs": [str(p.relative_to(job.path)) for p in written],
            "contours": {"polygons": len(contours), "slices": len({uid for uid, _ in contours}), "ct_slices": len(ct.files)},
        }

    def _collect_bundle_outputs(self, job: SeriesJob) -> None:
        """Move what the bundle's own savers wrote for this series (its NIfTI) into ``output/``."""
        out = Path(self.model.output_dir)
        if not out.is_dir():
            return
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            target = job.output_dir / "bundle" / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)

    def process(self, job: SeriesJob, stop: threading.Event | None = None) -> str:
        """Take ``job`` from its current state to ``sent`` or ``failed``.

        Returns:
            the final state, or the current one (``done``) when ``stop`` interrupted the sending
            (it is resumed after a restart).
        """
        state = self.spool.read_state(job)
        timings = dict(state.get("timings") or {})
        ids = f"series {job.series_uid} (study {job.study_uid})"
        if state.get("state") in ("sent", "failed"):  # interrupted just before filing
            self.spool.finish(job, state["state"])
            self.finished[state["state"]] += 1
            return state["state"]
        if state.get("state") != "done":
            try:
                fields = self._infer_and_write(job, timings)
            except Exception as exc:  # a bad series never stops the node
                reason = _reason(exc)
                logger.error("%s: failed, %s", ids, reason)
                self.spool.finish(job, "failed", reason=reason, timings=timings)
                self.finished["failed"] += 1
                return "failed"
            state = self.spool.set_state(job, "done", timings=timings, **fields)
            c = fields["contours"]
            logger.info(
                "%s: %d images checked in %.2f s, inference %.2f s, %s written in %.2f s (%d contours on %d slices)",
                ids, c["ct_slices"], timings["check_s"], timings["inference_s"], "+".join(Path(o).name for o in fields["outputs"]),
                timings["write_s"], c["polygons"], c["slices"],
            )
            if c["polygons"] == 0:
                logger.warning("%s: the prediction is empty; the structure set holds the ROI without contours", ids)
        files = [job.path / o for o in state["outputs"]]
        t = time.perf_counter()
        try:
            attempt = send_files(files, self.destination, calling_aet=self.ae_title, attempts=self.send_attempts, retry_delay=self.retry_delay, timeout=self.send_timeout, stop=stop)
        except SendError as exc:
            if stop is not None and stop.is_set():
                logger.warning("%s: stopping before it was delivered; it is sent after the restart", ids)
                return "done"
            reason = f"sending to {self.destination} failed: {exc}"
            logger.error("%s: %s", ids, reason)
            self.spool.finish(job, "failed", reason=reason, timings=timings)
            self.finished["failed"] += 1
            return "failed"
        timings["send_s"] = round(time.perf_counter() - t, 3)
        if state.get("last_received"):  # wall clock: from the last image received to delivery
            last = datetime.datetime.fromisoformat(state["last_received"])
            timings["since_last_image_s"] = round((datetime.datetime.now().astimezone() - last).total_seconds(), 3)
        self.spool.set_state(job, "sent", timings=timings, destination=str(self.destination), attempts=attempt)
        logger.info("%s: sent to %s in %.2f s (attempt %d)", ids, self.destination, timings["send_s"], attempt)
        self.spool.finish(job, "sent")
        self.finished["sent"] += 1
        return "sent"

    # ----------------------------------------------------------------- the loop
    def run(self, stop: threading.Event, *, max_series: int | None = None, exit_after_idle: float | None = None, poll_interval: float = 0.2) -> dict:
        """Work until ``stop`` is set (or the limits below are reached).

        Args:
            stop: set it (e.g. from a signal handler) to stop after the current series.
            max_series: return after this many series were finished (sent or failed).
            exit_after_idle: return after this many seconds with nothing received or processed
                and nothing waiting.
            poll_interval: seconds between looks at the spool.

        Returns:
            ``{"sent": n, "failed": m}`` of this run.

        Raises:
            InputError: another process works on the same spool.
        """
        took_lock = self.spool.lock()
        try:
            return self._loop(stop, max_series, exit_after_idle, poll_interval)
        finally:
            if took_lock:
                self.spool.unlock()

    def _loop(self, stop, max_series, exit_after_idle, poll_interval) -> dict:
        for job in self.spool.recover():
            if stop.is_set():
                break
            self._run_one(job, stop)
        while not stop.is_set():
            if max_series is not None and sum(self.finished.values()) >= int(max_series):
                logger.info("finished %d series (--max_series); stopping", sum(self.finished.values()))
                break
            job = self.spool.take(self.quiet_time)
            if job is not None:
                self._run_one(job, stop)
                continue
            idle = time.monotonic() - self.spool.last_activity
            if exit_after_idle is not None and idle >= float(exit_after_idle) and not self.spool.pending():
                logger.info("idle for %.0f s (--exit_after_idle); stopping", idle)
                break
            stop.wait(poll_interval)
        return dict(self.finished)

    def _run_one(self, job: SeriesJob, stop: threading.Event) -> None:
        try:
            self.process(job, stop)
        except Exception as exc:  # a fault of the node itself (disk, state file): file it, go on
            reason = _reason(exc)
            logger.exception("series %s: unexpected error: %s", job.series_uid, reason)
            try:
                self.spool.finish(job, "failed", reason=f"node error: {reason}")
                self.finished["failed"] += 1
            except Exception:
                logger.exception("series %s: could not be filed under failed/; stopping", job.series_uid)
                stop.set()
        self.spool.last_activity = time.monotonic()


def _setup_logging(verbose: bool, log_file: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(log_file, encoding="utf-8")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    # pynetdicom logs every association at INFO; keep its warnings and errors only
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)


def serve_command(
    bundle: str,
    spool: str,
    dest_aet: str,
    dest_port: int,
    dest_host: str = "127.0.0.1",
    config=(),
    ae_title: str = "NPCGTV",
    host: str = "127.0.0.1",
    port: int = 11112,
    allowed_aets=(),
    quiet_time: float = 10.0,
    dicom_seg: bool = False,
    roi_name: str | None = None,
    send_attempts: int = 3,
    retry_delay: float = 10.0,
    max_series: int | None = None,
    exit_after_idle: float | None = None,
    verbose: bool = False,
    **overrides,
):
    """Run the auto-contouring DICOM node: CT in over DICOM, RT structure set back.

    Receives CT series (C-STORE), waits until a series has been quiet for ``quiet_time``
    seconds, checks it (missing slices, uneven spacing, mixed series), runs the bundle's
    inference with the model loaded once, and sends the RTSTRUCT (and SEG) referencing the
    series to the destination. Stop with Ctrl-C / SIGTERM (after the current series; a second
    signal stops at once, the series is resumed at the next start).

    Args:
        bundle: bundle folder, e.g. ``bundles/sats_npc`` (its trained weights are used).
        spool: folder for received images, outputs, state and ``events.jsonl`` (created).
        dest_aet: AE title of the destination (PACS / planning system) that receives the results.
        dest_port: its DICOM port.
        dest_host: its host name or address.
        config: override config file(s) merged after ``configs/inference.yaml``
            (e.g. ``configs/quick.yaml``; relative paths are also looked up in the bundle).
        ae_title: the node's AE title.
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: DICOM port to listen on.
        allowed_aets: calling AE titles allowed to send (comma-separated or a list; empty: any).
        quiet_time: seconds without a new image after which a series counts as complete.
        dicom_seg: also write and send a DICOM SEG.
        roi_name: ROI name (default: the bundle's ``roi_name``, GTVp).
        send_attempts: associations tried per delivery before the series is filed as failed.
        retry_delay: seconds between delivery attempts.
        max_series: stop after this many series (sent or failed).
        exit_after_idle: stop after this many idle seconds.
        verbose: also log pynetdicom's association messages.
        **overrides: ``--<config id> <value>`` for the bundle's configuration, as in
            ``python -m monai.bundle run`` (``--ckpt_path``, ``--device``, ...).
    """
    import os

    from .model import BundleModel

    try:  # bad arguments and bad files stop here with one line, before anything listens
        if isinstance(allowed_aets, str):
            allowed_aets = [a for a in allowed_aets.replace(" ", ",").split(",") if a]
        destination = Destination(str(dest_aet), str(dest_host), dest_port)
        the_spool = Spool(spool)
        the_spool.lock()
        _setup_logging(bool(verbose), the_spool.root / "node.log")
        scp = StorageSCP(the_spool, ae_title=str(ae_title), host=str(host), port=port, allowed_aets=list(allowed_aets))
        model = BundleModel(bundle, the_spool.root / "bundle_output", config=config, overrides=overrides)
        node = Node(
            the_spool, model, destination, ae_title=scp.ae_title, quiet_time=quiet_time, dicom_seg=dicom_seg,
            roi_name=roi_name, send_attempts=send_attempts, retry_delay=retry_delay,
        )
    except ValueError as exc:  # includes InputError (missing bundle, config or weights file)
        print(f"npc-gtv serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    stop = threading.Event()

    def _on_signal(signum, _frame):
        if stop.is_set():
            logger.warning("second signal %d: stopping now; the current series is resumed at the next start", signum)
            raise SystemExit(128 + signum)
        logger.info("signal %d: stopping after the current series", signum)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            scp.start()
        except OSError as exc:
            print(f"npc-gtv serve: error: cannot listen on {scp.host}:{scp.port} ({exc.strerror or exc})", file=sys.stderr)
            raise SystemExit(2) from None
        logger.info(
            "AE %s listening on %s:%d (pid %d), bundle %s, results to %s, quiet time %.1f s, spool %s",
            scp.ae_title, scp.host, scp.port, os.getpid(), model.root.name, destination, node.quiet_time, the_spool.root,
        )
        if not echo(destination, calling_aet=scp.ae_title, timeout=5.0):
            logger.warning("the destination %s does not answer C-ECHO from %s; deliveries fail until it does", destination, scp.ae_title)
        counts = node.run(stop, max_series=max_series, exit_after_idle=exit_after_idle)
    finally:
        scp.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"npc-gtv serve: {counts['sent']} series sent, {counts['failed']} failed; received {scp.received} image(s), refused {scp.refused}")
    return None
