"""The Encoding family and the convolution on CuPy arrays (GPU): the functional ops in every
feature layout and dtype against normkit's CPU results on the same values and the float64
references; N > 65536; cancelling distances; s = 0; non-default streams, CUDA-graph capture of the
core ops and deterministic sums; the layers moved to the GPU; im2col / col2im and the convolution
against the CPU, float16 included; errors.

Marked `gpu` and skipped with a reason where CuPy or a CUDA device is missing.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import normkit.nn as nn
from encoding_reference import FEATURE_LAYOUTS, codebook, features, t64, torch_encoding, torch_op
from gpu_helpers import gpu_skip_reason, to_gpu, to_host
from helpers import assert_close, assert_close_dtype, channels_last, randn, rng

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None,
                                                  reason=str(gpu_skip_reason()))]

_C = normkit._C

# (B, N, D, K): one block, a ragged warp, several blocks, one codeword, N = 1.
SHAPES = [(2, 5, 3, 4), (3, 70, 6, 5), (2, 300, 9, 7), (2, 9, 4, 1), (3, 1, 4, 3)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = list(FEATURE_LAYOUTS)

# GPU vs CPU on the same values: both compute in the same type and differ in summation order and
# in cuBLAS's vs the host BLAS's rounding; the softmax amplifies that by a few units.
GPU_VS_CPU = {np.dtype(np.float64): (1e-11, 1e-11), np.dtype(np.float32): (1e-4, 2e-5),
              np.dtype(np.float16): (4e-3, 2e-3)}


@pytest.fixture(params=[np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
def gdtype(request):
    return np.dtype(request.param)


def _near_cpu(gpu, cpu, what):
    dtype = np.dtype(cpu.dtype)
    rtol, atol = GPU_VS_CPU[dtype]
    got = to_host(gpu)
    assert got.dtype == dtype and got.shape == cpu.shape, (what, got.dtype, got.shape)
    assert_close(got, cpu, rtol, atol, what)


def _problem(shape, layout, dtype, seed=11):
    B, N, D, K = shape
    pdt = np.float64 if dtype == np.float64 else np.float32
    X = FEATURE_LAYOUTS[layout](features((B, N, D), seed, offset=0.3).astype(dtype))
    C, s = codebook(K, D, seed + 1)
    return X, C.astype(pdt), s.astype(pdt)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_encoding_matches_cpu(shape, layout, gdtype):
    X, C, s = _problem(shape, layout, gdtype)
    B, N, D, K = shape
    gE = rng(6).standard_normal((B, K, D)).astype(gdtype)
    cpu_fwd = F.encoding_forward(X, C, s)
    cpu_bwd = F.encoding_backward(gE, X, C, s, *cpu_fwd[1:])
    gX, gC, gs, ggE = (to_gpu(a) for a in (X, C, s, gE))
    gpu_fwd = F.encoding_forward(gX, gC, gs)
    gpu_bwd = F.encoding_backward(ggE, gX, gC, gs, *gpu_fwd[1:])
    for name, got, ref in zip(("E", "A", "D2", "dX", "dC", "ds"), gpu_fwd + gpu_bwd,
                              cpu_fwd + cpu_bwd):
        _near_cpu(got, ref, name)
    if gdtype == np.float64:  # and the float64 reference itself
        tE, (tdX, tdC, tds) = torch_op(torch_encoding, (X, C, s), gE)
        for name, got, ref in (("E", gpu_fwd[0], tE), ("dX", gpu_bwd[0], tdX),
                               ("dC", gpu_bwd[1], tdC), ("ds", gpu_bwd[2], tds)):
            assert_close(to_host(got), ref, 1e-10, 1e-10, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_scaled_l2_and_aggregate_match_cpu(shape, layout, gdtype):
    X, C, s = _problem(shape, layout, gdtype)
    B, N, D, K = shape
    g = rng(3).standard_normal((B, N, K)).astype(gdtype)
    SL, D2 = F.scaled_l2_forward(X, C, s)
    cpu = (SL, D2) + F.scaled_l2_backward(g, X, C, s, D2)
    gX, gC, gs = (to_gpu(a) for a in (X, C, s))
    gSL, gD2 = F.scaled_l2_forward(gX, gC, gs)
    gpu = (gSL, gD2) + F.scaled_l2_backward(to_gpu(g), gX, gC, gs, gD2)
    for name, got, ref in zip(("SL", "D2", "dX", "dC", "ds"), gpu, cpu):
        _near_cpu(got, ref, name)
    A = F.encoding_forward(X, C, s)[1]
    gE = rng(4).standard_normal((B, K, D)).astype(gdtype)
    cpu = (F.aggregate(A, X, C),) + F.aggregate_backward(gE, A, X, C)
    gA = to_gpu(A)
    gpu = (F.aggregate(gA, gX, gC),) + F.aggregate_backward(to_gpu(gE), gA, gX, gC)
    for name, got, ref in zip(("E", "dA", "dX", "dC"), gpu, cpu):
        _near_cpu(got, ref, name)


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_encoding_more_than_65536_features(layout):
    B, N, D, K = 2, 70001, 3, 4
    X = FEATURE_LAYOUTS[layout](features((B, N, D), 61, offset=0.1).astype(np.float32))
    C, s = (a.astype(np.float32) for a in codebook(K, D, 62))
    gE = rng(63).standard_normal((B, K, D)).astype(np.float32)
    cpu = F.encoding_forward(X, C, s)
    cpu = cpu + F.encoding_backward(gE, X, C, s, *cpu[1:])
    gX, gC, gs = (to_gpu(a) for a in (X, C, s))
    gpu = F.encoding_forward(gX, gC, gs)
    gpu = gpu + F.encoding_backward(to_gpu(gE), gX, gC, gs, *gpu[1:])
    for name, got, ref in zip(("E", "A", "D2", "dX", "dC", "ds"), gpu, cpu):
        assert_close(to_host(got), ref, 1e-3, 2e-5, name)  # sums over 70001 rows
    assert_close(to_host(gpu[3])[:, 65536:], cpu[3][:, 65536:], 1e-3, 2e-5, "dX beyond 65536")


def test_cancelling_distances_are_recomputed_on_the_gpu():
    """|x| ~ 1000, |x - c| ~ 0.05 in float32: the GEMM form loses every digit; the kernels fall
    back to the residual form (see test_encoding_functional)."""
    B, N, D, K = 2, 67, 8, 3
    g = rng(71)
    base = 1000.0 + g.uniform(-1, 1, D)
    C = (base + g.uniform(-0.05, 0.05, (K, D))).astype(np.float32)
    X = (base + g.uniform(-0.05, 0.05, (B, N, D))).astype(np.float32)
    s = np.array([-300.0, -200.0, -500.0], np.float32)
    exact = ((X.astype(np.float64)[:, :, None] - C.astype(np.float64)) ** 2).sum(-1)
    for layout in ("rows", "n_major"):
        _, D2 = F.scaled_l2_forward(to_gpu(FEATURE_LAYOUTS[layout](X)), to_gpu(C), to_gpu(s))
        np.testing.assert_allclose(to_host(D2), exact, rtol=2e-6)


def test_zero_scale_gives_finite_gradients():
    X, C, s = _problem((2, 40, 3, 4), "n_major", np.float64, seed=51)
    s[[0, 2]] = 0.0
    gE = rng(52).standard_normal((2, 4, 3))
    gX, gC, gs = (to_gpu(a) for a in (X, C, s))
    E, A, D2 = F.encoding_forward(gX, gC, gs)
    dX, dC, ds = F.encoding_backward(to_gpu(gE), gX, gC, gs, A, D2)
    _, (tdX, tdC, tds) = torch_op(torch_encoding, (X, C, s), gE)
    for got, ref in ((dX, tdX), (dC, tdC), (ds, tds)):
        assert_close(to_host(got), ref, 1e-10, 1e-10)
    assert np.all(to_host(ds)[[0, 2]] != 0)


def test_results_are_deterministic():
    X, C, s = _problem((4, 1000, 16, 8), "n_major", np.float32, seed=81)
    gE = rng(82).standard_normal((4, 8, 16)).astype(np.float32)
    gX, gC, gs, ggE = (to_gpu(a) for a in (X, C, s, gE))
    runs = []
    for _ in range(2):
        fwd = F.encoding_forward(gX, gC, gs)
        runs.append([to_host(a) for a in fwd + F.encoding_backward(ggE, gX, gC, gs, *fwd[1:])])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_ops_run_on_the_current_stream():
    import cupy as cp

    X, C, s = _problem((3, 500, 8, 6), "n_major", np.float32, seed=91)
    gE = rng(92).standard_normal((3, 6, 8)).astype(np.float32)
    cpu = F.encoding_forward(X, C, s)
    cpu = cpu + F.encoding_backward(gE, X, C, s, *cpu[1:])
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gX, gC, gs, ggE = (to_gpu(a) for a in (X, C, s, gE))
        gpu = F.encoding_forward(gX, gC, gs)
        gpu = gpu + F.encoding_backward(ggE, gX, gC, gs, *gpu[1:])
        host = [a.get(stream=stream) for a in gpu]
    stream.synchronize()
    for name, got, ref in zip(("E", "A", "D2", "dX", "dC", "ds"), host, cpu):
        _near_cpu(got, ref, name)


def test_core_ops_capture_in_global_mode():
    """With every buffer allocated beforehand, the core's forward and backward kernels capture
    under cudaStreamCaptureModeGlobal, which fails on any host synchronization or allocation."""
    import cupy as cp

    B, N, D, K = 2, 300, 8, 5
    X, C, s = _problem((B, N, D, K), "rows", np.float32, seed=95)
    gX, gC, gs = (to_gpu(a) for a in (X, C, s))
    XC = gX @ gC.T
    XC_host = XC.get()
    D2, A, XG, W = (cp.empty((B, N, K), cp.float32) for _ in range(4))
    sumA, sumA2 = cp.empty((B, K), cp.float32), cp.empty((B, K), cp.float32)
    r, sumW, ds = cp.empty((B, N), cp.float32), cp.empty(K, cp.float32), cp.empty(K, cp.float32)
    G = to_gpu(rng(96).standard_normal((B, K, D)).astype(np.float32))
    ws = cp.empty(_C.encoding_workspace_size(B, N, K), cp.float64)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture(mode=getattr(cp.cuda.runtime, "streamCaptureModeGlobal", 0))
        _C.encoding_forward(gX, gC, gs, XC, D2, A, sumA, stream=stream.ptr, workspace=ws)
        _C.encoding_backward(G, gC, gs, A, D2, XC, W, r, sumW, sumA2, ds, stream=stream.ptr,
                             workspace=ws)
        graph = stream.end_capture()
    graph.launch(stream=stream)
    stream.synchronize()
    # The same core calls on the CPU, from the same XC.
    cD2, cA, cW = (np.empty((B, N, K), np.float32) for _ in range(3))
    csumA, csumA2 = np.empty((B, K), np.float32), np.empty((B, K), np.float32)
    cr, csumW, cds = np.empty((B, N), np.float32), np.empty(K, np.float32), np.empty(K, np.float32)
    cXG = XC_host.copy()
    _C.encoding_forward(X, C, s, XC_host.copy(), cD2, cA, csumA)
    _C.encoding_backward(G.get(), C, s, cA, cD2, cXG, cW, cr, csumW, csumA2, cds)
    for name, got, ref in (("D2", D2, cD2), ("A", A, cA), ("sumA", sumA, csumA), ("W", W, cW),
                           ("r", r, cr), ("sumW", sumW, csumW), ("sumA2", sumA2, csumA2),
                           ("ds", ds, cds)):
        _near_cpu(got, ref, name)


def test_core_errors_on_the_gpu():
    import cupy as cp

    X, C, s = _problem((2, 5, 3, 4), "rows", np.float32)
    gX, gC, gs = (to_gpu(a) for a in (X, C, s))
    XC, D2 = gX @ gC.T, cp.empty((2, 5, 4), cp.float32)
    with pytest.raises(ValueError, match=r"encoding_forward: CUDA arrays need a workspace of \d+ "
                                         r"float64 values"):
        _C.encoding_forward(gX, gC, gs, XC, D2, XC, None)
    small = cp.empty(3, cp.float64)
    with pytest.raises(ValueError, match="the workspace has 3 float64 values"):
        _C.scaled_l2_forward(gX, gC, gs, XC, D2, None, workspace=small)
    with pytest.raises(TypeError, match="D2 is on cpu:0 but X is on cuda:0"):
        _C.scaled_l2_forward(gX, gC, gs, XC, D2.get(), None)
    with pytest.raises(TypeError, match="float32 or float64"):
        h = gX.astype(cp.float16)
        _C.add_scaled_features(h, cp.ones((2, 5), cp.float32), cp.empty_like(h))
    with pytest.raises(TypeError, match="C is a numpy array but X is a cupy array"):
        F.encoding(gX, C, gs)


# --------------------------------------------------------------------------------------------------
# Layers moved to the GPU


def test_encoding_layer_on_the_gpu(gdtype):
    pdt = np.float64 if gdtype == np.float64 else np.float32
    cpu = nn.Encoding(6, 5, dtype=pdt, generator=rng(3))
    gpu = nn.Encoding(6, 5, dtype=pdt, generator=rng(3)).to("cuda")
    for x in (randn((2, 6, 9, 7), 4, gdtype), channels_last(randn((2, 6, 9, 7), 5, gdtype))):
        y = cpu(x)
        dy = rng(6).standard_normal(y.shape).astype(gdtype)
        dx = cpu.backward(dy)
        gy = gpu(to_gpu(x))
        gdx = gpu.backward(to_gpu(dy))
        _near_cpu(gy, y, "y")
        _near_cpu(gdx, dx, "dx")
    _near_cpu(gpu.codewords.grad, cpu.codewords.grad, "codewords.grad")
    _near_cpu(gpu.scale.grad, cpu.scale.grad, "scale.grad")


def test_gram_inspiration_upsample_layers_on_the_gpu():
    C = 5
    x = randn((3, C, 8, 7), 10, np.float32)
    gram, ggram = nn.GramMatrix(), nn.GramMatrix().to("cuda")
    G = gram(x)
    _near_cpu(ggram(to_gpu(x)), G, "gram")
    dG = rng(11).standard_normal(G.shape).astype(np.float32)
    _near_cpu(ggram.backward(to_gpu(dG)), gram.backward(dG), "gram dx")

    insp = nn.Inspiration(C, generator=rng(12))
    ginsp = nn.Inspiration(C, generator=rng(12)).to("cuda")
    for layer in (insp, ginsp):
        layer.set_target(G[:1], requires_grad=True)
    y = insp(x)
    dy = rng(13).standard_normal(y.shape).astype(np.float32)
    _near_cpu(ginsp(to_gpu(x)), y, "inspiration y")
    _near_cpu(ginsp.backward(to_gpu(dy)), insp.backward(dy), "inspiration dx")
    _near_cpu(ginsp.weight.grad, insp.weight.grad, "inspiration weight.grad")
    _near_cpu(ginsp.target_grad, insp.target_grad, "inspiration target_grad")

    up = nn.UpsampleConv2d(C, 3, 3, stride=2, padding=1, groups=1, scale_factor=2,
                           generator=rng(14))
    gup = nn.UpsampleConv2d(C, 3, 3, stride=2, padding=1, groups=1, scale_factor=2,
                            generator=rng(14)).to("cuda")
    y = up(x)
    dy = rng(15).standard_normal(y.shape).astype(np.float32)
    _near_cpu(gup(to_gpu(x)), y, "upsample y")
    _near_cpu(gup.backward(to_gpu(dy)), up.backward(dy), "upsample dx")
    _near_cpu(gup.weight.grad, up.weight.grad, "upsample weight.grad")
    _near_cpu(gup.bias.grad, up.bias.grad, "upsample bias.grad")


# --------------------------------------------------------------------------------------------------
# im2col / col2im and the convolution

CONV_CASES = [
    ((2, 3, 11), (4, 3, 3), 1, 0, 1, 1),
    ((2, 4, 13), (6, 2, 4), 2, 3, 2, 2),
    ((3, 3, 7, 9), (5, 3, 3, 3), 1, 1, 1, 1),
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),
    ((2, 6, 7, 5), (6, 1, 3, 3), 2, 1, 1, 6),
    ((2, 2, 5, 4, 6), (3, 2, 2, 3, 2), (1, 2, 1), 1, (2, 1, 1), 1),
]
CONV_IDS = [f"{len(c[0]) - 2}d-{i}" for i, c in enumerate(CONV_CASES)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_convolution_matches_cpu(case, layout):
    xs, ws, stride, padding, dilation, groups = case
    x = randn(xs, 1, np.float32, offset=0.3)
    x = channels_last(x) if layout == "channels_last" and x.ndim in (4, 5) else x
    w = (rng(2).standard_normal(ws) * 0.5).astype(np.float32)
    b = rng(3).uniform(-1, 1, ws[0]).astype(np.float32)
    y = F.convolution(x, w, b, stride, padding, dilation, groups)
    dy = rng(4).standard_normal(y.shape).astype(np.float32)
    cpu = (y,) + F.convolution_backward(dy, x, w, stride, padding, dilation, groups)
    gx, gw, gb = to_gpu(x), to_gpu(w), to_gpu(b)
    gy = F.convolution(gx, gw, gb, stride, padding, dilation, groups)
    gpu = (gy,) + F.convolution_backward(to_gpu(dy), gx, gw, stride, padding, dilation, groups)
    for name, got, ref in zip(("y", "dx", "dweight", "dbias"), gpu, cpu):
        _near_cpu(got, ref, name)
    # float16 on the GPU against the float32 result
    h = F.convolution(gx.astype(np.float16), gw.astype(np.float16), gb.astype(np.float16),
                      stride, padding, dilation, groups)
    assert h.dtype == np.float16
    assert_close_dtype(to_host(h), y, np.float16, "float16 y", factor=4)
    hdx = F.convolution_backward(to_gpu(dy).astype(np.float16), gx.astype(np.float16),
                                 gw.astype(np.float16), stride, padding, dilation, groups)[0]
    assert_close_dtype(to_host(hdx), cpu[1], np.float16, "float16 dx", factor=4)


def test_im2col_col2im_match_cpu_in_every_dtype():
    import cupy as cp

    x = randn((2, 3, 9, 8), 5, np.float64)
    geometry = ([3, 2], [2, 1], [1, 1], [1, 2])
    out = [_C.conv_output_size(n, k, st, p, d) for n, k, st, p, d in zip(x.shape[2:], *geometry)]
    shape = (2, 3 * 6, out[0] * out[1])
    cols = np.empty(shape)
    _C.im2col(x, cols, *geometry)
    back = np.empty_like(x)
    _C.col2im(cols, back, *geometry)
    for dtype in (cp.float64, cp.float32, cp.float16):
        gcols = cp.empty(shape, dtype)
        _C.im2col(to_gpu(x).astype(dtype), gcols, *geometry)
        np.testing.assert_array_equal(to_host(gcols), cols.astype(dtype))  # a copy: exact
        gback = cp.empty(x.shape, dtype)
        _C.col2im(gcols, gback, *geometry)
        assert_close_dtype(to_host(gback), back, np.dtype(dtype), str(dtype))
