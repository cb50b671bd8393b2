"""normkit.nn's weight-standardized layers (NumPy) against normkit.torch's on the same parameters:
outputs and every gradient over stride/padding/dilation/groups/padding_mode, the string paddings,
the transposed layers with output_size, FWS; the plain Conv*d's new padding modes against torch;
bad input."""
import numpy as np
import pytest
import torch

import normkit.nn as nn
import normkit.torch as nkt

seeded = np.random.default_rng  # a layer's generator= for a reproducible initialization

rng = np.random.default_rng(5)
CASES = [  # (dims, C_in, C_out, kernel, kwargs, spatial)
    (1, 4, 6, 3, dict(stride=2, padding=1, padding_mode="circular"), (11,)),
    (2, 4, 6, (3, 2), dict(padding=(1, 2), groups=2, dilation=(1, 2),
                           padding_mode="reflect"), (9, 8)),
    (2, 3, 5, 4, dict(padding="same", padding_mode="replicate"), (7, 6)),
    (2, 3, 5, 3, dict(padding="same", bias=False), (6, 5)),
    (2, 3, 5, 3, dict(padding="valid", stride=2), (7, 7)),
    (3, 2, 4, 3, dict(padding=1, padding_mode="zeros"), (4, 5, 3)),
]
NN = {1: nn.WSConv1d, 2: nn.WSConv2d, 3: nn.WSConv3d}
TORCH = {1: nkt.WSConv1d, 2: nkt.WSConv2d, 3: nkt.WSConv3d}


def to_torch_layer(ours, theirs):
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(getattr(ours, name).data)))
    return theirs


def randomize(layer):
    layer.gain.data[...] = rng.random(layer.gain.shape) + 0.5
    if layer.bias is not None:
        layer.bias.data[...] = rng.standard_normal(layer.bias.shape)
    return layer


def check_grads(ours, theirs, x, y, dy, dx, tol):
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(getattr(ours, name).grad, p.grad.numpy(), rtol=tol, atol=tol,
                                   err_msg=name)


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
@pytest.mark.parametrize("convention", ["elektronn3", "timm"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_ws_layers_vs_torch(case, convention, dtype):
    dims, cin, cout, k, kw, spatial = case
    ours = randomize(NN[dims](cin, cout, k, convention=convention, dtype=dtype,
                              generator=seeded(1), **kw))
    theirs = to_torch_layer(ours, TORCH[dims](cin, cout, k, convention=convention,
                                              dtype=torch.float64 if dtype == np.float64
                                              else torch.float32, **kw))
    x = rng.standard_normal((2, cin) + spatial).astype(dtype)
    y = ours(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = ours.backward(dy)
    check_grads(ours, theirs, x, y, dy, dx, 1e-10 if dtype == np.float64 else 2e-4)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_initialization_is_kaiming_normal_and_seeded():
    a = nn.WSConv2d(64, 32, 3, generator=seeded(3))
    b = nn.WSConv2d(64, 32, 3, generator=seeded(3))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert abs(a.weight.data.std() - np.sqrt(2 / (64 * 9))) < 0.05 * np.sqrt(2 / (64 * 9))
    np.testing.assert_array_equal(a.gain.data, np.ones(32, np.float32))


@pytest.mark.parametrize("dims", [2, 3])
def test_transposed_layers_vs_torch(dims):
    cls, tcls = {2: (nn.WSConvTranspose2d, nkt.WSConvTranspose2d),
                 3: (nn.WSConvTranspose3d, nkt.WSConvTranspose3d)}[dims]
    kw = dict(stride=2, padding=1, groups=2, dilation=1)
    ours = randomize(cls(4, 6, 3, dtype=np.float64, generator=seeded(2), **kw))
    theirs = to_torch_layer(ours, tcls(4, 6, 3, dtype=torch.float64, **kw))
    x = rng.standard_normal((2, 4) + (4,) * dims)
    size = (8,) * dims
    y = ours(x, output_size=size)
    assert y.shape[2:] == size
    dy = rng.standard_normal(y.shape)
    dx = ours.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt, output_size=size)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(getattr(ours, name).grad, p.grad.numpy(), rtol=1e-10,
                                   atol=1e-10, err_msg=name)
    with pytest.raises(ValueError, match="requested an output size"):
        ours(x, output_size=(3,) * dims)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [2, "same", (1, 0)])
def test_plain_conv_padding_modes_vs_torch(mode, padding):
    ours = nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=mode, dtype=np.float64,
                     generator=seeded(0))
    theirs = torch.nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=mode,
                             dtype=torch.float64)
    to_torch_layer(ours, theirs)
    x = rng.standard_normal((2, 3, 6, 7))
    y = ours(x)
    dy = rng.standard_normal(y.shape)
    check_grads(ours, theirs, x, y, dy, ours.backward(dy), 1e-11)
    assert ("padding_mode" in repr(ours)) == (mode != "zeros")


def test_fws_vs_torch():
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=np.float64, generator=seeded(4))
    tconv = to_torch_layer(conv, torch.nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64))
    ours, theirs = nn.FWS(conv), nkt.FWS(tconv)
    g = (rng.random(5) + 0.5).astype(np.float32)
    ours.gain.data[...] = g
    with torch.no_grad():
        theirs.gain.copy_(torch.from_numpy(g))
    x = rng.standard_normal((2, 3, 6, 6))
    y = ours(x)
    dy = rng.standard_normal(y.shape)
    dx = ours.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    np.testing.assert_allclose(conv.weight.data, tconv.weight.detach().numpy(), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.gain.grad, theirs.gain.grad.numpy(), rtol=1e-5)
    np.testing.assert_allclose(conv.weight.grad, tconv.weight.grad.numpy(), rtol=1e-10,
                               atol=1e-10)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())


def test_errors():
    with pytest.raises(ValueError, match="unknown convention"):
        nn.WSConv2d(2, 2, 3, convention="x")
    with pytest.raises(ValueError, match="eps must be > 0"):
        nn.WSConv2d(2, 2, 3, eps=-1)
    with pytest.raises(ValueError, match="eps must be > 0"):
        nn.WSConv2d(2, 2, 3)(np.ones((1, 2, 4, 4), np.float32), eps=0.0)
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.WSConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.WSConvTranspose2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="only padding_mode='zeros'"):
        nn.WSConvTranspose2d(4, 6, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="output_padding .* must be smaller than the stride"):
        nn.WSConvTranspose2d(4, 6, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        nn.Conv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be"):
        nn.Conv2d(2, 2, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="padding must be an int"):
        nn.Conv2d(2, 2, 3, padding="full")
    with pytest.raises(TypeError, match="FWS: wraps a normkit.nn Conv"):
        nn.FWS(nn.BatchNorm2d(3))
    with pytest.raises(RuntimeError, match="call forward first"):
        nn.WSConv2d(2, 2, 3).backward(np.ones((1, 2, 2, 2), np.float32))
