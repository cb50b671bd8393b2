"""normkit.nn's Encoding family (Encoding, GramMatrix, Inspiration, UpsampleConv2d) against float64
PyTorch compositions of LAYERS.md's formulas and finite differences: forward, backward, parameter
gradients, initialization, buffers and state_dicts, and errors."""
import numpy as np
import pytest
import torch

import normkit.functional as F
import normkit.nn as nn
from encoding_reference import t64, torch_encoding
from helpers import assert_close, assert_close_dtype, channels_last, fd_grad, randn, rng

F32_FACTOR = 10


def _check(actual, expected, dtype, what):
    assert actual.dtype == dtype, (what, actual.dtype)
    factor = 1 if dtype == np.float64 else F32_FACTOR
    assert_close_dtype(actual, expected, dtype, what, factor=factor)


# --------------------------------------------------------------------------------------------------
# Encoding


def _torch_encoding_layer(x, C, s):
    """Upstream's Encoding.forward: (B, D, *) -> X (B, N, D) -> encoding."""
    B, D = x.shape[:2]
    return torch_encoding(x.reshape(B, D, -1).transpose(1, 2), C, s)


@pytest.mark.parametrize("shape,layout", [((2, 6, 5, 7), "contiguous"),
                                          ((2, 6, 5, 7), "channels_last"),
                                          ((3, 5, 70), "contiguous"), ((1, 4, 1, 1), "contiguous")],
                         ids=["4d", "4d-channels-last", "3d", "4d-one-feature"])
def test_encoding_layer_vs_torch(shape, layout, dtype):
    D, K = shape[1], 4
    layer = nn.Encoding(D, K, dtype=dtype, generator=rng(3))
    x0 = randn(shape, 1, np.float64, offset=0.2)
    x = channels_last(x0.astype(dtype)) if layout == "channels_last" else x0.astype(dtype)
    C, s = layer.codewords.data.copy(), layer.scale.data.copy()
    E = layer(x)
    assert E.shape == (shape[0], K, D)
    dE = rng(2).standard_normal(E.shape)
    tx, tC, ts = t64(x, True), t64(C, True), t64(s, True)
    tE = _torch_encoding_layer(tx, tC, ts)
    tE.backward(t64(dE))
    _check(E, tE.detach().numpy(), dtype, "E")
    dx = layer.backward(dE.astype(dtype))
    assert dx.shape == x.shape
    if layout == "channels_last":
        assert dx.strides == x.strides  # the gradient comes back in the input's layout
    _check(dx, tx.grad.numpy(), dtype, "dx")
    _check(layer.codewords.grad, tC.grad.numpy(), dtype, "codewords.grad")
    _check(layer.scale.grad, ts.grad.numpy(), dtype, "scale.grad")
    np.testing.assert_array_equal(layer.codewords.data, C)  # a layer never updates its parameters


def test_encoding_layer_float16_input_runs_with_float32_parameters():
    layer = nn.Encoding(5, 3, generator=rng(4))
    x = randn((2, 5, 4, 3), 5, np.float16)
    y = layer(x)
    dy = randn(y.shape, 6, np.float16)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == np.float16 and dx.shape == x.shape
    ref = nn.Encoding(5, 3, generator=rng(4))
    y32 = ref(x.astype(np.float32))
    dx32 = ref.backward(dy.astype(np.float32))
    np.testing.assert_array_equal(y, y32.astype(np.float16))
    np.testing.assert_array_equal(dx, dx32.astype(np.float16))
    np.testing.assert_array_equal(layer.codewords.grad, ref.codewords.grad)
    np.testing.assert_array_equal(layer.scale.grad, ref.scale.grad)
    assert layer.codewords.grad.dtype == np.float32
    with pytest.raises(TypeError, match="float16 input needs float32 parameters, this layer's "
                                        "are float64"):
        nn.Encoding(5, 3, dtype=np.float64)(x)


def test_encoding_layer_finite_differences():
    layer = nn.Encoding(3, 4, dtype=np.float64, generator=rng(5))
    x = randn((2, 3, 2, 3), 6)
    R = rng(7).standard_normal((2, 4, 3))

    def loss():
        out = float((layer(x) * R).sum())
        layer._saved = None
        return out

    layer(x)
    dx = layer.backward(R)
    assert_close(dx, fd_grad(loss, x), 1e-7, 1e-8, "dx")
    assert_close(layer.codewords.grad, fd_grad(loss, layer.codewords.data), 1e-7, 1e-8, "dC")
    assert_close(layer.scale.grad, fd_grad(loss, layer.scale.data), 1e-7, 1e-8, "ds")


