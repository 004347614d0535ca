"""Evaluation of GTV segmentations: per-case metrics in mm, reports, figures, morphology, agreement.

* :mod:`.metrics` -- DSC, IoU, sensitivity, PPV, RVE, HD, HD95, ASSD, NSD, slice-level recall and
  precision, volumes; explicit empty-mask rules.
* :mod:`.report` -- ``evaluate_folders`` (used by the bundles' ``evaluate.yaml``), ``write_report``,
  ``compare_runs``, ``agreement_folders`` and the ``npc-gtv evaluate / compare / agreement`` commands.
* :mod:`.figures` -- box plots and truth/prediction outline overlays (matplotlib, Agg canvas).
* :mod:`.morphology` -- marching-cubes volume, surface area, maximum diameter, surface regularity.

Sub-modules are imported lazily so that ``import npc_gtv.evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = ["metrics", "report", "figures", "morphology", "compute_case_metrics", "evaluate_folders", "write_report"]

_LAZY = {
    "compute_case_metrics": ("metrics", "compute_case_metrics"),
    "evaluate_folders": ("report", "evaluate_folders"),
    "write_report": ("report", "write_report"),
}


def __getattr__(name):
    if name in ("metrics", "report", "figures", "morphology"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
