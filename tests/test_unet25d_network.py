"""UNet-2.5D bundle: exact network, frozen encoder, shared-encoder ensemble, export, BN fusion."""

from __future__ import annotations

import pytest
import torch

from conftest import bundle_scripts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    return bundle_scripts("unet25d_ssl", "network")


def test_parameter_counts_match_paper_table5(net):
    model = net.UNet25D()
    assert net.count_parameters(model) == 3_845_058
    assert net.count_parameters(model.decoder) == 895_122
    assert net.count_parameters(model.encoder) == 3_845_058 - 895_122
    # the encoder is a named submodule; its bottleneck is the only 3x3x3 block
    assert isinstance(model.encoder, net.UNet25DEncoder)
    kernels = {tuple(m.kernel_size) for m in model.encoder.bottleneck.modules() if isinstance(m, torch.nn.Conv3d)}
    assert kernels == {(3, 3, 3)}
    in_plane = {tuple(m.kernel_size) for m in model.decoder.modules() if isinstance(m, torch.nn.Conv3d)}
    assert in_plane == {(3, 3, 1)}


def test_forward_shapes_and_size_check(net):
    model = net.UNet25D().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 48, 6))
    assert out.shape == (1, 2, 32, 48, 6)
    feats = model.encoder(torch.randn(1, 1, 32, 32, 4))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32, 4), (32, 16, 16, 4), (64, 8, 8, 4), (128, 4, 4, 4), (256, 2, 2, 2)]
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 24, 32, 4))


def test_frozen_encoder_no_gradient_unchanged_after_step(net, tmp_path, capsys):
    torch.manual_seed(0)
    pretrained = net.UNet25D()
    torch.save(pretrained.encoder.state_dict(), tmp_path / "encoder.pt")
    model = net.prepare_network(net.UNet25D(), str(tmp_path / "encoder.pt"), freeze_encoder=True)
    assert "trainable parameters: 895,122 of 3,845,058" in capsys.readouterr().out
    assert net.count_parameters(model, trainable_only=True) == 895_122
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, pretrained.encoder.state_dict()[k]), k
    before_enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}  # weights + BN running stats
    before_dec = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    model.train()
    assert not model.encoder.training and model.decoder.training  # frozen encoder stays in eval mode
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 1, 32, 32, 4)
    y = torch.randint(0, 2, (2, 32, 32, 4))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    opt.step()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before_enc[k]), f"encoder {k} changed"
    changed = [k for k, v in model.decoder.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before_dec[k])]
    assert len(changed) > 10


def test_freeze_without_pretrained_encoder_is_an_error(net):
    with pytest.raises(ValueError, match="pretrained_encoder"):
        net.prepare_network(net.UNet25D(), None, freeze_encoder=True, verbose=False)


def test_load_encoder_from_full_state_dict(net):
    a, b = net.UNet25D(), net.UNet25D()
    b.load_encoder(a.state_dict())
    assert all(torch.equal(v, a.encoder.state_dict()[k]) for k, v in b.encoder.state_dict().items())


def test_shared_ensemble_averages_members_and_runs_encoder_once(net):
    torch.manual_seed(1)
    members = [net.UNet25D().eval() for _ in range(5)]
    encoder_state = members[0].encoder.state_dict()
    ens = net.UNet25DEnsemble(5, shared_encoder=True, return_spread=True).eval()
    ens.load_members([m.state_dict() for m in members], encoder_state)
    # one encoder copy in memory and in the state dict
    assert sum(1 for m in ens.modules() if isinstance(m, net.UNet25DEncoder)) == 1
    assert net.count_parameters(ens) == 3_845_058 + 4 * 895_122
    assert not any(k.startswith("members.") for k in ens.state_dict())
    calls = []
    ens.encoder.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, 32, 32, 4)
    with torch.no_grad():
        out = ens(x)
        feats = members[0].encoder(x)
        probs = torch.stack([torch.softmax(m.decoder(feats), 1) for m in members])
    assert len(calls) == 1
    assert out.shape == (1, 3, 32, 32, 4)
    torch.testing.assert_close(out[:, :2], probs.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 2:], probs[:, :, 1:2].std(0, unbiased=False), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :2].sum(1), torch.ones(1, 32, 32, 4), atol=1e-5, rtol=0)


def test_independent_ensemble_equals_mean_of_full_models(net):
    torch.manual_seed(2)
    members = [net.UNet25D().eval() for _ in range(3)]
    ens = net.UNet25DEnsemble(3, shared_encoder=False).eval().load_members([m.state_dict() for m in members])
    x = torch.randn(1, 1, 16, 16, 2)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=0)
    assert sum(1 for m in ens.modules() if isinstance(m, net.UNet25DEncoder)) == 3


def test_torchscript_and_batchnorm_fusion_match(net):
    wf = bundle_scripts("unet25d_ssl", "workflow")
    net = bundle_scripts("unet25d_ssl", "network")
    torch.manual_seed(3)
    ens = net.UNet25DEnsemble(5, shared_encoder=True).eval()
    # non-trivial BN statistics
    for m in ens.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 1, 32, 32, 4)
    with torch.no_grad():
        ref = ens(x)
        scripted = torch.jit.script(ens)
        torch.testing.assert_close(scripted(x), ref)
        wf.fuse_batchnorm_(ens)
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in ens.modules())
        torch.testing.assert_close(ens(x), ref, atol=1e-5, rtol=1e-4)


def test_pretext_net_outputs(net):
    model = net.PretextNet()
    rot, rpl = model((torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 4), torch.randn(2, 1, 16, 16, 4)))
    assert rot.shape == (2, 10) and rpl.shape == (2, 26)
    assert isinstance(model.encoder, net.UNet25DEncoder)


def test_activation_is_the_papers_relu_with_leaky_option(net, tmp_path):
    """Section 2.1's ReLU by default (slope 0 = exactly ReLU), the authors' LeakyReLU 0.01 as an option;
    the ensemble builds its members with the slope, and inference reads the slope the training recorded."""
    import json

    workflow = bundle_scripts("unet25d_ssl", "workflow")

    def slopes(module):
        return {m.negative_slope for m in module.modules() if isinstance(m, torch.nn.LeakyReLU)}

    model = net.UNet25D()
    assert slopes(model) == {0.0} and net.count_parameters(model) == 3_845_058
    x = torch.randn(1, 1, 16, 16, 2)
    act = model.encoder.block1[2]
    assert torch.equal(act(x.clone()), torch.relu(x))
    assert slopes(net.UNet25D(negative_slope=0.01)) == {0.01}
    assert slopes(net.UNet25DEnsemble(2, shared_encoder=True, negative_slope=0.01)) == {0.01}
    assert slopes(net.UNet25DEnsemble(2, shared_encoder=False)) == {0.0}
    assert slopes(net.PretextNet().encoder) == {0.0} and slopes(net.PretextNet(negative_slope=0.01).encoder) == {0.01}
    # what inference uses: no ensemble.json -> the paper's ReLU; a pre-0.4 ensemble.json -> 0.01; else its value
    assert workflow.ensemble_slope(tmp_path) == 0.0
    (tmp_path / "ensemble.json").write_text(json.dumps({"shared_encoder": True, "scales": ["medium"]}))
    assert workflow.ensemble_slope(tmp_path) == 0.01
    (tmp_path / "ensemble.json").write_text(json.dumps({"shared_encoder": True, "scales": ["medium"], "negative_slope": 0.0}))
    assert workflow.ensemble_slope(tmp_path) == 0.0
