"""``npc-gtv package``: a self-contained model-zoo bundle folder + zip that works without this repository.

A bundle in ``bundles/<name>`` imports shared code (``shared_transforms``, parts of ``npc_gtv``) that
lives once in this repository. Packaging copies the bundle and *vendors* exactly the modules it
needs, found by scanning its configs and scripts and following imports transitively
(``ci/bundle_deps.py``):

* the modules are copied byte for byte to ``scripts/_vendor/<package>/...`` (never edited, so
  :func:`verify_vendored` can compare them with the source), and ``scripts/_vendor/VENDORED.json``
  records each file's source path and SHA-256;
* ``scripts/__init__.py`` gets a generated block (before its first statement, after the docstring and
  ``from __future__`` imports) that puts ``scripts/_vendor`` first on ``sys.path``,
  so ``import shared_transforms`` / ``_target_: npc_gtv.training.ResumableCheckpoint`` resolve to the
  vendored copies under their own names (no import in the bundle is rewritten);
* every config with an ``imports`` list gets ``$import scripts`` as its first entry, so the vendored
  path is active before the config's own imports run (a bundle's ``scripts`` is importable whenever the
  bundle root is on ``sys.path``, as for any model-zoo bundle: run from the bundle folder, MONAI Label
  adds it, or set ``PYTHONPATH``);
* ``configs/metadata.json`` loses the ``required_packages_version`` entry of this project's own
  distribution (``npc-gtv``, from ``pyproject.toml``): inside the repository a bundle needs it installed,
  but a package carries that code in ``scripts/_vendor`` and ``npc-gtv`` is on no package index, so the
  entry would make ``pip install`` of the package's requirements fail. The removed entry is recorded in
  ``VENDORED.json`` (``dropped_requirements``).

Left out of the package: ``__pycache__``, training state (``models/checkpoint_last.pt`` and temporary
files), ``eval/`` outputs, TensorBoard / MLflow runs. ``models/model.pt`` / ``model.ts`` are included
when present (otherwise ``large_files.yml`` says where to get them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
VENDOR_DIR = "scripts/_vendor"
MANIFEST = "VENDORED.json"
BOOTSTRAP_MARK = "# --- added by `npc-gtv package`"
BOOTSTRAP = f'''
{BOOTSTRAP_MARK}: vendored shared code (scripts/_vendor) importable under its own names ---
import os as _os
import sys as _sys

_VENDOR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_vendor")
if _VENDOR not in _sys.path:
    _sys.path.insert(0, _VENDOR)
'''
_EXCLUDE_DIRS = {"__pycache__", "eval", "runs", "mlruns", ".pytest_cache", ".ipynb_checkpoints", "_vendor"}
_EXCLUDE_FILES = re.compile(r"^(checkpoint_last\.pt|\..*\.pt\..*|.*\.pyc|mlruns\.db|events\.out\.tfevents\..*)$")

__all__ = ["package_bundle", "package_command", "verify_vendored", "vendored_modules"]


def _bundle_deps():
    """Load ``ci/bundle_deps.py`` (standard library only; shared with the CI checks)."""
    name = "npc_gtv_ci_bundle_deps"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO_ROOT / "ci" / "bundle_deps.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; `npc-gtv package` runs from a checkout of the repository")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_bundle(bundle) -> Path:
    """A bundle folder from a path or a name under ``bundles/``; ``ValueError`` when it is not one."""
    path = Path(bundle)
    if not path.is_dir() and (BUNDLES_DIR / str(bundle)).is_dir():
        path = BUNDLES_DIR / str(bundle)
    if not path.is_dir():
        known = sorted(p.name for p in BUNDLES_DIR.iterdir() if p.is_dir()) if BUNDLES_DIR.is_dir() else []
        raise ValueError(f"bundle {bundle!r} not found (not a folder; bundles here: {known})")
    if not (path / "configs" / "metadata.json").is_file():
        raise ValueError(f"{path}: not a MONAI bundle (no configs/metadata.json)")
    return path.resolve()


def vendored_modules(bundle, source_root=REPO_ROOT) -> list[str]:
    """Project modules the bundle needs (transitively), e.g. ``['npc_gtv', 'npc_gtv.training', ...]``."""
    return _bundle_deps().project_module_closure(Path(bundle), Path(source_root))


def _copy_bundle(src: Path, dest: Path) -> list[str]:
    copied = []
    for root, dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDE_DIRS and not d.startswith("."))
        for name in sorted(files):
            if _EXCLUDE_FILES.match(name):
                continue
            target = dest / rel_root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, target)
            copied.append(str(rel_root / name))
    return copied


def _with_bootstrap(source: str) -> str:
    """``source`` of ``scripts/__init__.py`` with the vendoring block inserted before its first statement.

    The block goes after the module docstring and ``from __future__`` imports (which must stay first) and
    before anything else, so imports the package itself makes already see the vendored code.
    """
    import ast

    lines = source.splitlines(keepends=True)
    insert_at = 0
    try:
        body = ast.parse(source).body
    except SyntaxError:
        body = []
    for node in body:
        is_doc = isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
            and isinstance(node.value.value, str) and node is body[0]
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if is_doc or is_future:
            insert_at = node.end_lineno
        else:
            break
    head, tail = "".join(lines[:insert_at]), "".join(lines[insert_at:])
    if head and not head.endswith("\n"):
        head += "\n"
    return head + BOOTSTRAP + ("\n" + tail if tail else "")


def _prepend_scripts_import(config: Path) -> bool:
    """Insert ``$import scripts`` first in a config's top-level ``imports`` list (text edit keeps comments)."""
    text = config.read_text(encoding="utf-8")
    if config.suffix == ".json":
        data = json.loads(text)
        if isinstance(data.get("imports"), list) and data["imports"][:1] != ["$import scripts"]:
            data["imports"] = ["$import scripts"] + data["imports"]
            config.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
            return True
        return False
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if re.match(r"^imports:\s*(#.*)?$", line.rstrip("\n")):
            indent, first = "  ", None
            for nxt in lines[i + 1:]:
                if not nxt.strip() or nxt.lstrip().startswith("#"):
                    continue
                m = re.match(r"^(\s*)- ", nxt)
                if m:  # the list's first item
                    indent, first = m.group(1), nxt
                break
            # only an "$import scripts" that comes *first* makes the vendored code visible to the other
            # entries (a later one, as in bundles that import their scripts after npc_gtv, is too late)
            if first is not None and re.match(r"^\s*-\s*['\"]?\$import scripts['\"]?\s*$", first):
                return False
            lines.insert(i + 1, f"{indent}- $import scripts\n")
            config.write_text("".join(lines), encoding="utf-8")
            return True
        m = re.match(r"^imports:\s*\[(.*)\]\s*$", line.rstrip("\n"))
        if m:
            inner = m.group(1).strip()
            if re.match(r"^['\"]\$import scripts['\"]\s*(,|$)", inner):
                return False
            lines[i] = f"imports: [\"$import scripts\"{', ' + inner if inner else ''}]\n"
            config.write_text("".join(lines), encoding="utf-8")
            return True
    return False


