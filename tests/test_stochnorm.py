"""StochNorm1d/2d/3d in normkit.nn and normkit.torch against a float64 NumPy reference that uses
the same channel draw, batch norm at p = 0 / p = 1, torch compositions, gradcheck,
convert_stochnorm, seeding and errors; the masked fused batch-norm ops that run one process's
StochNorm against the reference, the split ops and batch norm, in every layout and dtype."""
import copy

import numpy as np
import pytest
import torch

import normkit
import normkit.functional as F
import normkit.nn as nkn
import normkit.torch as nkt
from helpers import (TOL, assert_close, assert_close_dtype, axes, bc, count, layouts_for,
                     make_layout, params, randn, running)
from torch_helpers import tensor, to_numpy

# (3, 5, 33, 32): rows of 1056 values, long enough for the fused planar kernels (each channel
# normalized right after it is reduced); the other shapes take the two-pass kernels.
SHAPES = {1: [(7, 5), (6, 5, 9)], 2: [(5, 6, 7, 3), (3, 5, 33, 32)], 3: [(3, 4, 3, 5, 2)]}
LAYOUTS = ["contiguous", "channels_last"]


def ref_stochnorm(x, dy, w, b, rm, rv, s, momentum, eps):
    """float64 StochNorm for a given draw s: (y, dx, dw, db, new_rm, new_rv)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    nd, n = x.ndim, count(x)
    mean = x.mean(axis=axes(x))
    var = ((x - bc(mean, nd)) ** 2).mean(axis=axes(x))
    m_sel = np.where(s, mean, rm)
    inv = 1.0 / np.sqrt(np.where(s, var, rv) + eps)
    xhat = (x - bc(m_sel, nd)) * bc(inv, nd)
    y = xhat * bc(w, nd) + bc(b, nd)
    g = dy * bc(w, nd)
    # s = 1: the gradient through the batch statistics; s = 0: through constants
    through = bc(s.astype(np.float64), nd)
    dx = bc(inv, nd) * (g - through * (g.mean(axis=axes(x), keepdims=True)
                                       + xhat * (g * xhat).mean(axis=axes(x), keepdims=True)))
    dw = (dy * xhat).sum(axis=axes(x))
    db = dy.sum(axis=axes(x))
    new_rm = (1 - momentum) * rm + momentum * mean
    new_rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    return y, dx, dw, db, new_rm, new_rv


def nn_layer(dim, C, p, dtype, seed=0, momentum=0.1):
    layer = getattr(nkn, f"StochNorm{dim}d")(C, momentum=momentum, p=p, dtype=dtype,
                                             generator=np.random.default_rng(seed))
    w, b = params(C, 3, dtype)
    rm, rv = running(C, 4, dtype)
    layer.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                           "num_batches_tracked": np.array(0)})
    return layer


def nn_draws(seed, C, steps, p):
    g = np.random.default_rng(seed)
    g.random(C)  # the U(0, 1) weight initialization
    return [g.random(C) < p for _ in range(steps)]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nn_matches_reference_over_three_steps(dim, p, layout, dtype):
    for shape in SHAPES[dim]:
        if layout == "channels_last" and len(shape) == 2:
            continue
        C = shape[1]
        layer = nn_layer(dim, C, p, dtype, seed=11)
        w, b = params(C, 3, np.float64)
        rm, rv = running(C, 4, np.float64)
        for step, s in enumerate(nn_draws(11, C, 3, p)):
            x = make_layout(randn(shape, 20 + step, dtype), layout)
            dy = make_layout(randn(shape, 30 + step, dtype), layout)
            y = layer(x)
            dx = layer.backward(dy)
            ry, rdx, rdw, rdb, rm, rv = ref_stochnorm(x, dy, w, b, rm, rv, s, 0.1, 1e-5)
            msg = f"step {step} s={s.astype(int)}"
            assert y.dtype == dtype and dx.dtype == dtype
            assert_close_dtype(y, ry, dtype, msg)
            assert_close_dtype(dx, rdx, dtype, msg, factor=10)
            assert_close_dtype(layer.running_mean, rm, dtype, msg)
            assert_close_dtype(layer.running_var, rv, dtype, msg)
            assert_close_dtype(layer.weight.grad, rdw, dtype, msg, factor=10)
            assert_close_dtype(layer.bias.grad, rdb, dtype, msg, factor=10)
            layer.zero_grad()
        assert int(layer.num_batches_tracked) == 3


def test_nn_p1_and_p0_equal_batch_norm(dtype):
    shape = (6, 5, 4, 3)
    x, dy = randn(shape, 1, dtype), randn(shape, 2, dtype)
    for p, bn_mode in ((1.0, "train"), (0.0, "eval")):
        sn = nn_layer(2, 5, p, dtype)
        bn = nkn.BatchNorm2d(5, dtype=dtype)
        bn.load_state_dict(copy.deepcopy(sn.state_dict()))
        bn_ref = nkn.BatchNorm2d(5, dtype=dtype)  # for the running statistics in eval mode
        bn_ref.load_state_dict(copy.deepcopy(sn.state_dict()))
        if bn_mode == "eval":
            bn.eval()
        y, dx = sn(x), sn.backward(dy)
        np.testing.assert_allclose(y, bn(x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx, bn.backward(dy), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
        bn_ref(x)  # a training call updates the running statistics as StochNorm does
        np.testing.assert_allclose(sn.running_var, bn_ref.running_var, rtol=1e-6)


def test_nn_eval_and_untracked():
    x = randn((6, 5, 4), 1)
    sn = nn_layer(1, 5, 0.5, np.float64)
    sn.eval()
    rm, rv = sn.running_mean.copy(), sn.running_var.copy()
    w, b = sn.weight.data, sn.bias.data
    ref = (x - bc(rm, 3)) / np.sqrt(bc(rv, 3) + 1e-5) * bc(w, 3) + bc(b, 3)
    assert_close(sn(x), ref, 1e-12, 1e-12)
    untracked = nkn.StochNorm1d(5, track_running_stats=False, dtype=np.float64)
    untracked.eval()
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    assert_close(untracked(x), (x - bc(mean, 3)) / np.sqrt(bc(var, 3) + 1e-5)
                 * bc(untracked.weight.data, 3), 1e-12, 1e-12)


def test_nn_momentum_none_is_cumulative_average():
    sn = nkn.StochNorm2d(3, momentum=None, p=0.5, dtype=np.float64,
                         generator=np.random.default_rng(0))
    xs = [randn((4, 3, 3, 3), k) for k in range(3)]
    for x in xs:
        sn(x)
    means = np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0)
    assert_close(sn.running_mean, means, 1e-12, 1e-12)


def test_nn_fd_gradient_intermediate_p():
    """Finite differences of sum(y * dy) through the whole layer for a fixed draw."""
    shape = (4, 5, 3)
    x, dy = randn(shape, 5), randn(shape, 6)
    sn = nn_layer(1, 5, 0.5, np.float64, seed=2, momentum=0.0)
    s = nn_draws(2, 5, 1, 0.5)[0]
    assert 0 < s.sum() < 5  # both kinds of channel

    def loss():
        g = np.random.default_rng(2)
        g.random(5)
        sn.generator = g
        out = float((sn(x) * dy).sum())
        sn._saved = sn._mask = None
        return out

    from helpers import fd_grad
    fd = fd_grad(loss, x)
    sn.generator = np.random.default_rng(2)
    sn.generator.random(5)
    sn(x)
    assert_close(sn.backward(dy), fd, 1e-6, 1e-7)


def test_manual_seed_reproduces_nn_draws():
    x = randn((6, 8, 5), 1, np.float32)
    outs = []
    for _ in range(2):
        normkit.manual_seed(123)
        sn = nkn.StochNorm1d(8)
        outs.append(np.concatenate([sn(x), sn(x)]))
    np.testing.assert_array_equal(outs[0], outs[1])
    normkit.manual_seed(124)
    assert not np.array_equal(nkn.StochNorm1d(8)(x), outs[0][:6])


def test_nn_float16_in_float16_out():
    x = randn((6, 4, 5, 3), 1, np.float16)
    sn = nkn.StochNorm2d(4, generator=np.random.default_rng(0))
    y = sn(x)
    dx = sn.backward(randn(x.shape, 2, np.float16))
    assert y.dtype == np.float16 and dx.dtype == np.float16
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


def test_convert_stochnorm_nn():
    bn = nkn.BatchNorm2d(4, momentum=0.3, eps=1e-3)
    bn.load_state_dict({k: np.asarray(v) for k, v in
                        {"weight": np.arange(1.0, 5.0), "bias": np.arange(4.0),
                         "running_mean": np.full(4, 0.5), "running_var": np.full(4, 2.0),
                         "num_batches_tracked": np.array(7)}.items()})
    bn.eval()
    net = nkn.Sequential(bn)
    net = nkn.convert_stochnorm(net, p=0.0)
    sn = net[0]
    assert type(sn) is nkn.StochNorm2d and sn.p == 0.0 and not sn.training
    assert sn.eps == 1e-3 and sn.momentum == 0.3 and int(sn.num_batches_tracked) == 7
    np.testing.assert_array_equal(sn.weight.data, bn.weight.data)
    assert sn.weight.data is not bn.weight.data and sn.running_mean is not bn.running_mean
    with pytest.raises(ValueError, match="p must be"):
        nkn.convert_stochnorm(nkn.BatchNorm1d(3), p=1.5)


# --- normkit.torch -------------------------------------------------------------------------------

def torch_layer(dim, C, p, dtype=torch.float64, seed=0, momentum=0.1):
    layer = getattr(nkt, f"StochNorm{dim}d")(C, momentum=momentum, p=p, dtype=dtype,
                                             generator=torch.Generator().manual_seed(seed))
    w, b = params(C, 3)
    rm, rv = running(C, 4)
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in
                           (("weight", w), ("bias", b), ("running_mean", rm),
                            ("running_var", rv))})  # tllib's keys: no num_batches_tracked
    return layer


def torch_draws(seed, C, steps, p, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.empty(C, dtype=dtype).uniform_(generator=g)  # the U(0, 1) weight initialization
    return [(torch.rand(C, generator=g) < p).numpy() for _ in range(steps)]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tdtype", [torch.float32, torch.float64])
def test_torch_matches_reference(dim, p, layout, tdtype):
    npd = np.float32 if tdtype == torch.float32 else np.float64
    for shape in SHAPES[dim]:
        if layout == "channels_last" and len(shape) == 2:
            continue
        C = shape[1]
        layer = torch_layer(dim, C, p, tdtype, seed=5)
        w, b = params(C, 3)
        rm, rv = running(C, 4)
        for step, s in enumerate(torch_draws(5, C, 3, p, tdtype)):
            x = tensor(randn(shape, 40 + step, npd), layout=layout, requires_grad=True)
            dy = randn(shape, 50 + step, npd)
            y = layer(x)
            y.backward(torch.from_numpy(dy))
            ry, rdx, rdw, rdb, rm, rv = ref_stochnorm(x.detach().numpy(), dy, w, b, rm, rv, s,
                                                      0.1, 1e-5)
            assert y.dtype == tdtype
            if layout == "channels_last" and x.dim() == 4:
                assert y.is_contiguous(memory_format=torch.channels_last)
            assert_close_dtype(to_numpy(y), ry, npd)
            assert_close_dtype(to_numpy(x.grad), rdx, npd, factor=10)
            assert_close_dtype(to_numpy(layer.weight.grad), rdw, npd, factor=10)
            assert_close_dtype(to_numpy(layer.bias.grad), rdb, npd, factor=10)
            assert_close_dtype(to_numpy(layer.running_mean), rm, npd)
            assert_close_dtype(to_numpy(layer.running_var), rv, npd)
            w = w - 0.0  # parameters are unchanged (no optimizer step)
            layer.zero_grad()


def tllib_formula(x, bn_train, bn_eval, s):
    """tllib's StochNorm forward as torch ops: two batch norms and a per-channel blend."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = s.reshape(shape).to(x.dtype)
    return bn_eval(x) * (1 - s) + bn_train(x) * s


