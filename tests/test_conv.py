"""normkit's N-d convolution (core im2col/col2im + NumPy GEMM) against
torch.nn.functional.conv1d/2d/3d, float64 finite differences, the adjointness of im2col and col2im,
pixel shuffle against torch, the Conv*d layers against torch.nn.Conv*d, and its errors."""
import numpy as np
import pytest
import torch

import normkit.functional as F
import normkit.nn as nn
from normkit import _C
from helpers import assert_close, assert_close_dtype, channels_last, fd_grad, randn, rng

TORCH_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
              3: torch.nn.functional.conv3d}

# (x shape, weight shape, stride, padding, dilation, groups)
CASES = [
    ((2, 3, 11), (4, 3, 3), 1, 0, 1, 1),
    ((2, 4, 13), (6, 2, 4), 2, 3, 2, 2),
    ((3, 3, 7, 9), (5, 3, 3, 3), 1, 1, 1, 1),
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),
    ((2, 6, 7, 5), (6, 1, 3, 3), 2, 1, 1, 6),              # depthwise
    ((2, 3, 6, 7), (5, 3, 1, 1), 1, 0, 1, 1),              # 1x1: no im2col
    ((1, 3, 5, 5), (2, 3, 5, 5), 1, 0, 1, 1),              # kernel as large as the input
    ((2, 2, 5, 4, 6), (3, 2, 2, 3, 2), (1, 2, 1), 1, (2, 1, 1), 1),
    ((1, 4, 4, 5, 3), (4, 2, 3, 1, 2), 1, (1, 0, 1), 1, 2),
]
CASE_IDS = [f"{len(c[0]) - 2}d-{i}" for i, c in enumerate(CASES)]


def _layout(x, name):
    if name == "contiguous":
        return np.ascontiguousarray(x)
    if name == "channels_last":
        return channels_last(x)
    base = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, x.dtype)  # "strided"
    base[..., ::2] = x
    return base[..., ::2]


def _torch_conv(x, w, b, stride, padding, dilation, groups, dy):
    tx, tw = (torch.tensor(np.array(a, np.float64), requires_grad=True) for a in (x, w))
    tb = None if b is None else torch.tensor(np.array(b, np.float64), requires_grad=True)
    y = TORCH_CONV[w.ndim - 2](tx, tw, tb, stride, padding, dilation, groups)
    y.backward(torch.tensor(dy))
    return (y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(),
            None if tb is None else tb.grad.numpy())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_convolution_vs_torch(case, bias, layout, dtype):
    xs, ws, stride, padding, dilation, groups = case
    x0 = randn(xs, 1, np.float64, offset=0.3)
    w = (rng(2).standard_normal(ws) * 0.5).astype(dtype)
    b = rng(3).uniform(-1, 1, ws[0]).astype(dtype) if bias else None
    x = _layout(x0.astype(dtype), layout)
    y = F.convolution(x, w, b, stride, padding, dilation, groups)
    dy = rng(4).standard_normal(y.shape)
    ty, tdx, tdw, tdb = _torch_conv(x, w, b, stride, padding, dilation, groups, dy)
    assert y.dtype == dtype and y.shape == ty.shape
    assert_close_dtype(y, ty, dtype, "y", factor=2)
    dx, dw, db = F.convolution_backward(dy.astype(dtype), x, w, stride, padding, dilation, groups)
    assert dx.shape == x.shape and dw.shape == w.shape
    assert_close_dtype(dx, tdx, dtype, "dx", factor=2)
    assert_close_dtype(dw, tdw, dtype, "dweight", factor=2)
    assert_close_dtype(db, dy.sum(axis=(0,) + tuple(range(2, dy.ndim))), dtype, "dbias", factor=2)
    if bias:
        assert_close_dtype(db, tdb, dtype, "dbias vs torch", factor=2)


