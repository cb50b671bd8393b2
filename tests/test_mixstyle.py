"""MixStyle in normkit.nn and normkit.torch against Dassl's formula (float64, as torch ops and in
NumPy) with the same permutation and lambdas: both modes, odd B, B = 1, 3D/4D/5D, both layouts,
float16/bfloat16, spatial size 1, the p gate, seeding, gradcheck, the helpers, errors."""
import numpy as np
import pytest
import torch

import normkit
import normkit.nn as nkn
import normkit.torch as nkt
from helpers import assert_close, make_layout, randn
from torch_helpers import tensor


def dassl_formula(x, perm, lam, eps=1e-6):
    """Dassl's MixStyle forward as torch ops, for given perm and lam, float64."""
    x = x.double()
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True) if x[0, 0].numel() > 1 else torch.zeros_like(mu)
    sig = (var + eps).sqrt()
    mu, sig = mu.detach(), sig.detach()
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape((-1,) + (1,) * (x.dim() - 1))
    perm = torch.as_tensor(perm)
    return (x - mu) / sig * (sig * lam + sig[perm] * (1 - lam)) + mu * lam + mu[perm] * (1 - lam)


def np_formula(x, perm, lam, eps=1e-6):
    x = np.asarray(x, np.float64)
    ax = tuple(range(2, x.ndim))
    mu = x.mean(axis=ax, keepdims=True)
    S = x[0, 0].size
    var = x.var(axis=ax, keepdims=True) * (S / (S - 1) if S > 1 else 0.0)
    sig = np.sqrt(var + eps)
    lam = np.asarray(lam, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    sig_mix = sig * lam + sig[perm] * (1 - lam)
    return (x - mu) / sig * sig_mix + mu * lam + mu[perm] * (1 - lam), sig_mix / sig


SHAPES = [(5, 4, 7), (6, 3, 5, 4), (4, 2, 3, 2, 3), (3, 4, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mix", ["random", "crossdomain"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_matches_dassl(shape, mix, layout):
    x = tensor(randn(shape, 1), layout=layout, requires_grad=True)
    layer = nkt.MixStyle(p=1.0, alpha=0.3, mix=mix, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    perm, lam = layer.last_draw
    assert sorted(perm.tolist()) == list(range(shape[0]))
    xr = x.detach().clone().requires_grad_()
    want = dassl_formula(xr, perm, lam)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    if layout == "channels_last" and x.dim() in (4, 5):
        assert y.stride() == x.stride()
    dy = torch.from_numpy(randn(shape, 2))
    y.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(y).all()


def test_crossdomain_pairs_the_two_halves_odd_batch():
    for B in (5, 6, 7):
        layer = nkt.MixStyle(p=1.0, mix="crossdomain", generator=torch.Generator().manual_seed(B))
        layer(torch.randn(B, 2, 3))
        perm = layer.last_draw[0].tolist()
        first = (B + 1) // 2
        # Dassl's order: reverse(arange(B)) split in two, the first part the larger
        assert sorted(perm[:first]) == list(range(B - first, B))
        assert sorted(perm[first:]) == list(range(B - first))


def test_nn_matches_numpy_reference(dtype):
    for shape in SHAPES:
        for mix in ("random", "crossdomain"):
            for layout in ("contiguous", "channels_last"):
                x = make_layout(randn(shape, 4, dtype), layout)
                layer = nkn.MixStyle(p=1.0, alpha=0.2, mix=mix,
                                     generator=np.random.default_rng(5))
                y = layer(x)
                perm, lam = layer.last_draw
                want, scale = np_formula(x, perm, lam)
                tol = 1e-10 if dtype == np.float64 else 2e-5
                assert y.dtype == dtype
                assert_close(y, want, tol, tol)
                dy = randn(shape, 6, dtype)
                assert_close(layer.backward(dy), dy * scale, tol, tol)


def test_nn_and_torch_draw_from_their_own_generators_reproducibly():
    x = randn((6, 3, 4, 4), 7, np.float32)
    normkit.manual_seed(11)
    a = nkn.MixStyle(p=1.0)(x)
    normkit.manual_seed(11)
    b = nkn.MixStyle(p=1.0)(x)
    np.testing.assert_array_equal(a, b)
    tx = torch.from_numpy(x)
    torch.manual_seed(11)
    c = nkt.MixStyle(p=1.0)(tx)
    torch.manual_seed(11)
    torch.testing.assert_close(nkt.MixStyle(p=1.0)(tx), c, rtol=0, atol=0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_torch_low_precision_in_and_out(half):
    x = torch.from_numpy(randn((5, 4, 6, 3), 8, np.float32)).to(half).requires_grad_()
    layer = nkt.MixStyle(p=1.0, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert y.dtype == half and layer.last_draw[1].dtype == torch.float32
    perm, lam = layer.last_draw
    want = dassl_formula(x.detach().float(), perm, lam)
    tol = 2e-2 if half == torch.bfloat16 else 4e-3
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    y.sum().backward()
    assert x.grad.dtype == half and torch.isfinite(x.grad.float()).all()


def test_identity_cases():
    x = torch.randn(4, 3, 5)
    assert nkt.MixStyle(p=1.0).eval()(x) is x
    assert nkt.MixStyle(p=0.0)(x) is x
    assert nkt.MixStyle(p=1.0)(x[:1]) is x[:1] or torch.equal(nkt.MixStyle(p=1.0)(x[:1]), x[:1])
    layer = nkn.MixStyle(p=1.0)
    xn = randn((1, 3, 5), 1)
    assert layer(xn) is xn and layer.backward(xn) is xn


def test_p_gate_frequency():
    layer = nkt.MixStyle(p=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 2, 3)
    acted = sum(layer(x) is not x for _ in range(400))
    assert 90 <= acted <= 150  # Binomial(400, 0.3): mean 120, sd 9.2
    layer = nkn.MixStyle(p=0.3, generator=np.random.default_rng(0))
    xn = randn((4, 2, 3), 2)
    acted = sum(layer(xn) is not xn for _ in range(400))
    assert 90 <= acted <= 150


def test_gradcheck_with_constant_statistics():
    """mu and sig are constants (as upstream detaches them): the gradient is that of the affine
    pass with the statistics of the point it is taken at."""
    x = torch.from_numpy(randn((4, 3, 5), 9)).requires_grad_()
    perm, lam = torch.tensor([2, 0, 3, 1]), torch.tensor([0.2, 0.9, 0.5, 0.7], dtype=torch.float64)
    x0 = x.detach().clone()
    mu = x0.mean(dim=2)
    sig = (x0.var(dim=2) + 1e-6).sqrt()
    lam2 = lam[:, None]
    scale = (lam2 * sig + (1 - lam2) * sig[perm]) / sig
    shift = lam2 * mu + (1 - lam2) * mu[perm]

    def frozen(t):
        return (t - mu[..., None]) * scale[..., None] + shift[..., None]

    got = nkt.mixstyle.mixstyle(x, perm, lam)
    torch.testing.assert_close(got, frozen(x))
    dy = torch.from_numpy(randn((4, 3, 5), 10))
    (gx,) = torch.autograd.grad(got, x, dy)
    (want,) = torch.autograd.grad(frozen(x), x, dy)
    torch.testing.assert_close(gx, want)
    affine = nkt.mixstyle._StyleAffine.apply
    assert torch.autograd.gradcheck(lambda t: affine(t, mu, scale, shift), (x,))


def test_helpers_and_context_managers():
    class Sub(nkt.MixStyle):
        pass

    model = torch.nn.Sequential(nkt.MixStyle(p=1.0), torch.nn.Sequential(Sub(p=1.0)))
    x = torch.randn(4, 3, 5)
    with nkt.run_without_mixstyle(model):
        assert not model[0]._activated and not model[1][0]._activated
        assert torch.equal(model(x), x)
    assert model[0]._activated
    with nkt.run_with_mixstyle(model, mix="crossdomain"):
        assert model[0].mix == "crossdomain" and model[1][0].mix == "crossdomain"
        assert not torch.equal(model(x), x)
    assert not model[0]._activated  # Dassl's run_with_mixstyle ends deactivated
    model.apply(nkt.activate_mixstyle)
    model.apply(nkt.random_mixstyle)
    assert model[1][0]._activated and model[1][0].mix == "random"
    net = nkn.Sequential(nkn.MixStyle(p=1.0))
    with nkn.run_without_mixstyle(net):
        assert not net[0]._activated
    with pytest.raises(ValueError, match="mix must be"):
        with nkt.run_with_mixstyle(model, mix="both"):
            pass


def test_errors():
    for make in (lambda: nkt.MixStyle(p=1.5), lambda: nkn.MixStyle(p=-0.1)):
        with pytest.raises(ValueError, match="p must be"):
            make()
    for make in (lambda: nkt.MixStyle(alpha=0.0), lambda: nkn.MixStyle(alpha=-1.0)):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            make()
    with pytest.raises(ValueError, match="mix must be"):
        nkt.MixStyle(mix="domain")
    with pytest.raises(ValueError, match="spatial"):
        nkt.MixStyle(p=1.0)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="spatial"):
        nkn.MixStyle(p=1.0)(randn((4, 3), 1))
    with pytest.raises(TypeError, match="generator"):
        nkt.MixStyle(generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="one entry per instance"):
        nkt.mixstyle.mixstyle(torch.randn(4, 2, 3), torch.arange(3), torch.rand(3))


def test_nn_float16_in_float16_out():
    x = randn((5, 3, 4, 4), 12, np.float16)
    layer = nkn.MixStyle(p=1.0, generator=np.random.default_rng(1))
    y = layer(x)
    perm, lam = layer.last_draw
    want, scale = np_formula(x.astype(np.float64), perm, lam)
    assert y.dtype == np.float16
    assert_close(y, want, 3e-3, 3e-3)
    dx = layer.backward(randn(x.shape, 13, np.float16))
    assert dx.dtype == np.float16 and np.all(np.isfinite(dx))
