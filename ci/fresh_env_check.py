#!/usr/bin/env python
"""Package bundles and check them in one brand-new virtual environment holding only MONAI + their requirements.

    python ci/fresh_env_check.py sats_npc [unet25d_ssl ...] [--work DIR] [--skip-runs] [--torch VERSION]
                                 [--summary FILE]
    python ci/fresh_env_check.py --all             # every bundle under bundles/, one environment
    python ci/fresh_env_check.py --tiny            # the CI self-test bundle (ci/tiny_bundle.py)

Steps (each timed; the timings and a per-bundle table are printed at the end):

1. ``npc-gtv package`` of every bundle into ``WORK/dist`` (run in this, the development, environment),
   then the zip is extracted to ``WORK/unzipped`` and must hold exactly the folder's files, byte for byte;
   the checks below run on the extracted copy (what a user downloads);
2. the pins of all packages' ``metadata.json`` are merged: ``torch==<pytorch_version>``,
   ``monai==<monai_version>``, ``numpy==<numpy_version>`` and every ``required_packages_version`` entry.
   Two bundles pinning one package to different versions cannot share an environment: the script stops
   (exit 2) naming the package, the bundles and their versions;
3. ``python -m venv WORK/venv`` (no ``--system-site-packages``: nothing of this repository or its
   environment is visible);
4. ``pip install`` of the merged pins plus ``jsonschema`` (used by the checker, not by the bundles), through
   pip's configured indexes / ``find-links`` (e.g. a local CPU torch wheel); ``--torch 2.13.0+cpu`` asks for
   that build of the metadata's torch release (a plain ``torch==2.13.0`` may fetch the CUDA build);
5. per bundle, ``WORK/venv/bin/python ci/check_bundles.py --hide-repo WORK/unzipped/<name>``: static
   checks, net in/out, TorchScript and, unless ``--skip-runs``, quick train / eval / infer with
   ``check_properties`` (``ci/*.py`` need only the standard library, MONAI and jsonschema).

Exit status: 0 every check of every bundle passed; 1 a check failed; 2 packaging, pin merging or the
install failed; 3 the package index could not be reached (the install failed with a network error).
``--summary FILE`` writes the timings, the install command and each bundle's results as JSON.

This is a maintainer / CI script (minutes; needs the package index or a local mirror / pip cache). The unit
tests also check the packages' self-containment in-process, with the repository hidden from ``sys.path``.
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
import zipfile
from pathlib import Path

CI_DIR = Path(__file__).resolve().parent
REPO_ROOT = CI_DIR.parent
sys.path.insert(0, str(CI_DIR))

import bundle_deps  # noqa: E402

EXIT_CHECK_FAILED, EXIT_SETUP_FAILED, EXIT_INDEX_UNREACHABLE = 1, 2, 3
# pip output meaning the index could not be reached (as opposed to a package / version that does not exist)
# ("Could not fetch URL ...: 404" alone is a package the index does not have, not an unreachable index)
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|ConnectTimeoutError|ReadTimeoutError|"
    r"Connection refused|ProxyError|connection error:"
)


class SetupError(Exception):
    """Packaging, pin merging or installing failed (``code``: the exit status to use)."""

    def __init__(self, message: str, code: int = EXIT_SETUP_FAILED):
        super().__init__(message)
        self.code = code


def merge_pins(metas: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """``{normalised package: (version, first bundle pinning it)}`` from several bundles' metadata.

    Args:
        metas: bundle name -> its (packaged) ``metadata.json`` content.

    Raises:
        SetupError: a bundle lacks a version field, or two bundles pin one package to different versions.
    """
    pins: dict[str, tuple[str, str]] = {}
    conflicts = []
    for name, meta in metas.items():
        wanted = {}
        for field, package in (("pytorch_version", "torch"), ("monai_version", "monai"), ("numpy_version", "numpy")):
            if not isinstance(meta.get(field), str) or not meta[field]:
                raise SetupError(f"{name}: configs/metadata.json has no {field}")
            wanted[package] = meta[field]
        reqs = meta.get("required_packages_version") or {}
        if not isinstance(reqs, dict):
            raise SetupError(f"{name}: configs/metadata.json required_packages_version is not an object")
        for package, version in reqs.items():
            wanted[bundle_deps.normalize(package)] = str(version)
        for package, version in wanted.items():
            if package in pins and pins[package][0] != version:
                conflicts.append(f"{package}: {pins[package][1]} pins {pins[package][0]}, {name} pins {version}")
            else:
                pins.setdefault(package, (version, name))
    if conflicts:
        raise SetupError("bundles pin different versions, so they cannot share one environment "
                         "(check them separately):\n  " + "\n  ".join(conflicts))
    return pins


def _network_error(py: str, pip_output: str, env: dict) -> str | None:
    """The network error behind a failed ``pip install`` (None: the index answered, e.g. no such version).

    pip prints connection failures only while it retries; with ``retries 0`` an unreachable index looks like
    "from versions: none". Then the first requirement not found is asked for again with ``-vv --dry-run``,
    which logs why the index page could not be fetched.
    """
    found = NETWORK_ERRORS.search(pip_output)
    if found:
        return found.group(0)
    missing = re.search(r"No matching distribution found for (\S+)", pip_output)
    if not missing:
        return None
    probe = subprocess.run([py, "-m", "pip", "install", "-vv", "--dry-run",
                            "--no-deps", missing.group(1)], capture_output=True, text=True, env=env)
    found = NETWORK_ERRORS.search(probe.stdout + probe.stderr)
    return f"{found.group(0)} while fetching {missing.group(1)}" if found else None


def _timed(name: str, cmd: list[str], timings: dict, **kwargs) -> subprocess.CompletedProcess:
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, **kwargs)
    timings[name] = round(time.time() - start, 1)
    print(f"--- {name}: exit {proc.returncode} after {timings[name]} s", flush=True)
    return proc


def _extract_and_compare(zip_path: Path, folder: Path, dest_root: Path) -> Path:
    """Extract ``zip_path`` under ``dest_root``; it must hold exactly ``folder``'s files with the same bytes."""
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest_root)
    extracted = dest_root / folder.name
    mine = {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()}
    theirs = {p.relative_to(extracted) for p in extracted.rglob("*") if p.is_file()}
    problems = [f"{p}: in the folder, not in the zip" for p in sorted(mine - theirs)]
    problems += [f"{p}: in the zip, not in the folder" for p in sorted(theirs - mine)]
    problems += [f"{p}: differs between zip and folder" for p in sorted(mine & theirs)
                 if (folder / p).read_bytes() != (extracted / p).read_bytes()]
    if problems:
        raise SetupError(f"{zip_path}: zip does not match {folder}:\n  " + "\n  ".join(problems))
    return extracted


