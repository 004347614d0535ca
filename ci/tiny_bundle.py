"""A minimal bundle in this project's layout, for testing the CI checks and the packaging command.

``write_tiny_bundle(dest)`` writes ``dest/tiny_seg``: a two-layer 3D conv network in ``scripts/``
(whose module imports ``shared_transforms.io`` so vendoring is exercised), train / evaluate /
inference / quick / multi-GPU configs on the small CT phantoms, the zoo metadata, docs, licence.
It trains for one epoch on 32x32x16 patches in a few seconds on one CPU core.
"""

from __future__ import annotations

import json
from pathlib import Path

NET_PY = '''"""Tiny 3D segmentation network for the CI self-test bundle."""

import torch

from shared_transforms.io import InputError


class TinySegNet(torch.nn.Module):
    """Conv(1->c)-ReLU-Conv(c->1): input ``(B, 1, X, Y, Z)`` -> logits ``(B, 1, X, Y, Z)``."""

    def __init__(self, channels: int = 4):
        super().__init__()
        if channels < 1:
            raise InputError(None, "channels must be >= 1")
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(1, channels, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(channels, 1, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
'''

TRAIN = """imports:
  - $import torch
  - $import monai
  - $import ignite
  - $import npc_gtv
  - $import npc_gtv.phantoms
  - $import npc_gtv.training
bundle_root: "."
ckpt_dir: "$@bundle_root + '/models'"
output_dir: "$@bundle_root + '/eval'"
dataset_dir: "$npc_gtv.phantoms.default_dataset_dir('ct', 'full')"
dataset_size: full
device: "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
epochs: 100
val_interval: 1
patch: [96, 96, 32]
network_def:
  _target_: scripts.net.TinySegNet
  channels: 8
network: "$@network_def.to(@device)"
loss:
  _target_: DiceCELoss
  sigmoid: true
optimizer:
  _target_: torch.optim.Adam
  params: "$@network.parameters()"
  lr: 0.001
lr_scheduler:
  _target_: torch.optim.lr_scheduler.StepLR
  optimizer: "@optimizer"
  step_size: 1
  gamma: 0.9
datalist: "$monai.data.load_decathlon_datalist(@dataset_dir + '/dataset.json', data_list_key='training')"
preprocessing:
  - _target_: LoadImaged
    keys: [image, label]
    image_only: true
    ensure_channel_first: true
  - _target_: shared_transforms.intensity.HUWindowd
    keys: image
    a_min: -150
    a_max: 350
train:
  preprocessing:
    _target_: Compose
    transforms: "$@preprocessing + [monai.transforms.RandSpatialCropd(keys=['image', 'label'], roi_size=@patch, random_size=False)]"
  dataset:
    _target_: Dataset
    data: "$@datalist[:-1]"
    transform: "@train#preprocessing"
  dataloader:
    _target_: DataLoader
    dataset: "@train#dataset"
    batch_size: 2
    shuffle: true
    num_workers: 0
  inferer:
    _target_: SimpleInferer
  handlers:
    - _target_: LrScheduleHandler
      lr_scheduler: "@lr_scheduler"
    - _target_: ValidationHandler
      validator: "@validate#evaluator"
      epoch_level: true
      interval: "@val_interval"
    - _target_: StatsHandler
      tag_name: train_loss
      output_transform: "$monai.handlers.from_engine(['loss'], first=True)"
    - _target_: TensorBoardStatsHandler
      log_dir: "@output_dir"
      tag_name: train_loss
      output_transform: "$monai.handlers.from_engine(['loss'], first=True)"
    - _target_: ignite.handlers.ProgressBar
      persist: true
    - _target_: npc_gtv.training.ResumableCheckpoint
      save_dir: "@ckpt_dir"
      save_dict:
        model: "@network"
        optimizer: "@optimizer"
        lr_scheduler: "@lr_scheduler"
  trainer:
    _target_: SupervisedTrainer
    max_epochs: "@epochs"
    device: "@device"
    train_data_loader: "@train#dataloader"
    network: "@network"
    loss_function: "@loss"
    optimizer: "@optimizer"
    inferer: "@train#inferer"
    train_handlers: "@train#handlers"
validate:
  preprocessing:
    _target_: Compose
    transforms: "@preprocessing"
  dataset:
    _target_: Dataset
    data: "$@datalist[-1:]"
    transform: "@validate#preprocessing"
  dataloader:
    _target_: DataLoader
    dataset: "@validate#dataset"
    batch_size: 1
    shuffle: false
    num_workers: 0
  inferer:
    _target_: SlidingWindowInferer
    roi_size: "@patch"
    sw_batch_size: 1
  postprocessing:
    _target_: Compose
    transforms:
      - _target_: Activationsd
        keys: pred
        sigmoid: true
      - _target_: AsDiscreted
        keys: pred
        threshold: 0.5
  handlers:
    - _target_: StatsHandler
      iteration_log: false
  key_metric:
    val_mean_dice:
      _target_: MeanDice
      output_transform: "$monai.handlers.from_engine(['pred', 'label'])"
  evaluator:
    _target_: SupervisedEvaluator
    device: "@device"
    val_data_loader: "@validate#dataloader"
    network: "@network"
    inferer: "@validate#inferer"
    postprocessing: "@validate#postprocessing"
    key_val_metric: "@validate#key_metric"
    val_handlers: "@validate#handlers"
initialize:
  - "$monai.utils.set_determinism(seed=0)"
  - "$npc_gtv.phantoms.ensure_dataset(@dataset_dir, modality='ct', size=@dataset_size)"
run:
  - "$@train#trainer.run()"
"""

