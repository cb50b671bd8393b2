"""StochNorm1d/2d/3d in normkit.nn and normkit.torch against a float64 NumPy reference that uses
the same channel draw, batch norm at p = 0 / p = 1, torch compositions, gradcheck,
convert_stochnorm, seeding and errors."""
import copy

import numpy as np
import pytest
import torch

import normkit
import normkit.nn as nkn
import normkit.torch as nkt
from helpers import (assert_close, assert_close_dtype, axes, bc, count, make_layout, params,
                     randn, running)
from torch_helpers import tensor, to_numpy

SHAPES = {1: [(7, 5), (6, 5, 9)], 2: [(5, 6, 7, 3)], 3: [(3, 4, 3, 5, 2)]}
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
