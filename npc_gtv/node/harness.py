"""Test and benchmark harness for the DICOM node: a throwaway Orthanc PACS and a known model.

Not part of the node itself and not for clinical use:

- :class:`Orthanc` writes an Orthanc configuration into a temporary folder, starts
  ``Orthanc CONFIG.json`` on free loopback ports and talks to its REST API (upload, send to a
  modality, find and download series). Orthanc 1.10 (Debian bookworm) has no bind-address
  option and listens on every interface, so when a C compiler is present the harness preloads a
  tiny ``bind()`` shim that turns "any address" into 127.0.0.1; in every case the
  configuration refuses remote HTTP clients and every DICOM peer but the configured
  modalities from 127.0.0.1.
- :class:`NodeProcess` runs ``npc-gtv serve`` in a subprocess and waits until it answers C-ECHO.
- :func:`constant_foreground_weights` writes weights for a bundle's network whose output is a
  constant high logit, so inference marks the whole region the bundle looks at (its body crop)
  as foreground: a non-empty, deterministic prediction for integration tests, independent of
  any training.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["free_port", "orthanc_binary", "Orthanc", "NodeProcess", "constant_foreground_weights"]

_BIND_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
/* bind(): a wildcard IPv4/IPv6 address becomes the loopback address (Orthanc has no bind option) */
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real = 0;
    if (!real) real = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return real(fd, (const struct sockaddr *)&a, sizeof a);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (!memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr)) a.sin6_addr = in6addr_loopback;
        return real(fd, (const struct sockaddr *)&a, sizeof a);
    }
    return real(fd, addr, len);
}
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    """Path of the ``Orthanc`` executable (Debian package ``orthanc``), or None."""
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if os.access(p, os.X_OK)), None)


def _build_bind_shim(folder: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = folder / "bind_loopback.c", folder / "bind_loopback.so"
    src.write_text(_BIND_SHIM)
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"], capture_output=True, text=True, timeout=60)
    return lib if proc.returncode == 0 and lib.is_file() else None


class Orthanc:
    """A temporary Orthanc server on 127.0.0.1 (for tests and benchmarks).

    Args:
        modalities: ``{name: (AE title, host, port)}`` of the DICOM peers Orthanc may send to
            and accept from (the node).
        aet: Orthanc's own AE title.
        workdir: folder for the configuration, database and log (a new temporary folder when
            None; removed by :meth:`stop` only if it was created here).
        binary: the Orthanc executable (default: found on ``PATH``).
        start_timeout: seconds to wait for the REST API.

    Use as a context manager; :attr:`url`, :attr:`dicom_port` and :attr:`aet` describe it.

    Raises:
        RuntimeError: Orthanc is missing or does not come up (its log tail is in the message).
    """

    def __init__(self, modalities: Mapping[str, Sequence] | None = None, *, aet: str = "ORTHANC", workdir=None, binary: str | None = None, start_timeout: float = 60.0):
        self.binary = binary or orthanc_binary()
        if self.binary is None:
            raise RuntimeError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc_") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = {k: [str(v[0]), str(v[1]), int(v[2])] for k, v in (modalities or {}).items()}
        self.start_timeout = float(start_timeout)
        self.process: subprocess.Popen | None = None
        self.loopback_only = False

    def config(self) -> dict:
        """The Orthanc configuration written to ``orthanc.json``."""
        db = str(self.workdir / "db")
        return {
            "Name": "npc-gtv-test",
            "StorageDirectory": db,
            "IndexDirectory": db,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomModalities": self.modalities,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "UnknownSopClassAccepted": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "StableAge": 3600,
        }

    def start(self) -> "Orthanc":
        """Write the configuration, start Orthanc and wait for its REST API."""
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ)
        shim = _build_bind_shim(self.workdir)
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
            self.loopback_only = True
        self._log = open(self.workdir / "orthanc.log", "wb")
        self.process = subprocess.Popen([self.binary, str(cfg)], stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start within {self.start_timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        """The end of Orthanc's log."""
        path = self.workdir / "orthanc.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s) and remove a temporary folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: bytes | dict | list | str | None = None, timeout: float = 120.0):
        """One REST call; JSON answers are decoded, others returned as bytes."""
        data, headers = None, {}
        if isinstance(body, (dict, list)):
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        elif isinstance(body, str):
            data = body.encode()
        elif body is not None:
            data, headers = body, {"Content-Type": "application/dicom"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            if resp.headers.get_content_type() == "application/json":
                return json.loads(raw.decode() or "null")
            return raw

    def get(self, path: str, timeout: float = 120.0):
        """``GET path``."""
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 120.0):
        """``POST path``."""
        return self.request("POST", path, body, timeout=timeout)

    def upload(self, files: Sequence) -> str:
        """Upload DICOM files (``POST /instances``); returns the Orthanc id of their series."""
        series = set()
        for f in files:
            answer = self.post("/instances", Path(f).read_bytes())
            series.add(answer["ParentSeries"])
        if len(series) != 1:
            raise ValueError(f"expected the files of one series, Orthanc filed them under {len(series)} series")
        return series.pop()

    def send(self, modality: str, resources: Sequence[str], timeout: float = 300.0):
        """C-STORE ``resources`` (Orthanc ids) to ``modality``, synchronously."""
        return self.post(f"/modalities/{modality}/store", {"Resources": list(resources), "Synchronous": True}, timeout=timeout)

    def find_series(self, modality: str, study_uid: str | None = None) -> list[str]:
        """Orthanc ids of the series with ``modality`` (optionally in one study)."""
        query = {"Modality": modality}
        if study_uid:
            query["StudyInstanceUID"] = study_uid
        return self.post("/tools/find", {"Level": "Series", "Query": query})

    def series_files(self, series_id: str) -> list[bytes]:
        """The DICOM files of a series."""
        ids = [item["ID"] for item in self.get(f"/series/{series_id}/instances")]
        return [self.get(f"/instances/{i}/file") for i in ids]


