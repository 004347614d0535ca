"""UNet-2.5D bundle: scale crops, augmentation, folds/splits, learning-rate schedule, ensemble output,
post-processing as configured in inference.yaml."""

from __future__ import annotations

import itertools
import json
import math

import monai
import numpy as np
import pytest
import torch

from conftest import BUNDLES_DIR, bundle_scripts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tr():
    return bundle_scripts("unet25d_ssl", "transforms")


def test_scale_fractions_and_sizes(tr):
    expected = {
        "extra_large": (1.00, 0.90), "large": (0.85, 0.80), "medium": (0.70, 0.70),
        "small": (0.55, 0.60), "extra_small": (0.40, 0.50),
    }
    for name, (fxy, fz) in expected.items():
        assert tr.scale_fractions(name) == pytest.approx((fxy, fxy, fz))
    assert tr.scale_fractions("xs") == tr.scale_fractions(4)
    # 512 x 512 x 120 slices: in plane 512, 435, 358, 282, 205; z 108, 96, 84, 72, 60
    sizes = [tr.scale_crop_size((512, 512, 120), s) for s in tr.SCALES]
    assert sizes == [(512, 512, 108), (435, 435, 96), (358, 358, 84), (282, 282, 72), (205, 205, 60)]
    with pytest.raises(ValueError):
        tr.scale_index("huge")


def test_scale_crop_keeps_gtv_inside(tr):
    img = torch.rand(1, 100, 90, 40)
    label = torch.zeros(1, 100, 90, 40)
    label[0, 60:75, 20:31, 25:30] = 1
    for scale in tr.SCALES:
        crop = tr.RandScaleCropd(keys=["image", "label"], scale=scale)
        for seed in range(6):
            crop.set_random_state(seed)
            out = crop({"image": img, "label": label})
            assert tuple(out["image"].shape[1:]) == tr.scale_crop_size((100, 90, 40), scale)
            assert out["label"].shape == out["image"].shape
            assert out["label"].sum() == label.sum()  # whole GTV inside
    # positions vary between draws for a small scale
    crop = tr.RandScaleCropd(keys=["image", "label"], scale="extra_small")
    starts = set()
    for seed in range(8):
        crop.set_random_state(seed)
        out = crop({"image": img, "label": label})
        starts.add(float(out["image"][0, 0, 0, 0]))
    assert len(starts) > 1


def test_scale_crop_gtv_larger_than_crop_is_centred(tr):
    label = torch.zeros(1, 100, 100, 20)
    label[0, 10:90, 10:90, 5:15] = 1
    crop = tr.RandScaleCrop("extra_small")  # 40 x 40 x 10
    out, slices = crop(torch.rand(1, 100, 100, 20), label)
    # box 10..89 (centre voxel 49) -> crop 29..68; z: the 10-slice box fits exactly
    assert [(s.start, s.stop) for s in slices] == [(29, 69), (29, 69), (5, 15)]
    assert out.shape == (1, 40, 40, 10)


def test_transpose_axes_keeps_the_patch_shape(tr):
    """The paper's transposition across x, y, z: on the anisotropic 128 x 128 x 16-style patch only
    X <-> Y keeps the shape; on a cubic patch all five non-identity permutations occur."""
    x = torch.arange(4 * 4 * 2).float().reshape(1, 4, 4, 2)
    t = tr.RandTransposeAxesd(keys=["a", "b"], axes=[0, 1, 2], prob=1.0)
    out = t({"a": x, "b": x.clone()})
    assert out["a"].shape == (1, 4, 4, 2)
    assert torch.equal(out["a"], x.transpose(1, 2)) and torch.equal(out["a"], out["b"])
    assert torch.equal(tr.RandTransposeAxesd(keys="a", prob=0.0)({"a": x})["a"], x)
    cube = torch.arange(27).float().reshape(1, 3, 3, 3)
    seen = set()
    t3 = tr.RandTransposeAxes(axes=(0, 1, 2), prob=1.0)
    t3.set_random_state(0)
    for _ in range(200):
        y = t3(cube)
        matches = [p for p in itertools.permutations(range(3)) if torch.equal(y, cube.permute(0, *[1 + i for i in p]))]
        assert len(matches) == 1  # a pure permutation of the axes (the cube's values are all distinct)
        seen.add(matches[0])
    assert len(seen) == 5 and (0, 1, 2) not in seen
    # X <-> Z only when asked, and never a shape change with keep_shape

    def drawn(shape, **kw):
        t = tr.RandTransposeAxes(prob=1.0, **kw)
        t.randomize()
        return t.permutation(shape)

    assert drawn((3, 3, 3), axes=(0, 1)) == (1, 0, 2)
    assert drawn((4, 4, 2), axes=(0, 2)) == (0, 1, 2)
    assert drawn((4, 4, 2), axes=(0, 2), keep_shape=False) == (2, 1, 0)
    with pytest.raises(ValueError, match="distinct spatial axes"):
        tr.RandTransposeAxes(axes=(0, 0))
    with pytest.raises(ValueError, match="prob"):
        tr.RandTransposeAxes(prob=2.0)