def test_convolution_backward_parts_are_optional():
    xs, ws, stride, padding, dilation, groups = CASES[3]
    x, w = randn(xs, 5), rng(6).standard_normal(ws)
    dy = rng(7).standard_normal(F.convolution(x, w, None, stride, padding, dilation, groups).shape)
    full = F.convolution_backward(dy, x, w, stride, padding, dilation, groups)
    assert F.convolution_backward(dy, x, w, stride, padding, dilation, groups,
                                  weight_grad=False, bias_grad=False)[1:] == (None, None)
    only_w = F.convolution_backward(dy, x, w, stride, padding, dilation, groups, input_grad=False)
    assert only_w[0] is None
    np.testing.assert_array_equal(only_w[1], full[1])


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[7]],
                         ids=["1d", "2d-groups-dilation", "2d-depthwise", "3d"])
def test_convolution_finite_differences(case):
    xs, ws, stride, padding, dilation, groups = case
    xs = (1,) + xs[1:]
    x = randn(xs, 8)
    w = rng(9).standard_normal(ws)
    b = rng(10).standard_normal(ws[0])
    R = rng(11).standard_normal(F.convolution(x, w, b, stride, padding, dilation, groups).shape)

    def loss():
        return float((F.convolution(x, w, b, stride, padding, dilation, groups) * R).sum())

    dx, dw, db = F.convolution_backward(R, x, w, stride, padding, dilation, groups)
    for name, got, arg in (("dx", dx, x), ("dweight", dw, w), ("dbias", db, b)):
        assert_close(got, fd_grad(loss, arg), 1e-7, 1e-8, name)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_col2im_is_the_adjoint_of_im2col(case, dtype):
    xs, ws, stride, padding, dilation, _ = case
    dims = len(ws) - 2
    norm = lambda v: [v] * dims if isinstance(v, int) else list(v)  # noqa: E731
    kernel, stride, padding, dilation = list(ws[2:]), norm(stride), norm(padding), norm(dilation)
    out = [_C.conv_output_size(n, k, s, p, d)
           for n, k, s, p, d in zip(xs[2:], kernel, stride, padding, dilation)]
    x = randn(xs, 12, dtype)
    cols = np.full((xs[0], xs[1] * int(np.prod(kernel)), int(np.prod(out))), np.nan, dtype)
    _C.im2col(x, cols, kernel, stride, padding, dilation)
    assert np.all(np.isfinite(cols))  # every column entry written, padding included
    Y = rng(13).standard_normal(cols.shape).astype(dtype)
    back = np.full(xs, np.nan, dtype)
    _C.col2im(Y, back, kernel, stride, padding, dilation)
    lhs = float((cols.astype(np.float64) * Y).sum())
    rhs = float((x.astype(np.float64) * back).sum())
    assert abs(lhs - rhs) <= (1e-12 if dtype == np.float64 else 1e-4) * max(1.0, abs(lhs))


def test_pixel_shuffle_matches_torch():
    x = rng(14).standard_normal((2, 12, 3, 5))
    y = F.pixel_shuffle(x, 2)
    np.testing.assert_array_equal(y, torch.nn.functional.pixel_shuffle(torch.tensor(x), 2).numpy())
    assert y[1, 2, 2 * 1 + 1, 2 * 4 + 0] == x[1, 2 * 4 + 1 * 2 + 0, 1, 4]
    np.testing.assert_array_equal(F.pixel_unshuffle(y, 2), x)
    np.testing.assert_array_equal(F.pixel_unshuffle(y, 2),
                                  torch.nn.functional.pixel_unshuffle(torch.tensor(y), 2).numpy())