EVALUATE = """# merged on inference.yaml: the test cases with their labels, Dice, metrics file
imports:
  - $import glob
  - $import torch
  - $import monai
  - $import npc_gtv
  - $import npc_gtv.phantoms
datalist: "$monai.data.load_decathlon_datalist(@dataset_dir + '/dataset.json', data_list_key='test')"
preprocessing:
  _target_: Compose
  transforms:
    - _target_: LoadImaged
      keys: [image, label]
      image_only: true
      ensure_channel_first: true
    - _target_: shared_transforms.intensity.HUWindowd
      keys: image
      a_min: -150
      a_max: 350
postprocessing:
  _target_: Compose
  transforms:
    - _target_: Activationsd
      keys: pred
      sigmoid: true
    - _target_: AsDiscreted
      keys: pred
      threshold: 0.5
key_metric:
  test_mean_dice:
    _target_: MeanDice
    output_transform: "$monai.handlers.from_engine(['pred', 'label'])"
handlers:
  - _target_: npc_gtv.training.SafeCheckpointLoader
    load_path: "$@ckpt_dir + '/model.pt'"
    load_dict:
      model: "@network"
  - _target_: StatsHandler
    iteration_log: false
  - _target_: MetricsSaver
    save_dir: "@output_dir"
    metrics: [test_mean_dice]
evaluator#key_val_metric: "@key_metric"
"""

INFERENCE = """imports:
  - $import glob
  - $import torch
  - $import npc_gtv
  - $import npc_gtv.phantoms
bundle_root: "."
ckpt_dir: "$@bundle_root + '/models'"
output_dir: "$@bundle_root + '/eval'"
dataset_dir: "$npc_gtv.phantoms.default_dataset_dir('ct', 'full')"
dataset_size: full
device: "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
patch: [96, 96, 32]
datalist: "$[{'image': f} for f in sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz'))]"
network_def:
  _target_: scripts.net.TinySegNet
  channels: 8
network: "$@network_def.to(@device)"
preprocessing:
  _target_: Compose
  transforms:
    - _target_: LoadImaged
      keys: image
      image_only: true
      ensure_channel_first: true
    - _target_: shared_transforms.intensity.HUWindowd
      keys: image
      a_min: -150
      a_max: 350
dataset:
  _target_: Dataset
  data: "@datalist"
  transform: "@preprocessing"
dataloader:
  _target_: DataLoader
  dataset: "@dataset"
  batch_size: 1
  shuffle: false
  num_workers: 0
inferer:
  _target_: SlidingWindowInferer
  roi_size: "@patch"
  sw_batch_size: 1
postprocessing:
  _target_: Compose
  transforms:
    - _target_: Activationsd
      keys: pred
      sigmoid: true
    - _target_: AsDiscreted
      keys: pred
      threshold: 0.5
    - _target_: SaveImaged
      keys: pred
      output_dir: "@output_dir"
      output_postfix: seg
      resample: false
      separate_folder: false
handlers:
  - _target_: npc_gtv.training.SafeCheckpointLoader
    load_path: "$@ckpt_dir + '/model.pt'"
    load_dict:
      model: "@network"
evaluator:
  _target_: SupervisedEvaluator
  device: "@device"
  val_data_loader: "@dataloader"
  network: "@network"
  inferer: "@inferer"
  postprocessing: "@postprocessing"
  val_handlers: "@handlers"
initialize:
  - "$npc_gtv.phantoms.ensure_dataset(@dataset_dir, modality='ct', size=@dataset_size)"
run:
  - "$@evaluator.run()"
"""

