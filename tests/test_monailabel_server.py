"""A real MONAI Label 0.8.5 server with the three packaged bundles: train through ``POST /train``, infer through ``POST /infer``.

What a clinic does (docs/operating.md, "MONAI Label"): ``monailabel apps --download --name monaibundle``,
each bundle packaged with ``npc-gtv package`` into the app's ``model/`` folder, a studies folder of CT
volumes with three labelled ones, ``monailabel start_server`` on 127.0.0.1. The test then

1. checks ``/info/``: every bundle is a trainer; without weights none is an inference model (MONAI
   Label registers an inference task only when ``models/model.pt`` exists at start-up);
2. trains each bundle for one epoch through ``POST /train/<model>?run_sync=true`` with MONAI Label's
   default ``val_split`` 0.2 (three studies: two training cases, one validation case) and measures the
   request's time and the peak memory of the server's process tree;
3. restarts the server (the only way MONAI Label 0.8.5 picks up an inference model trained after
   start-up), checks ``/info/`` (label ``gtvp`` = 1, ``dimension`` 3) and infers an unlabelled study
   through ``POST /infer/<model>?output=image``: the returned mask must have the study's shape and
   affine and only the values 0 and 1.

The bundles run their quick configurations (``configs/train.json`` / ``inference.json``, which MONAI Label
reads before the YAML files, are the quick-mode merges): small phantoms, one short epoch.

It needs ``monailabel`` and a ``torchvision`` that imports beside the installed torch; the package index's
torchvision does not import beside the CPU torch 2.13.0 of the README install, so it runs in the
environment that ``ci/monailabel_env/install.sh`` makes and is skipped elsewhere (CI included), with the reason.
Measurements are written to ``$NPC_GTV_MONAILABEL_REPORT`` (JSON) when that is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from npc_gtv.resources import PeakRSS

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["sats_npc", "unet25d_ssl", "hcf_sanet"]


def _skip_reason() -> str | None:
    if importlib.util.find_spec("monailabel") is None:
        return "monailabel is not installed here (make the environment with ci/monailabel_env/install.sh)"
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"torchvision does not import beside this torch ({last}); MONAI Label needs it"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read(), dict(resp.headers)


def _multipart(fields: dict) -> tuple[bytes, str]:
    boundary = "npcgtvboundary7f3a"
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n')
    parts.append(f"--{boundary}--\r\n")
    return "".join(parts).encode(), f"multipart/form-data; boundary={boundary}"


class _Server:
    def __init__(self, app: Path, studies: Path, models: list[str], log: Path, data_home: Path):
        self.app, self.studies, self.models, self.log, self.data_home = app, studies, models, log, data_home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 240) -> float:
        exe = Path(sys.executable).with_name("monailabel")
        cmd = [str(exe), "start_server", "--app", str(self.app), "--studies", str(self.studies),
               "--conf", "models", ",".join(self.models), "--conf", "zoo_source", "github", "--conf", "sam2", "false",
               "--host", "127.0.0.1", "--port", str(self.port)]
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", NPC_GTV_DATA=str(self.data_home))
        t0 = time.time()
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-5000:]}")
            try:
                _request(self.url + "/info/", timeout=5)
                return time.time() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise AssertionError(f"server not up after {timeout} s:\n{self.log.read_text()[-5000:]}")

    def info(self) -> dict:
        return json.loads(_request(self.url + "/info/")[1])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


def _quick_merges(bundle: Path) -> None:
    """configs/train.json and inference.json = the quick-mode merges (MONAI Label reads .json first)."""
    from monai.bundle import ConfigParser

    for json_name, yamls in (("train.json", ["train.yaml", "quick.yaml"]), ("inference.json", ["inference.yaml", "quick.yaml"])):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / y) for y in yamls])
        ConfigParser.export_config_file(parser.config, str(bundle / "configs" / json_name), fmt="json", indent=2)


def test_monailabel_server_trains_and_infers(tmp_path, small_ct_dataset):
    import nibabel

    ds = json.loads((small_ct_dataset / "dataset.json").read_text())
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for item in ds["training"][:3]:  # three labelled studies
        name = Path(item["image"]).name
        shutil.copy(small_ct_dataset / item["image"], studies / name)
        shutil.copy(small_ct_dataset / item["label"], studies / "labels" / "final" / name)
    test_image = small_ct_dataset / ds["test"][0]["image"]
    test_id = "unlabelled_" + Path(test_image).name.split(".")[0]
    shutil.copy(test_image, studies / (test_id + ".nii.gz"))

    apps = tmp_path / "apps"
    subprocess.run([str(Path(sys.executable).with_name("monailabel")), "apps", "--download", "--name", "monaibundle",
                    "--output", str(apps)], check=True, capture_output=True)
    app = apps / "monaibundle"
    for name in BUNDLES:
        subprocess.run([str(Path(sys.executable).with_name("npc-gtv")), "package", name, "--out", str(app / "model")],
                       check=True, capture_output=True, cwd=str(REPO))
        _quick_merges(app / "model" / name)

    report: dict = {"monailabel": __import__("monailabel").__version__, "bundles": {}}
    data_home = tmp_path / "npc_gtv_data"  # the bundles' phantom home: MONAI Label supplies the data, nothing is generated
    data_home.mkdir()
    server = _Server(app, studies, BUNDLES, tmp_path / "server.log", data_home)
    try:
        report["start_s"] = round(server.start(), 1)
        info = server.info()
        assert set(BUNDLES) <= set(info["trainers"]), info["trainers"]
        assert not set(BUNDLES) & set(info["models"]), "an inference model without weights"
        for name in BUNDLES:
            body = json.dumps({"max_epochs": 1, "val_split": 0.2, "multi_gpu": False, "device": "cpu",
                               "tracking": "None"}).encode()
            t0 = time.time()
            with PeakRSS(server.proc.pid) as rss:
                status, out, _ = _request(f"{server.url}/train/{name}?run_sync=true", "POST", body,
                                          {"Content-Type": "application/json"}, timeout=1800)
            assert status == 200, out[-2000:]
            weights = app / "model" / name / "models" / "model.pt"
            assert weights.is_file(), f"{name}: POST /train wrote no models/model.pt:\n{server.log.read_text()[-4000:]}"
            report["bundles"][name] = {"train_s": round(time.time() - t0, 1), "train_peak_rss_gb": round(rss.peak / 2**30, 2)}
        assert (app / "model" / "hcf_sanet" / "models" / "classifier.pt").is_file(), "HCF: no slice classifier trained"
        assert not any(data_home.iterdir()), f"a bundle generated phantoms although MONAI Label gave the data: {list(data_home.iterdir())}"

        server.stop()
        report["restart_s"] = round(server.start(), 1)
        info = server.info()
        for name in BUNDLES:
            model = info["models"].get(name)
            assert model is not None, f"{name} is not an inference model after training: {sorted(info['models'])}"
            assert model["labels"] == {"gtvp": 1}, (name, model["labels"])
            assert model["dimension"] == 3, (name, model["dimension"])
            body, ctype = _multipart({"params": json.dumps({"device": "cpu"})})
            t0 = time.time()
            status, out, _ = _request(f"{server.url}/infer/{name}?image={test_id}&output=image", "POST", body,
                                      {"Content-Type": ctype}, timeout=900)
            assert status == 200, out[-2000:]
            mask_file = tmp_path / f"{name}_mask.nii.gz"
            mask_file.write_bytes(out)
            mask, ref = nibabel.load(str(mask_file)), nibabel.load(str(test_image))
            values = np.unique(np.asarray(mask.dataobj))
            assert mask.shape[:3] == ref.shape[:3], (name, mask.shape, ref.shape)
            np.testing.assert_allclose(mask.affine, ref.affine, atol=1e-3, err_msg=name)
            assert set(values.tolist()) <= {0, 1}, (name, values)
            report["bundles"][name].update({"infer_s": round(time.time() - t0, 1), "mask_values": values.tolist(),
                                            "mask_voxels": int((np.asarray(mask.dataobj) > 0).sum())})
    finally:
        server.stop()
        if os.environ.get("NPC_GTV_MONAILABEL_REPORT"):
            Path(os.environ["NPC_GTV_MONAILABEL_REPORT"]).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
