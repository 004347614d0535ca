"""DICOM networking of the node (pynetdicom): the Storage SCP that receives CT images and the
Storage SCU that sends the RT structure set (and SEG) to the destination.

Receiving (:class:`StorageSCP`): the node accepts associations for Verification (C-ECHO) and for
every storage SOP class, in the uncompressed transfer syntaxes the project's DICOM reader
decodes without extra codecs. It stores CT Image Storage instances only; every other SOP class
is answered with the DIMSE status 0x0122 "Refused: SOP Class not supported", so the sender
reports the refusal per instance. Statuses (PS3.4 B.2.3, PS3.7 C):

=========  ================================================================================
0x0000     stored (also for an instance received before: the first copy is kept)
0x0122     refused: the SOP class is not CT Image Storage
0xA700     refused: out of resources (the spool could not be written)
0xA900     error: data set does not match the SOP class (wrong SOP Class UID, missing or
           invalid Study / Series / SOP Instance UID)
0xC000     error: cannot understand (the data set could not be decoded)
=========  ================================================================================

Sending (:func:`send_files`): one association per attempt, a bounded number of attempts with a
pause between them; an attempt succeeds when every file is answered with success or a warning
status (0x0000, 0x0001, 0xB000, 0xB006, 0xB007).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from npc_gtv.dicom.series import CT_IMAGE_STORAGE

from .spool import Spool, is_uid

__all__ = [
    "Destination",
    "StorageSCP",
    "send_files",
    "echo",
    "SendError",
    "check_ae_title",
    "STATUS_SUCCESS",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
# success and warning statuses of a C-STORE response: the instance was stored
_STORED = {0x0000, 0x0001, 0xB000, 0xB006, 0xB007}


def check_ae_title(value, what: str = "AE title") -> str:
    """Return ``value`` as an AE title, or raise ``ValueError`` (1-16 characters, no backslash)."""
    text = str(value or "").strip()
    if not 1 <= len(text) <= 16 or "\\" in text or not text.isprintable():
        raise ValueError(f"{what} must be 1-16 printable characters without a backslash, got {value!r}")
    return text


def _check_port(value, what: str, allow_any: bool = False) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a TCP port number, got {value!r}") from None
    if not (0 if allow_any else 1) <= port <= 65535:
        raise ValueError(f"{what} must be in {0 if allow_any else 1}..65535, got {port}")
    return port


@dataclass(frozen=True)
class Destination:
    """Where the results go: a DICOM Storage SCP (the PACS or the planning system).

    Attributes:
        ae_title: its AE title (the "called" AE). host: its host name or address. port: its port.
    """

    ae_title: str
    host: str
    port: int

    def __post_init__(self):
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "destination AE title"))
        object.__setattr__(self, "port", _check_port(self.port, "destination port"))
        if not str(self.host).strip():
            raise ValueError("destination host must not be empty")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class StorageSCP:
    """The node's Storage SCP: receives CT images into a :class:`~npc_gtv.node.spool.Spool`.

    Args:
        spool: where images are stored.
        ae_title: the node's AE title (the called AE title it answers to).
        host: bind address (127.0.0.1 by default: reachable from this machine only).
        port: TCP port (0: a free port chosen by the system, see :attr:`port` after :meth:`start`).
        allowed_aets: calling AE titles allowed to associate (empty: any).
        require_called_aet: refuse associations addressed to another AE title.

    Raises:
        ValueError: bad AE title or port.
    """

    def __init__(self, spool: Spool, ae_title: str = "NPCGTV", host: str = "127.0.0.1", port: int = 11112, allowed_aets: Sequence[str] = (), require_called_aet: bool = True):
        self.spool = spool
        self.ae_title = check_ae_title(ae_title)
        self.host = str(host)
        self.port = _check_port(port, "port", allow_any=True)
        self.allowed_aets = [check_ae_title(a, "allowed calling AE title") for a in allowed_aets]
        self.require_called_aet = bool(require_called_aet)
        self._server = None
        self.received = 0
        self.refused = 0
        self._count_lock = threading.Lock()

    def _ae(self):
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, AE
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, DEFAULT_TRANSFER_SYNTAXES)
        ae.require_called_aet = self.require_called_aet
        if self.allowed_aets:
            ae.require_calling_aet = list(self.allowed_aets)
        ae.maximum_associations = 8
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 120
        return ae

    def start(self) -> "StorageSCP":
        """Start listening (background threads; returns at once).

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        self._server = self._ae().start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        """Stop listening and close the open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _refuse(self, status: int, why: str, event) -> int:
        with self._count_lock:
            self.refused += 1
        calling = event.assoc.requestor.ae_title if getattr(event, "assoc", None) else "?"
        logger.warning("refused an instance from %s: %s (status 0x%04X)", calling, why, status)
        return status

    def _on_store(self, event) -> int:
        context_class = str(event.context.abstract_syntax)
        if context_class != CT_IMAGE_STORAGE:
            return self._refuse(STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {context_class} is not CT Image Storage", event)
        try:
            ds = event.dataset
            sop_class = str(ds.get("SOPClassUID", ""))
            study, series, sop = (str(ds.get(tag, "")) for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception as exc:  # undecodable data set
            return self._refuse(STATUS_CANNOT_UNDERSTAND, f"data set cannot be decoded ({type(exc).__name__})", event)
        if sop_class != CT_IMAGE_STORAGE:
            return self._refuse(STATUS_DATASET_MISMATCH, f"SOPClassUID {sop_class!r} does not match the presentation context", event)
        bad = [name for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop)) if not is_uid(uid)]
        if bad:
            return self._refuse(STATUS_DATASET_MISMATCH, f"missing or invalid {', '.join(bad)}", event)
        try:
            self.spool.store(event.encoded_dataset(), study, series, sop)
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"spool write failed ({type(exc).__name__}: {exc.strerror or exc})", event)
        with self._count_lock:
            self.received += 1
        return STATUS_SUCCESS


def echo(dest: Destination, *, calling_aet: str = "NPCGTV", timeout: float = 10.0) -> bool:
    """True when a C-ECHO (DICOM "ping") to ``dest`` is answered with success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=check_ae_title(calling_aet))
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(getattr(status, "Status", -1)) == STATUS_SUCCESS
    finally:
        assoc.release()


