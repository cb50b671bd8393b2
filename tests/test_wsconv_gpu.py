"""Weight standardization on CuPy arrays (GPU): the core op in every dtype against the float64
composition (float16/bfloat16-free: CuPy has float16), the backward against the CPU's, aliasing
w_hat = w, a non-default stream; normkit.nn's WS layers and conv_transpose moved to the GPU against
their CPU results; normkit.torch's layers on CUDA tensors where torch has CUDA.

Marked `gpu` and skipped with a reason where CuPy or a CUDA device is missing.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import normkit.nn as nn
from gpu_helpers import gpu_skip_reason, to_gpu, to_host

seeded = np.random.default_rng  # a layer's generator= for a reproducible initialization

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None,
                                                  reason=str(gpu_skip_reason()))]

rng = np.random.default_rng(11)
CONVENTIONS = ["elektronn3", "nfnet", "timm"]
# A row shorter than a block, several blocks' worth per row, many rows (> grid), a 1-d row.
SHAPES = [(5, 3, 3, 3), (4, 300, 3, 3), (70000, 2, 2), (3, 1000)]
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 4e-3}


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16],
                         ids=["f64", "f32", "f16"])
def test_gpu_forward_backward_vs_cpu_float64(convention, shape, dtype):
    w = rng.standard_normal(shape) * 0.1 + 0.2
    gain = rng.random(shape[0]) + 0.5
    dy = rng.standard_normal(shape)
    pd = np.float64 if dtype == np.float64 else np.float32
    w_hat, mean, rstd = F.ws_standardize(to_gpu(w.astype(dtype)), to_gpu(gain.astype(pd)), 1e-4,
                                         convention)
    assert w_hat.dtype == dtype and mean.dtype == pd
    ref, rmean, rrstd = F.ws_standardize(w, gain, 1e-4, convention)
    tol = TOL[np.dtype(dtype)]
    w_in = w.astype(dtype).astype(np.float64)  # the values the GPU saw
    ref_in = F.ws_standardize(w_in, gain, 1e-4, convention)[0]
    np.testing.assert_allclose(to_host(w_hat).astype(np.float64), ref_in, rtol=tol,
                               atol=tol * abs(ref).max())
    dw, dg = F.ws_standardize_backward(to_gpu(dy.astype(dtype)), to_gpu(w.astype(dtype)),
                                       to_gpu(gain.astype(pd)), mean, rstd, 1e-4, convention)
    rdw, rdg = F.ws_standardize_backward(dy.astype(dtype).astype(np.float64), w_in, gain,
                                         *F.ws_standardize(w_in, gain, 1e-4, convention)[1:],
                                         1e-4, convention)
    np.testing.assert_allclose(to_host(dw).astype(np.float64), rdw, rtol=tol * 10,
                               atol=tol * 10 * abs(rdw).max())
    np.testing.assert_allclose(to_host(dg).astype(np.float64), rdg, rtol=tol * 10,
                               atol=tol * 10 * abs(rdg).max())


def test_gpu_in_place_and_stream():
    import cupy as cp

    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    ref = F.ws_standardize(w, None)[0]
    wg = to_gpu(w)
    mean = cp.empty(8, cp.float32)
    rstd = cp.empty(8, cp.float32)
    with cp.cuda.Stream(non_blocking=True) as s:
        normkit._C.ws_standardize_forward(wg, None, 0, 1e-4, wg, mean, rstd,
                                          stream=s.ptr)
        s.synchronize()
    np.testing.assert_allclose(to_host(wg), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["f64", "f32", "f16"])
def test_gpu_backward_in_place_equals_separate(dtype):
    """dw written over dw_hat (as normkit.torch's WS layers call it) equals dw in a separate
    array, exactly."""
    import cupy as cp

    shape = (70, 300, 3, 3)  # rows of several blocks' worth
    pd = np.float64 if dtype == np.float64 else np.float32
    w = to_gpu((rng.standard_normal(shape) * 0.1 + 0.2).astype(dtype))
    gain = to_gpu((rng.random(shape[0]) + 0.5).astype(pd))
    dy = to_gpu(rng.standard_normal(shape).astype(dtype))
    for convention in CONVENTIONS:
        _, mean, rstd = F.ws_standardize(w, gain, 1e-4, convention)
        dw, dg = F.ws_standardize_backward(dy, w, gain, mean, rstd, 1e-4, convention)
        g, dg2 = dy.copy(), cp.empty_like(gain)
        normkit._C.ws_standardize_backward(g, w, gain, mean, rstd, CONVENTIONS.index(convention),
                                           1e-4, g, dg2)
        assert cp.array_equal(g, dw) and cp.array_equal(dg2, dg)


def test_gpu_nn_layers_vs_cpu():
    cpu = nn.WSConv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2, dtype=np.float64,
                      generator=seeded(0))
    gpu = nn.WSConv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2, dtype=np.float64,
                      generator=seeded(0)).to("cuda")
    x = rng.standard_normal((2, 4, 7, 6))
    y = cpu(x)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(to_host(gpu(to_gpu(x))), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_host(gpu.backward(to_gpu(dy))), cpu.backward(dy), rtol=1e-10,
                               atol=1e-10)
    for name in ("weight", "gain", "bias"):
        np.testing.assert_allclose(to_host(getattr(gpu, name).grad), getattr(cpu, name).grad,
                                   rtol=1e-9, atol=1e-10)
    tcpu = nn.WSConvTranspose2d(4, 6, 3, stride=2, dtype=np.float64, generator=seeded(1))
    tgpu = nn.WSConvTranspose2d(4, 6, 3, stride=2, dtype=np.float64, generator=seeded(1)).to("cuda")
    np.testing.assert_allclose(to_host(tgpu(to_gpu(x), output_size=(16, 14))),
                               tcpu(x, output_size=(16, 14)), rtol=1e-10, atol=1e-10)


def test_gpu_torch_layers():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    import normkit.torch as nkt

    layer = nkt.WSConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grads = [layer.weight.grad.clone(), layer.gain.grad.clone(), x.grad.clone()]
    layer.cuda().zero_grad()
    xg = x.detach().cuda().requires_grad_()
    yg = layer(xg)
    yg.sum().backward()
    torch.testing.assert_close(yg.cpu(), y.detach())
    for a, b in zip([layer.weight.grad, layer.gain.grad, xg.grad], grads):
        torch.testing.assert_close(a.cpu(), b)
    # the fused path's backward on CUDA, with and without an input gradient
    assert type(yg.grad_fn).__name__ == "_WSConvBackward"
    (dw,) = torch.autograd.grad(layer(xg.detach()), layer.weight, torch.ones_like(yg))
    torch.testing.assert_close(dw.cpu(), grads[0])
    half = nkt.WSConv2d(4, 6, 3).cuda().half()
    assert half(xg.detach().half()).dtype == torch.float16
