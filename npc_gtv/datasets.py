"""Converters of public NPC data-set layouts to a Decathlon-style ``dataset.json``.

``npc-gtv convert FORMAT SOURCE OUT [options]`` with FORMAT one of

- ``segrap2023``: SegRap2023 (non-contrast and contrast-enhanced CT, GTVp label);
- ``structseg2019``: StructSeg2019 task 2, nasopharynx GTV;
- ``npc_mri``: the NPC MRI data set of Li et al. (paper 002; DICOM series per sequence, NIfTI
  masks, CSV side information);
- ``glob``: any layout described by path templates with a ``{case}`` field.

The layouts are not specified to the file in the data sets' papers, so every converter is a set
of path templates (all overridable as options) and the assumed layout is documented in
``docs/dicom.md``. The output ``dataset.json`` follows the project's contract (see
``docs/DEVELOPING.md``): ``labels {"0": "background", "1": "GTVp"}``, ``modality``, ``training``
and ``test`` lists of ``{"image", "label", "case_id", ...}`` (multi-channel: ``image`` is a list).
NIfTI sources are referenced in place by absolute path (``copy=True`` copies them into
``imagesTr`` / ``labelsTr``); DICOM sources and labels that need binarising are written as NIfTI.
Every image/label pair is checked (readable header, 3D, same grid) and labels are checked to be
binary (``check_labels``); every listed image is then decompressed completely and checked for
non-finite voxels and a usable geometry (:func:`check_files`, in parallel threads: gzip
decompression releases the GIL), so a truncated or NaN-holding case is reported by name before
any training starts, and nothing is listed or copied (``--copy``) before all files passed.
Nothing is written inside the source tree's files: outputs go to ``OUT`` atomically.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from shared_transforms.io import InputError, atomic_write, check_affine, check_label_array, nifti_header_problem, save_nifti

__all__ = [
    "template_cases",
    "convert_glob",
    "convert_segrap2023",
    "convert_structseg2019",
    "convert_npc_mri",
    "convert_command",
    "check_files",
    "FORMATS",
]

logger = logging.getLogger(__name__)

LABELS = {"0": "background", "1": "GTVp"}
# tolerance (mm) when comparing an image's and its mask's affines read from different software
GRID_TOLERANCE = 1e-2


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def template_cases(root, template: str) -> dict[str, Path]:
    """Find the cases matching a path template with one ``{case}`` field.

    Args:
        root: data-set root.
        template: path relative to ``root``, e.g. ``"imagesTr/{case}_0000.nii.gz"`` or
            ``"{case}/data.nii.gz"``; glob wildcards are allowed elsewhere in the template.

    Returns:
        ``{case id: path}`` sorted by case id (numeric ids sort numerically).

    Raises:
        ValueError: the template has no (or several) ``{case}`` field(s).
    """
    if template.count("{case}") != 1:
        raise ValueError(f"template must contain exactly one {{case}} field, got {template!r}")
    root = Path(root)
    pattern = template.replace("{case}", "*")
    head, tail = template.split("{case}")
    regex = re.compile(
        "^" + _glob_to_regex(head) + r"(?P<case>[^/]+?)" + _glob_to_regex(tail) + "$"
    )
    found = {}
    for path in root.glob(pattern):
        rel = path.relative_to(root).as_posix()
        m = regex.match(rel)
        if m:
            found[m.group("case")] = path
    return dict(sorted(found.items(), key=lambda kv: _case_key(kv[0])))


def _glob_to_regex(text: str) -> str:
    out = ""
    for ch in text:
        out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
    return out


def _case_key(case: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", case) if t]


def _resolve(root: Path, template: str, case: str) -> Path | None:
    pattern = template.format(case=case)
    if any(c in pattern for c in "*?["):
        hits = sorted(root.glob(pattern))
        if len(hits) > 1:
            raise InputError(root / pattern, f"case {case}: {len(hits)} files match, expected one")
        return hits[0] if hits else None
    path = root / pattern
    return path if path.exists() else None


def _header(path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = tuple(s for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D volume, got shape {img.shape}")
    return img, shape


def _check_pair(image, label, case, check_labels: bool, label_value: int | None):
    """Check an image/label pair; return the label array when it must be binarised, else None."""
    img, shape = _header(image)
    lab, lshape = _header(label)
    if lshape != shape:
        raise InputError(label, f"case {case}: label shape {lshape} does not match image shape {shape} ({image})")
    diff = float(np.abs(np.asarray(img.affine) - np.asarray(lab.affine)).max())
    if diff > GRID_TOLERANCE:
        raise InputError(label, f"case {case}: label affine differs from the image's by {diff:.3g} ({image})")
    if label_value is not None:
        data = np.asarray(lab.dataobj).reshape(lshape)
        return (np.rint(data) == label_value).astype(np.uint8)
    if check_labels:
        check_label_array(np.asarray(lab.dataobj), label)
    return None


def _check_file(path: Path) -> str | None:
    """Problem of one NIfTI file when read completely (truncation, NaN/inf voxels, geometry), or None."""
    import nibabel as nib

    problem = nifti_header_problem(path)
    if problem:
        return problem
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel / gzip / zlib raise many types for broken files
        return " ".join(f"cannot be read completely ({type(exc).__name__}: {exc}); truncated or corrupt file?".split())
    try:
        check_affine(img.affine, path)
    except InputError as exc:
        return exc.problem
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            return f"{bad} NaN/inf voxel(s)"
    return None


def check_files(paths: Sequence, *, workers: int | None = None) -> None:
    """Read every file completely and check it (:func:`_check_file`), in parallel threads.

    Raises:
        InputError: naming the first broken file and its problem, and how many others are broken.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if not unique:
        return
    workers = workers or min(8, os.cpu_count() or 1, len(unique))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = [(p, msg) for p, msg in zip(unique, pool.map(_check_file, unique)) if msg]
    if problems:
        first, msg = problems[0]
        more = ""
        if len(problems) > 1:
            others = ", ".join(str(p) for p, _ in problems[1:4]) + (" ..." if len(problems) > 4 else "")
            more = f" (and {len(problems) - 1} more broken file(s): {others})"
        raise InputError(first, f"{msg}{more}; nothing was written")


