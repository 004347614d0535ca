"""Import shim for MONAI Label 0.8.5 beside pydicom 3 (installed by ``ci/monailabel_env/install.sh``).

MONAI Label's inference endpoint imports ``pydicom_seg`` (DICOM SEG output), whose reader imports
``pydicom._storage_sopclass_uids``, a module pydicom 3 removed; the UIDs it needs live in
``pydicom.uid``. This finder answers that one import with ``pydicom.uid``, only when it is asked
for (a ``.pth`` file installs the finder at interpreter start; nothing is imported then).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_ALIASES = {"pydicom._storage_sopclass_uids": "pydicom.uid"}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        return None


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolve the module names of ``_ALIASES`` to their replacements."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(_ALIASES[fullname]))


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
