"""User-facing tools of the NPC GTV toolkit: phantoms, evaluation, DICOM I/O, packaging, demo.

All tools are reached through the single console command ``npc-gtv`` (see :mod:`npc_gtv.cli`).
"""

__version__ = "0.1.0"
