"""Transforms shared by every NPC GTV bundle (MONAI style: array transform + dictionary wrapper).

Import the submodules directly (``from shared_transforms.intensity import HUWindowd``); this
package keeps its import light so bundle configs can ``$import shared_transforms`` cheaply.
"""

__version__ = "0.1.0"
