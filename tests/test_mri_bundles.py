"""Every bundle on three-sequence MRI (configs/mri.yaml): trained and evaluated end to end on the MRI
phantoms (T1, T2, CE-T1 on their own grids), predictions on the CE-T1 grid (paper 002's layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLES_DIR, bundle_scripts, run_bundle

ENV = {"OMP_NUM_THREADS": "1"}

# per bundle: its training runs (config files), its evaluation configs (quick mode, mri.yaml last),
# overrides of both
RUNS = {
    "sats_npc": ([["train.yaml", "quick.yaml", "mri.yaml"]], ["inference.yaml", "evaluate.yaml", "quick.yaml", "mri.yaml"], {}),
    "unet25d_ssl": ([["train.yaml", "quick.yaml", "mri.yaml"]], ["evaluate.yaml", "quick.yaml", "mri.yaml"], {"scales": "['medium']"}),
    "hcf_sanet": ([["train.yaml", "quick.yaml", "mri.yaml"]], ["inference.yaml", "evaluate.yaml", "quick.yaml", "mri.yaml"], {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(RUNS))
def test_bundle_trains_and_evaluates_on_three_sequence_mri(bundle, small_mri_dataset, tmp_path):
    trains, evaluate, extra = RUNS[bundle]
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    common = {"dataset_dir": str(small_mri_dataset), "ckpt_dir": str(ckpt), **extra}
    for configs in trains:
        run_bundle(bundle, "training", configs, {**common, "output_dir": str(out)}, env=ENV)
    report = out / "test"
    run_bundle(bundle, "evaluating", evaluate, {**common, "output_dir": str(report)}, env=ENV)
    # the network takes the three stacked sequences
    state = torch.load(ckpt / "model.pt", weights_only=True, map_location="cpu")
    state = state.get("model", state) if isinstance(state, dict) else state
    convs = [v for v in state.values() if torch.is_tensor(v) and v.ndim >= 4]
    assert any(v.shape[1] == 3 for v in convs) and not any(v.shape[1] == 1 for v in convs)
    # the model zoo's shape check on the MRI network: the metadata's input channels set to 3
    cfg = BUNDLES_DIR / bundle / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", str(cfg / "metadata.json"),
           "--config_file", repr([str(cfg / "inference.yaml"), str(cfg / "mri.yaml")]), "--_meta_#network_data_format#inputs#image#num_channels", "3"]
    proc = subprocess.run(cmd, cwd=str(BUNDLES_DIR / bundle), capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert proc.returncode == 0 and "verified with no error" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    # one prediction per test case, binary, on the case's CE-T1 grid (where its mask is delineated)
    dataset = json.loads((small_mri_dataset / "dataset.json").read_text())
    summary = json.loads((report / "summary.json").read_text())
    assert summary["n_cases"] == len(dataset["test"]) >= 1
    for case in dataset["test"]:
        cet1 = nib.load(small_mri_dataset / case["image"][-1])
        pred = nib.load(report / "predictions" / f"{case['case_id']}_seg.nii.gz")
        assert pred.shape == cet1.shape
        assert np.allclose(pred.affine, cet1.affine, atol=1e-3)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


@pytest.mark.slow
def test_sats_symmetric_registration_on_mri(small_mri_dataset):
    """SATS's inference pre-processing on MRI: three z-scored channels, the mid-sagittal plane found
    on T1 (atlas-free, Otsu body mask) with the asymmetry reduced, all channels resampled."""
    from monai.bundle import ConfigParser

    bundle_scripts("sats_npc")  # its scripts importable, as the bundle's initialize makes them
    cfg = BUNDLES_DIR / "sats_npc" / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / c) for c in ("inference.yaml", "mri.yaml")])
    parser.update({"bundle_root": str(BUNDLES_DIR / "sats_npc"), "dataset_dir": str(small_mri_dataset), "dataset_size": "small",
                   "pixdim": [2.4, 2.4, 3.0]})
    parser.parse()
    case = parser.get_parsed_content("datalist")[0]
    out = parser.get_parsed_content("preprocessing")(case)["image"]
    assert out.shape[0] == 3 and out.meta["symmetry_ok"]
    report = json.loads(out.meta["symmetry_report"])
    assert report["mode"] == "atlas-free" and report["asymmetry_after"] < report["asymmetry_before"]
    assert abs(float(out.mean())) < 1.0  # z-scored channels, not HU


def test_mri_input_needs_the_sequence_list(tmp_path):
    """modality mri with a single image path: a one-line error naming the file."""
    from shared_transforms.io import InputError
    from shared_transforms.mri import LoadVolumed, input_modality

    with pytest.raises(InputError, match="list of sequences"):
        LoadVolumed(["image"], modality="mri")({"image": str(tmp_path / "ct.nii.gz")})
    with pytest.raises(ValueError, match="modality must be one of"):
        input_modality("pet")