def test_torch_matches_tllib_formula_forward():
    C = 6
    x = torch.from_numpy(randn((5, C, 4, 4), 1))
    layer = torch_layer(2, C, 0.5, seed=9)
    bn_eval = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    bn_eval.load_state_dict(layer.state_dict())
    bn_eval.eval()
    bn_train = copy.deepcopy(bn_eval).train()
    s = torch.from_numpy(torch_draws(9, C, 1, 0.5)[0])
    want = tllib_formula(x, bn_train, bn_eval, s)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, bn_train.running_var)


def test_torch_gradcheck_stoch_norm():
    C = 4
    x = torch.from_numpy(randn((3, C, 5), 1)).requires_grad_()
    w = torch.from_numpy(params(C, 2)[0]).requires_grad_()
    b = torch.from_numpy(params(C, 2)[1]).requires_grad_()
    rm, rv = (torch.from_numpy(a) for a in running(C, 3))
    s = torch.tensor([True, False, True, False])

    def f(x, w, b):
        return nkt.stoch_norm(x, rm, rv, w, b, s, momentum=0.0)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_torch_untracked_eval_and_dtypes():
    x = torch.from_numpy(randn((6, 4, 3, 3), 1, np.float32))
    sn = nkt.StochNorm2d(4, track_running_stats=False)
    ref = torch.nn.functional.batch_norm(x, None, None, sn.weight, sn.bias, True)
    torch.testing.assert_close(sn(x), ref)
    sn.eval()
    torch.testing.assert_close(sn(x), ref)
    layer = nkt.StochNorm2d(4)
    xh = x.half().requires_grad_()
    y = layer(xh)
    y.sum().backward()
    assert y.dtype == torch.float16 and xh.grad.dtype == torch.float16
    assert torch.isfinite(y.float()).all() and torch.isfinite(xh.grad.float()).all()
    # bfloat16 in and out, float32 statistics (the batch-norm kernels' CPU bfloat16 path)
    layer.eval()
    xb = x.bfloat16()
    yb = layer(xb)
    ref = torch.nn.functional.batch_norm(xb.float(), layer.running_mean, layer.running_var,
                                         layer.weight, layer.bias, False)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, atol=2e-2, rtol=1e-2)
    assert (sn.weight >= 0).all() and (sn.weight < 1).all() and sn.weight.std() > 0


