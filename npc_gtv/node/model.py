"""A bundle's inference, parsed and loaded once, then run on one CT series at a time.

:class:`BundleModel` reads the bundle's ``configs/inference.yaml`` (plus override config files
and ``--key value`` overrides, as ``python -m monai.bundle run`` does) with MONAI's
``ConfigParser`` once, builds the bundle's own ``evaluator`` and fires its ``STARTED`` event
once, so the bundle's own handlers load the weights (``npc_gtv.training.SafeCheckpointLoader``
or MONAI's ``CheckpointLoader``) and apply any one-off network preparation (UNet-2.5D's
BatchNorm fusion). The network then stays in memory. :meth:`BundleModel.predict` runs one
image through the same steps as one iteration of that evaluator: the bundle's
``preprocessing`` on ``{"image": path}``, collation to a batch of one, the evaluator's
``prepare_batch``, forward mode and AMP setting, its ``inferer``, decollation and the bundle's
``postprocessing`` (which inverts the prediction onto the input CT grid).

What the node changes in the bundle's configuration, and why:

- ``bundle_root``: the bundle folder (absolute), so ``ckpt_dir`` and ``scripts`` resolve from
  any working directory; the folder is also put on ``sys.path`` for the bundle's ``scripts``.
- ``output_dir``: a folder chosen by the caller (the node's spool), so the bundle's own
  ``SaveImaged`` never writes patient predictions into the bundle folder.
- ``datalist``: empty, because the evaluator is never iterated (and the default data list of
  the phantom test set must not be required on a clinical machine).
- ``write_rtstruct`` / ``write_dicom_seg``: false; the node writes the DICOM outputs itself
  from the CT it has already read and checked (``npc_gtv.dicom.transforms.SaveDicomRTd.write``).
- ``overwrite``: true. The bundle's NIfTI output lands in the node's own folder, named after the
  ``case_id`` the node gives each prediction (the Series Instance UID); a series sent again
  replaces its own earlier copy there instead of being refused.

The bundle's ``initialize`` list is not run: in the project's bundles it prepares the phantom
training data, which a clinical node must not do.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

from shared_transforms.io import InputError

__all__ = ["BundleModel", "resolve_config_files"]

logger = logging.getLogger(__name__)

#: config ids the node sets itself (a user override of these is refused with a message)
NODE_OWNED_IDS = {"datalist": [], "write_rtstruct": False, "write_dicom_seg": False, "overwrite": True}


def resolve_config_files(bundle, config: str | Sequence[str] | None = ()) -> list[Path]:
    """``configs/inference.yaml`` of ``bundle`` followed by the override config files.

    Args:
        bundle: bundle folder.
        config: one path or a list of paths of config files merged after ``inference.yaml``
            (later ones win). A path that does not exist as given is looked up relative to the
            bundle folder, so ``configs/quick.yaml`` works from anywhere.

    Returns:
        absolute paths, ``inference.yaml`` first.

    Raises:
        InputError: the bundle folder, its ``inference.yaml`` or an override file is missing.
    """
    root = Path(bundle).expanduser().resolve()
    if not root.is_dir():
        raise InputError(bundle, "bundle folder does not exist")
    files = [root / "configs" / "inference.yaml"]
    if not files[0].is_file():
        raise InputError(root, "is not a bundle folder: configs/inference.yaml is missing")
    if config is None:
        config = []
    elif isinstance(config, (str, Path)):
        config = [p for p in str(config).split(",") if p.strip()]
    for item in config:
        path = Path(str(item).strip()).expanduser()
        if not path.is_file() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise InputError(item, f"config file does not exist (neither as given nor in {root})")
        files.append(path.resolve())
    return files


def _use_bundle_scripts(root: Path) -> None:
    """Put ``root`` first on ``sys.path`` and forget a ``scripts`` package of another bundle.

    Every model-zoo bundle has a top-level ``scripts`` package; one process can use one bundle's.
    """
    loaded = sys.modules.get("scripts")
    if loaded is not None:
        origin = Path(getattr(loaded, "__file__", "") or "").resolve()
        if root not in origin.parents:
            for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
                del sys.modules[name]
            logger.info("replaced the scripts package of %s by that of %s", origin.parent, root)
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()


class BundleModel:
    """A bundle's inference with the network loaded once.

    Args:
        bundle: bundle folder (holding ``configs/inference.yaml``).
        output_dir: value of the bundle's ``output_dir``: where its own ``SaveImaged`` writes
            ``predictions/<case>_seg.nii.gz``.
        config: override config files merged after ``inference.yaml`` (see
            :func:`resolve_config_files`), e.g. ``configs/quick.yaml``.
        overrides: ``{config id: value}`` applied last, like ``monai.bundle run --id value``
            (``ckpt_path``, ``device``, ``network_def#filters``, ...). Every id must exist in
            the merged configuration, so a mistyped option is an error and not silently ignored.

    Attributes:
        load_seconds: time spent parsing the configuration, building the network and loading
            its weights.
        roi_name: the bundle's ``roi_name`` (``"GTVp"`` when it has none).

    Raises:
        InputError: missing bundle / config / weights file.
        ValueError: an override names an id the configuration does not have, or one the node
            sets itself; the bundle has no ``evaluator`` of the supervised kind.
    """

    def __init__(self, bundle, output_dir, config: str | Sequence[str] | None = (), overrides: Mapping | None = None):
        import torch
        from ignite.engine import Events
        from monai.bundle import ConfigParser
        from monai.engines import SupervisedEvaluator

        start = time.perf_counter()
        self.root = Path(bundle).expanduser().resolve()
        self.config_files = resolve_config_files(self.root, config)
        _use_bundle_scripts(self.root)

        parser = ConfigParser()
        parser.read_config([str(f) for f in self.config_files])
        meta = self.root / "configs" / "metadata.json"
        if meta.is_file():
            parser.read_meta(str(meta))
        overrides = dict(overrides or {})
        for key in overrides:
            if key in NODE_OWNED_IDS:
                raise ValueError(f"--{key} is set by the node itself and cannot be overridden")
            if key not in parser:
                raise ValueError(
                    f"--{key}: no such option of npc-gtv serve and no such id in {self.config_files[0]} "
                    f"(+ {len(self.config_files) - 1} override file(s))"
                )
        parser["bundle_root"] = str(self.root)
        parser["output_dir"] = str(Path(output_dir).resolve())
        for key, value in NODE_OWNED_IDS.items():
            if key in parser:
                parser[key] = value
        for key, value in overrides.items():
            parser[key] = value
        for key in ("preprocessing", "postprocessing", "evaluator"):
            if key not in parser:
                raise ValueError(f"{self.config_files[0]}: the bundle's inference config has no '{key}'")
        self.parser = parser

        self.evaluator = parser.get_parsed_content("evaluator")
        if not isinstance(self.evaluator, SupervisedEvaluator):
            raise ValueError(
                f"{self.config_files[0]}: 'evaluator' is a {type(self.evaluator).__name__}; the node runs "
                "bundles whose evaluator is a monai.engines.SupervisedEvaluator"
            )
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.roi_name = str(parser.get_parsed_content("roi_name")) if "roi_name" in parser else "GTVp"
        # the bundle's own STARTED handlers, once: checkpoint loader(s), network preparation
        self.evaluator.fire_event(Events.STARTED)
        self.evaluator.network.eval()
        self._torch = torch
        self.device = self.evaluator.state.device
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "bundle %s loaded in %.1f s (configs: %s; device %s)",
            self.root.name, self.load_seconds, ", ".join(f.name for f in self.config_files), self.device,
        )

    @property
    def output_dir(self) -> Path:
        """The bundle's ``output_dir`` (set by the node)."""
        return Path(self.parser["output_dir"])

    def predict(self, image, case_id: str | None = None) -> dict:
        """Run the bundle's inference on one image.

        Args:
            image: a DICOM series folder (or a NIfTI file): the bundle's ``image`` input.
            case_id: name of the bundle's own outputs (``<case_id>_seg.nii.gz``); default: the
                input's folder or file name.

        Returns:
            the post-processed item: ``pred`` is the bundle's final ``(C, X, Y, Z)``
            MetaTensor on the input grid (after its ``Invertd``), with the input's metadata.
        """
        from monai.data import list_data_collate
        from monai.engines.utils import engine_apply_transform
        from monai.transforms import Decollated

        ev = self.evaluator
        data = self.preprocessing({"image": str(image), **({"case_id": str(case_id)} if case_id else {})})
        batch = list_data_collate([data])
        prepared = ev.prepare_batch(batch, ev.state.device, ev.non_blocking, **ev.to_kwargs)
        inputs, targets = prepared[0], prepared[1]
        args, kwargs = (tuple(prepared[2]), dict(prepared[3])) if len(prepared) > 2 else ((), {})
        amp = self._torch.autocast("cuda", **ev.amp_kwargs) if ev.amp else nullcontext()
        with ev.mode(ev.network), amp:
            pred = ev.inferer(inputs, ev.network, *args, **kwargs)
        decollate = Decollated(keys=None, detach=True)
        items = decollate(batch)
        outputs = decollate({"image": inputs, "label": targets, "pred": pred})
        item, output = engine_apply_transform(items[0], outputs[0], self.postprocessing)
        return {**item, **output}