def test_encoding_layer_initialization_and_state():
    layer = nn.Encoding(16, 8, generator=rng(0))
    bound = 1 / np.sqrt(16 * 8)
    C, s = layer.codewords.data, layer.scale.data
    assert C.shape == (8, 16) and s.shape == (8,) and C.dtype == s.dtype == np.float32
    assert np.all(np.abs(C) <= bound) and np.max(np.abs(C)) > 0.8 * bound
    assert np.all((s >= -1) & (s <= 0)) and s.min() < -0.5
    np.testing.assert_array_equal(nn.Encoding(16, 8, generator=rng(0)).codewords.data, C)
    assert list(layer.state_dict()) == ["codewords", "scale"]
    other = nn.Encoding(16, 8, generator=rng(1))
    other.load_state_dict({k: torch.tensor(v) for k, v in layer.state_dict().items()})
    np.testing.assert_array_equal(other.codewords.data, C)
    layer.to(dtype=np.float64)
    assert layer.codewords.dtype == np.float64
    assert layer(randn((2, 16, 3, 3), 1)).dtype == np.float64
    assert "16" in repr(layer) and "8" in repr(layer)


def test_encoding_layer_errors():
    layer = nn.Encoding(6, 4)
    with pytest.raises(ValueError, match=r"expected 3D \(B, D, N\) or 4D \(B, D, H, W\) input "
                                         r"\(got 2D input\)"):
        layer(np.ones((2, 6), np.float32))
    with pytest.raises(ValueError, match=r"Encoding\(D=6, K=4\): input has 5 features in dim 1"):
        layer(np.ones((2, 5, 3, 3), np.float32))
    with pytest.raises(TypeError, match="float64 input needs float64 parameters"):
        layer(np.ones((2, 6, 3, 3)))
    with pytest.raises(TypeError, match="dtype int64"):
        layer(np.ones((2, 6, 3, 3), np.int64))
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(np.ones((2, 4, 6), np.float32))
    layer(randn((2, 6, 3, 3), 2, np.float32))
    with pytest.raises(ValueError, match=r"dE must have shape \(B, K, D\) = \(2, 4, 6\), "
                                         r"got \(2, 6, 4\)"):
        layer.backward(np.ones((2, 6, 4), np.float32))
    with pytest.raises(ValueError, match="K must be a positive integer"):
        nn.Encoding(6, 0)


def test_encoding_after_conv_in_sequential():
    """A Sequential's backward chains the layers' backwards: Conv2d -> Encoding against torch."""
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, dtype=np.float64, generator=rng(1)),
                        nn.Encoding(5, 3, dtype=np.float64, generator=rng(2)))
    x = randn((2, 3, 6, 5), 3)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    conv.load_state_dict({k: torch.tensor(v) for k, v in net[0].state_dict().items()})
    tx = t64(x, True)
    tC, ts = t64(net[1].codewords.data, True), t64(net[1].scale.data, True)
    tE = _torch_encoding_layer(conv(tx), tC, ts)
    dE = rng(4).standard_normal(tE.shape)
    tE.backward(t64(dE))
    E = net(x)
    dx = net.backward(dE)
    assert_close(E, tE.detach().numpy(), 1e-10, 1e-10, "E")
    assert_close(dx, tx.grad.numpy(), 1e-10, 1e-10, "dx")
    assert_close(net[0].weight.grad, conv.weight.grad.numpy(), 1e-10, 1e-10, "conv weight")
    assert_close(net[1].codewords.grad, tC.grad.numpy(), 1e-10, 1e-10, "codewords")


# --------------------------------------------------------------------------------------------------
# GramMatrix


def test_gram_matrix_vs_torch(dtype):
    y = randn((3, 5, 4, 6), 10, dtype)
    layer = nn.GramMatrix()
    G = layer(y)
    ty = t64(y, True)
    feats = ty.reshape(3, 5, -1)
    tG = feats.bmm(feats.transpose(1, 2)) / (5 * 4 * 6)
    dG = rng(11).standard_normal(G.shape)
    tG.backward(t64(dG))
    assert G.shape == (3, 5, 5)
    _check(G, tG.detach().numpy(), dtype, "G")
    _check(layer.backward(dG.astype(dtype)), ty.grad.numpy(), dtype, "dy")


def test_gram_matrix_finite_differences():
    y = randn((2, 3, 2, 3), 12)
    R = rng(13).standard_normal((2, 3, 3))
    assert_close(F.gram_matrix_backward(R, y),
                 fd_grad(lambda: float((F.gram_matrix(y) * R).sum()), y), 1e-7, 1e-8)