# --------------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("cls,tcls,xs,kw", [
    (nn.Conv1d, torch.nn.Conv1d, (3, 4, 10), dict(kernel_size=3, stride=2, padding=1)),
    (nn.Conv2d, torch.nn.Conv2d, (2, 4, 7, 6), dict(kernel_size=(3, 2), dilation=(1, 2), groups=2)),
    (nn.Conv3d, torch.nn.Conv3d, (2, 2, 4, 5, 3),
     dict(kernel_size=2, padding=(1, 0, 1), bias=False)),
])
def test_conv_layers_vs_torch(cls, tcls, xs, kw, dtype):
    layer = cls(xs[1], 6, dtype=dtype, generator=rng(0), **kw)
    ref = tcls(xs[1], 6, dtype=torch.float64, **kw)
    ref.load_state_dict({k: torch.tensor(np.array(v, np.float64)) for k, v in
                         layer.state_dict().items()})
    assert set(layer.state_dict()) == set(ref.state_dict())
    x = randn(xs, 15, dtype)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = ref(tx)
    y = layer(x)
    assert_close_dtype(y, ty.detach().numpy(), dtype, "y", factor=2)
    dy = rng(16).standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    dx = layer.backward(dy.astype(dtype))
    assert_close_dtype(dx, tx.grad.numpy(), dtype, "dx", factor=2)
    assert_close_dtype(layer.weight.grad, ref.weight.grad.numpy(), dtype, "dweight", factor=2)
    if layer.bias is not None:
        assert_close_dtype(layer.bias.grad, ref.bias.grad.numpy(), dtype, "dbias", factor=2)
    layer(x)
    layer.backward(dy.astype(dtype))  # gradients accumulate
    assert_close_dtype(layer.weight.grad, 2 * ref.weight.grad.numpy(), dtype, "accumulated",
                       factor=2)
    with pytest.raises(RuntimeError, match="call forward first"):
        layer.backward(dy.astype(dtype))


