"""Run one bundle workflow through MONAI's ``ConfigWorkflow`` after ``check_properties`` (CI helper).

Usage (from any folder; the bundle root is put on ``sys.path`` like ``monai.bundle run`` does)::

    python ci/run_workflow.py BUNDLE_DIR TYPE CONFIG [CONFIG ...] [--override JSON]

``TYPE`` is ``train``, ``eval`` or ``infer``. ``CONFIG`` paths are relative to the bundle folder.
Exit status 3 when required properties are missing, otherwise the workflow's own outcome.
Standard library + MONAI only (it must run in a clean environment holding a packaged bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("workflow_type", choices=["train", "eval", "infer"])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--override", default="{}", help="JSON object of config id -> value")
    args = parser.parse_args(argv)

    if os.environ.get("NPC_GTV_HIDE_REPO"):  # check a package as if this repository were not installed
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bundle_deps

        bundle_deps.hide_installed_project()
        sys.path.pop(0)
    bundle = Path(args.bundle).resolve()
    sys.path.insert(0, str(bundle))
    os.chdir(bundle)
    from monai.bundle import ConfigWorkflow

    overrides = json.loads(args.override)
    overrides.setdefault("bundle_root", str(bundle))
    logging_file = bundle / "configs" / "logging.conf"
    workflow = ConfigWorkflow(
        config_file=[str(bundle / c) for c in args.configs],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(logging_file) if logging_file.exists() else None,
        workflow_type=args.workflow_type,
        **overrides,
    )
    workflow.initialize()  # MONAI 1.6 parses (and so can check) properties only after initialize
    missing = workflow.check_properties()
    if missing:
        print(f"CHECK-PROPERTIES-MISSING {json.dumps(missing)}", flush=True)
        return 3
    print("CHECK-PROPERTIES-OK", flush=True)
    workflow.run()
    workflow.finalize()
    for pkg in ("shared_transforms", "npc_gtv"):
        if pkg in sys.modules:
            print(f"IMPORTED {pkg} FROM {sys.modules[pkg].__file__}", flush=True)
    print(f"WORKFLOW-DONE {args.workflow_type}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