def project_distribution(source_root=REPO_ROOT) -> str | None:
    """This project's distribution name (``[project] name`` of ``pyproject.toml``), None without one."""
    import tomllib

    path = Path(source_root) / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("name")
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None


def _drop_project_requirement(metadata: Path, distribution: str | None) -> dict:
    """Remove ``distribution`` from ``required_packages_version`` of ``metadata``; returns what was removed."""
    if not distribution:
        return {}
    meta = json.loads(metadata.read_text(encoding="utf-8"))
    reqs = meta.get("required_packages_version")
    if not isinstance(reqs, dict):
        return {}
    norm = _bundle_deps().normalize
    dropped = {k: v for k, v in reqs.items() if norm(k) == norm(distribution)}
    if dropped:
        meta["required_packages_version"] = {k: v for k, v in reqs.items() if k not in dropped}
        metadata.write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return dropped


def _write_zip(folder: Path, zip_path: Path) -> None:
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    os.replace(tmp, zip_path)


def package_bundle(bundle, out_dir, *, source_root=REPO_ROOT, make_zip: bool = True, overwrite: bool = False) -> dict:
    """Build the self-contained package of ``bundle`` in ``out_dir/<name>`` (+ ``out_dir/<name>.zip``).

    Args:
        bundle: bundle folder or name under ``bundles/``.
        out_dir: output folder (created).
        source_root: folder holding ``shared_transforms`` / ``npc_gtv`` (the repository).
        make_zip: also write ``<name>.zip`` (top-level folder ``<name>/``, as model-zoo zips).
        overwrite: replace an existing package of the same name (only one made by this command).

    Returns:
        ``{"folder", "zip", "vendored": [module names], "files": [vendored relative paths],
        "configs_patched": [...], "dropped_requirements": {name: version}}``.

    Raises:
        ValueError: not a bundle, or the output exists and ``overwrite`` is False.
    """
    src = resolve_bundle(bundle)
    out_dir = Path(out_dir).resolve()
    dest = out_dir / src.name
    if dest.resolve() == src or src in dest.resolve().parents:
        raise ValueError(f"output {dest} is inside the bundle {src}; choose another --out")
    if dest.exists():
        if not overwrite:
            raise ValueError(f"{dest} already exists; pass overwrite=True (--overwrite) to replace it")
        if not (dest / VENDOR_DIR / MANIFEST).is_file() and any(dest.iterdir()):
            raise ValueError(f"{dest} exists and was not made by `npc-gtv package`; refusing to delete it")
        shutil.rmtree(dest)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{src.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        _copy_bundle(src, staging)
        modules = vendored_modules(src, source_root)
        deps = _bundle_deps()
        manifest = {"source_root": str(Path(source_root).resolve()), "modules": modules, "files": {}}
        for mod in modules:
            path = deps.module_file(mod, Path(source_root))
            rel = path.relative_to(source_root)
            target = staging / VENDOR_DIR / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # bytes only: the copy must equal the source
            manifest["files"][str(rel)] = _sha256(path)
        for pkg in sorted({m.split(".")[0] for m in modules}):
            version = None
            init = Path(source_root) / pkg / "__init__.py"
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", init.read_text()) if init.is_file() else None
            if found:
                version = found.group(1)
            manifest.setdefault("versions", {})[pkg] = version
        distribution = project_distribution(source_root)
        manifest["distribution"] = distribution
        manifest["dropped_requirements"] = _drop_project_requirement(staging / "configs" / "metadata.json", distribution)
        (staging / VENDOR_DIR).mkdir(parents=True, exist_ok=True)
        (staging / VENDOR_DIR / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        init = staging / "scripts" / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        existing = init.read_text(encoding="utf-8") if init.is_file() else ""
        if BOOTSTRAP_MARK not in existing:
            init.write_text(_with_bootstrap(existing), encoding="utf-8")
        patched = []
        for cfg in sorted((staging / "configs").glob("*")):
            if cfg.suffix in (".yaml", ".yml", ".json") and cfg.name != "metadata.json" and _prepend_scripts_import(cfg):
                patched.append(cfg.name)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    zip_path = None
    if make_zip:
        zip_path = out_dir / f"{src.name}.zip"
        _write_zip(dest, zip_path)
    return {"folder": dest, "zip": zip_path, "vendored": modules, "files": sorted(manifest["files"]),
            "configs_patched": patched, "dropped_requirements": manifest["dropped_requirements"]}


def verify_vendored(package_dir, source_root=REPO_ROOT) -> list[str]:
    """Differences between a package's vendored files and the source (empty list: identical bytes)."""
    package_dir = Path(package_dir)
    manifest_path = package_dir / VENDOR_DIR / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing (not made by `npc-gtv package`)"]
    manifest = json.loads(manifest_path.read_text())
    problems = []
    for rel, digest in manifest["files"].items():
        copy, source = package_dir / VENDOR_DIR / rel, Path(source_root) / rel
        if not copy.is_file():
            problems.append(f"{rel}: missing in the package")
        elif not source.is_file():
            problems.append(f"{rel}: no longer in the source")
        elif copy.read_bytes() != source.read_bytes():
            problems.append(f"{rel}: differs from the source")
        elif _sha256(copy) != digest:
            problems.append(f"{rel}: does not match the recorded SHA-256")
    return problems


def package_command(bundle: str, out: str = "dist", zip: bool = True, overwrite: bool = False, check: bool = False) -> None:  # noqa: A002
    """Package BUNDLE (a name under bundles/ or a folder) as a self-contained model-zoo bundle.

    Args:
        bundle: bundle name (``sats_npc``) or folder.
        out: output folder; the package is ``OUT/<name>/`` and ``OUT/<name>.zip``.
        zip: also write the zip.
        overwrite: replace a previous package of the same bundle in OUT.
        check: afterwards run ``ci/check_bundles.py`` on the package (quick mode).
    """
    result = package_bundle(bundle, out, make_zip=zip, overwrite=overwrite)
    print(f"package: {result['folder']}")
    if result["zip"]:
        print(f"zip:     {result['zip']}")
    print(f"vendored {len(result['files'])} files of {', '.join(sorted({m.split('.')[0] for m in result['vendored']}))} "
          f"into scripts/_vendor: {', '.join(result['vendored'])}")
    print(f"configs with '$import scripts' added: {', '.join(result['configs_patched']) or 'none'}")
    if result["dropped_requirements"]:
        print("metadata.json: required_packages_version no longer lists "
              + ", ".join(f"{k}=={v}" for k, v in result["dropped_requirements"].items()) + " (vendored)")
    problems = verify_vendored(result["folder"])
    if problems:
        raise SystemExit("vendored copy differs from the source:\n" + "\n".join(problems))
    print("vendored copy verified identical to the source")
    if check:
        import subprocess

        proc = subprocess.run([sys.executable, str(REPO_ROOT / "ci" / "check_bundles.py"), str(result["folder"])])
        if proc.returncode:
            raise SystemExit(proc.returncode)