def test_conv_layer_initialization():
    layer = nn.Conv2d(8, 16, (3, 5), groups=2, generator=rng(1))
    bound = 1 / np.sqrt(8 // 2 * 3 * 5)
    for p in (layer.weight.data, layer.bias.data):
        assert np.all(np.abs(p) <= bound) and np.max(np.abs(p)) > 0.8 * bound
    assert layer.weight.shape == (16, 4, 3, 5) and layer.weight.dtype == np.float32
    np.testing.assert_array_equal(nn.Conv2d(8, 16, (3, 5), groups=2, generator=rng(1)).weight.data,
                                  layer.weight.data)



def test_layer_initialization_follows_normkit_manual_seed():
    """Without generator=, initialization draws from normkit's default generator, so
    normkit.manual_seed reproduces a model; a seed or RandomState is a TypeError naming the layer."""
    import normkit
    import normkit.nn as nkn
    makers = [lambda: nkn.Conv2d(4, 6, 3), lambda: nkn.Conv1d(4, 6, 3),
              lambda: nkn.WSConv2d(4, 6, 3), lambda: nkn.WSConvTranspose2d(4, 6, 3),
              lambda: nkn.Encoding(5, 3), lambda: nkn.Inspiration(5),
              lambda: nkn.UpsampleConv2d(4, 6, 3, scale_factor=2)]
    for make in makers:
        normkit.manual_seed(11)
        a = make()
        normkit.manual_seed(11)
        b = make()
        c = make()  # the default generator moved on: another draw
        for (name, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                                c.named_parameters()):
            np.testing.assert_array_equal(pa.data, pb.data, err_msg=f"{type(a).__name__}.{name}")
            if name in ("weight", "codewords"):
                assert not np.array_equal(pa.data, pc.data), f"{type(a).__name__}.{name}"
    with pytest.raises(TypeError, match="Conv2d: generator must be a numpy.random.Generator"):
        nkn.Conv2d(4, 6, 3, generator=3)
    with pytest.raises(TypeError, match="Encoding: generator must be"):
        nkn.Encoding(5, 3, generator=np.random.RandomState(0))

# --------------------------------------------------------------------------------------------------
# Errors


def test_convolution_errors():
    x = randn((2, 4, 6, 6), 17, np.float32)
    w = np.ones((6, 2, 3, 3), np.float32) * 0.1
    with pytest.raises(ValueError, match=r"a 2-d kernel needs x of shape "
                                         r"\(B, C_in, 2 spatial dims\)"):
        F.convolution(x[0], w)
    with pytest.raises(ValueError, match="x has 4 channels but weight .* with groups=1 expects 2"):
        F.convolution(x, w)
    with pytest.raises(ValueError, match="6 output channels are not divisible by groups=4"):
        F.convolution(x, np.ones((6, 1, 3, 3), np.float32), groups=4)
    with pytest.raises(ValueError, match="spatial dim 0 of x has size 6, smaller than the kernel's "
                                         "extent 9 with padding 0"):
        F.convolution(x, w, groups=2, dilation=4, padding=(0, 2))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        F.convolution(x, w, groups=2, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        F.convolution(x, w, groups=2, padding=-1)
    with pytest.raises(ValueError, match="stride must be an int or 2 ints"):
        F.convolution(x, w, groups=2, stride=(1, 2, 3))
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        F.convolution(x, w.astype(np.float64), groups=2)
    with pytest.raises(TypeError, match="dtype int32"):
        F.convolution(x.astype(np.int32), w, groups=2)
    with pytest.raises(TypeError, match="dtype float16"):
        F.convolution(x.astype(np.float16), w.astype(np.float16), groups=2)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        F.convolution(x, w, np.ones(5, np.float32), groups=2)
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(2, 6, 4, 4\)"):
        F.convolution_backward(np.ones((2, 6, 4, 5), np.float32), x, w, groups=2)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        F.convolution(torch.ones(2, 4, 6, 6), w, groups=2)


def test_core_im2col_errors():
    x = np.ones((2, 3, 5, 5), np.float32)
    cols = np.empty((2, 27, 9), np.float32)
    _C.im2col(x, cols, [3, 3], [1, 1], [0, 0], [1, 1])
    cols.flags.writeable = False
    with pytest.raises(ValueError, match="output cols is read-only"):
        _C.im2col(x, cols, [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"cols must have shape .* = \(2, 27, 9\), "
                                         r"got \(2, 27, 8\)"):
        _C.im2col(x, np.empty((2, 27, 8), np.float32), [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(TypeError, match="cols has dtype float64 but x has float32"):
        _C.im2col(x, np.empty((2, 27, 9)), [3, 3], [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="one value per spatial dim"):
        _C.col2im(np.empty((2, 27, 9), np.float32), x, [3, 3], [1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match="must have shape \\(B, C, 2 spatial dims\\)"):
        _C.im2col(x[0], np.empty((2, 27, 9), np.float32), [3, 3], [1, 1], [0, 0], [1, 1])


def test_conv_layer_errors():
    layer = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(np.ones((4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d\(4, ...\): input has 3 channels"):
        layer(np.ones((1, 3, 5, 5), np.float32))
    with pytest.raises(TypeError, match="float64 input needs float64 parameters"):
        layer(np.ones((1, 4, 5, 5)))
    with pytest.raises(ValueError, match="in_channels \\(4\\) must be divisible by groups \\(3\\)"):
        nn.Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="kernel_size must be an int >= 1 or 2 of them"):
        nn.Conv2d(4, 6, (3, 3, 3))


def test_threaded_im2col_agrees(dtype):
    """im2col/col2im on several threads (the default is the calling thread) give the same columns
    and the same sums."""
    x = randn((4, 6, 20, 18), 18, dtype)
    w = rng(19).standard_normal((6, 3, 3, 3)).astype(dtype)
    dy = rng(20).standard_normal((4, 6, 10, 9)).astype(dtype)
    before = F.get_between_gemm_threads()
    def run():
        return (F.convolution(x, w, None, 2, 1, 1, 2),) + F.convolution_backward(dy, x, w, 2, 1,
                                                                                 1, 2)

    one = run()
    try:
        F.set_between_gemm_threads(0)
        many = run()
    finally:
        F.set_between_gemm_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)  # each plane belongs to one thread: same order of sums