def test_torch_default_generator_reproduces():
    x = torch.from_numpy(randn((6, 8, 3), 1, np.float32))
    torch.manual_seed(7)
    a = nkt.StochNorm1d(8)(x)
    torch.manual_seed(7)
    b = nkt.StochNorm1d(8)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_3d_trains_and_tllib_state_dict_loads():
    layer = nkt.StochNorm3d(3, p=0.5)
    sd = {k: v for k, v in torch.nn.BatchNorm3d(3).state_dict().items()
          if k != "num_batches_tracked"}
    layer.load_state_dict(sd)
    assert int(layer.num_batches_tracked) == 0
    x = torch.randn(2, 3, 3, 4, 2, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and int(layer.num_batches_tracked) == 1


def test_torch_convert_stochnorm_copies_everything():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4, eps=1e-3)),
                                nkt.BatchNorm3d(2, affine=False))
    model[1].weight.data.uniform_()
    model[1].running_mean.uniform_()
    model[1].num_batches_tracked.fill_(5)
    originals = copy.deepcopy(model)
    for p in (0.0, 0.3, 1.0):
        conv = nkt.stochnorm.convert_model(copy.deepcopy(originals), p=p)
        for name, kind in (("1", nkt.StochNorm2d), ("2.0", nkt.StochNorm1d),
                           ("3", nkt.StochNorm3d)):
            m, src = conv.get_submodule(name), originals.get_submodule(name)
            assert type(m) is kind and m.p == p
            assert (m.eps, m.momentum, m.affine) == (src.eps, src.momentum, src.affine)
            for key, v in src.state_dict().items():
                torch.testing.assert_close(m.state_dict()[key], v)
    old = model[1]
    conv = nkt.convert_stochnorm(model)
    conv[1].running_mean.add_(1.0)  # a copy: the converted-from layer keeps its statistics
    torch.testing.assert_close(old.running_mean, originals[1].running_mean)
    assert conv[1].weight.data_ptr() != old.weight.data_ptr()