QUICK = """dataset_dir: "$npc_gtv.phantoms.default_dataset_dir('ct', 'small')"
dataset_size: small
epochs: 1
patch: [32, 32, 16]
network_def#channels: 4
"""

MULTI_GPU = """device: "$torch.device('cuda:' + os.environ['LOCAL_RANK'] if torch.cuda.is_available() else 'cpu')"
imports:
  - $import os
  - $import torch
  - $import torch.distributed as dist
  - $import monai
  - $import ignite
  - $import npc_gtv
  - $import npc_gtv.phantoms
  - $import npc_gtv.training
network: "$torch.nn.parallel.DistributedDataParallel(@network_def.to(@device))"
initialize:
  - "$dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')"
  - "$monai.utils.set_determinism(seed=0)"
run:
  - "$@train#trainer.run()"
finalize:
  - "$dist.is_initialized() and dist.destroy_process_group()"
"""

LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def metadata(monai_version: str | None = None) -> dict:
    import monai
    import numpy
    import torch

    from importlib import metadata as im

    def v(dist):
        return im.version(dist)

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": "0.1.1",
        "changelog": {"0.1.1": "tiny CI self-test bundle", "0.1.0": "first version"},
        "monai_version": monai_version or monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"pytorch-ignite": v("pytorch-ignite"), "tensorboard": v("tensorboard")},
        "task": "CI self-test: segmentation of the phantom GTV",
        "description": "Two-layer convolutional network used only to test the model-zoo checks and packaging.",
        "authors": "NPC GTV toolkit contributors",
        "copyright": "Copyright (c) NPC GTV toolkit contributors",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                    "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [0, 1],
                    "is_patch_data": True, "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": 1,
                    "spatial_shape": [32, 32, 16], "dtype": "float32", "value_range": [0, 1],
                    "is_patch_data": True, "channel_def": {"0": "GTVp"},
                }
            },
        },
    }


def write_tiny_bundle(dest, name: str = "tiny_seg") -> Path:
    """Write the tiny bundle to ``dest/name`` and return its folder."""
    root = Path(dest) / name
    files = {
        "scripts/__init__.py": '"""Scripts of the tiny CI self-test bundle."""\n',
        "scripts/net.py": NET_PY,
        "configs/train.yaml": TRAIN,
        "configs/evaluate.yaml": EVALUATE,
        "configs/inference.yaml": INFERENCE,
        "configs/quick.yaml": QUICK,
        "configs/multi_gpu_train.yaml": MULTI_GPU,
        "configs/logging.conf": LOGGING,
        "configs/metadata.json": json.dumps(metadata(), indent=2) + "\n",
        "docs/README.md": "# tiny_seg\n\nCI self-test bundle (not a model).\n",
        "LICENSE": "Apache License 2.0\n",
        "large_files.yml": "large_files: []\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # the shared code evolves (e.g. io.py reading DICOM folders pulls in pydicom): list what it imports now
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bundle_deps
    from importlib import metadata as im

    meta = json.loads((root / "configs/metadata.json").read_text())
    for name in bundle_deps.third_party_imports(root, Path(__file__).resolve().parents[1]):
        dist = bundle_deps.distribution_of(name)
        if name not in bundle_deps.BASE_PACKAGES and dist:
            meta["required_packages_version"][bundle_deps.normalize(dist)] = im.version(dist)
    (root / "configs/metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
