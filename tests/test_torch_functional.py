"""normkit.torch's autograd functions: torch.autograd.gradcheck in float64 for every one, values
and gradients against torch.nn.functional.batch_norm (float16/32/64, every layout torch tensors
can have), the float64 reference of helpers.py for PyTorch-Encoding's functional form,
no_grad/inference_mode, undefined output gradients, and errors."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import normkit
import normkit.torch as nkt
from helpers import (
    assert_close_dtype,
    bc,
    other_layout,
    params,
    randn,
    ref_formula,
    running,
)
from torch_helpers import DEVICES, tensor, to_numpy, torch_layouts


class Solo:
    """A communicator of one process (normkit's protocol): the all-reduce is the identity."""
    rank, size, debug = 0, 1, False

    def allreduce_sum(self, array):
        return array


def _inputs(shape, seed, device, layout="contiguous", dtype=np.float64):
    C = shape[1]
    x = tensor(randn(shape, seed, dtype, offset=0.4), device, layout, requires_grad=True)
    w, b = (tensor(p, device, requires_grad=True) for p in params(C, seed + 1, dtype))
    return x, w, b


# --- gradcheck, float64 ---------------------------------------------------------------------------

GRAD_CASES = [((5, 3), "fortran"), ((3, 4, 5), "channels_last"), ((2, 3, 3, 4), "contiguous"),
              ((2, 3, 3, 4), "channels_last"), ((2, 3, 4, 3), "non_collapsible"),
              ((2, 2, 3, 2, 3), "channels_last")]
GRAD_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in GRAD_CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", GRAD_CASES, ids=GRAD_IDS)
def test_gradcheck_batch_norm_training(shape, layout, device):
    x, w, b = _inputs(shape, 1, device, layout)
    rm, rv = (tensor(r, device) for r in running(shape[1], 2))
    assert gradcheck(lambda x, w, b: nkt.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                     (x, w, b))
    assert gradcheck(lambda x: nkt.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", GRAD_CASES[:4], ids=GRAD_IDS[:4])
def test_gradcheck_batch_norm_eval(shape, layout, device):
    x, w, b = _inputs(shape, 3, device, layout)
    rm, rv = (tensor(r, device) for r in running(shape[1], 4))
    assert gradcheck(lambda x, w, b: nkt.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                     (x, w, b))


def _given(shape, seed, device, layout="contiguous"):
    """x, gamma, beta, mean, std for the given-statistics form (std positive)."""
    x, g, b = _inputs(shape, seed, device, layout)
    m, v = running(shape[1], seed + 5)
    return (x, g, b, tensor(m, device, requires_grad=True),
            tensor(np.sqrt(v + 0.1), device, requires_grad=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((4, 3), "contiguous"), ((3, 4, 5), "contiguous"),
                                          ((3, 4, 5), "channels_last")])
def test_gradcheck_batchnormtrain(shape, layout, device):
    assert gradcheck(nkt.batchnormtrain, _given(shape, 5, device, layout))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((4, 3), "fortran"), ((3, 4, 5), "channels_last")])
def test_gradcheck_batchnormeval(shape, layout, device):
    x, g, b, m, s = _given(shape, 6, device, layout)
    m, s = m.detach(), s.detach()
    assert gradcheck(lambda x, g, b: nkt.batchnormeval(x, g, b, m, s), (x, g, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,layout", [((2, 3, 3, 4), "contiguous"),
                                          ((2, 3, 3, 4), "channels_last"), ((5, 3), "fortran")])
def test_gradcheck_sync_batch_norm_one_rank(shape, layout, device):
    """The split path (stats -> all-reduce -> normalize; reduce -> all-reduce -> elemt) with a
    communicator of one process; several ranks: tests/torch_dist."""
    x, w, b = _inputs(shape, 7, device, layout)
    assert gradcheck(lambda x, w, b: nkt.sync_batch_norm(x, w, b, None, None, 1e-5, 0.1, Solo()),
                     (x, w, b))


# --- values against torch -------------------------------------------------------------------------

VALUE_SHAPES = [(7, 5), (3, 5, 9), (3, 5, 7, 9), (2, 3, 5, 4, 3)]