def _split(cases: list[str], test_fraction: float, seed: int) -> set[str]:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * len(cases)))
    if n_test == 0:
        return set()
    rng = np.random.default_rng(seed)
    return {cases[i] for i in rng.permutation(len(cases))[:n_test]}


def _copy(src: Path, dst: Path, overwrite: bool) -> Path:
    with atomic_write(dst, overwrite=overwrite, inputs=[src]) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _write_json(out: Path, content: dict, overwrite: bool, inputs=()) -> Path:
    path = out / "dataset.json"
    with atomic_write(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(content, indent=2))
    return path


def _check_out(source: Path, out: Path) -> None:
    if not source.is_dir():
        raise InputError(source, "data-set root does not exist or is not a directory")
    if out.resolve() == source.resolve():
        raise InputError(out, "output folder is the data-set root; choose a separate folder")


def _rel_or_abs(path: Path, out: Path) -> str:
    try:
        return "./" + path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


# --------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------


def convert_glob(
    source,
    out,
    image: str | Sequence[str],
    label: str | None = None,
    *,
    name: str = "npc_gtv_dataset",
    modality: str | Sequence[str] = "CT",
    test_fraction: float = 0.2,
    seed: int = 0,
    copy: bool = False,
    check_labels: bool = True,
    label_value: int | None = None,
    allow_unlabelled: bool = False,
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    """Build ``OUT/dataset.json`` from path templates.

    Args:
        source: data-set root.
        out: output folder (created).
        image: template of the image with one ``{case}`` field, or a list of templates, one per
            channel; the first template defines the cases.
        label: template of the label (``None``: an unlabelled set, all cases go to ``test``).
        name: data-set name in ``dataset.json``.
        modality: modality name(s), one per channel.
        test_fraction: fraction of labelled cases put in ``test`` (deterministic with ``seed``).
        seed: split seed.
        copy: copy NIfTI files into ``OUT/imagesTr`` / ``labelsTr`` instead of referencing them.
        check_labels: load every label and check it is binary.
        label_value: the label file holds several structures; keep voxels equal to this value
            (the binarised label is written to ``OUT/labelsTr``).
        allow_unlabelled: cases without a label file go to ``test`` instead of raising.
        overwrite: replace existing outputs.
        extra: extra top-level keys of ``dataset.json``.

    Returns:
        path of the written ``dataset.json``.

    Raises:
        InputError: no case found, a missing channel or label, mismatching grids, non-binary label.
    """
    source, out = Path(source), Path(out)
    _check_out(source, out)
    templates = [image] if isinstance(image, str) else list(image)
    modalities = [modality] if isinstance(modality, str) else list(modality)
    if len(modalities) != len(templates):
        raise ValueError(f"{len(templates)} image template(s) but {len(modalities)} modality name(s)")
    cases = template_cases(source, templates[0])
    if not cases:
        raise InputError(source, f"no case matches {templates[0]!r}")
    planned = []
    for case, first in cases.items():
        channels = [first]
        for t in templates[1:]:
            path = _resolve(source, t, case)
            if path is None:
                raise InputError(source / t.format(case=case), f"case {case}: channel file is missing")
            channels.append(path)
        lab = _resolve(source, label, case) if label else None
        if label and lab is None and not allow_unlabelled:
            raise InputError(source / label.format(case=case), f"case {case}: label file is missing")
        for ch in channels[1:]:
            _check_pair(channels[0], ch, case, check_labels=False, label_value=None)
        binary = _check_pair(channels[0], lab, case, check_labels, label_value) if lab is not None else None
        planned.append((case, channels, lab, binary))
    # every file read completely before anything is written or listed
    check_files([p for _, channels, lab, _ in planned for p in [*channels, *([lab] if lab is not None else [])]])
    out.mkdir(parents=True, exist_ok=True)
    entries, unlabelled = {}, []
    for case, channels, lab, binary in planned:
        if copy:
            channels = [
                _copy(p, out / "imagesTr" / f"{case}{'' if len(channels) == 1 else f'_{i:04d}'}.nii.gz", overwrite)
                for i, p in enumerate(channels)
            ]
        if binary is not None:
            import nibabel as nib

            lab = save_nifti(binary, nib.load(str(lab)).affine, out / "labelsTr" / f"{case}.nii.gz", overwrite=overwrite, inputs=[lab])
        elif lab is not None and copy:
            lab = _copy(lab, out / "labelsTr" / f"{case}.nii.gz", overwrite)
        entry = {"image": [_rel_or_abs(p, out) for p in channels] if len(channels) > 1 else _rel_or_abs(channels[0], out), "case_id": case}
        if lab is not None:
            entry["label"] = _rel_or_abs(lab, out)
        else:
            unlabelled.append(case)
        entries[case] = entry
    labelled = [c for c in entries if c not in unlabelled]
    test = _split(labelled, test_fraction, seed) | set(unlabelled)
    content = {
        "name": name,
        "description": f"converted by npc-gtv convert from {source.resolve()}",
        "labels": LABELS,
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "numTraining": len(entries) - len(test),
        "numTest": len(test),
        "training": [e for c, e in entries.items() if c not in test],
        "test": [e for c, e in entries.items() if c in test],
    }
    content.update(extra or {})
    path = _write_json(out, content, overwrite)
    print(f"{path}: {content['numTraining']} training and {content['numTest']} test case(s)")
    return path


SEGRAP_IMAGES = "SegRap2023_Training_Set_120cases/{case}/image.nii.gz"
SEGRAP_CONTRAST = "SegRap2023_Training_Set_120cases/{case}/image_contrast.nii.gz"
SEGRAP_LABEL = "SegRap2023_Training_Set_120cases_OneHot_Labels/Task002/{case}/GTVp.nii.gz"


def convert_segrap2023(
    source,
    out,
    *,
    channels: str = "both",
    image: str = SEGRAP_IMAGES,
    contrast: str = SEGRAP_CONTRAST,
    label: str = SEGRAP_LABEL,
    label_value: int | None = None,
    **kwargs,
) -> Path:
    """SegRap2023: non-contrast + contrast-enhanced CT, GTVp label (assumed layout in docs/dicom.md).

    Args:
        channels: ``"both"`` (2-channel: non-contrast, contrast), ``"noncontrast"`` or ``"contrast"``.
        image, contrast, label: path templates relative to ``source``.
        label_value: value of GTVp when ``label`` points at a multi-structure label file.
        **kwargs: see :func:`convert_glob`.
    """
    if channels == "both":
        images, modality = [image, contrast], ["CT", "CT contrast-enhanced"]
    elif channels == "noncontrast":
        images, modality = [image], ["CT"]
    elif channels == "contrast":
        images, modality = [contrast], ["CT contrast-enhanced"]
    else:
        raise ValueError(f"channels must be both, noncontrast or contrast, got {channels!r}")
    kwargs.setdefault("name", "SegRap2023_GTVp")
    return convert_glob(source, out, images, label, modality=modality, label_value=label_value, **kwargs)


def convert_structseg2019(source, out, *, image: str = "{case}/data.nii.gz", label: str = "{case}/label.nii.gz", **kwargs) -> Path:
    """StructSeg2019 task 2 (nasopharynx GTV): ``<case>/data.nii.gz`` + ``<case>/label.nii.gz``."""
    kwargs.setdefault("name", "StructSeg2019_NasoGTV")
    return convert_glob(source, out, image, label, modality="CT", **kwargs)


NPC_MRI_SEQUENCES = {"t1": "T1WI", "t2": "T2WI", "cet1": "CE-T1WI"}
NPC_MRI_MASKS = {"t1": "ROI-T1.nii*", "t2": "ROI-T2.nii*", "cet1": "ROI-CE-T1.nii*"}
NPC_MRI_CSVS = ("info_diagnoses.csv", "morphological_parameters.csv", "meta_data.csv")


def convert_npc_mri(
    source,
    out,
    *,
    cases_dir: str = "MRI-Segments",
    sequences: dict | None = None,
    masks: dict | None = None,
    reference: str = "cet1",
    csv_files: Sequence[str] = NPC_MRI_CSVS,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """The NPC MRI data set of paper 002: DICOM T1 / T2 / CE-T1 per patient, NIfTI masks, CSVs.

    Assumed layout (configurable): ``SOURCE/<cases_dir>/<patient>/<sequence folder>/`` holding
    each sequence's DICOM series (``T1WI``, ``T2WI``, ``CE-T1WI``), the radiologists' masks
    ``ROI-T1.nii(.gz)``, ``ROI-T2...``, ``ROI-CE-T1...`` in the patient folder (one per sequence,
    each on its sequence's grid), and the CSV files at ``SOURCE`` (or anywhere below it).

    Output: ``OUT/imagesTr/<patient>_t1|t2|cet1.nii.gz`` (DICOM converted with the series
    checks), ``OUT/labelsTr/<patient>.nii.gz`` (the ``reference`` sequence's mask, the label used
    with :class:`shared_transforms.mri.StackSequencesd`, which resamples the other sequences
    onto that grid), per-sequence masks as ``label_t1`` / ``label_t2`` / ``label_cet1`` entries,
    and the CSV files copied to ``OUT/side_info/`` and listed under ``"side_information"``.

    Args:
        source: data-set root (the unpacked ``primary_data``).
        out: output folder.
        cases_dir: folder of the patient folders, relative to ``source``.
        sequences: ``{name: folder}`` of the DICOM series per sequence.
        masks: ``{name: glob}`` of the masks per sequence (inside the patient folder).
        reference: sequence whose mask is ``label`` (and the reference grid).
        csv_files: CSV side-information files to keep (missing ones are reported, not fatal).
        test_fraction, seed: deterministic test split.
        overwrite: replace existing outputs.
    """
    from shared_transforms.dicom import read_dicom_series

    source, out = Path(source), Path(out)
    _check_out(source, out)
    sequences = dict(sequences or NPC_MRI_SEQUENCES)
    masks = dict(masks or NPC_MRI_MASKS)
    if reference not in sequences or reference not in masks:
        raise ValueError(f"reference {reference!r} must be one of the sequences {list(sequences)}")
    base = source / cases_dir
    if not base.is_dir():
        raise InputError(base, "patient folder root is missing (set cases_dir)")
    patients = sorted((p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _case_key(p.name))
    if not patients:
        raise InputError(base, "no patient folders")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for pdir in patients:
        case = pdir.name
        entry = {"case_id": case, "image": []}
        grids = {}
        for name, folder in sequences.items():
            sdir = pdir / folder
            if not sdir.is_dir():
                raise InputError(sdir, f"case {case}: sequence folder {folder} is missing")
            vol = read_dicom_series(sdir, modality="MR")
            grids[name] = (vol.array.shape, vol.affine)
            path = save_nifti(vol.array, vol.affine, out / "imagesTr" / f"{case}_{name}.nii.gz", overwrite=overwrite)
            entry["image"].append(_rel_or_abs(path, out))
        for name, pattern in masks.items():
            hits = sorted(pdir.glob(pattern))
            if not hits:
                raise InputError(pdir / pattern, f"case {case}: mask of sequence {name} is missing")
            if len(hits) > 1:
                raise InputError(pdir / pattern, f"case {case}: {len(hits)} files match the {name} mask pattern")
            img, shape = _header(hits[0])
            ref_shape, ref_affine = grids[name]
            diff = float(np.abs(np.asarray(img.affine) - ref_affine).max())
            if shape != tuple(ref_shape) or diff > GRID_TOLERANCE:
                raise InputError(
                    hits[0],
                    f"case {case}: mask grid (shape {shape}) does not match the {name} DICOM series "
                    f"(shape {tuple(ref_shape)}, affine difference {diff:.3g})",
                )
            mask = check_label_array(np.asarray(img.dataobj).reshape(shape), hits[0])
            dest = out / "labelsTr" / (f"{case}.nii.gz" if name == reference else f"{case}_{name}.nii.gz")
            path = save_nifti(mask, ref_affine, dest, overwrite=overwrite, inputs=[hits[0]])
            entry["label" if name == reference else f"label_{name}"] = _rel_or_abs(path, out)
        entries.append(entry)
    side = []
    for name in csv_files:
        hits = sorted(source.rglob(name))
        if not hits:
            logger.warning("side-information file %s not found under %s", name, source)
            print(f"note: {name} not found under {source}")
            continue
        dst = _copy(hits[0], out / "side_info" / name, overwrite)
        with open(dst, newline="", encoding="utf-8", errors="replace") as fh:
            n_rows = sum(1 for _ in csv.reader(fh)) - 1
        side.append({"file": _rel_or_abs(dst, out), "rows": max(n_rows, 0)})
    test = _split([e["case_id"] for e in entries], test_fraction, seed)
    content = {
        "name": "NPC_MRI_multisequence",
        "description": f"converted by npc-gtv convert npc_mri from {source.resolve()}",
        "labels": LABELS,
        "modality": {"0": "T1", "1": "T2", "2": "CE-T1"} if list(sequences) == ["t1", "t2", "cet1"] else {str(i): n for i, n in enumerate(sequences)},
        "sequence_names": list(sequences),
        "reference_sequence": reference,
        "numTraining": len(entries) - len(test),
        "numTest": len(test),
        "training": [e for e in entries if e["case_id"] not in test],
        "test": [e for e in entries if e["case_id"] in test],
        "side_information": side,
    }
    path = _write_json(out, content, overwrite)
    print(f"{path}: {content['numTraining']} training and {content['numTest']} test case(s), {len(side)} side-information file(s)")
    return path


FORMATS = {
    "segrap2023": convert_segrap2023,
    "structseg2019": convert_structseg2019,
    "npc_mri": convert_npc_mri,
    "glob": convert_glob,
}


def convert_command(fmt: str, source: str, out: str, **options):
    """Convert a public data-set layout to a Decathlon ``dataset.json``.

    Args:
        fmt: ``segrap2023``, ``structseg2019``, ``npc_mri`` or ``glob``.
        source: data-set root.
        out: output folder (``dataset.json`` and any converted files).
        **options: converter options, e.g. ``--test_fraction 0.2 --copy``; for ``glob``:
            ``--image 'imagesTr/{case}_0000.nii.gz' --label 'labelsTr/{case}.nii.gz'``
            (several channels: ``--image '[a/{case}.nii.gz,b/{case}.nii.gz]'``).
    """
    key = str(fmt).lower().replace("-", "_")
    if key not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if key == "glob" and "image" not in options:
        raise ValueError("glob needs --image TEMPLATE (with a {case} field) and usually --label TEMPLATE")
    FORMATS[key](source, out, **options)
    return None
