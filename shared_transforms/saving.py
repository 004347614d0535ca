"""Bundle output writers with the project's output discipline (see :mod:`shared_transforms.io`).

MONAI's ``SaveImage`` tries each registered writer in turn and only *logs* a failure
(``INFO ... unable to write``): on a full disk the NIfTI writer fails, the ITK writer then leaves a
0-byte file, and the bundle run exits 0. It also writes in place (a concurrent reader sees a
truncated gzip) and names the output after the input file's base name, so two patients' DICOM
folders both called ``CT`` (or two ``ct.nii.gz`` from different folders) write one
``CT_seg.nii.gz``, the second over the first.

* :class:`SafeSaveImage` / :class:`SafeSaveImaged` are ``SaveImage`` / ``SaveImaged`` subclasses
  (so MONAI Label, which drops ``SaveImaged`` from a bundle's post-processing, drops them too) that
  write with one writer through :func:`~shared_transforms.io.atomic_write`: temporary file in the
  target folder, ``fsync``, rename; any failure raises (``OSError`` naming the file), no partial
  file is left; an existing output is refused unless ``overwrite``; the name is
  ``<case>_<postfix><ext>`` with ``<case>`` the data list's ``case_id`` when the entry has one,
  else the input's file or folder name (:func:`output_stem`), made file-name safe; a second input
  of the same run mapping to a name already written is refused, naming both inputs.
* :func:`check_output_names` runs the same naming over a whole data list before inference starts
  (bundle ``initialize``): an empty or malformed data list, two entries mapping to one output name,
  and (without ``overwrite``) outputs that exist already are refused before any case is computed.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImage, SaveImaged
from monai.utils import ensure_tuple, ensure_tuple_rep

from shared_transforms.io import InputError, atomic_write, safe_name

__all__ = ["output_stem", "check_datalist", "check_output_names", "SafeSaveImage", "SafeSaveImaged"]

_IMAGE_EXT = re.compile(r"(\.nii\.gz|\.nii|\.mha|\.mhd|\.nrrd|\.nhdr|\.dcm|\.img|\.hdr)$", re.IGNORECASE)


def _source_of(meta: Mapping | None):
    if not meta:
        return None
    src = meta.get("filename_or_obj")
    if isinstance(src, (list, tuple)):
        src = src[0] if src else None
    return None if src in (None, "") else str(src)


def output_stem(case_id=None, source=None) -> str:
    """The ``<case>`` part of an output name.

    Args:
        case_id: the data list entry's ``case_id`` (used when given).
        source: the input file or DICOM folder (its name without the image extension otherwise).

    Returns:
        a file-name-safe stem (:func:`shared_transforms.io.safe_name`): never a path, never hidden.

    Raises:
        InputError: neither gives a usable name.
    """
    if case_id not in (None, ""):
        return safe_name(case_id, source)
    if source in (None, ""):
        raise InputError(None, "cannot name the output: the data has neither a 'case_id' nor a source file name")
    name = Path(str(source).rstrip("/\\")).name
    return safe_name(_IMAGE_EXT.sub("", name), source)


def check_datalist(datalist, *, keys: Sequence[str] = ("image",), what: str = "datalist") -> list[dict]:
    """Check that a bundle data list is a non-empty list of dicts holding ``keys``.

    Raises:
        InputError: not a list (e.g. ``--datalist /data/ct.nii.gz`` without the list brackets), empty,
            or an entry that is not a dict or lacks a key; the message shows the expected form.
    """
    example = "e.g. --datalist \"[{'image': '/data/ct.nii.gz'}]\""
    if isinstance(datalist, (str, bytes)) or not isinstance(datalist, Sequence):
        raise InputError(what, f"must be a list of {{'image': path}} entries, got {type(datalist).__name__} {str(datalist)[:80]!r} ({example})")
    if not datalist:
        raise InputError(what, f"is empty: nothing to process ({example})")
    for i, entry in enumerate(datalist):
        if not isinstance(entry, Mapping):
            raise InputError(what, f"entry {i} must be a dict like {{'image': path}}, got {type(entry).__name__} {str(entry)[:80]!r} ({example})")
        missing = [k for k in keys if k not in entry]
        if missing:
            raise InputError(what, f"entry {i} has no {', '.join(map(repr, missing))} (keys: {sorted(map(str, entry))}; {example})")
    return list(datalist)


def check_output_names(
    datalist,
    output_dir,
    suffixes: Iterable[str] = ("_seg.nii.gz",),
    *,
    overwrite: bool = False,
    case_key: str = "case_id",
    image_key: str = "image",
) -> dict[str, str]:
    """Refuse, before a run, a data list whose outputs would collide or (without ``overwrite``) exist.

    Args:
        datalist: the bundle's data list (checked with :func:`check_datalist`).
        output_dir: the prediction folder.
        suffixes: the file-name endings each case writes after its stem (``_seg.nii.gz``,
            ``_rtstruct.dcm`` ...).
        overwrite: existing outputs may be replaced.
        case_key: data list key of the per-case id.
        image_key: data list key of the input (a list: its first element names the case).

    Returns:
        ``{stem: input}`` of the run.

    Raises:
        InputError: malformed data list, two inputs with one output name, or an existing output.
    """
    entries = check_datalist(datalist, keys=(image_key,))
    out = Path(output_dir)
    stems: dict[str, str] = {}
    for entry in entries:
        image = entry[image_key]
        if isinstance(image, (list, tuple)):
            image = image[0] if image else None
        stem = output_stem(entry.get(case_key), image)
        if stem in stems:
            raise InputError(
                image,
                f"has the same output name {stem!r} as {stems[stem]} (outputs are named after the case_id, else the input's "
                "file or folder name); give each datalist entry a distinct 'case_id'",
            )
        stems[stem] = str(image)
    if not overwrite:
        suffixes = list(suffixes)
        existing = [out / f"{stem}{suf}" for stem in stems for suf in suffixes if (out / f"{stem}{suf}").exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise InputError(existing[0], f"already exists{more}; refusing to overwrite earlier outputs (set overwrite true, "
                                          "e.g. --overwrite true, or choose another output_dir)")
    return stems


class SafeSaveImage(SaveImage):
    """MONAI ``SaveImage`` with the project's output discipline (module docstring).

    Args:
        output_dir: output folder.
        output_postfix: name suffix, ``<case>_<postfix><ext>``.
        output_ext: file extension (``.nii.gz``).
        output_dtype: data type written.
        overwrite: replace an existing output (default: refuse).
        resample: resample to ``original_affine`` before writing (MONAI's option; the bundles invert
            with ``Invertd`` first and keep False).
        kwargs: further ``SaveImage`` options (``squeeze_end_dims``, ``channel_dim``, ``writer`` ...);
            ``separate_folder`` / ``output_name_formatter`` / ``folder_layout`` are not used.

    Raises:
        InputError: (at call time) an existing output without ``overwrite``, or a second input of this
            saver mapping to a name it already wrote.
        OSError: the write failed (full disk, permission): no partial file is left.
    """

    def __init__(self, output_dir=".", output_postfix: str = "seg", output_ext: str = ".nii.gz", output_dtype=np.uint8,
                 overwrite: bool = False, resample: bool = False, **kwargs) -> None:
        for unused in ("separate_folder", "print_log", "output_name_formatter", "folder_layout", "data_root_dir"):
            kwargs.pop(unused, None)
        super().__init__(output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext,
                         output_dtype=output_dtype, resample=resample, separate_folder=False, print_log=False, **kwargs)
        if not self.writers:
            raise ValueError(f"no MONAI image writer for {self.output_ext!r}")
        self.writers = tuple(self.writers)[:1]  # one writer; its failure is an error, not a silent fallback
        self.output_dir = Path(output_dir)
        self.output_postfix = str(output_postfix)
        self.overwrite = bool(overwrite)
        self.written: dict[Path, str] = {}  # output -> input, for this saver's lifetime (one run)

    def output_path(self, meta: Mapping | None, case_id=None) -> Path:
        """``output_dir / <case>_<postfix><ext>`` for one input (see :func:`output_stem`)."""
        stem = output_stem(case_id, _source_of(meta))
        postfix = f"_{self.output_postfix}" if self.output_postfix else ""
        path = self.output_dir / f"{stem}{postfix}{self.output_ext}"
        if path.parent != self.output_dir:  # cannot happen after safe_name; kept as the guarantee
            raise InputError(_source_of(meta), f"output name {path.name!r} leaves the output folder {self.output_dir}")
        return path

    def __call__(self, img, meta_data: dict | None = None, filename=None, case_id=None):
        """Write ``img`` (``(C, X, Y, Z)``, channel first); returns ``img``.

        Args:
            img: the image (MetaTensor: its meta data name the input and give the affine).
            meta_data: meta data of a plain array.
            filename: explicit output path without extension (MONAI's option; bypasses the naming).
            case_id: per-case id from the data list.
        """
        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        source = _source_of(meta) or "<image>"
        path = Path(f"{filename}{self.output_ext}") if filename is not None else self.output_path(meta, case_id)
        if path in self.written:
            raise InputError(
                source,
                f"maps to the output {path.name}, already written in this run for {self.written[path]}; give each datalist "
                "entry a distinct 'case_id'",
            )
        if meta:
            meta_spatial_shape = ensure_tuple(meta.get("spatial_shape", ()))
            if len(meta_spatial_shape) >= len(img.shape):
                self.data_kwargs["channel_dim"] = None
        writer = self.writers[0](**self.init_kwargs)
        writer.set_data_array(data_array=img, **self.data_kwargs)
        writer.set_metadata(meta_dict=meta, **self.meta_kwargs)
        with atomic_write(path, overwrite=self.overwrite, inputs=[source] if source != "<image>" else ()) as tmp:
            writer.write(str(tmp), verbose=False)
        self.writer_obj = writer
        self._data_index += 1
        self.written[path] = source
        if self.savepath_in_metadict and meta is not None:
            meta["saved_to"] = str(path)
        return img


class SafeSaveImaged(SaveImaged):
    """Dictionary version of :class:`SafeSaveImage` (a ``SaveImaged``, so MONAI Label leaves it out).

    Args:
        keys: keys of the images to save (e.g. ``pred``).
        output_dir, output_postfix, output_ext, output_dtype, overwrite, resample: see :class:`SafeSaveImage`.
        case_key: data key of the per-case id (the data list's ``case_id``; absent: the input's name).
        meta_keys, meta_key_postfix: meta data of plain arrays, as in ``SaveImaged``.
        allow_missing_keys: skip missing keys.
        kwargs: passed to :class:`SafeSaveImage`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir=".",
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        output_dtype=np.uint8,
        overwrite: bool = False,
        resample: bool = False,
        case_key: Hashable = "case_id",
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.meta_keys = ensure_tuple_rep(meta_keys, len(self.keys))
        self.meta_key_postfix = ensure_tuple_rep(meta_key_postfix, len(self.keys))
        self.case_key = case_key
        self.saver = SafeSaveImage(output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext,
                                   output_dtype=output_dtype, overwrite=overwrite, resample=resample, **kwargs)

    def __call__(self, data):
        d = dict(data)
        case_id = d.get(self.case_key)
        if isinstance(case_id, (list, tuple)) and len(case_id) == 1:  # collated
            case_id = case_id[0]
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            if meta_key is None and meta_key_postfix is not None:
                meta_key = f"{key}_{meta_key_postfix}"
            meta_data = d.get(meta_key) if meta_key is not None else None
            self.saver(img=d[key], meta_data=meta_data, case_id=case_id)
        return d
