"""What a bundle imports: project modules to vendor and third-party packages it must declare.

Standard library only, so ``ci/check_bundles.py`` can use it in a fresh environment that holds
MONAI and a packaged bundle's requirements but not this repository. ``npc-gtv package`` uses
:func:`project_module_closure` to decide which files of ``shared_transforms`` / ``npc_gtv`` to vendor.

Sources scanned:

* ``scripts/**/*.py`` of the bundle (every ``import`` / ``from ... import``, at any depth, except
  those guarded by ``try: ... except ImportError``);
* ``configs/*.yaml|json``: the ``imports`` entries, dotted ``_target_`` values and dotted names in
  ``$`` expressions (e.g. ``$npc_gtv.phantoms.ensure_dataset(...)``).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PROJECT_PACKAGES = ("shared_transforms", "npc_gtv")
# MONAI's own install requirements: a bundle needs not list these
BASE_PACKAGES = {"monai", "torch", "numpy"}
# import name -> distribution name where they differ and the package may not be installed to ask
KNOWN_DISTRIBUTIONS = {
    "ignite": "pytorch-ignite",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "itk": "itk",
    "cv2": "opencv-python",
}

# config components whose optional dependency an import scan of the bundle cannot see
COMPONENT_REQUIREMENTS = {
    r"\bProgressBar\b": "tqdm",
    r"\bTensorBoard\w*Handler\b": "tensorboard",
    r"\bMLFlowHandler\b": "mlflow",
    r"\bClearMLStatsHandler\b|\bClearMLImageHandler\b": "clearml",
}
_YAML_COMMENT = re.compile(r"(?:^|(?<=\s))#.*$")  # a '#' at the start or after a blank (not 'train#handlers')
_DOTTED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
_IMPORT_LINE = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w\s,]+)|import\s+([\w.,\s]+?)(?:\s+as\s+\w+)?)\s*$")


def normalize(dist: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _guarded_by_import_error(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = []
                if isinstance(handler.type, ast.Name):
                    names = [handler.type.id]
                elif isinstance(handler.type, ast.Tuple):
                    names = [e.id for e in handler.type.elts if isinstance(e, ast.Name)]
                if {"ImportError", "ModuleNotFoundError", "Exception"} & set(names):
                    return True
    return False


def python_imports(path: Path, package: str | None = None) -> list[tuple[str, bool]]:
    """``(absolute module name, optional)`` for every import in a python file.

    Args:
        path: the ``.py`` file.
        package: dotted package the file belongs to (to resolve relative imports), e.g.
            ``"npc_gtv.evaluation"`` for ``npc_gtv/evaluation/report.py``.
    """
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        optional = False
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            optional = _guarded_by_import_error(node, parents)
        if isinstance(node, ast.Import):
            found += [(alias.name, optional) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if not package:
                    continue
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, optional))
            # "from pkg import submodule" pulls in pkg.submodule
            found += [(f"{module}.{alias.name}", optional) for alias in node.names if alias.name != "*"]
    return found


def config_references(config_path: Path) -> set[str]:
    """Dotted module paths a config file refers to (imports, ``_target_``, ``$`` expressions)."""
    text = Path(config_path).read_text(encoding="utf-8")
    if Path(config_path).suffix in (".yaml", ".yml"):  # YAML comments are prose ("bench/bench_learning.py"), not references
        text = "\n".join(_YAML_COMMENT.sub("", line) for line in text.splitlines())
    refs: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip().lstrip("-").strip().strip("'\"")
        if line.startswith("$import ") or line.startswith("$from "):
            match = _IMPORT_LINE.match(line[1:])
            if match:
                if match.group(1):
                    refs.add(match.group(1))
                    refs.update(f"{match.group(1)}.{n.strip()}" for n in match.group(2).split(","))
                else:
                    refs.update(m.strip() for m in match.group(3).split(","))
    refs.update(_DOTTED.findall(text))
    return refs


def top_level(name: str) -> str:
    return name.split(".")[0]


def module_file(name: str, source_root: Path) -> Path | None:
    """File of project module ``name`` under ``source_root`` (``pkg/__init__.py`` for packages)."""
    parts = name.split(".")
    base = Path(source_root, *parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _longest_module(name: str, source_root: Path) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if module_file(candidate, source_root) is not None:
            return candidate
    return None


def bundle_sources(bundle: Path) -> tuple[list[Path], list[Path]]:
    """(python files of ``scripts/``, config files of ``configs/``)."""
    bundle = Path(bundle)
    py = sorted(p for p in (bundle / "scripts").rglob("*.py") if "__pycache__" not in p.parts)
    cfg = sorted(p for ext in ("*.yaml", "*.yml", "*.json") for p in (bundle / "configs").glob(ext) if p.name != "metadata.json")
    return py, cfg


def bundle_references(bundle: Path, exclude: tuple[str, ...] = ()) -> list[tuple[str, bool, str]]:
    """``(module, optional, where)`` referenced by a bundle's scripts and configs."""
    bundle = Path(bundle)
    py, cfg = bundle_sources(bundle)
    refs: list[tuple[str, bool, str]] = []
    for path in py:
        rel = path.relative_to(bundle)
        if any(part in exclude for part in rel.parts):
            continue
        package = ".".join(rel.with_suffix("").parts[:-1]) if rel.name != "__init__.py" else ".".join(rel.parts[:-1])
        refs += [(m, opt, str(rel)) for m, opt in python_imports(path, package)]
    for path in cfg:
        refs += [(m, False, str(path.relative_to(bundle))) for m in sorted(config_references(path))]
    return refs


