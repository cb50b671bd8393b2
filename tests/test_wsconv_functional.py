"""The weight-standardization core op (through normkit.functional and normkit.torch's autograd
function) against float64 torch compositions of each convention, finite differences and
gradcheck; the transposed convolution and padding modes of normkit.functional against torch;
bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import normkit
import normkit.functional as F
from normkit.torch import ws_standardize as torch_ws
from wsconv_reference import ref_standardize

CONVENTIONS = ["elektronn3", "nfnet", "timm"]
# Weight shapes: conv 2-d, 1-d, 3-d, transposed-like, an odd 1x1 and a ragged row (K = 7).
SHAPES = [(6, 4, 3, 3), (5, 3, 5), (4, 2, 3, 3, 3), (3, 7, 2, 2), (9, 5, 1, 1), (5, 7)]
g = np.random.default_rng(1234)


def weight(shape, dtype=np.float64, offset=0.3, scale=0.05):
    return (g.standard_normal(shape) * scale + offset).astype(dtype)


def gain(C, dtype=np.float64):
    return (g.random(C) + 0.5).astype(dtype)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_forward_backward_vs_composition(convention, shape, dtype):
    w, gn = weight(shape), gain(shape[0])
    eps = 1e-4 if convention != "timm" else 1e-6
    w_hat, mean, rstd = F.ws_standardize(w.astype(dtype), gn.astype(dtype), eps, convention)
    wt = torch.tensor(w, requires_grad=True)
    gt = torch.tensor(gn, requires_grad=True)
    ref = ref_standardize(wt, gt, eps, convention)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert w_hat.dtype == dtype and mean.dtype == dtype
    r = ref.detach().numpy()
    np.testing.assert_allclose(w_hat, r, rtol=tol, atol=tol * abs(r).max())
    np.testing.assert_allclose(mean, w.reshape(shape[0], -1).mean(1), rtol=tol, atol=1e-7)
    dy = g.standard_normal(shape)
    dwr, dgr = torch.autograd.grad(ref, (wt, gt), torch.tensor(dy))
    dw, dg = F.ws_standardize_backward(dy.astype(dtype), w.astype(dtype), gn.astype(dtype), mean,
                                       rstd, eps, convention)
    dwr, dgr = dwr.numpy(), dgr.numpy()
    np.testing.assert_allclose(dw, dwr, rtol=tol * 10, atol=tol * 10 * abs(dwr).max())
    np.testing.assert_allclose(dg, dgr, rtol=tol * 10, atol=tol * 10 * abs(dgr).max())
    only_w = F.ws_standardize_backward(dy.astype(dtype), w.astype(dtype), gn.astype(dtype), mean,
                                       rstd, eps, convention, gain_grad=False)
    assert only_w[1] is None
    np.testing.assert_array_equal(only_w[0], dw)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_exact_when_mean_dominates(convention):
    """|mean| = 1e4 std: shifted float64 sums keep the variance (E[x^2] - E[x]^2 would not)."""
    w = weight((4, 3, 3, 3), np.float64, offset=100.0, scale=0.01)
    w_hat, _, _ = F.ws_standardize(w, None, 1e-12, convention)
    ref = ref_standardize(torch.tensor(w), None, 1e-12, convention).numpy()
    np.testing.assert_allclose(w_hat, ref, rtol=1e-7, atol=1e-7 * abs(ref).max())


@pytest.mark.parametrize("convention", ["elektronn3", "nfnet"])
def test_eps_clamp_has_no_variance_gradient(convention):
    """When eps wins the max, d/dvar is zero, as torch's clamp/max gives."""
    w = weight((4, 2, 3), scale=1e-6)
    wt = torch.tensor(w, requires_grad=True)
    gt = torch.tensor(gain(4), requires_grad=True)
    ref = ref_standardize(wt, gt, 1e-3, convention)
    out = torch_ws(wt, gt, 1e-3, convention)
    dy = torch.tensor(g.standard_normal(w.shape))
    # values ~1e-6 around 0.3: the mean subtraction leaves ~1e-10 relative precision
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-13)
    for a, b in zip(torch.autograd.grad(out, (wt, gt), dy), torch.autograd.grad(ref, (wt, gt), dy)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (3, 5), (2, 2, 2, 2, 2)])
def test_gradcheck(convention, shape):
    w = torch.tensor(weight(shape, scale=1.0), requires_grad=True)
    gn = torch.tensor(gain(shape[0]), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: torch_ws(a, b, 1e-4, convention), (w, gn))
    assert torch.autograd.gradcheck(lambda a: torch_ws(a, None, 1e-4, convention), (w,))