def test_gram_matrix_errors():
    with pytest.raises(ValueError, match=r"y must have shape \(B, C, H, W\)"):
        nn.GramMatrix()(np.ones((3, 4), np.float32))
    with pytest.raises(RuntimeError, match="call forward first"):
        nn.GramMatrix().backward(np.ones((1, 3, 3), np.float32))


# --------------------------------------------------------------------------------------------------
# Inspiration


def _torch_inspiration(x, W, G):
    """Upstream's forward: P = bmm(W.expand_as(G), G);
    Y = bmm(P^T.expand(B, C, C), X.view(B, C, -1)), viewed as X."""
    P = torch.bmm(W.expand_as(G), G)
    B, C = x.shape[:2]
    return torch.bmm(P.transpose(1, 2).expand(B, C, C), x.reshape(B, C, -1)).view_as(x)


@pytest.mark.parametrize("target_batch", [1, 3])
def test_inspiration_vs_torch(target_batch, dtype):
    C = 5
    layer = nn.Inspiration(C, dtype=dtype, generator=rng(4))
    G = rng(20).standard_normal((target_batch, C, C)).astype(dtype)
    layer.set_target(G, requires_grad=True)
    x = randn((3, C, 4, 3), 21, dtype)
    Y = layer(x)
    tx, tW, tG = t64(x, True), t64(layer.weight.data, True), t64(G, True)
    tY = _torch_inspiration(tx, tW, tG)
    dY = rng(22).standard_normal(Y.shape)
    tY.backward(t64(dY))
    assert Y.shape == x.shape
    _check(Y, tY.detach().numpy(), dtype, "Y")
    _check(layer.backward(dY.astype(dtype)), tx.grad.numpy(), dtype, "dx")
    _check(layer.weight.grad, tW.grad.numpy(), dtype, "weight.grad")
    _check(layer.target_grad, tG.grad.numpy(), dtype, "target_grad")


def test_inspiration_finite_differences():
    C = 3
    x = randn((2, C, 2, 3), 30)
    W = rng(31).uniform(0, 0.5, (1, C, C))
    R = rng(32).standard_normal(x.shape)
    for G in (rng(33).standard_normal((1, C, C)), rng(34).standard_normal((2, C, C))):
        loss = lambda: float((F.inspiration(x, W, G) * R).sum())  # noqa: E731
        Y, P = F.inspiration_forward(x, W, G)
        dx, dW, dG = F.inspiration_backward(R, x, W, G, P, target_grad=True)
        for name, got, arg in (("dx", dx, x), ("dW", dW, W), ("dG", dG, G)):
            assert_close(got, fd_grad(loss, arg), 1e-7, 1e-8, name)
        assert F.inspiration_backward(R, x, W, G, P)[2] is None


def test_inspiration_target_is_a_buffer():
    C = 4
    layer = nn.Inspiration(C, B=2, generator=rng(5))
    w = layer.weight.data
    assert w.shape == (1, C, C) and np.all((w >= 0) & (w <= 0.02)) and w.max() > 0.01
    assert layer.G.shape == (2, C, C) and not np.any(layer.G)
    assert list(layer.state_dict()) == ["weight", "G"]
    target = rng(40).standard_normal((1, C, C))
    layer.setTarget(torch.tensor(target))  # upstream's name; torch tensors are accepted
    assert layer.G.shape == (1, C, C) and layer.G.dtype == np.float32
    np.testing.assert_allclose(layer.G, target.astype(np.float32))
    target[...] = 0
    assert np.any(layer.G)  # the layer keeps a copy
    sd = layer.state_dict()
    # another target batch: the buffer takes the checkpoint's
    other = nn.Inspiration(C, B=3, generator=rng(6))
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.G, layer.G)
    np.testing.assert_array_equal(other.weight.data, layer.weight.data)
    layer.to(dtype=np.float64)
    assert layer.G.dtype == np.float64 and layer.weight.dtype == np.float64
    x = randn((2, C, 3, 3), 41)
    assert layer(x).dtype == np.float64
    layer.backward(np.ones_like(x))
    assert layer.target_grad is None  # not asked for


