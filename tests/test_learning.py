"""npc_gtv.learning: epoch length, output-bias prior, loss terms and their logging, optimiser by name."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events
from monai.losses import DiceCELoss

from npc_gtv import learning


def test_epoch_length_number_or_one_pass():
    loader = [0] * 7
    assert learning.epoch_length(250, loader) == 250
    assert learning.epoch_length("250", None) == 250
    for auto in (None, 0, "auto", "none"):
        assert learning.epoch_length(auto, loader) == 7
    with pytest.raises(ValueError, match="positive integer"):
        learning.epoch_length(-3, loader)
    with pytest.raises(ValueError, match="positive integer"):
        learning.epoch_length(2.5, loader)
    with pytest.raises(ValueError, match="empty"):
        learning.epoch_length("auto", [])
    with pytest.raises(ValueError, match="needs a data loader"):
        learning.epoch_length("auto", None)


def test_foreground_prior_voxels_and_samples():
    lab = torch.zeros(2, 1, 4, 4, 2)
    lab[0, 0, :2, :2, 0] = 1  # 4 of 64 voxels; one sample of two has foreground
    loader = [{"label": lab}]
    assert learning.foreground_prior(loader, batches=3) == pytest.approx(4 / 64)
    assert learning.foreground_prior(loader, per="sample", batches=2) == pytest.approx(0.5)
    # multi-sample crops come as a list of dicts; an empty draw gives the floor
    assert learning.foreground_prior([[{"label": lab}, {"label": torch.zeros_like(lab)}]], batches=1) == pytest.approx(4 / 128)
    assert learning.foreground_prior([{"label": torch.zeros(1, 1, 2, 2)}], batches=1) == 1e-4
    with pytest.raises(ValueError, match="empty"):
        learning.foreground_prior([], batches=1)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_init_output_bias_gives_the_prior(channels):
    conv = torch.nn.Conv3d(4, channels, 1)
    torch.nn.init.zeros_(conv.weight)
    learning.init_output_bias(conv, 0.01)
    out = conv(torch.randn(1, 4, 2, 2, 2))
    prob = torch.sigmoid(out) if channels == 1 else torch.softmax(out, 1)
    if channels == 1:
        torch.testing.assert_close(prob, torch.full_like(prob, 0.01))
    else:
        torch.testing.assert_close(prob[:, 0], torch.full_like(prob[:, 0], 0.99))
        torch.testing.assert_close(prob[:, 1:].sum(1), torch.full_like(prob[:, 0], 0.01))
    with pytest.raises(ValueError):
        learning.init_output_bias(conv, 1.0)


def test_init_from_data_finds_the_last_layer_and_accepts_lists():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 2, 1))
    loader = [{"label": torch.cat([torch.ones(1, 1, 4, 4), torch.zeros(3, 1, 4, 4)])}]
    assert learning.init_output_bias_from_data(net, "auto", loader, per="sample", batches=1) == pytest.approx(0.25)
    assert (net[2].bias[1] - net[2].bias[0]).item() == pytest.approx(math.log(0.25 / 0.75))
    heads = [torch.nn.Conv3d(2, 2, 1), torch.nn.Conv3d(4, 2, 1)]
    assert learning.init_output_bias_from_data(heads, 0.1) == 0.1
    assert all((h.bias[1] - h.bias[0]).item() == pytest.approx(math.log(0.1 / 0.9)) for h in heads)
    before = net[2].bias.clone()
    assert learning.init_output_bias_from_data(net, None) is None
    torch.testing.assert_close(net[2].bias, before)


def test_dice_ce_terms_equal_monai_and_are_recorded():
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 4, 4, 3), (torch.rand(2, 1, 4, 4, 3) > 0.7).float()
    ours = learning.DiceCETermsLoss(to_onehot_y=True, softmax=True)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)
    assert ours(x, y).item() == pytest.approx(ref(x, y).item(), rel=1e-6)
    assert ours.terms["dice"] + ours.terms["ce"] == pytest.approx(ref(x, y).item(), rel=1e-6)
    assert ours.terms["dice"] == pytest.approx(ref.dice(x, y).item(), rel=1e-6)


def test_terms_logged_per_iteration_and_as_epoch_means():
    loss = learning.DiceCETermsLoss(to_onehot_y=True, softmax=True)
    seen = []

    def step(engine, batch):
        x, y = batch
        value = loss(x, y)
        return {"loss": value}

    engine = Engine(step)
    learning.LossTermMetrics(loss, prefix="train_").attach(engine)
    output = learning.LossTermsOutput(loss)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(output(e.state.output)))
    torch.manual_seed(0)
    data = [(torch.randn(1, 2, 4, 4, 2), (torch.rand(1, 1, 4, 4, 2) > 0.5).float()) for _ in range(3)]
    engine.run(data, max_epochs=1)
    assert [set(s) for s in seen] == [{"loss", "dice", "ce"}] * 3
    assert all(s["loss"] == pytest.approx(s["dice"] + s["ce"], rel=1e-6) for s in seen)
    assert engine.state.metrics["train_dice"] == pytest.approx(sum(s["dice"] for s in seen) / 3, rel=1e-6)
    assert engine.state.metrics["train_ce"] == pytest.approx(sum(s["ce"] for s in seen) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="term_names"):
        learning.LossTermMetrics(torch.nn.MSELoss())


def test_make_optimizer_by_name():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = learning.make_optimizer("sgd", params, 0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.99 and sgd.defaults["nesterov"]
    adam = learning.make_optimizer("Adam", params, 1e-3)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-3
    groups = learning.make_optimizer("adam", [{"params": params, "lr": 0.1}], 1e-3)
    assert groups.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="optimizer_name"):
        learning.make_optimizer("rmsprop", params, 1e-3)