def test_numpy_backward_vs_finite_differences():
    w, gn = weight((3, 2, 3, 3), scale=1.0), gain(3)
    dy = g.standard_normal(w.shape)
    _, mean, rstd = F.ws_standardize(w, gn, 1e-4, "nfnet")
    dw, dg = F.ws_standardize_backward(dy, w, gn, mean, rstd, 1e-4, "nfnet")
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 1, 2, 0), (2, 0, 1, 2)]:
        wp, wm = w.copy(), w.copy()
        wp[idx] += h
        wm[idx] -= h
        fd = ((F.ws_standardize(wp, gn, 1e-4, "nfnet")[0] * dy).sum()
              - (F.ws_standardize(wm, gn, 1e-4, "nfnet")[0] * dy).sum()) / (2 * h)
        assert abs(fd - dw[idx]) < 1e-6 * max(1, abs(fd))
    gp = gn.copy()
    gp[1] += h
    fd = ((F.ws_standardize(w, gp, 1e-4, "nfnet")[0] - F.ws_standardize(w, gn, 1e-4, "nfnet")[0])
          * dy).sum() / h
    assert abs(fd - dg[1]) < 1e-5 * max(1, abs(fd))


def test_layouts_and_in_place():
    """A channels-last weight gives the values of the contiguous one; w_hat may be w itself."""
    w = weight((6, 5, 3, 3), np.float32)
    wt = torch.tensor(w)
    cl = wt.contiguous(memory_format=torch.channels_last)
    ref = torch_ws(wt, None, 1e-4, "elektronn3")
    torch.testing.assert_close(torch_ws(cl, None, 1e-4, "elektronn3"), ref, rtol=1e-6,
                               atol=1e-7)
    inplace = wt.clone()
    mean = torch.empty(6)
    rstd = torch.empty(6)
    dl = torch.utils.dlpack.to_dlpack
    normkit._C.ws_standardize_forward(dl(inplace), None, 0, 1e-4, dl(inplace), dl(mean), dl(rstd))
    torch.testing.assert_close(inplace, ref, rtol=1e-6, atol=1e-7)
    # A non-contiguous (sliced) weight is copied by the adapter, not misread.
    big = torch.tensor(weight((6, 10, 3, 3), np.float32))
    torch.testing.assert_close(torch_ws(big[:, ::2], None, 1e-4, "timm"),
                               torch_ws(big[:, ::2].contiguous(), None, 1e-4, "timm"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_long_rows_and_streamed_gradient(dtype):
    """Rows of 9279 values (several float32 lane blocks, a ragged tail, rows not 16-byte aligned)
    and a dw over 4 MiB, which the backward writes with streaming stores; |mean| = 60 std, which
    the shifted float32 sums keep."""
    R = 130 if dtype == np.float32 else 70
    w, gn, dy = weight((R, 1031, 3, 3), offset=3.0), gain(R), g.standard_normal((R, 1031, 3, 3))
    assert w.size * np.dtype(dtype).itemsize >= 4 << 20
    w_hat, mean, rstd = F.ws_standardize(w.astype(dtype), gn.astype(dtype), 1e-4, "nfnet")
    dw, dg = F.ws_standardize_backward(dy.astype(dtype), w.astype(dtype), gn.astype(dtype), mean,
                                       rstd, 1e-4, "nfnet")
    wt, gt = torch.tensor(w, requires_grad=True), torch.tensor(gn, requires_grad=True)
    ref = ref_standardize(wt, gt, 1e-4, "nfnet")
    dwr, dgr = (t.numpy() for t in torch.autograd.grad(ref, (wt, gt), torch.tensor(dy)))
    tol = 1e-11 if dtype == np.float64 else 2e-5
    r = ref.detach().numpy()
    np.testing.assert_allclose(w_hat, r, rtol=tol, atol=tol * abs(r).max())
    np.testing.assert_allclose(dw, dwr, rtol=tol * 10, atol=tol * 10 * abs(dwr).max())
    np.testing.assert_allclose(dg, dgr, rtol=tol * 10, atol=tol * 10 * abs(dgr).max())


_STREAM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, torch
import normkit.functional as F
from wsconv_reference import ref_standardize
g = np.random.default_rng(5)
for dtype, tol in [(np.float32, 2e-5), (np.float64, 1e-12)]:
    for shape in [(7, 5, 3, 3), (5, 33), (3, 2, 2, 2, 2)]:
        for conv in ["elektronn3", "nfnet", "timm"]:
            w = g.standard_normal(shape) * 0.05 + 0.3
            gn, dy = g.random(shape[0]) + 0.5, g.standard_normal(shape)
            w_hat, mean, rstd = F.ws_standardize(w.astype(dtype), gn.astype(dtype), 1e-4, conv)
            dw, dg = F.ws_standardize_backward(dy.astype(dtype), w.astype(dtype),
                                               gn.astype(dtype), mean, rstd, 1e-4, conv)
            wt, gt = torch.tensor(w, requires_grad=True), torch.tensor(gn, requires_grad=True)
            ref = ref_standardize(wt, gt, 1e-4, conv)
            dwr, dgr = torch.autograd.grad(ref, (wt, gt), torch.tensor(dy))
            for got, want, t in [(w_hat, ref.detach(), tol), (dw, dwr, 10 * tol),
                                 (dg, dgr, 10 * tol)]:
                want = want.numpy()
                np.testing.assert_allclose(got, want, rtol=t, atol=t * abs(want).max())
print("checked")
"""


def test_streaming_stores_in_subprocess():
    """w_hat and dw written with streaming stores (below 4 MiB only when forced by the threshold
    NORMKIT_STREAM_MIN_BYTES, read once per process): the values of the plain stores."""
    env = dict(os.environ, NORMKIT_STREAM_MIN_BYTES="256")
    script = _STREAM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checked" in proc.stdout


def test_errors():
    w, gn = weight((4, 3, 3)), gain(4)
    for eps in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            F.ws_standardize(w, gn, eps)
    with pytest.raises(ValueError, match="unknown convention 'bit'"):
        F.ws_standardize(w, gn, 1e-4, "bit")
    with pytest.raises(ValueError, match="unknown convention 7"):
        normkit._C.ws_standardize_forward(w, gn, 7, 1e-4, np.empty_like(w), np.empty(4),
                                          np.empty(4))
    with pytest.raises(ValueError, match="gain must have shape \\(4,\\)"):
        F.ws_standardize(w, gain(3))
    with pytest.raises(TypeError, match="gain must be float64 for float64 w"):
        F.ws_standardize(w, gn.astype(np.float32))
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        F.ws_standardize(weight((4, 1, 1, 1)), gn)
    with pytest.raises(ValueError, match="2 or more dims"):
        F.ws_standardize(weight((4,)), gn)
    with pytest.raises(TypeError, match="float16 is not supported on the CPU"):
        F.ws_standardize(w.astype(np.float16), None)
    with pytest.raises(ValueError, match="w_hat must have w's shape"):
        normkit._C.ws_standardize_forward(w, gn, 0, 1e-4, np.empty((4, 9)), np.empty(4),
                                          np.empty(4))
    # 1x1 weights are fine where the variance is biased
    assert np.isfinite(F.ws_standardize(weight((4, 1, 1)), gn, 1e-4, "timm")[0]).all()


# --- normkit.functional's transposed convolution and padding modes -------------------------------

TRANSPOSE_CASES = [  # (x shape, weight shape, stride, padding, output_padding, groups, dilation)
    ((2, 4, 5, 6), (4, 3, 3, 2), 2, 1, 1, 1, 1),
    ((2, 4, 5, 6), (4, 3, 3, 3), 3, 0, 2, 2, 2),
    ((1, 3, 7), (3, 2, 4), 2, 1, 0, 1, 1),
    ((2, 2, 3, 4, 3), (2, 2, 2, 3, 2), (1, 2, 2), (0, 1, 1), (0, 1, 0), 2, 1),
]


@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=range(len(TRANSPOSE_CASES)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_conv_transpose_vs_torch(case, dtype):
    xs, wsh, s, p, op, grp, d = case
    x = g.standard_normal(xs).astype(dtype)
    w = g.standard_normal(wsh).astype(dtype)
    b = g.standard_normal(wsh[1] * grp).astype(dtype)
    y = F.conv_transpose(x, w, b, s, p, op, grp, d)
    fn = {3: torch.nn.functional.conv_transpose1d, 4: torch.nn.functional.conv_transpose2d,
          5: torch.nn.functional.conv_transpose3d}[len(xs)]
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = fn(xt, wt, bt, s, p, op, grp, d)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=tol, atol=tol)
    dy = g.standard_normal(y.shape).astype(dtype)
    yt.backward(torch.tensor(dy))
    for mine, ref in zip(F.conv_transpose_backward(dy, x, w, s, p, op, grp, d),
                         (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(mine, ref.numpy(), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad_and_its_adjoint_vs_torch(mode):
    x = g.standard_normal((2, 3, 5, 4, 6))
    pads = [(2, 1), (0, 3), (3, 3)]
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.pad(xt, (3, 3, 0, 3, 2, 1),
                                 mode="constant" if mode == "zeros" else mode)
    np.testing.assert_array_equal(F.pad(x, pads, mode), yt.detach().numpy())
    dy = g.standard_normal(yt.shape)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(F.pad_backward(dy, pads, mode), xt.grad.numpy(), rtol=1e-13,
                               atol=1e-13)


def test_conv_transpose_errors():
    x, w = g.standard_normal((1, 4, 5, 5)), g.standard_normal((4, 2, 3, 3))
    with pytest.raises(ValueError, match="output_padding .* must be smaller than the stride"):
        F.conv_transpose(x, w, None, 2, 0, 2)
    with pytest.raises(ValueError, match="x has 4 channels, weight .* groups=3"):
        F.conv_transpose(x, w, None, groups=3)
    with pytest.raises(ValueError, match="requested an output size of \\[13, 12\\]"):
        F.conv_transpose_output_padding((5, 5), (13, 12), (3, 3), (2, 2), (0, 0), (1, 1))
    assert F.conv_transpose_output_padding((5, 5), (1, 4, 12, 11), (3, 3), (2, 2), (0, 0),
                                           (1, 1)) == [1, 0]
    with pytest.raises(ValueError, match="padding_mode=.reflect.: padding \\(5, 5\\)"):
        F.pad(x, [(5, 5), (0, 0)], "reflect")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        F.pad(x, [(1, 1), (1, 1)], "mirror")