class SendError(RuntimeError):
    """Every attempt to deliver the files failed; the message says how the last one failed."""


def _send_once(files: Sequence[Path], dest: Destination, calling_aet: str, timeout: float) -> None:
    import pydicom
    from pynetdicom import AE

    classes = []
    for f in files:
        meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
        if meta.MediaStorageSOPClassUID not in classes:
            classes.append(meta.MediaStorageSOPClassUID)
    ae = AE(ae_title=calling_aet)
    for uid in classes:
        ae.add_requested_context(uid)  # pynetdicom's default uncompressed transfer syntaxes
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {dest} {why}")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = [uid for uid in classes if str(uid) not in accepted]
        if refused:
            raise SendError(f"{dest} does not accept SOP class(es) {', '.join(map(str, refused))}")
        for f in files:
            status = assoc.send_c_store(f)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in _STORED:
                raise SendError(f"{dest} answered C-STORE of {Path(f).name} with " + (f"status 0x{code:04X}" if code >= 0 else "no response"))
    finally:
        if assoc.is_established:
            assoc.release()


def send_files(files: Sequence, dest: Destination, *, calling_aet: str = "NPCGTV", attempts: int = 3, retry_delay: float = 10.0, timeout: float = 30.0, stop: threading.Event | None = None) -> int:
    """C-STORE ``files`` to ``dest``, retrying a bounded number of times.

    Args:
        files: DICOM files (RTSTRUCT, SEG) sent in one association per attempt.
        dest: the destination Storage SCP.
        calling_aet: the node's AE title.
        attempts: at most this many associations (>= 1).
        retry_delay: seconds between attempts.
        timeout: connection / ACSE / DIMSE / network timeout per attempt, seconds.
        stop: when set during a pause, give up at once (the caller keeps the files for later).

    Returns:
        the number of the attempt that succeeded (1 = first).

    Raises:
        SendError: every attempt failed (or ``stop`` was set), with the last failure's reason.
        ValueError: bad arguments.
    """
    if int(attempts) < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if float(retry_delay) < 0:
        raise ValueError(f"retry_delay must be >= 0, got {retry_delay}")
    files = [Path(f) for f in files]
    calling_aet = check_ae_title(calling_aet)
    last = "no attempt made"
    for attempt in range(1, int(attempts) + 1):
        try:
            _send_once(files, dest, calling_aet, float(timeout))
            return attempt
        except (SendError, OSError, RuntimeError) as exc:
            last = str(exc) or type(exc).__name__
            logger.warning("sending to %s, attempt %d of %d failed: %s", dest, attempt, attempts, last)
        if attempt < attempts:
            if stop is not None:
                if stop.wait(float(retry_delay)):
                    raise SendError(f"stopped while retrying; last attempt: {last}")
            else:
                time.sleep(float(retry_delay))
    raise SendError(f"{attempts} attempt(s) failed; last: {last}")