def test_inspiration_errors():
    layer = nn.Inspiration(4)
    layer.set_target(np.ones((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="the target has batch 2 but the input has batch 3"):
        layer(np.ones((3, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"Inspiration\(C=4\): input has 5 channels"):
        layer(np.ones((2, 5, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"the target must have shape \(B, 4, 4\), got \(4, 4\)"):
        layer.set_target(np.ones((4, 4)))
    with pytest.raises(TypeError, match="float64 input needs float64 parameters"):
        layer(np.ones((2, 4, 2, 2)))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, H, W\)"):
        layer(np.ones((2, 4), np.float32))


# --------------------------------------------------------------------------------------------------
# UpsampleConv2d


@pytest.mark.parametrize("args,scale", [
    (dict(kernel_size=3, stride=2, padding=1), 2),
    (dict(kernel_size=(3, 2), padding=(1, 0), dilation=(1, 2), groups=2), 3),
    (dict(kernel_size=1, bias=False), 1),
])
def test_upsample_conv2d_vs_torch(args, scale, dtype):
    layer = nn.UpsampleConv2d(4, 6, scale_factor=scale, dtype=dtype, generator=rng(7), **args)
    x = randn((2, 4, 7, 6), 50, dtype)
    k = args["kernel_size"]
    k = (k, k) if isinstance(k, int) else k
    assert layer.weight.shape == (6 * scale * scale, 4 // args.get("groups", 1)) + k
    conv_args = {key: v for key, v in args.items() if key not in ("kernel_size", "bias")}
    tx, tw = t64(x, True), t64(layer.weight.data, True)
    tb = None if layer.bias is None else t64(layer.bias.data, True)
    conv = torch.nn.functional.conv2d(tx, tw, tb, **conv_args)
    ty = torch.nn.functional.pixel_shuffle(conv, scale)
    y = layer(x)
    H = (7 + 2 * layer.padding[0] - layer.dilation[0] * (k[0] - 1) - 1) // layer.stride[0] + 1
    assert y.shape == ty.shape and y.shape[:3] == (2, 6, scale * H)
    dy = rng(51).standard_normal(y.shape)
    ty.backward(t64(dy))
    _check(y, ty.detach().numpy(), dtype, "y")
    _check(layer.backward(dy.astype(dtype)), tx.grad.numpy(), dtype, "dx")
    _check(layer.weight.grad, tw.grad.numpy(), dtype, "weight.grad")
    if tb is not None:
        _check(layer.bias.grad, tb.grad.numpy(), dtype, "bias.grad")


def test_upsample_conv2d_finite_differences_and_init():
    layer = nn.UpsampleConv2d(2, 2, 3, stride=2, padding=1, scale_factor=2, dtype=np.float64,
                              generator=rng(8))
    bound = 1 / np.sqrt(2 * 3 * 3)
    w = np.abs(layer.weight.data)
    assert np.all(w <= bound) and np.max(w) > 0.8 * bound
    x = randn((1, 2, 5, 4), 52)
    y = layer(x)
    R = rng(53).standard_normal(y.shape)
    dx = layer.backward(R)

    def loss():
        out = float((layer(x) * R).sum())
        layer._saved = None
        return out

    assert_close(dx, fd_grad(loss, x), 1e-7, 1e-8, "dx")
    assert_close(layer.weight.grad, fd_grad(loss, layer.weight.data), 1e-7, 1e-8, "dweight")
    assert_close(layer.bias.grad, fd_grad(loss, layer.bias.data), 1e-7, 1e-8, "dbias")


def test_upsample_conv2d_errors():
    with pytest.raises(ValueError, match="scale_factor must be a positive integer"):
        nn.UpsampleConv2d(4, 4, 3, scale_factor=0)
    with pytest.raises(ValueError, match=r"out_channels \* scale_factor\^2 \(3\) must be divisible "
                                         r"by groups \(2\)"):
        nn.UpsampleConv2d(4, 3, 3, groups=2)
    layer = nn.UpsampleConv2d(4, 3, 3, scale_factor=2)
    layer(np.ones((1, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(1, 3, 6, 6\)"):
        layer.backward(np.ones((1, 3, 5, 6), np.float32))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(np.ones((4, 5, 5), np.float32))


def test_exports():
    for name in ("Encoding", "GramMatrix", "Inspiration", "UpsampleConv2d", "Conv1d", "Conv2d",
                 "Conv3d"):
        assert name in nn.__all__ and issubclass(getattr(nn, name), nn.Module), name
    for name in ("scaled_l2", "scaled_l2_forward", "scaled_l2_backward", "aggregate",
                 "aggregate_backward", "encoding", "encoding_forward", "encoding_backward",
                 "gram_matrix", "gram_matrix_backward", "inspiration", "inspiration_forward",
                 "inspiration_backward", "convolution", "convolution_backward", "pixel_shuffle",
                 "pixel_unshuffle"):
        assert name in F.__all__ and callable(getattr(F, name)), name