def torch_requirement(pins: dict[str, tuple[str, str]], torch_version: str | None) -> str:
    """The torch requirement: the bundles' ``pytorch_version``, or ``torch_version`` when it is a build of it.

    ``torch_version`` (e.g. ``2.13.0+cpu``, a local CPU build) keeps the install light where the index would
    otherwise offer the default (CUDA) build; it must be the same release as the metadata's version.
    """
    wanted, bundle = pins["torch"]
    if torch_version is None:
        return f"torch=={wanted}"
    if torch_version.split("+")[0] != wanted:
        raise SetupError(f"--torch {torch_version} is not a build of torch {wanted}, the pytorch_version of {bundle}")
    return f"torch=={torch_version}"


def run(bundles: list[str], work: Path, *, skip_runs: bool = False, timeout: int = 1800,
        torch_version: str | None = None) -> dict:
    """Package ``bundles``, install one fresh environment, check each package; returns the summary dict."""
    from npc_gtv.packaging import package_bundle, resolve_bundle, verify_vendored

    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    summary: dict = {"work": str(work), "bundles": {}, "timings_s": timings, "skip_runs": skip_runs}

    start = time.time()
    sources: dict[str, Path] = {}
    for bundle in bundles:
        try:
            folder = resolve_bundle(bundle)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        if folder.name in sources:
            raise SetupError(f"{bundle}: a bundle named {folder.name!r} was given twice ({sources[folder.name]})")
        sources[folder.name] = folder
    packages: dict[str, Path] = {}
    for name, folder in sources.items():
        try:
            result = package_bundle(folder, work / "dist", overwrite=True)
        except ValueError as exc:
            raise SetupError(f"{folder}: packaging failed: {exc}") from None
        problems = verify_vendored(result["folder"])
        if problems:
            raise SetupError(f"{result['folder']}: vendored copy differs from the source: {problems}")
        packages[name] = _extract_and_compare(result["zip"], result["folder"], work / "unzipped")
        print(f"packaged {name}: {result['zip']} (vendored {len(result['files'])} files; "
              f"dropped requirements {result['dropped_requirements'] or 'none'})", flush=True)
    timings["package"] = round(time.time() - start, 1)

    metas = {name: json.loads((pkg / "configs" / "metadata.json").read_text()) for name, pkg in packages.items()}
    pins = merge_pins(metas)
    reqs = [torch_requirement(pins, torch_version) if pkg == "torch" else f"{pkg}=={version}"
            for pkg, (version, _) in sorted(pins.items())] + ["jsonschema"]
    summary["install"] = reqs

    venv = work / "venv"
    if _timed("venv", [sys.executable, "-m", "venv", str(venv)], timings).returncode:
        raise SetupError(f"python -m venv {venv} failed")
    py = str(venv / "bin" / "python")
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(var, None)
    proc = _timed("pip install", [py, "-m", "pip", "install", "--progress-bar", "off", *reqs], timings,
                  env=env, capture_output=True, text=True)
    if proc.returncode:
        output = proc.stdout[-6000:] + proc.stderr[-6000:]
        print(output, flush=True)
        network = _network_error(py, proc.stdout + proc.stderr, env)
        if network:
            raise SetupError(f"package index unreachable: pip install failed with a network error ({network})",
                             EXIT_INDEX_UNREACHABLE)
        last = [line for line in output.splitlines() if line.startswith("ERROR")]
        raise SetupError(f"pip install into {venv} failed: {' | '.join(last) or 'see output above'}")
    with open(work / "freeze.txt", "w") as fh:
        _timed("pip freeze", [py, "-m", "pip", "freeze"], timings, env=env, stdout=fh)

    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    failed = False
    for name, pkg in packages.items():
        result_file = work / f"results_{name}.json"
        check = [py, str(CI_DIR / "check_bundles.py"), str(pkg), "--hide-repo", "--work-dir", str(work / "check"),
                 "--data-dir", str(work / "data"), "--json", str(result_file), "--timeout", str(timeout)]
        if skip_runs:
            check.append("--skip-runs")
        proc = _timed(f"check {name}", check, timings, env=env, cwd=str(work))
        results = json.loads(result_file.read_text()) if result_file.is_file() else []
        statuses = {r["check"]: r["status"] for r in results}
        ok = proc.returncode == 0 and bool(results)
        failed |= not ok
        summary["bundles"][name] = {"passed": ok, "exit": proc.returncode, "seconds": timings[f"check {name}"],
                                    "checks": statuses, "results": results}
    timings["total"] = round(sum(timings.values()), 1)
    summary["passed"] = not failed
    return summary


