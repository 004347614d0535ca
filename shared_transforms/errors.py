"""One clear line for a failed run: the message behind an exception, and the bundle-run exception hook.

A bad input deep inside a bundle run reaches the top wrapped several times: MONAI's ``Compose``
raises ``RuntimeError("applying transform ...")`` from it, a data-loader worker re-raises it as a
``RuntimeError`` holding the worker's traceback as text, the config parser raises ``RuntimeError
("Failed to evaluate ...")``. Python then prints 200-350 lines ending in a generic ``RuntimeError``.

* :func:`clear_message` finds the message that says what is wrong: an
  :class:`~shared_transforms.io.InputError` (``"<file>: <problem>"``), an ``OSError`` (``"<file>:
  No space left on device"``) or a ``MemoryError``, along the ``__cause__`` / ``__context__`` chain
  or inside a data-loader worker's traceback text.
* :func:`install_bundle_excepthook` (called when :mod:`shared_transforms` is imported by
  ``python -m monai.bundle``, i.e. by every bundle config of this project) makes a failed run end
  with ``npc-gtv bundle run: error: <message>`` as its last line, once (exit status 1; exit
  handlers run before it, and nothing prints after it). For those clear errors
  the Python traceback is left out (MONAI's own log above keeps its record of the failure;
  ``NPC_GTV_TRACEBACK=1`` prints it); any other exception keeps its full traceback and the last
  line names its innermost cause.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["clear_message", "root_cause", "final_line", "install_bundle_excepthook"]

_WORKER_INPUT = re.compile(r"^(?:[\w.]+\.)?InputError: (.+)$")
_WORKER_OS = re.compile(r"^(?:[\w.]+\.)?(\w*Error): \[Errno (\d+)\] (.+)$")


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _os_message(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    name = exc.filename
    return f"{name}: {text}" if name else (text if exc.strerror else f"{type(exc).__name__}: {exc}")


def clear_message(exc: BaseException | None) -> str | None:
    """The one-line message of a bad input or an operating-system failure behind ``exc``, or None.

    Looks for, in this order along the exception chain: :class:`~shared_transforms.io.InputError`,
    ``OSError`` (no space, permission, read-only file system, missing file), ``MemoryError``; then in
    the text of a data-loader worker's re-raised traceback. Returns None for anything else (a bug:
    its traceback is the useful output).
    """
    from shared_transforms.io import InputError

    chain = list(_chain(exc))
    for item in chain:  # torch's DataLoader re-raises a worker's failure with the traceback as text
        text = str(item)
        if "Original Traceback" not in text:
            continue
        lines = [line.strip() for line in text.splitlines()]
        for line in lines:
            found = _WORKER_INPUT.match(line)
            if found:
                return found.group(1).strip()
        for line in lines:
            found = _WORKER_OS.match(line)
            if found:
                return found.group(3).strip()
    for item in chain:
        if isinstance(item, InputError):
            return " ".join(str(item).split())
    for item in chain:
        if isinstance(item, OSError) and not isinstance(item, (ConnectionError, TimeoutError)) and (item.errno or item.strerror):
            return " ".join(_os_message(item).split())
    for item in chain:
        if isinstance(item, MemoryError):
            return " ".join(f"out of memory ({item})".split())
    return None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of the chain (what actually went wrong first)."""
    return list(_chain(exc))[-1]


def final_line(exc: BaseException, prefix: str) -> tuple[str, bool]:
    """``(last line to print, is_clear)`` for a failed run."""
    clear = clear_message(exc)
    if clear is not None:
        return f"{prefix}: error: {clear}", True
    cause = root_cause(exc)
    text = " ".join(str(cause).split()) or "(no message)"
    return f"{prefix}: error: {type(cause).__name__}: {text[:500]}", False


def _running_bundle() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", "") in ("monai.bundle.__main__", "monai.bundle"):
        return True
    parts = os.path.normpath(sys.argv[0] if sys.argv else "").split(os.sep)
    return parts[-3:] == ["monai", "bundle", "__main__.py"]


def install_bundle_excepthook(force: bool = False) -> bool:
    """Make a failed ``python -m monai.bundle run`` end with one clear line (module docstring).

    Args:
        force: install even when this process is not ``python -m monai.bundle``.

    Returns:
        True when the hook is installed (it is installed once).
    """
    if getattr(sys.excepthook, "_npc_gtv", False):
        return True
    if not (force or _running_bundle()):
        return False
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt) or exc is None:
            previous(exc_type, exc, tb)
            return
        line, clear = final_line(exc, "npc-gtv bundle run")
        if not clear or os.environ.get("NPC_GTV_TRACEBACK"):
            previous(exc_type, exc, tb)
        # what would otherwise print after us (exit handlers, warnings at interpreter teardown such as
        # ITK's SWIG DeprecationWarning) runs or is skipped now, so that our line is the last one
        import atexit
        import logging

        try:
            atexit._run_exitfuncs()
            logging.shutdown()
        except Exception:  # noqa: BLE001 - the failure report must still be printed
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        print(line, file=sys.stderr, flush=True)
        os._exit(1)

    hook._npc_gtv = True  # type: ignore[attr-defined]
    sys.excepthook = hook
    return True
