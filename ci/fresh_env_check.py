#!/usr/bin/env python
"""Package a bundle and check it in a brand-new virtual environment holding only MONAI + its requirements.

    python ci/fresh_env_check.py sats_npc [--work DIR] [--keep] [--skip-runs]
    python ci/fresh_env_check.py --tiny            # the CI self-test bundle (ci/tiny_bundle.py)

Steps (each timed, the timings printed at the end):

1. ``npc-gtv package BUNDLE`` into ``WORK/dist`` (run in this, the development, environment);
2. ``python -m venv WORK/venv`` (no ``--system-site-packages``: nothing of this repository or its
   environment is visible);
3. ``pip install`` ``torch==<metadata pytorch_version>`` (pip's configured indexes / ``find-links``, e.g.
   a local CPU wheel), ``monai==<metadata monai_version>``, every ``required_packages_version`` entry at
   its listed version, and ``jsonschema`` (used by the checker, not by the bundle);
4. ``WORK/venv/bin/python ci/check_bundles.py WORK/dist/<name>`` (static checks, net in/out, TorchScript and,
   unless ``--skip-runs``, quick train / eval / infer; ``ci/*.py`` need only the standard library,
   MONAI and jsonschema).

Exit status: the checker's. This is a maintainer / CI script (minutes, network to the package index);
the unit tests check the same self-containment in-process with the repository hidden from ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CI_DIR = Path(__file__).resolve().parent
REPO_ROOT = CI_DIR.parent


def _step(name: str, cmd: list[str], timings: dict, **kwargs) -> None:
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, **kwargs)
    timings[name] = round(time.time() - start, 1)
    if proc.returncode != 0:
        print(json.dumps(timings, indent=2))
        raise SystemExit(f"{name} failed with exit status {proc.returncode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", help="bundle name under bundles/ or folder")
    ap.add_argument("--tiny", action="store_true", help="use the CI self-test bundle")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    ap.add_argument("--skip-runs", action="store_true", help="no train/eval/infer runs in the fresh environment")
    args = ap.parse_args(argv)
    if not args.bundle and not args.tiny:
        ap.error("give a bundle or --tiny")

    work = Path(args.work or tempfile.mkdtemp(prefix="fresh_env_"))
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    bundle = args.bundle
    if args.tiny:
        sys.path.insert(0, str(CI_DIR))
        import tiny_bundle

        bundle = str(tiny_bundle.write_tiny_bundle(work / "src"))

    from npc_gtv.packaging import package_bundle, resolve_bundle, verify_vendored

    start = time.time()
    result = package_bundle(resolve_bundle(bundle), work / "dist", overwrite=True)
    timings["package"] = round(time.time() - start, 1)
    assert not verify_vendored(result["folder"]), verify_vendored(result["folder"])
    pkg = result["folder"]
    meta = json.loads((pkg / "configs" / "metadata.json").read_text())

    venv = work / "venv"
    _step("venv", [sys.executable, "-m", "venv", str(venv)], timings)
    py = str(venv / "bin" / "python")
    reqs = [f"torch=={meta['pytorch_version']}", f"monai=={meta['monai_version']}", "jsonschema"]
    reqs += [f"{k}=={v}" for k, v in sorted(meta.get("required_packages_version", {}).items())]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    _step("pip install", [py, "-m", "pip", "install", "-q", *reqs], timings, env=env)
    _step("pip freeze", [py, "-m", "pip", "freeze"], timings, env=env, stdout=open(work / "freeze.txt", "w"))
    check = [py, str(CI_DIR / "check_bundles.py"), str(pkg), "--work-dir", str(work / "check"),
             "--data-dir", str(work / "data"), "--json", str(work / "results.json")]
    if args.skip_runs:
        check.append("--skip-runs")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    code = 0
    try:
        _step("check_bundles", check, timings, env=env, cwd=str(work))
    except SystemExit as exc:
        print(exc)
        code = 1
    timings["total"] = round(sum(timings.values()), 1)
    print("timings (s):", json.dumps(timings))
    print(f"work folder: {work} (venv {venv}, installed packages in {work / 'freeze.txt'})")
    return code


if __name__ == "__main__":
    sys.exit(main())