def _print_summary(summary: dict) -> None:
    print("\n== fresh-environment check")
    for name, res in summary["bundles"].items():
        counts = {s: sum(v == s for v in res["checks"].values()) for s in ("ok", "fail", "skip")}
        failed = [c for c, s in res["checks"].items() if s == "fail"]
        print(f"{name:14s} {'PASS' if res['passed'] else 'FAIL'}  {res['seconds']:7.1f} s  "
              f"ok {counts['ok']}, failed {counts['fail']}, skipped {counts['skip']}"
              + (f"  failed: {', '.join(failed)}" if failed else "")
              + ("" if res["results"] else f"  (checker exit {res['exit']}, no results written)"))
    print("timings (s):", json.dumps(summary["timings_s"]))
    print(f"work folder: {summary['work']} (installed packages in {summary['work']}/freeze.txt)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", help="bundle names under bundles/ or folders")
    ap.add_argument("--all", action="store_true", help="every bundle under bundles/ with a configs/metadata.json")
    ap.add_argument("--tiny", action="store_true", help="the CI self-test bundle")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary folder, kept)")
    ap.add_argument("--skip-runs", action="store_true", help="no train/eval/infer runs in the fresh environment")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per checker subprocess")
    ap.add_argument("--torch", default=None, metavar="VERSION",
                    help="install this build of the metadata's torch release, e.g. 2.13.0+cpu (a local CPU wheel)")
    ap.add_argument("--summary", default=None, help="write the summary (timings, results) to this JSON file")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="fresh_env_")).resolve()
    bundles = list(args.bundles)
    if args.all:
        bundles += sorted(str(p) for p in (REPO_ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
    if args.tiny:
        import tiny_bundle

        bundles.append(str(tiny_bundle.write_tiny_bundle(work / "src")))
    if not bundles:
        ap.error("give bundles, --all or --tiny")

    try:
        summary = run(bundles, work, skip_runs=args.skip_runs, timeout=args.timeout, torch_version=args.torch)
    except SetupError as exc:
        print(f"fresh-environment check: {exc}", file=sys.stderr, flush=True)
        if args.summary:
            Path(args.summary).write_text(json.dumps({"work": str(work), "error": str(exc), "exit": exc.code}, indent=2))
        return exc.code
    _print_summary(summary)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
