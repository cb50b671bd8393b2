"""AdaptiveFeatureNorm (stepwise and hard), Block and ImageClassifier in normkit.torch and
normkit.nn against torch compositions of tllib's formulas, gradcheck and errors."""
import copy
import math

import numpy as np
import pytest
import torch

import normkit.nn as nkn
import normkit.torch as nkt
from helpers import assert_close, randn


def feats(seed, shape=(7, 5)):
    f = randn(shape, seed)
    f[3] = 0.0  # a zero row: its gradient is 0, never NaN
    return f


def test_torch_stepwise_value_and_gradient():
    f = torch.from_numpy(feats(1)).requires_grad_()
    loss = nkt.AdaptiveFeatureNorm(0.7)(f)
    torch.testing.assert_close(loss, torch.tensor(0.49, dtype=torch.float64))
    loss.backward()
    norm = f.detach().norm(dim=1, keepdim=True)
    want = torch.where(norm > 0, -(2 * 0.7 / f.shape[0]) * f.detach() / norm.clamp_min(1e-300),
                       torch.zeros(()))
    torch.testing.assert_close(f.grad, want)
    assert torch.isfinite(f.grad).all() and (f.grad[3] == 0).all()


def test_torch_hard_value_and_gradcheck():
    f = torch.from_numpy(randn((6, 4), 2)).requires_grad_()
    afn = nkt.AdaptiveFeatureNorm(radius=3.0, mode="hard")
    torch.testing.assert_close(afn(f), (f.norm(dim=1).mean() - 3.0) ** 2)
    assert torch.autograd.gradcheck(afn, (f,))
    # (the stepwise loss has no gradcheck: its value is delta^2 whatever f, by design of the
    # detached target; its gradient is checked against the formula above)


def test_nn_afn_matches_torch():
    f = feats(3)
    for kwargs in ({"delta": 1.3}, {"radius": 2.5, "mode": "hard"}):
        tf = torch.from_numpy(f.copy()).requires_grad_()
        tl = nkt.AdaptiveFeatureNorm(**kwargs)(tf)
        tl.backward(torch.tensor(0.5, dtype=torch.float64))
        layer = nkn.AdaptiveFeatureNorm(**kwargs)
        assert_close(layer(f), tl.detach().numpy(), 1e-12, 1e-12)
        assert_close(layer.backward(0.5), tf.grad.numpy(), 1e-12, 1e-12)


def tllib_block(block, x, mask):
    """tllib's Block as torch ops with a given dropout mask: fc, bn, relu, dropout, * sqrt(1-p)."""
    p = block.dropout_p
    f = torch.relu(torch.nn.functional.batch_norm(
        torch.nn.functional.linear(x, block.fc.weight, block.fc.bias), None, None,
        block.bn.weight, block.bn.bias, True))
    return f * mask / (1 - p) * math.sqrt(1 - p) if p else f


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_block_matches_formula_and_backprops(p):
    torch.manual_seed(0)
    block = nkt.Block(6, 9, dropout_p=p, generator=torch.Generator().manual_seed(4)).double()
    x = torch.from_numpy(randn((8, 6), 5)).requires_grad_()
    y = block(x)
    mask = (torch.rand((8, 9), generator=torch.Generator().manual_seed(4)) >= p).double()
    want = tllib_block(block, x, mask)
    torch.testing.assert_close(y, want)
    y.sum().backward()  # dropout_p = 0 too (tllib's raises here)
    gx = x.grad.clone()
    x.grad = None
    want.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    block.eval()
    torch.testing.assert_close(block(x), torch.relu(block.bn(block.fc(x))))
    assert set(block.state_dict()) >= {"fc.weight", "fc.bias", "bn.weight", "bn.running_var"}


def test_torch_block_keeps_l2_norm_in_expectation():
    block = nkt.Block(4, 2000, dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    train = block(x).pow(2).sum(1).mean()
    block.eval()
    ref = block(x).pow(2).sum(1).mean()  # batch stats in train vs running ones: compare shapes
    assert train > 0 and ref > 0
    block.train()
    f = torch.relu(block.bn(block.fc(x)))
    kept = block(x)
    ratio = (kept.pow(2).sum() / f.pow(2).sum()).item()
    assert abs(ratio - 1.0) < 0.05


class Backbone(torch.nn.Module):
    out_features = 5

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.conv(x)


def test_image_classifier_keys_init_outputs_and_lrs():
    torch.manual_seed(0)
    model = nkt.ImageClassifier(Backbone(), 4, num_blocks=2, bottleneck_dim=300, dropout_p=0.5)
    keys = set(model.state_dict())
    assert {"bottleneck.0.0.fc.weight", "bottleneck.0.0.bn.running_mean", "bottleneck.1.fc.bias",
            "head.weight", "backbone.conv.weight"} <= keys
    bn = model.bottleneck[0][0].bn
    assert abs(bn.weight.mean().item() - 1.0) < 0.005 and 0.005 < bn.weight.std().item() < 0.02
    assert (bn.bias == 0).all()
    for lin in (model.bottleneck[0][0].fc, model.bottleneck[1].fc, model.head):
        assert abs(lin.weight.std().item() - 0.01) < 0.003 and lin.bias.abs().max() < 0.06
    x = torch.randn(6, 3, 7, 7)
    pred, f = model(x)
    assert pred.shape == (6, 4) and f.shape == (6, 300)
    model.eval()
    assert model(x).shape == (6, 4)
    groups = model.get_parameters(base_lr=0.02)
    assert [g["lr"] for g in groups] == [pytest.approx(0.002), 0.02, 0.02]
    model.finetune = False
    assert model.get_parameters(0.02)[0]["lr"] == 0.02


def test_nn_block_backward_by_finite_differences():
    from helpers import fd_grad

    block = nkn.Block(4, 6, dropout_p=0.25, dtype=np.float64, generator=np.random.default_rng(1))
    x, dy = randn((5, 4), 2), randn((5, 6), 3)

    def loss():
        block.dropout.generator = np.random.default_rng(9)
        out = float((block(x) * dy).sum())
        for m in block.modules():
            m.__dict__["_saved"] = None
        return out

    fd = fd_grad(loss, x)
    block.dropout.generator = np.random.default_rng(9)
    block(x)
    assert_close(block.backward(dy), fd, 1e-6, 1e-7)


def test_errors():
    with pytest.raises(ValueError, match="shape \\(N, F\\)"):
        nkt.AdaptiveFeatureNorm(1.0)(torch.randn(3))
    with pytest.raises(ValueError, match="radius"):
        nkt.AdaptiveFeatureNorm(mode="hard")
    with pytest.raises(ValueError, match="mode"):
        nkn.AdaptiveFeatureNorm(mode="soft")
    with pytest.raises(ValueError, match="dropout_p"):
        nkt.Block(3, 4, dropout_p=1.0)
    with pytest.raises(ValueError, match="num_blocks"):
        nkt.ImageClassifier(Backbone(), 3, num_blocks=0)
    with pytest.raises(TypeError, match="generator"):
        nkn.Dropout(0.5, generator=torch.Generator())
    copy.deepcopy(nkt.Block(3, 4))
