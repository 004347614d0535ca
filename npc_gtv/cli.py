"""The ``npc-gtv`` console command.

Each sub-command lives in its own module and is imported only when it is called, so that
``npc-gtv phantoms`` does not pay for importing torch, ITK and pydicom. ``fire`` builds the
argument parsing and ``--help`` from the target function's signature and docstring.

Two rules hold for every command:

* **Text stays text.** fire turns an argument that looks like a Python literal into a number,
  ``None`` or a tuple, so a folder called ``20240101``, ``12345`` or ``None`` would reach the
  command as an int or None. Every parameter annotated ``str`` (paths, names, UIDs; also
  unannotated ``*args``) is passed through as the literal text (:func:`string_args`); the other
  parameters keep fire's parsing (numbers, booleans, lists).
* **One line per failure.** Bad input (:class:`~shared_transforms.io.InputError`), an
  operating-system failure (no space left, permission denied, read-only file system: ``OSError``)
  and a bad argument (``ValueError``) print ``npc-gtv COMMAND: error: <message>`` on stderr and exit
  with status 2 (1 for OS failures); ``NPC_GTV_TRACEBACK=1`` shows the traceback as well.
"""

from __future__ import annotations

import importlib
import inspect
import os
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


_TEXT_ANNOTATIONS = {"str", "str | None", "None | str", "Optional[str]", "typing.Optional[str]"}


def _is_text(annotation) -> bool:
    if annotation is str:
        return True
    if isinstance(annotation, str):
        return annotation.replace(" ", "") in {a.replace(" ", "") for a in _TEXT_ANNOTATIONS}
    return str(annotation) in ("typing.Optional[str]", "str | None")


def string_args(func):
    """Tell fire to pass every ``str``-annotated parameter of ``func`` through unparsed (module docstring).

    Returns:
        ``func`` itself, with fire's parse-function metadata set.
    """
    import fire.decorators
    from fire.parser import DefaultParseValue

    sig = inspect.signature(func)
    positional, named, default = [], {}, None
    for param in sig.parameters.values():
        fn = str if _is_text(param.annotation) else DefaultParseValue
        if param.kind is param.VAR_POSITIONAL:
            # fire parses *args with the default function; they are paths in every command (masks, runs)
            default = str if fn is str or param.annotation is param.empty else None
        elif param.kind is param.VAR_KEYWORD:
            continue
        else:
            named[param.name] = fn
            if param.kind is param.POSITIONAL_OR_KEYWORD:
                positional.append(fn)
    fire.decorators.SetParseFns(*positional, **named)(func)
    if default is not None:
        fire.decorators.SetParseFn(default)(func)
    return func


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
    return string_args(getattr(module, func_name))


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
    from shared_transforms.errors import clear_message, root_cause

    command = f"npc-gtv {argv[0]}"
    try:
        fire.Fire(func, command=argv[1:], name=command)
    except Exception as exc:  # bad input, OS failure, bad argument: one line naming the problem, no traceback
        clear = clear_message(exc)
        cause = root_cause(exc)
        if clear is None and isinstance(cause, ValueError):
            clear = " ".join(str(cause).split())
        if clear is None:
            raise
        if os.environ.get("NPC_GTV_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"{command}: error: {clear}", file=sys.stderr)
        os_failure = any(isinstance(e, OSError) for e in _chain(exc)) and not any(
            type(e).__name__ == "InputError" for e in _chain(exc))
        raise SystemExit(1 if os_failure else 2) from None


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__

if __name__ == "__main__":
    main()