def project_module_closure(bundle: Path, source_root: Path, packages=PROJECT_PACKAGES) -> list[str]:
    """Project modules (and their packages' ``__init__``) a bundle needs, transitively, sorted.

    Args:
        bundle: bundle folder.
        source_root: folder holding the project packages (the repository root).
        packages: top-level project package names.
    """
    todo = []
    for name, _, _ in bundle_references(bundle, exclude=("_vendor",)):
        if top_level(name) in packages:
            mod = _longest_module(name, source_root)
            if mod:
                todo.append(mod)
    needed: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in needed:
            continue
        needed.add(mod)
        parts = mod.split(".")
        for end in range(1, len(parts)):  # parent packages execute their __init__ on import
            todo.append(".".join(parts[:end]))
        path = module_file(mod, source_root)
        package = mod if path.name == "__init__.py" else ".".join(parts[:-1])
        for name, _optional in python_imports(path, package):
            if top_level(name) in packages:
                found = _longest_module(name, source_root)
                if found:
                    todo.append(found)
    return sorted(needed)


def third_party_imports(bundle: Path, source_root: Path | None = None, packages=PROJECT_PACKAGES) -> dict[str, list[str]]:
    """Third-party top-level import names used by a bundle (and the project modules it needs) -> where.

    Standard-library modules, ``scripts``, the project packages and optional (``ImportError``-guarded)
    imports are left out. Config references count only for names that are importable modules or
    appear in an ``imports`` entry, so attribute chains like ``torch.cuda.is_available`` don't mislead.
    """
    import importlib.util

    bundle = Path(bundle)
    vendor = bundle / "scripts" / "_vendor"
    if source_root is None and vendor.is_dir():
        source_root = vendor
    used: dict[str, list[str]] = {}

    def add(name: str, where: str) -> None:
        top = top_level(name)
        if not top or top in sys.stdlib_module_names or top in packages or top in ("scripts", "__future__"):
            return
        used.setdefault(top, [])
        if where not in used[top]:
            used[top].append(where)

    py_files, cfg_files = bundle_sources(bundle)
    yaml_cfgs = [p for p in cfg_files if p.suffix in (".yaml", ".yml")]
    if yaml_cfgs:  # MONAI reads YAML configs with PyYAML, which is not one of MONAI's own requirements
        add("yaml", f"configs/{yaml_cfgs[0].name} (YAML config)")
    for cfg in cfg_files:
        text = cfg.read_text(encoding="utf-8")
        for pattern, module in COMPONENT_REQUIREMENTS.items():
            found = re.search(pattern, text)
            if found:
                add(module, f"configs/{cfg.name} ({found.group(0)})")
    for name, optional, where in bundle_references(bundle, exclude=("_vendor",)):
        if optional:
            continue
        if where.endswith(".py"):
            add(name, where)
        else:
            top = top_level(name)
            if top in sys.stdlib_module_names or top in packages or top == "scripts":
                continue
            # dotted names in configs: keep those whose first part is an importable top-level module
            # (e.g. "ignite.handlers.ProgressBar"); "item.shape" style names are not modules
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            if spec is not None or top in KNOWN_DISTRIBUTIONS:
                add(name, where)
    if source_root is not None:
        for mod in project_module_closure(bundle, source_root, packages):
            path = module_file(mod, source_root)
            package = mod if path.name == "__init__.py" else ".".join(mod.split(".")[:-1])
            for name, optional in python_imports(path, package):
                if not optional:
                    add(name, str(path.relative_to(source_root)))
    return used


_PACKAGES_DISTRIBUTIONS: dict | None = None


def distribution_of(import_name: str) -> str | None:
    """Installed distribution providing top-level module ``import_name`` (None when unknown)."""
    global _PACKAGES_DISTRIBUTIONS
    from importlib import metadata

    if _PACKAGES_DISTRIBUTIONS is None:  # scanning every installed distribution is slow: once per process
        _PACKAGES_DISTRIBUTIONS = metadata.packages_distributions()
    if import_name in KNOWN_DISTRIBUTIONS:  # e.g. "itk" is provided by itk, itk-core, itk-segmentation, ...
        return KNOWN_DISTRIBUTIONS[import_name]
    dists = _PACKAGES_DISTRIBUTIONS.get(import_name)
    return dists[0] if dists else None


def distributions_of(import_name: str) -> set[str]:
    """Every distribution (normalised) that may provide ``import_name``: any of them may be listed."""
    distribution_of(import_name)
    names = set(_PACKAGES_DISTRIBUTIONS.get(import_name, []))
    if import_name in KNOWN_DISTRIBUTIONS:
        names.add(KNOWN_DISTRIBUTIONS[import_name])
    return {normalize(n) for n in names}


def hide_installed_project(packages=PROJECT_PACKAGES) -> list[str]:
    """Make the repository's own ``shared_transforms`` / ``npc_gtv`` unimportable in this process.

    Used (``NPC_GTV_HIDE_REPO=1``) to check a packaged bundle as if this repository were not installed:
    drops the editable-install import finders and every ``sys.path`` entry holding one of ``packages``
    outside a ``_vendor`` folder, and forgets modules already imported from there. Returns what was removed.
    """
    from pathlib import Path as _P

    removed = []
    for finder in list(sys.meta_path):
        module = getattr(finder, "__module__", "") or getattr(type(finder), "__module__", "")
        if module.startswith("__editable__"):
            sys.meta_path.remove(finder)
            removed.append(f"meta_path:{module}")
    for entry in list(sys.path):
        base = _P(entry or ".").resolve()
        if "_vendor" not in base.parts and any((base / p / "__init__.py").is_file() for p in packages):
            sys.path.remove(entry)
            removed.append(f"sys.path:{entry}")
    for name in list(sys.modules):
        if top_level(name) in packages:
            mod_file = getattr(sys.modules[name], "__file__", "") or ""
            if "_vendor" not in _P(mod_file).parts:
                del sys.modules[name]
    return removed
