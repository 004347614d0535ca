"""Transforms shared by every NPC GTV bundle (MONAI style: array transform + dictionary wrapper).

Import the submodules directly (``from shared_transforms.intensity import HUWindowd``); this
package keeps its import light so bundle configs can ``$import shared_transforms`` cheaply.
"""

from shared_transforms.errors import install_bundle_excepthook as _install_bundle_excepthook

__version__ = "0.1.0"

# under `python -m monai.bundle run ...` (every bundle config imports this package) a failed run ends
# with one clear line naming the file and the problem (shared_transforms.errors); no-op elsewhere
_install_bundle_excepthook()