def _vs_torch(shape, layout, dtype, device, training, affine=True, seed=10):
    """normkit.torch.batch_norm and torch's on the same data: y, dx, dw, db, running stats."""
    C = shape[1]
    pd = np.float64 if dtype == np.float64 else np.float32
    x0 = randn(shape, seed, dtype, offset=0.3)
    dy0 = randn(shape, seed + 1, dtype)
    w0, b0 = params(C, seed + 2, pd)
    rm0, rv0 = running(C, seed + 3, pd)
    out = {}
    for name, fn, lay, dlay in (
            ("nk", nkt.batch_norm, layout, other_layout(layout, len(shape))),
            ("torch", torch.nn.functional.batch_norm, "contiguous", "contiguous")):
        x = tensor(x0, device, lay, requires_grad=True)
        w, b = (tensor(p, device, requires_grad=True) if affine else None for p in (w0, b0))
        rm, rv = tensor(rm0, device), tensor(rv0, device)
        y = fn(x, rm, rv, w, b, training, 0.3, 1e-3)
        y.backward(tensor(dy0, device, dlay))
        out[name] = {"y": y, "dx": x.grad, "rm": rm, "rv": rv,
                     "dw": w.grad if affine else None, "db": b.grad if affine else None}
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", VALUE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_matches_torch_in_every_layout(shape, training, dtype, device):
    dtype = np.dtype(dtype)
    for layout in torch_layouts(len(shape)):
        res = _vs_torch(shape, layout, dtype, device, training)
        for key in ("y", "dx", "dw", "db", "rm", "rv"):
            got, want = res["nk"][key], res["torch"][key]
            assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
            # float16 output rounds to 2^-11; the reference computes in float32 and rounds too.
            assert_close_dtype(to_numpy(got), to_numpy(want),
                               dtype if key in ("y", "dx") else np.float32 if dtype == np.float16
                               else dtype, f"{layout} {key}")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_without_affine_matches_torch(device):
    res = _vs_torch((4, 3, 5, 6), "channels_last", np.dtype(np.float64), device, True,
                    affine=False)
    for key in ("y", "dx", "rm", "rv"):
        assert_close_dtype(to_numpy(res["nk"][key]), to_numpy(res["torch"][key]), np.float64, key)


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_the_memory_format(device):
    for shape, fmt in (((3, 5, 4, 6), torch.channels_last), ((2, 3, 4, 5, 3),
                                                              torch.channels_last_3d)):
        x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_()
        y = nkt.batch_norm(x, None, None, training=True)
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
        y.backward(torch.randn(shape, device=device))
        assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_and_mixed_layout_gradients(device):
    """A gradient that arrives expanded (stride 0, from a sum) or in another layout than x."""
    x0 = randn((3, 4, 5, 6), 20, np.float64, offset=0.5)
    w0, b0 = params(4, 21)
    grads = []
    for fn, fmt in ((nkt.batch_norm, torch.channels_last), (torch.nn.functional.batch_norm,
                                                              torch.contiguous_format)):
        x = tensor(x0, device).contiguous(memory_format=fmt).requires_grad_()
        w, b = tensor(w0, device, requires_grad=True), tensor(b0, device, requires_grad=True)
        y = fn(x, None, None, w, b, True, 0.1, 1e-5)
        (y.sum() + (y * y).permute(0, 2, 3, 1).sum()).backward()
        grads.append([x.grad, w.grad, b.grad])
    # dx (~2e-5) is what is left of O(1) terms of dy = 1 + 2y: float64 carries it to ~1e-10 of its
    # scale in any summation order (normkit and torch are each 1.9e-15 off a long-double
    # reference, so they may differ by twice the usual tolerance).
    for got, want, name, factor in zip(*grads, ("dx", "dw", "db"), (4, 1, 1)):
        assert_close_dtype(to_numpy(got), to_numpy(want), np.float64, name, factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", ["batchnormtrain", "batchnormeval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_given_statistics_form_matches_reference(fn, dtype, device):
    """y = (x - mean) / std * gamma + beta against the float64 formula; gradients of the sum
    of y * dy by the closed forms (train: all five inputs; eval: x, gamma, beta only)."""
    dtype = np.dtype(dtype)
    shape = (6, 4, 7)
    x0, dy0 = randn(shape, 30, dtype, offset=0.2), randn(shape, 31, dtype)
    g0, b0 = params(4, 32, dtype)
    m0, v0 = running(4, 33, dtype)
    s0 = np.sqrt(v0 + 0.1).astype(dtype)
    args = [tensor(a, device, lay, requires_grad=True)
            for a, lay in ((x0, "channels_last"), (g0, "contiguous"), (b0, "contiguous"),
                           (m0, "contiguous"), (s0, "contiguous"))]
    y = getattr(nkt, fn)(*args)
    assert_close_dtype(to_numpy(y), ref_formula(x0, g0, b0, m0, s0), dtype, "y")
    y.backward(tensor(dy0, device))
    dx, dg, db, dm, ds = (a.grad for a in args)
    x, dy = x0.astype(np.float64), dy0.astype(np.float64)
    xhat = (x - bc(m0, 3)) / bc(s0, 3)
    assert_close_dtype(to_numpy(dx), dy * bc(g0 / s0, 3), dtype, "dx")
    assert_close_dtype(to_numpy(dg), (dy * xhat).sum((0, 2)), dtype, "dgamma")
    assert_close_dtype(to_numpy(db), dy.sum((0, 2)), dtype, "dbeta")
    if fn == "batchnormtrain":
        assert_close_dtype(to_numpy(dm), -(g0 / s0) * dy.sum((0, 2)), dtype, "dmean")
        assert_close_dtype(to_numpy(ds), -(g0 / s0) * (dy * xhat).sum((0, 2)), dtype, "dstd")
    else:
        assert dm is None and ds is None


# --- autograd modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_runs_without_a_graph_and_updates_running_stats(mode):
    x, w, b = _inputs((4, 3, 5, 5), 40, "cpu", dtype=np.float32)
    rm, rv = (torch.from_numpy(r) for r in running(3, 41, np.float32))
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with mode():
        y = nkt.batch_norm(x, rm, rv, w, b, True, 0.2, 1e-5)
    y_ref = torch.nn.functional.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.2, 1e-5)
    assert y.grad_fn is None and not y.requires_grad
    assert y_ref.grad_fn is not None  # the same call with grad enabled builds a graph
    for got, want in ((y, y_ref), (rm, rm_ref), (rv, rv_ref)):
        assert_close_dtype(to_numpy(got), to_numpy(want), np.float32)


