"""The auto-contouring DICOM node (``npc-gtv serve``): CT in over DICOM, RT structure set back.

- :mod:`npc_gtv.node.spool`: the on-disk queue of received series and their states.
- :mod:`npc_gtv.node.dimse`: the Storage SCP (receiving CT) and SCU (sending results), pynetdicom.
- :mod:`npc_gtv.node.model`: a bundle's inference, loaded once and kept warm.
- :mod:`npc_gtv.node.service`: the worker loop and the ``npc-gtv serve`` command.
- :mod:`npc_gtv.node.harness`: a throwaway Orthanc and a known model, for tests and benchmarks.

See ``docs/dicom_node.md``.
"""