@pytest.mark.parametrize("make", [
    lambda: nkt.StochNorm2d(3, p=1.5), lambda: nkt.StochNorm2d(3, p=-0.1),
    lambda: nkn.StochNorm2d(3, p=2.0), lambda: nkt.convert_stochnorm(torch.nn.BatchNorm2d(2), -1),
])
def test_bad_p(make):
    with pytest.raises(ValueError, match="p must be"):
        make()


def test_errors():
    with pytest.raises(ValueError, match="expected 4D"):
        nkt.StochNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 4D"):
        nkn.StochNorm2d(3)(np.zeros((2, 3, 4), np.float32) + 0.5)
    with pytest.raises(TypeError, match="generator"):
        nkt.StochNorm1d(3, generator=np.random.default_rng(0))
    with pytest.raises(TypeError, match="generator"):
        nkn.StochNorm1d(3, generator=torch.Generator())
    with pytest.raises(TypeError, match="parameters"):
        nkt.StochNorm1d(3)(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value"):
        nkt.StochNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="s must be"):
        nkt.stoch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), None, None,
                       torch.ones(3))


def test_comm_of_the_wrong_kind():
    for make in (lambda: nkt.StochNorm2d(3, comm=object()), lambda: nkn.StochNorm2d(3, comm=1),
                 lambda: nkt.MixStyle(comm=object()), lambda: nkn.MixStyle(comm="world")):
        with pytest.raises(TypeError, match="comm must be a normkit communicator"):
            make()


