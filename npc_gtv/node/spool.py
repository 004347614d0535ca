"""The DICOM node's spool: received CT images and each series' state, on disk.

Layout under the spool folder (every file is written under a temporary name and renamed into
place; a series moves between the top folders by renaming its folder)::

    incoming/<StudyUID>/<SeriesUID>/CT/<SOPInstanceUID>.dcm   images of a series being received
                                   /state.json                 {"state": "received", ...}
    work/<StudyUID>/<SeriesUID>/                               taken for processing (same layout)
                               /output/                        RTSTRUCT, SEG, the bundle's NIfTI
    sent/<StudyUID>/<SeriesUID>[.N]/                           delivered series ("sent")
    failed/<StudyUID>/<SeriesUID>[.N]/                         rejected series ("failed", state.json
                                                               says why)
    tmp/                                                       images of transfers in progress
    events.jsonl                                               one JSON line per finished series

A series' states: ``received`` (in ``incoming/``) -> ``processing`` -> ``done`` (outputs
written, not yet delivered) -> ``sent``; any of them -> ``failed``. After a restart
(:meth:`Spool.recover`) a series in ``work/`` is resumed from its state: ``processing`` is
processed again from its images, ``done`` is only sent, ``sent`` / ``failed`` are only filed.
A series still in ``incoming/`` waits for the quiet time again. Delivered series are never sent
again by the node; the one window left is a crash between the destination's success answer
and the ``sent`` state reaching the disk, after which the same files (same SOP Instance UIDs)
are sent once more, which a PACS stores as the same instance.

Folder names are DICOM UIDs, checked to be UIDs (digits and dots) before they touch a path.
Nothing here reads or records patient names or IDs.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared_transforms.io import InputError, atomic_write

__all__ = ["Spool", "SeriesJob", "is_uid", "STATES"]

logger = logging.getLogger(__name__)

STATES = ("received", "processing", "done", "sent", "failed")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    text = str(value or "")
    return 0 < len(text) <= 64 and _UID.match(text) is not None


def _now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SeriesJob:
    """One series in the spool.

    Attributes:
        study_uid, series_uid: the series' Study and Series Instance UIDs.
        path: its folder (in ``incoming/``, ``work/``, ``sent/`` or ``failed/``).
    """

    study_uid: str
    series_uid: str
    path: Path

    @property
    def images_dir(self) -> Path:
        """Folder of the CT images (``CT/``)."""
        return self.path / "CT"

    @property
    def output_dir(self) -> Path:
        """Folder of the outputs (``output/``)."""
        return self.path / "output"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def key(self) -> tuple[str, str]:
        return (self.study_uid, self.series_uid)


class Spool:
    """The node's on-disk queue (see the module docstring for the layout).

    Thread-safe: the storage handlers of several associations call :meth:`store` while the
    worker calls :meth:`take`, :meth:`set_state` and :meth:`finish`.

    Args:
        root: spool folder (created if missing).
    """

    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(self.root, "spool path exists and is not a folder")
        if not self.root.exists():
            self.root.mkdir(parents=True, mode=0o700)  # it will hold patient images
        for name in ("incoming", "work", "sent", "failed", "tmp"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self.events_path = self.root / "events.jsonl"
        self._lock = threading.Lock()
        # (study, series) -> (monotonic time, wall-clock ISO time) of the last image received
        self._last: dict[tuple[str, str], tuple[float, str]] = {}
        self._first: dict[tuple[str, str], str] = {}
        self.last_activity = time.monotonic()

    # ----------------------------------------------------------------- one node per spool
    def lock(self) -> bool:
        """Hold the spool for this process (``node.lock``, released when the process ends).

        Returns:
            True when this call took the lock, False when this object already held it.

        Raises:
            InputError: another process (another ``npc-gtv serve``) holds it.
        """
        import fcntl

        if getattr(self, "_lock_fd", None) is not None:
            return False
        fd = os.open(self.root / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(self.root, "spool is in use by another running npc-gtv serve (one node per spool)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        """Release :meth:`lock`."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    # ----------------------------------------------------------------- receiving
    def store(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Store one received CT image of a series in ``incoming/``.

        Args:
            data: the complete DICOM file (preamble, file meta, data set).
            study_uid, series_uid, sop_uid: its UIDs (checked with :func:`is_uid`).

        Returns:
            True when stored, False when this SOP instance was already there (kept as it was).

        Raises:
            ValueError: a UID is not a valid UID. OSError: the disk refused the write.
        """
        for name, uid in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid), ("SOPInstanceUID", sop_uid)):
            if not is_uid(uid):
                raise ValueError(f"{name} {str(uid)[:80]!r} is not a valid DICOM UID")
        fd, tmp = tempfile.mkstemp(prefix=f".{sop_uid}.", suffix=".dcm", dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            with self._lock:
                job = SeriesJob(study_uid, series_uid, self.root / "incoming" / study_uid / series_uid)
                target = job.images_dir / f"{sop_uid}.dcm"
                if target.exists():
                    return False
                job.images_dir.mkdir(parents=True, exist_ok=True)
                if not job.state_path.exists():
                    self._write_state(job, {"state": "received", "study_uid": study_uid, "series_uid": series_uid, "history": [{"state": "received", "at": _now_iso()}]})
                os.replace(tmp, target)
                now, wall = time.monotonic(), _now_iso()
                self._last[job.key] = (now, wall)
                self._first.setdefault(job.key, wall)
                self.last_activity = now
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ----------------------------------------------------------------- state files
    def _write_state(self, job: SeriesJob, state: dict) -> None:
        with atomic_write(job.state_path) as tmp:
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))

    def read_state(self, job: SeriesJob) -> dict:
        """The series' ``state.json`` (``{"state": "received"}`` when it has none yet)."""
        try:
            return json.loads(job.state_path.read_text())
        except FileNotFoundError:
            return {"state": "received", "study_uid": job.study_uid, "series_uid": job.series_uid, "history": []}
        except (OSError, ValueError) as exc:
            raise InputError(job.state_path, f"unreadable state file ({type(exc).__name__}: {exc})") from exc

    def set_state(self, job: SeriesJob, state: str, **fields) -> dict:
        """Record a new state (and extra fields) in the series' ``state.json``, atomically."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        current = self.read_state(job)
        current.update(fields)
        current["state"] = state
        current.setdefault("history", []).append({"state": state, "at": _now_iso()})
        self._write_state(job, current)
        return current

    # ----------------------------------------------------------------- the queue
    def _jobs(self, top: str) -> list[SeriesJob]:
        out = []
        base = self.root / top
        for study in sorted(p for p in base.iterdir() if p.is_dir() and is_uid(p.name)):
            for series in sorted(p for p in study.iterdir() if p.is_dir() and is_uid(p.name)):
                out.append(SeriesJob(study.name, series.name, series))
        return out

    def pending(self) -> list[SeriesJob]:
        """Series in ``work/`` (resumed after a restart) and in ``incoming/``."""
        with self._lock:
            return self._jobs("work") + self._jobs("incoming")

    def recover(self) -> list[SeriesJob]:
        """Start-up: remove partial transfers, restart the quiet time of incoming series.

        Returns:
            the series in ``work/`` (interrupted by a stop or crash), to be resumed first.
        """
        with self._lock:
            for stray in (self.root / "tmp").iterdir():
                if stray.is_file():
                    stray.unlink()
            now, wall = time.monotonic(), _now_iso()
            for job in self._jobs("incoming"):
                self._last[job.key] = (now, wall)
            work = self._jobs("work")
        for job in work:
            logger.info("resuming series %s (study %s) in state %s", job.series_uid, job.study_uid, self.read_state(job).get("state"))
        return work

    def take(self, quiet_time: float) -> SeriesJob | None:
        """The next series to work on, moved to ``work/``; None when there is none yet.

        Series already in ``work/`` come first (they were interrupted); then the incoming series
        whose last image arrived at least ``quiet_time`` seconds ago, oldest first. An incoming
        series whose UIDs are still in ``work/`` waits until that one is finished.
        """
        with self._lock:
            work = self._jobs("work")
            if work:
                return work[0]
            now = time.monotonic()
            ready = []
            for job in self._jobs("incoming"):
                last = self._last.setdefault(job.key, (now, _now_iso()))
                if now - last[0] >= quiet_time:
                    ready.append((last[0], job))
            if not ready:
                return None
            _, job = min(ready, key=lambda item: item[0])
            target = SeriesJob(job.study_uid, job.series_uid, self.root / "work" / job.study_uid / job.series_uid)
            target.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(job.path, target.path)
            wall_last = self._last.pop(job.key)[1]
            first = self._first.pop(job.key, None)
            self._remove_empty(job.path.parent)
        n_images = sum(1 for _ in target.images_dir.glob("*.dcm"))
        self.set_state(target, "processing", images=n_images, first_received=first, last_received=wall_last)
        return target

    def finish(self, job: SeriesJob, state: str, **fields) -> SeriesJob:
        """Record the final state (``sent`` or ``failed``), file the series and log an event.

        The series folder moves from ``work/`` to ``sent/`` or ``failed/`` (``.1``, ``.2`` ... is
        appended when that series was filed before); one line is appended to ``events.jsonl``.

        Returns:
            the series at its new place.
        """
        if state not in ("sent", "failed"):
            raise ValueError(f"a series finishes as 'sent' or 'failed', not {state!r}")
        current = self.read_state(job)
        record = current if current.get("state") == state and not fields else self.set_state(job, state, **fields)
        dest_parent = self.root / state / job.study_uid
        dest_parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            dest, n = dest_parent / job.series_uid, 0
            while dest.exists():
                n += 1
                dest = dest_parent / f"{job.series_uid}.{n}"
            os.replace(job.path, dest)
            self._remove_empty(job.path.parent)
            self.last_activity = time.monotonic()
        event = {k: record.get(k) for k in ("study_uid", "series_uid", "state", "images", "first_received", "last_received", "reason", "timings", "outputs", "destination", "contours", "attempts")}
        event["filed_as"] = str(dest.relative_to(self.root))
        event["at"] = _now_iso()
        self._append_event(event)
        return SeriesJob(job.study_uid, job.series_uid, dest)

    def _append_event(self, event: dict) -> None:
        line = (json.dumps(event, sort_keys=True) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        """All finished-series events so far (``events.jsonl``)."""
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    @staticmethod
    def _remove_empty(folder: Path) -> None:
        try:
            folder.rmdir()
        except OSError:
            pass

    def clear_output(self, job: SeriesJob) -> None:
        """Remove outputs of an interrupted processing run of ``job`` (never sent)."""
        if job.output_dir.exists():
            shutil.rmtree(job.output_dir)