class _DropGrad(torch.autograd.Function):
    """Identity whose backward sends an undefined gradient upstream."""

    @staticmethod
    def forward(ctx, y):
        ctx.set_materialize_grads(False)
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return None


def test_undefined_output_gradient_allocates_nothing():
    """With set_materialize_grads(False) the backward receives None and returns None: weight and
    bias get no gradient tensor at all (torch's own batch norm writes zeros)."""
    x, w, b = _inputs((4, 3, 5), 50, "cpu")
    other = torch.from_numpy(randn((4, 3, 5), 51))
    y = nkt.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    (_DropGrad.apply(y).sum() + (x * other).sum()).backward()
    assert w.grad is None and b.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), other.numpy())
    g, beta, m, s = (t.detach().requires_grad_() for t in _given((4, 3, 5), 52, "cpu")[1:])
    y = nkt.batchnormtrain(x.detach(), g, beta, m, s)
    _DropGrad.apply(y).sum().backward()
    assert all(t.grad is None for t in (g, beta, m, s))


def test_backward_is_once_differentiable():
    x, w, b = _inputs((4, 3, 5), 55, "cpu")
    y = nkt.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        dx.sum().backward()


# --- errors ---------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    x = torch.randn(4, 3, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"\(N, C, \.\.\.\).*1D"):
        nkt.batch_norm(torch.randn(5), rm, rv, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nkt.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="eval mode.*running_mean"):
        nkt.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\).*got \(1,\)"):
        nkt.batch_norm(x, rm, torch.ones(1), training=True)
    with pytest.raises(TypeError, match="running_mean must be torch.float64"):
        nkt.batch_norm(x.double(), rm, rv.double(), training=True)
    with pytest.raises(TypeError, match="weight must be float64 for float64 input, got float32"):
        nkt.batch_norm(x.double(), None, None, torch.ones(3), None, training=True)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        nkt.batch_norm(x, None, None, torch.ones(4), None, training=True)
    with pytest.raises(TypeError, match="normkit takes float16.*float32 and float64"):
        nkt.batch_norm(torch.arange(60).reshape(4, 3, 5), None, None, training=True)
    with pytest.raises(TypeError, match="batchnormtrain: std must be float32 for float32 input"):
        nkt.batchnormtrain(x, torch.ones(3), torch.zeros(3), rm, rv.double())
    with pytest.raises(TypeError, match="gamma must be a tensor"):
        nkt.batchnormtrain(x, None, torch.zeros(3), rm, rv)
    # The capsule path of the core: a capsule some consumer already used is refused by name.
    capsule = torch.utils.dlpack.to_dlpack(torch.ones(3))
    torch.utils.dlpack.from_dlpack(capsule)
    with pytest.raises(ValueError, match="mean is a capsule but not an unconsumed DLPack"):
        normkit._C.batch_norm_stats(torch.utils.dlpack.to_dlpack(x), capsule,
                                    torch.utils.dlpack.to_dlpack(torch.empty(3)))


def test_float16_input_takes_float32_parameters():
    x = tensor(randn((6, 4, 5), 60, np.float16, offset=0.5), requires_grad=True)
    w, b = (tensor(p, requires_grad=True) for p in params(4, 61, np.float32))
    y = nkt.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    y_ref = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert y.dtype == torch.float16
    assert_close_dtype(to_numpy(y), to_numpy(y_ref), np.float16)
    y.backward(torch.ones_like(y) * 0.5)
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float16



def test_training_refuses_a_negated_view_as_running_stats():
    """The kernel writes the running statistics in place: a lazily negated view has no storage of
    its values to write, so it is a clear TypeError (a resolved copy would take the update)."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    running_mean = torch._neg_view(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="negated or conjugate view"):
        nkt.batch_norm(x, running_mean, torch.ones(3, dtype=torch.float64), training=True)