class NodeProcess:
    """``npc-gtv serve ARGS`` in a subprocess, its output in ``log_path``.

    Args:
        args: the command's arguments (after ``serve``); must include ``--port``.
        log_path: file receiving stdout and stderr.
        env: extra environment variables.
        calling_aet: AE title of the readiness C-ECHO (one of ``--allowed_aets`` if given).
    """

    def __init__(self, args: Sequence[str], log_path, env: Mapping[str, str] | None = None, calling_aet: str = "ECHOSCU"):
        import sys

        self.args = [str(a) for a in args]
        self.port = int(self.args[self.args.index("--port") + 1])
        self.ae_title = self.args[self.args.index("--ae_title") + 1] if "--ae_title" in self.args else "NPCGTV"
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", "npc_gtv.cli", "serve", *self.args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.process: subprocess.Popen | None = None
        self.calling_aet = calling_aet

    def start(self, ready_timeout: float = 180.0) -> "NodeProcess":
        """Start the node and wait until it answers C-ECHO (it loads the model first)."""
        from .dimse import Destination, echo

        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"npc-gtv serve exited with {self.process.returncode}: {self.output()[-3000:]}")
            if echo(Destination(self.ae_title, "127.0.0.1", self.port), calling_aet=self.calling_aet, timeout=2.0):
                return self
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"npc-gtv serve did not answer C-ECHO within {ready_timeout:.0f} s: {self.output()[-3000:]}")

    def output(self) -> str:
        """What the node printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        """Wait for the node to exit by itself; its return code."""
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._close()

    def signal(self, signum: int) -> None:
        """Send a signal to the node (this process only)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the node if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._close()

    def _close(self) -> None:
        if getattr(self, "_log", None) is not None and self.process is not None and self.process.poll() is not None:
            self._log.close()
            self._log = None


def constant_foreground_weights(bundle, out_path, *, config: Sequence[str] = (), logit: float = 8.0, seed: int = 0) -> Path:
    """Weights for a bundle's network whose output is the constant logit ``logit`` everywhere.

    The network is built from the bundle's ``network_def`` (``inference.yaml`` + ``config``),
    initialised with ``torch.manual_seed(seed)``, and its output convolutions (``output_layers``,
    else the last convolution) get zero weights and a bias that makes every voxel foreground: ``logit``
    for one sigmoid channel (sigmoid(8) = 0.9997), ``-logit`` for the background and ``+logit`` for the
    other channels of a softmax output. The prediction is then the bundle's region of interest (the
    body crop) on the input grid.

    Args:
        bundle: bundle folder. config: override config files (e.g. ``configs/quick.yaml``).
        out_path: ``.pt`` file to write (a bare ``state_dict``, as ``models/model.pt``).
        logit: output bias. seed: initialisation seed.

    Returns:
        ``out_path``.
    """
    import torch
    from monai.bundle import ConfigParser

    from shared_transforms.io import atomic_write

    from .model import _use_bundle_scripts, resolve_config_files

    files = resolve_config_files(bundle, config)
    root = files[0].parents[1]
    _use_bundle_scripts(root)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser["bundle_root"] = str(root)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def", instantiate=True)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    layers = list(getattr(net, "output_layers", None) or convs[-1:])
    if not layers or any(layer.bias is None for layer in layers):
        raise ValueError(f"{root}: the network has no final convolution with a bias")
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.fill_(float(logit))
            if layer.bias.numel() > 1:
                layer.bias[0] = -float(logit)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_write(out_path) as tmp:
        torch.save(state, str(tmp))
    return Path(out_path)
