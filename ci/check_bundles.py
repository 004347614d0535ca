#!/usr/bin/env python
"""Model-zoo style checks of every bundle, offline (what the MONAI model zoo's CI checks, re-done here).

    python ci/check_bundles.py                     # every bundle under bundles/, quick mode
    python ci/check_bundles.py bundles/sats_npc    # one bundle (also a packaged bundle folder)
    python ci/check_bundles.py --full              # full-size configs (slow, GPU advised)
    python ci/check_bundles.py --skip-runs         # static checks + net in/out + TorchScript only
    python ci/check_bundles.py --hide-repo dist/sats_npc   # a package, with this repository's code hidden

Checks, in order, per bundle (a failed check does not stop the others):

1. ``files``: the zoo's required ``configs/metadata.json`` and an inference config, plus this project's
   layout (``train``/``evaluate``/``inference``/``quick``/``multi_gpu_train`` configs, ``logging.conf``,
   ``docs/README.md``, ``LICENSE``, ``large_files.yml``).
2. ``metadata``: ``metadata.json`` against ``ci/meta_schema_20240725_required.json`` (the required fields and
   types of MONAI's ``meta_schema_20240725.json``; ``monai.bundle verify_metadata`` would download it) with
   ``jsonschema``.
3. ``version``: ``version`` is ``X.Y.Z``, is a key of ``changelog`` and is its newest entry.
4. ``data_format``: ``network_data_format`` has an ``image`` input and a ``pred`` output (2D slice or 3D).
5. ``requirements``: every third-party package imported by ``scripts/``, the configs and the project code the
   bundle uses (vendored or not) is listed in ``required_packages_version`` (MONAI's own torch/numpy
   excepted) and installed; a version different from the listed one is reported as a note. A package (with
   ``scripts/_vendor``) must not list the project distribution whose code it vendors (``npc-gtv``).
6. ``net_in_out``: ``monai.bundle verify_net_in_out`` (subprocess) with the zoo's default arguments on the
   full ``configs/inference.yaml`` (also in quick mode: the metadata's shapes must fit the full network).
7. ``torchscript``: ``monai.bundle ckpt_export`` of the full network to TorchScript + same output as the
   eager network (weights: the trained ``model.pt`` with ``--full``, the initial ones in quick mode), unless
   ``metadata.json`` has ``"torchscript": {"exempt": "<reason>"}`` (the reason is printed; a bundle may
   also ask for ``{"use_trace": true}``).
8. ``train`` / ``eval`` / ``infer``: ``ConfigWorkflow`` + ``check_properties`` + initialise/run/finalise in
   a subprocess on the phantom data, with ``configs/quick.yaml`` merged last unless ``--full``; outputs go
   to a temporary work folder (``ckpt_dir``/``output_dir`` overridden), the trained ``model.pt`` feeds
   ``eval``/``infer`` (and, with ``--full``, the TorchScript export).

Which config files each workflow merges follows this project's convention (``train.yaml``;
``inference.yaml + evaluate.yaml``; ``inference.yaml``) and can be changed per bundle in
``ci/bundle_custom.json`` (like the zoo's ``ci/bundle_custom_data.py``): ``workflows`` (config lists),
``extra_train`` (config lists of further trainings a bundle needs before inference, e.g. a second
network, run after ``train``), ``net_id``, ``net_configs``, ``overrides``.

Exit status 0 when every check passed (skips allowed), 1 otherwise. ``--json FILE`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CI_DIR = Path(__file__).resolve().parent
REPO_ROOT = CI_DIR.parent
sys.path.insert(0, str(CI_DIR))

import bundle_deps  # noqa: E402

SCHEMA_FILE = CI_DIR / "meta_schema_20240725_required.json"
CUSTOM_FILE = CI_DIR / "bundle_custom.json"
ZOO_REQUIRED = ["configs/metadata.json"]
PROJECT_REQUIRED = [
    "configs/train.yaml",
    "configs/inference.yaml",
    "configs/evaluate.yaml",
    "configs/quick.yaml",
    "configs/multi_gpu_train.yaml",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
    "large_files.yml",
]
DEFAULT_WORKFLOWS = {  # this project's convention (docs/DEVELOPING.md): evaluate.yaml merges on inference.yaml
    "train": ["configs/train.yaml"],
    "eval": ["configs/inference.yaml", "configs/evaluate.yaml"],
    "infer": ["configs/inference.yaml"],
}
QUICK_CONFIG = "configs/quick.yaml"
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


class Result:
    """Outcome of one check: ``status`` is ``ok``, ``fail`` or ``skip``."""

    def __init__(self, bundle: str, check: str, status: str, message: str = "", seconds: float = 0.0):
        self.bundle, self.check, self.status, self.message, self.seconds = bundle, check, status, message, seconds

    def as_dict(self) -> dict:
        return dict(bundle=self.bundle, check=self.check, status=self.status, message=self.message, seconds=round(self.seconds, 1))

    def __repr__(self) -> str:
        return f"[{self.status.upper():4}] {self.bundle}: {self.check} ({self.seconds:.1f}s) {self.message}"


# ----------------------------------------------------------------------------------------------- static checks
def load_metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def check_files(bundle: Path) -> list[str]:
    """Missing required files (empty list: all present)."""
    missing = [f for f in ZOO_REQUIRED + PROJECT_REQUIRED if not (bundle / f).is_file()]
    if (bundle / "scripts").is_dir() and not (bundle / "scripts" / "__init__.py").is_file():
        missing.append("scripts/__init__.py")
    return missing


def check_metadata_schema(meta: dict) -> list[str]:
    """Schema violations of ``metadata.json`` (offline copy of the zoo schema's required fields/types)."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = []
    for err in sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{where}: {err.message}")
    url = meta.get("schema", "")
    if isinstance(url, str) and not re.search(r"meta_schema_\d{8}\.json$", url):
        errors.append(f"schema: {url!r} does not name a MONAI meta_schema_YYYYMMDD.json")
    return errors


def check_version(meta: dict) -> list[str]:
    """Version / changelog consistency, as the zoo's verify_version_changes (minus the published-version lookup)."""
    errors = []
    version = meta.get("version")
    changelog = meta.get("changelog")
    if not isinstance(version, str) or not SEMVER.match(version):
        errors.append(f"version {version!r} is not of the form X.Y.Z")
    if not isinstance(changelog, dict) or not changelog:
        errors.append("changelog is missing or empty")
        return errors
    if version not in changelog:
        errors.append(f"version {version!r} has no changelog entry (changelog has {list(changelog)})")
    bad = [k for k in changelog if not SEMVER.match(str(k))]
    if bad:
        errors.append(f"changelog keys not of the form X.Y.Z: {bad}")
    elif isinstance(version, str) and SEMVER.match(version):
        newest = max(changelog, key=lambda k: tuple(int(p) for p in k.split(".")))
        if newest != version:
            errors.append(f"version {version} is not the newest changelog entry ({newest})")
    for key, text in changelog.items():
        if not isinstance(text, str) or not text.strip():
            errors.append(f"changelog[{key!r}] is empty")
    return errors


def check_data_format(meta: dict) -> list[str]:
    """``network_data_format``: an ``image`` input and a ``pred`` output (2D or 3D spatial shape)."""
    errors = []
    fmt = meta.get("network_data_format") or {}
    for section, name in (("inputs", "image"), ("outputs", "pred")):
        entry = (fmt.get(section) or {}).get(name)
        if not isinstance(entry, dict):
            errors.append(f"network_data_format.{section} has no {name!r} entry (has {list(fmt.get(section) or {})})")
            continue
        shape = entry.get("spatial_shape")
        if not isinstance(shape, list) or len(shape) not in (2, 3):
            errors.append(f"network_data_format.{section}.{name}.spatial_shape should have 2 or 3 entries, got {shape!r}")
        if not isinstance(entry.get("num_channels"), int) or entry.get("num_channels", 0) < 1:
            errors.append(f"network_data_format.{section}.{name}.num_channels must be a positive integer")
    return errors


def check_requirements(bundle: Path, meta: dict, source_root: Path | None) -> tuple[list[str], list[str]]:
    """(errors, notes): imported third-party packages vs ``required_packages_version`` and the environment."""
    from importlib import metadata as im

    listed = {bundle_deps.normalize(k): v for k, v in (meta.get("required_packages_version") or {}).items()}
    errors, notes = [], []
    used = bundle_deps.third_party_imports(bundle, source_root)
    for name, where in sorted(used.items()):
        if name in bundle_deps.BASE_PACKAGES:
            continue
        dist = bundle_deps.distribution_of(name)
        if dist is None:
            errors.append(f"imports {name!r} ({', '.join(where[:3])}) which is not installed and not a known package")
            continue
        if not (bundle_deps.distributions_of(name) | {bundle_deps.normalize(dist)}) & set(listed):
            errors.append(f"imports {name!r} ({', '.join(where[:3])}) but required_packages_version does not list {dist!r}")
    manifest = bundle / "scripts" / "_vendor" / "VENDORED.json"
    vendored_dist = json.loads(manifest.read_text()).get("distribution") if manifest.is_file() else None
    if vendored_dist and bundle_deps.normalize(vendored_dist) in listed:
        errors.append(f"lists {vendored_dist!r}, whose code this package vendors in scripts/_vendor; a package must not "
                      f"require it (it is on no package index, so installing the requirements would fail)")
        listed.pop(bundle_deps.normalize(vendored_dist))
    for dist, wanted in sorted(listed.items()):
        try:
            have = im.version(dist)
        except im.PackageNotFoundError:
            errors.append(f"required package {dist}=={wanted} is not installed")
            continue
        if str(have).split("+")[0] != str(wanted):
            notes.append(f"{dist}: listed {wanted}, installed {have}")
    return errors, notes


# ----------------------------------------------------------------------------------------------- subprocess checks
def _env(bundle: Path, data_dir: Path | None, hide_repo: bool = False) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if hide_repo:
        env["NPC_GTV_HIDE_REPO"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(bundle)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if data_dir is not None:
        env["NPC_GTV_DATA"] = str(data_dir)
    return env


def _run(cmd: list[str], bundle: Path, env: dict, timeout: int) -> tuple[bool, str]:
    try:
        proc = subprocess.run(cmd, cwd=str(bundle), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-3000:]
        return False, f"timed out after {timeout}s: {' '.join(cmd)}\n{out!r}"
    text = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        return False, f"exit {proc.returncode}: {' '.join(cmd)}\n{text[-4000:]}"
    return True, text


def _cli_list(paths: list[str]) -> str:
    return repr(paths) if len(paths) > 1 else paths[0]


def load_custom(bundle_name: str) -> dict:
    if CUSTOM_FILE.is_file():
        return json.loads(CUSTOM_FILE.read_text()).get(bundle_name, {})
    return {}


def workflow_configs(bundle: Path, custom: dict, quick: bool) -> dict[str, list[str]]:
    flows = {k: list(v) for k, v in DEFAULT_WORKFLOWS.items()}
    flows.update({k: list(v) for k, v in custom.get("workflows", {}).items()})
    if quick and (bundle / QUICK_CONFIG).is_file():
        flows = {k: v + [QUICK_CONFIG] for k, v in flows.items()}
    return flows


def check_bundle(bundle, *, quick: bool = True, runs: bool = True, work_dir=None, data_dir=None,
                 source_root=None, timeout: int = 1800, hide_repo: bool = False, log=print) -> list[Result]:
    """Run every check on one bundle folder; returns the results (also logged as they come)."""
    bundle = Path(bundle).resolve()
    name = bundle.name
    results: list[Result] = []

    def record(check, status, message="", start=None):
        res = Result(name, check, status, message, 0.0 if start is None else time.time() - start)
        results.append(res)
        log(repr(res))
        return res

    missing = check_files(bundle)
    record("files", "fail" if missing else "ok", f"missing: {missing}" if missing else "")
    try:
        meta = load_metadata(bundle)
    except ValueError as exc:
        record("metadata", "fail", str(exc))
        return results
    errs = check_metadata_schema(meta)
    record("metadata", "fail" if errs else "ok", "; ".join(errs))
    errs = check_version(meta)
    record("version", "fail" if errs else "ok", "; ".join(errs) or f"version {meta.get('version')}")
    errs = check_data_format(meta)
    record("data_format", "fail" if errs else "ok", "; ".join(errs))
    if source_root is None and not (bundle / "scripts" / "_vendor").is_dir():
        source_root = REPO_ROOT  # a bundle inside the repository uses the repository's shared code
    errs, notes = check_requirements(bundle, meta, source_root)
    record("requirements", "fail" if errs else "ok", "; ".join(errs + notes))

    custom = load_custom(name)
    net_id = custom.get("net_id", "network_def")
    flows = workflow_configs(bundle, custom, quick)
    # the zoo's commands run on the full inference config whatever the mode (a quick-mode network
    # can accept shapes the full one does not); quick-trained weights fit only the quick network
    net_configs = custom.get("net_configs", ["configs/inference.yaml"])
    env = _env(bundle, data_dir, hide_repo)
    meta_file = str(bundle / "configs" / "metadata.json")
    py = sys.executable

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"check_{name}_")
        work_dir = tmp.name
    work = Path(work_dir) / name
    (work / "models").mkdir(parents=True, exist_ok=True)
    (work / "eval").mkdir(parents=True, exist_ok=True)
    overrides = {"ckpt_dir": str(work / "models"), "output_dir": str(work / "eval")}
    overrides.update(custom.get("overrides", {}))
    try:
        trained = work / "models" / "model.pt"
        if runs:
            extra = [list(c) + ([QUICK_CONFIG] if quick and (bundle / QUICK_CONFIG).is_file() else [])
                     for c in custom.get("extra_train", [])]
            steps = [("train", "train", flows["train"])]
            steps += [(f"train_extra{i + 1}", "train", cfgs) for i, cfgs in enumerate(extra)]
            steps += [("eval", "eval", flows["eval"]), ("infer", "infer", flows["infer"])]
            for label, wf, cfgs in steps:
                start = time.time()
                missing_cfg = [c for c in cfgs if not (bundle / c).is_file()]
                if missing_cfg:
                    record(label, "fail", f"missing {missing_cfg}", start)
                    continue
                if label != "train" and not trained.is_file():
                    record(label, "skip", "no trained model.pt (train failed)", start)
                    continue
                # inference writes its own folder: predictions of the eval step are never overwritten (refused)
                step_overrides = {**overrides, "output_dir": str(work / "infer")} if label == "infer" else overrides
                ok, out = _run([py, str(CI_DIR / "run_workflow.py"), str(bundle), wf, *cfgs,
                                "--override", json.dumps(step_overrides)], bundle, env, timeout)
                msg = ""
                if not ok:
                    found = re.search(r"CHECK-PROPERTIES-MISSING (.*)", out)
                    msg = f"check_properties: missing {found.group(1)}" if found else out
                elif label == "train" and not trained.is_file():
                    ok, msg = False, f"training finished but wrote no {trained}"
                if ok and hide_repo:
                    outside = [line for line in out.splitlines()
                               if line.startswith("IMPORTED ") and str(bundle) not in line]
                    if outside:
                        ok, msg = False, f"project code imported from outside the package: {outside}"
                    else:
                        msg = "; ".join(line for line in out.splitlines() if line.startswith("IMPORTED "))
                record(label, "ok" if ok else "fail", msg, start)

        start = time.time()
        ts_rule = meta.get("torchscript") or {}
        missing_cfg = [c for c in net_configs if not (bundle / c).is_file()]
        if missing_cfg:
            record("net_in_out", "fail", f"missing {missing_cfg}", start)
            record("torchscript", "fail", f"missing {missing_cfg}", start)
        else:
            cmd = [py, str(CI_DIR / "net_tools.py"), str(bundle), net_id, str(work / "models"), *net_configs,
                   "--torchscript", json.dumps(ts_rule)]
            if trained.is_file() and not quick:
                cmd += ["--weights", str(trained)]
            ok, out = _run(cmd, bundle, env, timeout)
            net_ok = "NET-IN-OUT-OK" in out
            record("net_in_out", "ok" if net_ok else "fail", "" if net_ok else out[-4000:], start)
            marker = next((line for line in out.splitlines() if line.startswith("TORCHSCRIPT-")), "")
            if marker.startswith("TORCHSCRIPT-EXEMPT"):
                record("torchscript", "skip", f"exempt (metadata.json): {marker.split(' ', 1)[-1]}", start)
            elif marker.startswith("TORCHSCRIPT-OK"):
                record("torchscript", "ok", marker, start)
            else:
                record("torchscript", "fail", out[-4000:], start)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def find_bundles(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / "configs").is_dir()) if Path(root).is_dir() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Model-zoo style checks of NPC GTV bundles (offline).")
    parser.add_argument("bundles", nargs="*", help="bundle folders (default: every bundle under bundles/)")
    parser.add_argument("--full", action="store_true", help="full-size configs instead of configs/quick.yaml")
    parser.add_argument("--skip-runs", action="store_true", help="no train/eval/infer runs")
    parser.add_argument("--work-dir", default=None, help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--data-dir", default=None, help="NPC_GTV_DATA for the phantom data (default: unchanged)")
    parser.add_argument("--source-root", default=None, help="where shared_transforms/npc_gtv live (default: vendored or this repo)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--hide-repo", action="store_true",
                        help="run the workflows as if this repository were not installed (for packaged bundles)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    bundles = [Path(b) for b in args.bundles] or find_bundles(REPO_ROOT / "bundles")
    if not bundles:
        print("no bundles found", file=sys.stderr)
        return 1
    results: list[Result] = []
    for bundle in bundles:
        print(f"== {bundle}", flush=True)
        results += check_bundle(bundle, quick=not args.full, runs=not args.skip_runs, work_dir=args.work_dir,
                                data_dir=args.data_dir, source_root=args.source_root, timeout=args.timeout,
                                hide_repo=args.hide_repo,
                                log=lambda r: print(r, flush=True))
    failed = [r for r in results if r.status == "fail"]
    print(f"\n{len(results)} checks on {len(bundles)} bundle(s): {len(failed)} failed, "
          f"{sum(r.status == 'skip' for r in results)} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
