"""The learning benchmark's plan: recipes, the papers' optimiser settings and iteration budgets per bundle."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import BUNDLES_DIR, REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    """bench/bench_learning.py as a module; sys.path and sys.modules are left as they were (other tests scan them)."""
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("bench_learning_under_test", REPO_ROOT / "bench" / "bench_learning.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name in ("baselines",):
                sys.modules.pop(name)
    return mod


def test_recipes_and_papers_optimiser(bench):
    sats, unet, hcf = (BUNDLES_DIR / b for b in ("sats_npc", "unet25d_ssl", "hcf_sanet"))
    assert bench.recipes_of(sats) == bench.recipes_of(unet) == ["fast", "paper"]
    assert bench.recipes_of(hcf) == ["fast"]  # its demo.yaml changes no setting of the paper's recipe
    assert bench.recipe_overrides(sats, "fast") == {}
    # UNet-2.5D's paper recipe: the scale crops themselves are the inputs (demo.yaml: patches)
    assert bench.recipe_overrides(unet, "paper") == {"scale_input": "crop"}
    # the papers' recipe: SGD (momentum 0.99) at lr 1e-2, nnU-Net's third of foreground patches
    assert bench.recipe_overrides(sats, "paper") == {"optimizer_name": "sgd", "stage1_learning_rate": 0.01, "pos_fraction": 0.33}
    with pytest.raises(ValueError, match="recipe"):
        bench.recipe_overrides(sats, "slow")


def test_budgets_set_the_budget_step_only(bench):
    recipe = {b: bench.bundle_recipe(BUNDLES_DIR / b) for b in ("sats_npc", "unet25d_ssl", "hcf_sanet")}
    knobs = {}
    for name, budget in (("sats_npc", 1000), ("unet25d_ssl", 1000), ("hcf_sanet", 250)):
        for_step = bench.budget_overrides(BUNDLES_DIR / name, budget)
        knobs[name] = [for_step(step) for step in recipe[name]]
    # SATS: stage 1 gets 1000 iterations (20 epochs of 50), stage 2 and the evaluation keep the demo's
    assert knobs["sats_npc"] == [{"stage1_epochs": 20}, {}, {}]
    # UNet-2.5D: five scale models share the budget (8 epochs of 25 each); pretraining keeps its length
    assert knobs["unet25d_ssl"] == [{}, {"train_epochs": 8}, {}]
    # HCF: SANet gets the budget (10 epochs of 25); the slice classifier keeps its length
    assert knobs["hcf_sanet"] == [{}, {"sanet_epochs": 10}, {}]
    with pytest.raises(ValueError, match="multiple"):
        bench.budget_overrides(BUNDLES_DIR / "unet25d_ssl", 300)
