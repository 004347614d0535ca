"""The ``npc-gtv`` console command.

Each sub-command lives in its own module and is imported only when it is called, so that
``npc-gtv phantoms`` does not pay for importing torch, ITK and pydicom. ``fire`` builds the
argument parsing and ``--help`` from the target function's signature and docstring.
"""

from __future__ import annotations

import importlib
import sys

# command name -> "module:function"; hyphenated names are the public spelling.
COMMANDS: dict[str, str] = {
    "phantoms": "npc_gtv.phantoms:phantoms_command",
    "demo": "npc_gtv.demo:demo_command",
    "symmetrize": "npc_gtv.symmetry_tools:symmetrize_command",
    "make-atlas": "npc_gtv.symmetry_tools:make_atlas_command",
    "evaluate": "npc_gtv.evaluation.report:evaluate_command",
    "compare": "npc_gtv.evaluation.report:compare_command",
    "morphology": "npc_gtv.evaluation.morphology:morphology_command",
    "agreement": "npc_gtv.evaluation.report:agreement_command",
    "dicom2nifti": "npc_gtv.dicom.commands:dicom2nifti_command",
    "rtstruct": "npc_gtv.dicom.commands:rtstruct_command",
    "dicomseg": "npc_gtv.dicom.commands:dicomseg_command",
    "convert": "npc_gtv.datasets:convert_command",
    "package": "npc_gtv.packaging:package_command",
    "serve": "npc_gtv.node.service:serve_command",
}


def _usage() -> str:
    lines = ["usage: npc-gtv COMMAND [ARGS...]   (npc-gtv COMMAND --help for its options)", "", "commands:"]
    for name, target in COMMANDS.items():
        lines.append(f"  {name:<12} {target.split(':')[0]}")
    return "\n".join(lines)


def resolve(name: str):
    """Return the function behind command ``name`` (hyphens and underscores are equivalent)."""
    key = name.replace("_", "-")
    if key not in COMMANDS:
        raise ValueError(f"unknown command {name!r}.\n{_usage()}")
    module_name, func_name = COMMANDS[key].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(module_name.split(".")[0]):
            raise NotImplementedError(f"command {key!r} is not implemented yet ({module_name} is missing)") from exc
        raise
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``npc-gtv`` console script."""
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    try:
        func = resolve(argv[0])
    except (ValueError, NotImplementedError) as exc:
        print(f"npc-gtv: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from shared_transforms.io import input_error_from

    try:
        fire.Fire(func, command=argv[1:], name=f"npc-gtv {argv[0]}")
    except Exception as exc:  # bad input: print the file and the problem, not a traceback
        clear = input_error_from(exc)
        if clear is None:
            raise
        print(f"npc-gtv {argv[0]}: error: {clear}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