def test_bias_false_carried_by_convert():
    sn = nkt.convert_stochnorm(torch.nn.BatchNorm2d(4, bias=False), p=1.0)
    assert sn.bias is None and sn.weight is not None
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    sn(x).sum().backward()
    bn = nkn.BatchNorm1d(3, bias=False)
    snn = nkn.convert_stochnorm(bn, p=1.0)
    assert snn.bias is None
    x = randn((5, 3), 1, np.float32)
    np.testing.assert_allclose(snn(x), bn(x), rtol=1e-6, atol=1e-6)


# --- the masked fused batch-norm ops (one process's StochNorm) ------------------------------------

# Fused planar kernels: (3, 5, 33, 32) for float32/float64 rows, (2, 3, 48, 45) for 2-byte ones
# too, (4, 5, 64, 64) on two threads (each owning whole channels); the rest two-pass kernels.
MASKED_SHAPES = [(7, 5), (6, 5, 9), (5, 7, 3, 3), (3, 5, 33, 32), (2, 3, 48, 45), (4, 5, 64, 64),
                 (2, 3, 5, 4, 3)]
CHOICES = ["mixed", "p0", "p1"]


def choice(C, kind):
    """s: batch statistics on channels 0, 2, 4, ... ("mixed"), on none ("p0") or on all ("p1")."""
    return {"mixed": np.arange(C) % 2 == 0, "p0": np.zeros(C, bool), "p1": np.ones(C, bool)}[kind]


def split_stochnorm(x, dy, w, b, rm, rv, s, eps):
    """The same step through the split ops (the synchronized layers' passes), in x's dtype:
    (y, dx, dw, db, used mean, used invstd)."""
    mean, var = F.batch_norm_stats(x)
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(mean.dtype)
    sel_mean = np.where(s, mean, rm)
    run_invstd = (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(mean.dtype)
    sel_invstd = np.where(s, invstd, run_invstd)
    y = F.batch_norm_normalize(x, sel_mean, sel_invstd, w, b)
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, sel_mean)
    keep = s.astype(mean.dtype)
    dx = F.batch_norm_backward_elemt(dy, x, sel_mean, sel_invstd, w, sum_dy * keep,
                                     sum_dy_xmu * keep, count=count(x))
    return y, dx, sum_dy_xmu * sel_invstd, sum_dy, sel_mean, sel_invstd


@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
@pytest.mark.parametrize("kind", CHOICES)
@pytest.mark.parametrize("xdtype", [np.float16, np.float32, np.float64],
                         ids=["f16", "f32", "f64"])
def test_masked_ops_match_reference_and_split_ops(shape, kind, xdtype):
    C = shape[1]
    pd = np.float64 if xdtype == np.float64 else np.float32
    s = choice(C, kind)
    w, b = params(C, 3, pd)
    rm, rv = running(C, 4, pd)
    for layout in layouts_for(len(shape)):
        x = make_layout(randn(shape, 1, xdtype, offset=0.5), layout)
        dy = make_layout(randn(shape, 2, xdtype), layout)
        msg = f"{layout} s={s.astype(int)}"
        ry, rdx, rdw, rdb, rrm, rrv = ref_stochnorm(x, dy, w, b, rm, rv, s, 0.1, 1e-5)
        rm_k, rv_k = rm.copy(), rv.copy()
        y, mean, invstd = F.batch_norm_forward_masked(x, s, rm_k, rv_k, w, b, 0.1, 1e-5)
        dx, dw, db = F.batch_norm_backward_masked(dy, x, mean, invstd, s, w)
        assert y.dtype == xdtype and dx.dtype == xdtype and mean.dtype == pd
        assert y.strides == x.strides or layout not in ("contiguous", "channels_last")
        assert_close_dtype(y, ry, xdtype, msg)
        assert_close_dtype(dx, rdx, xdtype, msg, factor=10)
        assert_close_dtype(dw, rdw, xdtype, msg, factor=10)
        assert_close_dtype(db, rdb, xdtype, msg, factor=10)
        # every channel's batch statistics reach the running ones, whatever it normalized with
        assert_close_dtype(rm_k, rrm, pd, msg)
        assert_close_dtype(rv_k, rrv, pd, msg)
        # the split ops (the synchronized path) compute the same step in other passes
        sy, sdx, sdw, sdb, smean, sinvstd = split_stochnorm(x, dy, w, b, rm, rv, s, 1e-5)
        assert_close_dtype(mean, smean, pd, msg)
        assert_close_dtype(invstd, sinvstd, pd, msg)
        assert_close_dtype(y, sy, xdtype, msg)
        assert_close_dtype(dx, sdx, xdtype, msg)
        assert_close_dtype(dw, sdw, xdtype, msg)
        assert_close_dtype(db, sdb, xdtype, msg)


