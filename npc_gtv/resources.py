"""Resource measurements for the benchmarks and the server checks (``psutil``, from the ``bench`` extra).

:class:`PeakRSS` samples the resident memory of a process and all its descendants (a MONAI Label
server and the training subprocesses it starts, a bundle run and its data-loader workers).
"""

from __future__ import annotations

import threading
import time

__all__ = ["PeakRSS"]


class PeakRSS:
    """Peak resident memory, in bytes, of process ``pid`` and all its descendants while the context is open.

    Args:
        pid: the process to watch.
        interval: seconds between samples (a shorter peak can be missed).

    Example:
        >>> with PeakRSS(proc.pid) as rss:  # doctest: +SKIP
        ...     proc.wait()
        >>> rss.peak / 2**30  # doctest: +SKIP
    """

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.proc = psutil.Process(pid)
        self.interval = float(interval)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """The current resident memory of the process tree (processes that end meanwhile count as 0)."""
        import psutil

        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