def test_training_augmentation_rotates_about_every_axis():
    """train.yaml's rotation covers X, Y and Z (paper section 3.2.2), its transposition all three axes."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "unet25d_ssl" / "configs" / "train.yaml"))
    parser.parse()
    assert parser.get_parsed_content("rotate_range_deg") == [15, 15, 15]
    items = parser.get("train#random_transforms")
    rot = next(i for i, t in enumerate(items) if t["_target_"] == "RandRotated")
    for axis in ("x", "y", "z"):
        assert parser.get_parsed_content(f"train#random_transforms#{rot}#range_{axis}") == pytest.approx(math.radians(15))
    trans = next(t for t in items if t["_target_"].endswith("RandTransposeAxesd"))
    assert parser.get_parsed_content(trans["axes"][1:]) == [0, 1, 2]


def test_ensemble_output_threshold_and_spread(tr):
    prob = torch.zeros(3, 2, 2, 1)
    prob[1] = torch.tensor([[[0.2], [0.5]], [[0.49], [0.9]]])
    prob[0] = 1 - prob[1]
    prob[2] = 0.1
    out = tr.EnsembleOutputd(keys="pred", threshold=0.5)({"pred": prob})
    assert out["pred"].dtype == torch.uint8
    assert out["pred"][0, :, :, 0].tolist() == [[0, 1], [0, 1]]
    assert torch.allclose(out["uncertainty"], torch.full((1, 2, 2, 1), 0.1))
    assert "uncertainty" not in tr.EnsembleOutputd(keys="pred")({"pred": prob[:2]})
    # background dropped before the inversion (inference.yaml): foreground first, spread second
    out0 = tr.EnsembleOutputd(keys="pred", foreground_channel=0)({"pred": prob[1:]})
    assert torch.equal(out0["pred"], out["pred"]) and torch.allclose(out0["uncertainty"], out["uncertainty"])
    with pytest.raises(ValueError):
        tr.EnsembleOutput(foreground_channel=0)(prob)
    with pytest.raises(ValueError):
        tr.EnsembleOutput(threshold=1.0)


def test_step_decay_schedule():
    wf = bundle_scripts("unet25d_ssl", "workflow")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = wf.step_decay(opt, 1e-3, 150, 1e-4, "subtract")
    lrs = {}
    for epoch in range(900):
        lrs[epoch] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[149] == pytest.approx(1e-3)
    assert lrs[150] == pytest.approx(9e-4) and lrs[750] == pytest.approx(5e-4) and lrs[899] == pytest.approx(5e-4)
    mult = wf.StepDecay(1e-3, 150, 1e-4, "multiply")
    assert mult(149) == 1.0 and mult(150) == pytest.approx(1e-4) and mult(300) == pytest.approx(1e-8)


def _fake_dataset(tmp_path, n_train=12, n_test=2):
    ds = tmp_path / "ds"
    ds.mkdir()
    entries = lambda part, r: [{"case_id": f"c{i:02d}", "image": f"images{part}/c{i:02d}.nii.gz", "label": f"labels{part}/c{i:02d}.nii.gz"} for i in r]
    (ds / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "GTVp"},
                                                 "training": entries("Tr", range(n_train)), "test": entries("Ts", range(n_train, n_train + n_test))}))
    return ds / "dataset.json"


def test_seven_fold_datalists_reproducible_and_disjoint(tmp_path):
    data = bundle_scripts("unet25d_ssl", "data")
    src = _fake_dataset(tmp_path)
    tests = []
    for k in range(7):
        p = data.write_fold_datalist(src, tmp_path / f"f{k}.json", k, 7, seed=0)
        d = json.loads(p.read_text())
        assert d["cross_validation"]["test_fold"] == k
        assert all(e["fold"] == k for e in d["test"]) and all(e["fold"] != k for e in d["training"])
        assert len(d["test"]) + len(d["training"]) == 14 and len(d["test"]) == 2
        assert all(e["image"].startswith("/") for e in d["training"])
        tests += [e["case_id"] for e in d["test"]]
    assert sorted(tests) == [f"c{i:02d}" for i in range(14)]  # every case tested exactly once
    again = data.write_fold_datalist(src, tmp_path / "again.json", 3, 7, seed=0)
    assert json.loads(again.read_text())["test"] == json.loads((tmp_path / "f3.json").read_text())["test"]
    other = data.assign_folds([f"c{i:02d}" for i in range(14)], 7, seed=1)
    assert other != data.assign_folds([f"c{i:02d}" for i in range(14)], 7, seed=0)
    assert data.fold_datalist(src, -1) == str(src)
    with pytest.raises(ValueError):
        data.write_fold_datalist(src, tmp_path / "x.json", 7, 7)


def test_train_val_split_and_label_fraction(tmp_path):
    data = bundle_scripts("unet25d_ssl", "data")
    entries = data.load_datalist(_fake_dataset(tmp_path, n_train=10), "training")
    train = data.train_val_split(entries, "train", 0.2, 0)
    val = data.train_val_split(entries, "val", 0.2, 0)
    assert len(train) == 8 and len(val) == 2
    assert not {e["case_id"] for e in train} & {e["case_id"] for e in val}
    assert data.train_val_split(entries, "val", 0.2, 0) == val
    sizes = {f: len(data.subset_fraction(train, f, 0)) for f in (0.2, 0.3, 0.5, 1.0)}
    assert sizes == {0.2: 2, 0.3: 2, 0.5: 4, 1.0: 8}
    small = {e["case_id"] for e in data.subset_fraction(train, 0.2, 0)}
    assert small <= {e["case_id"] for e in data.subset_fraction(train, 0.5, 0)}


def _parse_inference(**overrides):
    bundle_scripts("unet25d_ssl")  # puts the bundle root on sys.path for `scripts`
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "unet25d_ssl" / "configs" / "inference.yaml"))
    parser.update({"ckpt_dir": "/nonexistent", **overrides})
    return parser


def _hand_made_mask():
    """Main block + a thin line sticking out + a separate small blob + a second 2D island in one slice."""
    m = np.zeros((1, 30, 30, 8), np.uint8)
    m[0, 5:15, 5:15, 2:6] = 1          # main tumour, 10 x 10 x 4 = 400 voxels
    m[0, 15:20, 10, 3] = 1             # 1-voxel-wide line leaving the block (removed by the opening)
    m[0, 20:23, 20:23, 0] = 1          # separate 3 x 3 blob in slice 0
    m[0, 20:24, 5:9, 4] = 1            # second 2D component in slice 4 (4 x 4)
    return m


def _run_post(parser, affine):
    from monai.data import MetaTensor

    d = {"pred": MetaTensor(torch.as_tensor(_hand_made_mask()), affine=torch.as_tensor(affine))}
    sums = []
    for i in (3, 4, 5):  # opening, per-slice largest 2D component, largest 3D component
        d = parser.get_parsed_content(f"postprocessing#transforms#{i}")(d)
        sums.append(int(np.asarray(d["pred"]).sum()))
    return np.asarray(d["pred"])[0], sums


def test_postprocessing_as_configured_on_hand_made_mask():
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # slice axis = array axis 2 (read from the affine)
    out, sums = _run_post(_parse_inference(), affine)
    # in-plane opening with the radius-1 cross: each 10x10 slice of the block loses its 4 corners
    # (96 voxels), the line's first voxel is restored by the dilation, the rest of it goes; the 3x3
    # blob becomes a 5-voxel plus, the 4x4 island loses its corners (12)
    expected = np.zeros((30, 30, 8), np.uint8)
    expected[5:15, 5:15, 2:6] = 1
    for x, y in ((5, 5), (5, 14), (14, 5), (14, 14)):
        expected[x, y, 2:6] = 0
    expected[15, 10, 3] = 1
    assert sums == [385 + 5 + 12, 385 + 5, 385]  # opening, then the slice-4 island, then the blob
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)

    # each step is switchable
    out, sums = _run_post(_parse_inference(largest_component=False), affine)
    assert sums == [402, 390, 390] and out[20:23, 20:23, 0].sum() == 5 and out[20:24, 5:9, 4].sum() == 0
    out, sums = _run_post(_parse_inference(opening=False), affine)
    assert sums == [430, 414, 405] and out[15:20, 10, 3].sum() == 5
    out, sums = _run_post(_parse_inference(opening=False, slice_largest_component=False, largest_component=False), affine)
    np.testing.assert_array_equal(out, _hand_made_mask()[0])


def test_evaluate_config_keeps_inference_components_in_sync():
    """evaluate.yaml is self-contained (model-zoo: usable after train.yaml); its inference part must
    stay identical to inference.yaml."""
    import yaml

    cfg = BUNDLES_DIR / "unet25d_ssl" / "configs"
    inf = yaml.safe_load((cfg / "inference.yaml").read_text())
    ev = yaml.safe_load((cfg / "evaluate.yaml").read_text())
    differing = {k for k in set(inf) | set(ev) if inf.get(k) != ev.get(k)}
    assert differing == {"datalist", "datalist_file", "imports", "finalize", "inferring", "inference", "evaluating"}
    assert set(inf["imports"]) < set(ev["imports"])
    assert "evaluate_folders" in ev["finalize"][0]


def test_metadata_against_offline_zoo_schema():
    """``monai.bundle verify_metadata`` needs the schema from the network; validate against the
    repository's offline copy of its required fields instead."""
    import jsonschema

    from conftest import REPO_ROOT

    schema = json.loads((REPO_ROOT / "ci" / "meta_schema_20240725_required.json").read_text())
    meta = json.loads((BUNDLES_DIR / "unet25d_ssl" / "configs" / "metadata.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(meta)
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "GTVp"}


@pytest.mark.parametrize("scale_input", ["crop", "patch"])
def test_scale_models_are_fed_their_scale_crops(tr, small_ct_dataset, tmp_path, scale_input):
    """scale_input crop (default, paper section 2.2): each scale model's input is its scale crop of the
    volume (padded to the network's divisor), so extra-large and extra-small inputs differ in size;
    patch: every scale gets patch_size patches from inside its crop."""
    from monai.bundle import ConfigParser

    net = bundle_scripts("unet25d_ssl", "network")
    shapes = {}
    for scale in ("extra_large", "extra_small"):
        parser = ConfigParser()
        parser.read_config([str(BUNDLES_DIR / "unet25d_ssl" / "configs" / c) for c in ("train.yaml", "quick.yaml")])
        parser.update({"bundle_root": str(BUNDLES_DIR / "unet25d_ssl"), "dataset_dir": str(small_ct_dataset),
                       "ckpt_dir": str(tmp_path / "models"), "scale": scale, "scale_input": scale_input})
        parser.parse()
        item = parser.get_parsed_content("train#data")[0]
        volume = parser.get_parsed_content("train#preprocessing").transforms
        det = [t for t in volume if not isinstance(t, monai.transforms.Randomizable)]
        vol_shape = tuple(monai.transforms.Compose(det)(item)["image"].shape[1:])
        samples = parser.get_parsed_content("train#preprocessing")(item)
        assert len(samples) == parser.get_parsed_content("samples_per_volume")
        shapes[scale] = {tuple(s["image"].shape[1:]) for s in samples}
        assert all(s["image"].shape == s["label"].shape for s in samples)
        if scale_input == "crop":
            crop = tr.scale_crop_size(vol_shape, scale)
            expected = tuple(int(math.ceil(c / d) * d) for c, d in zip(crop, net.DIVISOR))
            assert shapes[scale] == {expected}, (vol_shape, crop)
            assert parser.get_parsed_content("volumes_per_batch") == 1
        else:
            assert shapes[scale] == {tuple(parser.get_parsed_content("patch_size"))}
    if scale_input == "crop":
        assert shapes["extra_large"] != shapes["extra_small"]
    with pytest.raises(ValueError, match="scale_input must be one of"):
        tr.scale_input_mode("resize")
