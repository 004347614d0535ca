"""Clinical DICOM input and output.

- :mod:`npc_gtv.dicom.series`: writing a volume as a single-frame DICOM series (phantoms, tests,
  data-set fixtures). Reading lives in :mod:`shared_transforms.dicom`.
- :mod:`npc_gtv.dicom.grid`: bringing a mask back onto a CT's own grid.
- :mod:`npc_gtv.dicom.rtstruct`: DICOM RT Structure Set writing (pydicom) and re-rasterising.
- :mod:`npc_gtv.dicom.seg`: DICOM Segmentation writing and reading (highdicom).
- :mod:`npc_gtv.dicom.commands`: the ``npc-gtv dicom2nifti | rtstruct | dicomseg`` commands.
"""