@pytest.mark.parametrize("shape", [(6, 5, 9), (3, 5, 33, 32)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_ops_at_p1_and_p0_are_batch_norm(shape, layout, dtype):
    """All channels on batch statistics: batch norm's fused training ops, bit for bit (the same
    kernels). None: batch norm in eval with the running statistics."""
    C = shape[1]
    x = make_layout(randn(shape, 5, dtype, offset=-0.7), layout)
    dy = make_layout(randn(shape, 6, dtype), layout)
    w, b = params(C, 7, dtype)
    rm, rv = running(C, 8, dtype)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, mean, invstd = F.batch_norm_forward_masked(x, np.ones(C, bool), rm1, rv1, w, b, 0.2)
    dx, dw, db = F.batch_norm_backward_masked(dy, x, mean, invstd, np.ones(C, bool), w)
    by, bmean, binvstd = F.batch_norm_forward(x, w, b, rm2, rv2, True, 0.2)
    bdx, bdw, bdb = F.batch_norm_backward(dy, x, bmean, binvstd, w)
    for got, want in ((y, by), (mean, bmean), (invstd, binvstd), (rm1, rm2), (rv1, rv2),
                      (dx, bdx), (dw, bdw), (db, bdb)):
        np.testing.assert_array_equal(got, want)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = F.batch_norm_forward_masked(x, np.zeros(C, bool), rm0, rv0, w, b, 0.2)
    dx, dw, db = F.batch_norm_backward_masked(dy, x, mean, invstd, np.zeros(C, bool), w)
    ey, emean, einvstd = F.batch_norm_forward(x, w, b, rm, rv, False)
    edx, edw, edb = F.batch_norm_backward(dy, x, emean, einvstd, w, training=False)
    tight = TOL[np.dtype(dtype)][0] / 10
    for got, want in ((y, ey), (mean, emean), (invstd, einvstd), (dx, edx), (dw, edw),
                      (db, edb)):
        assert_close(got, want, tight, tight)
    np.testing.assert_array_equal(rm0, rm1)  # the same running update either way
    np.testing.assert_array_equal(rv0, rv1)


def test_masked_ops_optional_outputs_and_affine_false():
    x, dy = randn((4, 5, 6), 1, offset=0.3), randn((4, 5, 6), 2)
    rm, rv = running(5, 3)
    s = choice(5, "mixed")
    y, mean, invstd = F.batch_norm_forward_masked(x, s, rm.copy(), rv.copy(), None, None)
    ry, rdx, _, _, _, _ = ref_stochnorm(x, dy, np.ones(5), np.zeros(5), rm, rv, s, 0.1, 1e-5)
    assert_close(y, ry, 1e-12, 1e-12)
    dx, dw, db = F.batch_norm_backward_masked(dy, x, mean, invstd, s)
    assert dw is None and db is None
    assert_close(dx, rdx, 1e-11, 1e-11)
    w = params(5, 4)[0]
    dx, dw, db = F.batch_norm_backward_masked(dy, x, mean, invstd, s, w, input_grad=False)
    assert dx is None and dw is not None and db is not None


def test_masked_ops_errors():
    x = randn((4, 3, 5), 1, np.float32)
    rm, rv = running(3, 2, np.float32)
    with pytest.raises(ValueError, match="use_batch must have shape"):
        F.batch_norm_forward_masked(x, np.ones(4, bool), rm, rv)
    with pytest.raises(ValueError, match="running_var is required"):
        F.batch_norm_forward_masked(x, np.ones(3, bool), rm, None)
    with pytest.raises(TypeError, match="running_mean must be float32"):
        F.batch_norm_forward_masked(x, np.ones(3, bool), rm.astype(np.float64), rv)
    with pytest.raises(ValueError, match="more than 1 value"):
        F.batch_norm_forward_masked(x[:1, :, :1], np.ones(3, bool), rm, rv)
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm_forward_masked(x, np.ones(3, bool), rm, rv, eps=0.0)
    with pytest.raises(TypeError, match="use_batch must be float32"):  # the core's own check
        normkit._C.batch_norm_backward_train_masked(
            x, x, rm, rv, None, np.ones(3, np.float64), None, np.empty(3, np.float32),
            np.empty(3, np.float32))
    with pytest.raises(ValueError, match="use_batch must have shape"):
        F.batch_norm_backward_masked(x, x, rm, rv, np.ones((3, 1), bool))


TORCH_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5,
             torch.float64: 1e-10}


@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (2, 3, 48, 45)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", CHOICES)
@pytest.mark.parametrize("tdtype", list(TORCH_TOL), ids=str)
def test_torch_masked_op_every_dtype(shape, layout, kind, tdtype):
    """torch.ops.normkit.batch_norm_train_masked and its registered backward against the float64
    reference on the same (rounded) input; float16/bfloat16 in and out, float32 statistics."""
    C = shape[1]
    pd = torch.float64 if tdtype == torch.float64 else torch.float32
    s = choice(C, kind)
    w, b = params(C, 3)
    rm, rv = running(C, 4)
    x = tensor(randn(shape, 11, offset=0.5), layout=layout).to(tdtype).requires_grad_()
    dy = tensor(randn(shape, 12), layout=layout).to(tdtype)
    tw, tb = (torch.tensor(a, dtype=pd, requires_grad=True) for a in (w, b))
    y, mean, var, used_mean, used_invstd = torch.ops.normkit.batch_norm_train_masked(
        x, tw, tb, torch.tensor(s, dtype=pd), torch.tensor(rm, dtype=pd),
        torch.tensor(rv, dtype=pd), 1e-5)
    y.backward(dy)
    assert y.dtype == tdtype and x.grad.dtype == tdtype and mean.dtype == pd
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    xr, dyr = to_numpy(x), to_numpy(dy)
    rmr, rvr = to_numpy(torch.tensor(rm, dtype=pd)), to_numpy(torch.tensor(rv, dtype=pd))
    ry, rdx, rdw, rdb, _, _ = ref_stochnorm(xr, dyr, to_numpy(tw), to_numpy(tb), rmr, rvr, s,
                                            0.1, 1e-5)
    stats_tol = 1e-10 if pd == torch.float64 else 1e-5
    assert_close(to_numpy(mean), xr.mean(axis=axes(xr)), stats_tol, stats_tol)
    assert_close(to_numpy(var), xr.var(axis=axes(xr)), stats_tol, stats_tol)
    assert_close(to_numpy(used_mean), np.where(s, xr.mean(axis=axes(xr)), rmr), stats_tol,
                 stats_tol)
    tol = TORCH_TOL[tdtype]
    assert_close(to_numpy(y), ry, tol, tol)
    assert_close(to_numpy(x.grad), rdx, 10 * tol, 10 * tol)
    assert_close(to_numpy(tw.grad), rdw, 10 * tol, 10 * tol)
    assert_close(to_numpy(tb.grad), rdb, 10 * tol, 10 * tol)
    if kind == "p1":  # every channel on batch statistics: batch norm's training op exactly
        by, bmean, bvar, binvstd = torch.ops.normkit.batch_norm_train(x.detach(), tw.detach(),
                                                                      tb.detach(), 1e-5)
        for got, want in ((y, by), (mean, bmean), (var, bvar), (used_invstd, binvstd)):
            assert torch.equal(got.detach(), want)


def test_torch_masked_op_gradcheck():
    C = 5
    x = torch.from_numpy(randn((3, C, 4), 1, offset=0.4)).requires_grad_()
    w, b = (torch.from_numpy(a).requires_grad_() for a in params(C, 2))
    rm, rv = (torch.from_numpy(a) for a in running(C, 3))
    use_batch = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)

    def f(x, w, b):
        return torch.ops.normkit.batch_norm_train_masked(x, w, b, use_batch, rm, rv, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
