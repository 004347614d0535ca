"""MONAI Label ``monaibundle`` app: each bundle trains and infers the way MONAI Label 0.8.5 drives it.

Two layers (see docs/operating.md, "MONAI Label"):

* ``test_monailabel_contract_*`` (everywhere): re-enacts, step by step, what MONAI Label 0.8.5's
  ``BundleTrainTask.__call__`` (single GPU) and ``BundleInferTask`` + ``BasicInferTask.run_inferer`` do
  (read from the 0.8.5 wheel): training = ``monai.bundle.run(run_id="run", init_id=None, final_id=None)``
  on ``configs/train.*`` with the overrides ``bundle_root``, ``train#trainer#max_epochs``,
  ``train#dataset#data``, ``validate#dataset#data``, ``device`` and ``train#handlers`` (+ MONAI's
  ``CheckpointLoader`` of ``models/model.pt`` when it exists); inference = ``network_def`` instantiated
  and loaded from ``models/model.pt`` (``strict=False``), ``preprocessing`` with ``LoadImaged(image_only=False)``,
  ``inferer(image[None], network)``, ``postprocessing`` without ``SaveImaged``, given only the image (the data
  dict holds what ``BasicInferTask.__call__`` puts there: the request, ``image`` and ``image_path``).
  The result must equal the bundle's own pipeline (the same pieces plus the config's ``handlers``), so
  nothing a bundle needs may hide in ``handlers`` (which MONAI Label never runs).
* ``test_monailabel_real_classes`` (only where ``monailabel`` imports): the same with MONAI Label's own
  ``BundleTrainTask`` / ``BundleInferTask`` objects. MONAI Label imports ``torchvision`` for two
  visualisation helpers that this path never calls; where torchvision is missing (no CPU build here)
  the test installs a stand-in module whose functions raise, so any use would fail the test.

MONAI Label reads ``configs/train.json`` before ``train.yaml`` (and ``inference.json`` before
``inference.yaml``), so the test bundle copy holds the quick-mode merge of each as JSON: the real
configs, only smaller (``quick.yaml``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {
    # name -> commands a user runs before MONAI Label can infer (beyond the MONAI Label training itself)
    "sats_npc": [],
    "unet25d_ssl": [],
    "hcf_sanet": [],  # the slice classifier is trained inside `train` (classifier_first: auto)
}

COMMON = textwrap.dedent(
    r"""
    import copy, json, os, sys
    import numpy as np
    import torch

    def unload_scripts():
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]

    def datalist(ds_dir):
        with open(os.path.join(ds_dir, "dataset.json")) as f:
            d = json.load(f)
        return [{"image": os.path.join(ds_dir, x["image"]), "label": os.path.join(ds_dir, x["label"])} for x in d["training"]]
    """
)

CONTRACT_TRAIN = COMMON + textwrap.dedent(
    r"""
    import monai.bundle
    from monai.bundle import ConfigParser
    from monai.data import partition_dataset
    from monai.handlers import CheckpointLoader

    path, ds_dir, max_epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config_path = os.path.join(path, "configs", "train.json")
    cfg = ConfigParser(); cfg.read_config(config_path); cfg.config.update({"bundle_root": path})
    assert "network" in cfg.config and "network_def" in cfg.config, "MONAI Label needs `network` and `network_def`"
    # MONAI Label's default split of two labelled studies: an empty validation list
    train_ds, val_ds = partition_dataset(datalist(ds_dir)[:2], ratios=[0.8, 0.2], shuffle=False)
    assert len(train_ds) == 2 and val_ds == [], (train_ds, val_ds)
    handlers = cfg.get("train#handlers", [])
    model_pt = os.path.join(path, "models", "model.pt")
    if os.path.exists(model_pt) and not [h for h in handlers if h.get("_target_") == "CheckpointLoader"]:
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": model_pt, "load_dict": {"model": "$@network"},
                            "strict": False})
    overrides = {"bundle_root": path, "train#trainer#max_epochs": max_epochs, "train#dataset#data": train_ds,
                 "device": torch.device("cpu"), "train#handlers": handlers, "validate#dataset#data": val_ds}
    sys.path.insert(0, path); unload_scripts()
    monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=os.path.join(path, "configs", "metadata.json"),
                     config_file=config_path, **overrides)
    print("ML-TRAIN-DONE", os.path.exists(model_pt), flush=True)
    """
)

CONTRACT_INFER = COMMON + textwrap.dedent(
    r"""
    from ignite.engine import Engine, Events
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, LoadImaged, SaveImaged

    path, image = sys.argv[1], sys.argv[2]
    meta = json.load(open(os.path.join(path, "configs", "metadata.json")))
    key_image = next(iter(meta["network_data_format"]["inputs"]))
    key_pred = next(iter(meta["network_data_format"]["outputs"]))
    assert (key_image, key_pred) == ("image", "pred"), (key_image, key_pred)

    def pipeline(with_handlers):
        sys.path.insert(0, path); unload_scripts()
        cfg = ConfigParser(); cfg.read_config(os.path.join(path, "configs", "inference.json"))
        cfg.config.update({"bundle_root": path}); cfg.config["use_click"] = False
        network_def = cfg.get_parsed_content("network_def", instantiate=True)
        pre = cfg.get_parsed_content("preprocessing", instantiate=True)
        pre = list(pre.transforms) if isinstance(pre, Compose) else pre
        for t in pre:
            if isinstance(t, LoadImaged):
                t._loader.image_only = False
        inferer = cfg.get_parsed_content("inferer", instantiate=True)
        post = cfg.get_parsed_content("postprocessing", instantiate=True)
        post = [t for t in (list(post.transforms) if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)]
        if with_handlers:  # the bundle's own evaluator: its handlers run at STARTED
            network = cfg.get_parsed_content("network", instantiate=True)
            engine = Engine(lambda e, b: None)
            for h in cfg.get_parsed_content("handlers", instantiate=True):
                h.attach(engine)
            engine.fire_event(Events.STARTED)
        else:  # MONAI Label: a copy of network_def with models/model.pt, strict=False
            network = copy.deepcopy(network_def)
            ck = torch.load(os.path.join(path, "models", "model.pt"), map_location="cpu")
            sd = ck.get("model", ck)
            result = network.load_state_dict(sd, strict=False)
            assert not result.missing_keys and not result.unexpected_keys, result
        network.eval()
        # BasicInferTask.__call__: the request (with its config options) plus "image_path"
        data = {"image": image, "image_path": image, "device": "cpu", "model_filename": ["model.pt"]}
        for t in pre:
            data = t(data)
        x = data[key_image]
        x = (x if torch.is_tensor(x) else torch.from_numpy(x))[None]
        with torch.no_grad():
            out = inferer(x, network)
        data[key_pred] = out[0]
        for t in post:
            data = t(data)
        sys.path.remove(path)
        pred = data[key_pred]
        return np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred)

    a = pipeline(False)
    b = pipeline(True)
    import nibabel
    shape = nibabel.load(image).shape
    differ = float(np.mean(a != b)) if a.shape == b.shape else 1.0
    print("ML-INFER", json.dumps({"pred_shape": list(a.shape), "image_shape": list(shape), "differ": differ,
                                  "values": sorted(np.unique(a).tolist())[:5]}), flush=True)
    """
)

REAL = textwrap.dedent(
    r"""
    import json, os, sys, types
    try:
        import torchvision  # noqa: F401
    except ImportError:  # MONAI Label imports make_grid/save_image at module level; this path never calls them
        tv, tvu = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
        def _unavailable(*a, **k):
            raise RuntimeError("torchvision stand-in called")
        tvu.make_grid = tvu.save_image = _unavailable
        tv.utils = tvu
        sys.modules["torchvision"], sys.modules["torchvision.utils"] = tv, tvu
    import nibabel, numpy as np
    from monailabel.tasks.train.bundle import BundleTrainTask
    from monailabel.tasks.infer.bundle import BundleInferTask

    path, ds_dir, image = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(os.path.join(ds_dir, "dataset.json")) as f:
        d = json.load(f)

    class Store:  # the only Datastore method BundleTrainTask uses
        def datalist(self):
            return [{"image": os.path.join(ds_dir, x["image"]), "label": os.path.join(ds_dir, x["label"])} for x in d["training"]]

    train = BundleTrainTask(path, {})
    assert train.is_valid()
    train({"model": os.path.basename(path), "max_epochs": 1, "device": "cpu", "multi_gpu": False, "tracking": "None",
           "val_split": 0.2, "pretrained": True}, Store())
    assert os.path.exists(os.path.join(path, "models", "model.pt"))
    infer = BundleInferTask(path, {})
    assert infer.is_valid()
    result = infer({"image": image, "device": "cpu"})
    out = nibabel.load(result[0])
    print("REAL-INFER", json.dumps({"pred_shape": list(out.shape), "image_shape": list(nibabel.load(image).shape),
                                    "values": sorted(np.unique(np.asarray(out.dataobj)).tolist())[:5]}), flush=True)
    """
)


def _derived_bundle(name: str, dest: Path, dataset: Path) -> Path:
    """Copy of the bundle whose configs/train.json and inference.json are the quick-mode merges."""
    from monai.bundle import ConfigParser

    src = REPO / "bundles" / name
    path = dest / name
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("__pycache__", "models", "eval"))
    for json_name, yamls in (("train.json", ["train.yaml", "quick.yaml"]), ("inference.json", ["inference.yaml", "quick.yaml"])):
        parser = ConfigParser()
        parser.read_config([str(path / "configs" / y) for y in yamls])
        parser["dataset_dir"] = str(dataset)
        ConfigParser.export_config_file(parser.config, str(path / "configs" / json_name), fmt="json", indent=2)
    return path


def _run(args, cwd, env_extra=None, timeout=1500) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args], cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def _prepare(name, tmp_path, dataset) -> tuple[Path, str]:
    bundle = REPO / "bundles" / name
    if not bundle.is_dir():
        pytest.skip(f"bundles/{name} does not exist yet")
    path = _derived_bundle(name, tmp_path, dataset)
    image = str(dataset / json.loads((dataset / "dataset.json").read_text())["test"][0]["image"])
    return path, image


def _user_prep(name, path):
    for configs in BUNDLES[name]:  # e.g. the HCF slice classifier, trained with the bundle's own command
        files = repr([str(path / "configs" / c) for c in configs])
        _run(["-m", "monai.bundle", "run", "training", "--config_file", files, "--meta_file",
              str(path / "configs" / "metadata.json"), "--bundle_root", str(path), "--dataset_dir", os.environ["NPC_DS"]], path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_monailabel_contract(name, tmp_path, small_ct_dataset, monkeypatch):
    monkeypatch.setenv("NPC_DS", str(small_ct_dataset))
    path, image = _prepare(name, tmp_path, small_ct_dataset)
    home = tmp_path / "npc_gtv_data"  # the phantom home: MONAI Label gives the data, so nothing may be generated
    out = _run(["-c", CONTRACT_TRAIN, str(path), str(small_ct_dataset), "1"], path, {"NPC_GTV_DATA": str(home)})
    assert "ML-TRAIN-DONE True" in out, out[-3000:]
    assert not home.exists(), f"{name}: the training generated phantoms although the data were given"
    _user_prep(name, path)
    out = _run(["-c", CONTRACT_INFER, str(path), image], path)
    res = json.loads(next(line for line in out.splitlines() if line.startswith("ML-INFER "))[9:])
    assert res["pred_shape"][-3:] == res["image_shape"], res  # prediction on the input grid
    assert set(res["values"]) <= {0, 1}, res
    assert res["differ"] <= 1e-3, f"MONAI Label's pieces give another result than the bundle's pipeline: {res}"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("monailabel") is None, reason="monailabel is not installed here")
@pytest.mark.parametrize("name", list(BUNDLES))
def test_monailabel_real_classes(name, tmp_path, small_ct_dataset, monkeypatch):
    monkeypatch.setenv("NPC_DS", str(small_ct_dataset))
    path, image = _prepare(name, tmp_path, small_ct_dataset)
    _user_prep(name, path)
    out = _run(["-c", REAL, str(path), str(small_ct_dataset), image], path)
    res = json.loads(next(line for line in out.splitlines() if line.startswith("REAL-INFER "))[11:])
    assert res["pred_shape"][:3] == res["image_shape"], res
    assert set(res["values"]) <= {0, 1}, res
