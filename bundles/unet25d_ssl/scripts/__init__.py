"""Networks, transforms, pretext tasks, data lists and workflow helpers of the UNet-2.5D bundle.

The submodules are imported here so that a config's ``$import scripts`` makes all of them usable.
"""

from . import data, network, pretext, transforms, workflow  # noqa: F401
