"""The per-sample statistics family on CuPy arrays (GPU): the functional ops in every layout and
dtype against normkit's CPU results on the same values and a float64 NumPy reference; split
reductions (N * G small, S large) and their determinism through a reused workspace; |mean| >>
std; bfloat16 through DLPack; non-default streams; CUDA-graph capture.

Marked `gpu` and skipped with a reason where CuPy or a CUDA device is missing.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
from gpu_helpers import BFloat16, bf16_bits, bf16_values, gpu_skip_reason, to_gpu, to_host
from helpers import (
    assert_close,
    assert_close_dtype,
    bc,
    layouts_for,
    make_layout,
    other_layout,
    params,
    randn,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None,
                                                  reason=str(gpu_skip_reason()))]

# (shape, groups): no spatial dims, odd sizes, C not a multiple of a vector, instance norm
# (G = C), one group per sample, N * G = 1 with a long spatial extent (split reductions).
SHAPES = [((5, 6), 3), ((2, 6, 5), 2), ((3, 10, 7, 9), 5), ((2, 6, 5, 4, 3), 3),
          ((4, 32, 16, 16), 8), ((3, 64, 6, 6), 64), ((2, 7, 2), 7), ((1, 4, 50, 41), 1),
          ((2, 3, 4099), 3), ((130, 12), 4)]
CASES = [(s, g, lay) for s, g in SHAPES for lay in layouts_for(len(s))]
CASE_IDS = [f"{'x'.join(map(str, s))}-G{g}-{lay}" for s, g, lay in CASES]
EPS = 1e-3

# GPU result vs the CPU result on the same values: both accumulate in float32 (float64 for
# float64 data) and differ only in summation order and in rounding the stored value.
GPU_VS_CPU = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


@pytest.fixture(params=[np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
def gdtype(request):
    return np.dtype(request.param)


def pdtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def same(gpu, cpu, dtype, what=""):
    tol = GPU_VS_CPU[np.dtype(dtype)]
    assert_close(to_host(gpu), cpu, tol, tol, what)


def inputs(shape, layout, dtype, seed):
    x0 = randn(shape, seed, dtype, offset=0.7, scale=1.3)
    dy0 = randn(shape, seed + 1, dtype, offset=0.2, scale=0.9)
    return x0, make_layout(x0, layout), dy0, make_layout(dy0, other_layout(layout, len(shape)))


# --------------------------------------------------------------------------------------------------
# float64 NumPy references


def ref_forward(x, groups, w, b, eps):
    """y, mean, var, rstd of group norm in float64; statistics (N, G)."""
    x = np.asarray(x, np.float64)
    N = x.shape[0]
    xg = x.reshape(N, groups, -1)
    mean, var = xg.mean(-1), xg.var(-1)
    rstd = 1 / np.sqrt(var + eps)
    y = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if w is not None:
        y = y * bc(w, x.ndim)
    if b is not None:
        y = y + bc(b, x.ndim)
    return y, mean, var, rstd


def ref_backward(dy, x, groups, w, eps):
    """dx, dweight, dbias of group norm in float64."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    N, red = x.shape[0], (0,) + tuple(range(2, x.ndim))
    xhat = ref_forward(x, groups, None, None, eps)[0]
    rstd = ref_forward(x, groups, None, None, eps)[3]
    g = (dy * (bc(w, x.ndim) if w is not None else 1)).reshape(N, groups, -1)
    xh = xhat.reshape(N, groups, -1)
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True)
                            - xh * (g * xh).mean(-1, keepdims=True))
    return dx.reshape(x.shape), (dy * xhat).sum(axis=red), dy.sum(axis=red)


# --------------------------------------------------------------------------------------------------
# Functional ops


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,groups,layout", CASES, ids=CASE_IDS)
def test_forward_backward(shape, groups, layout, affine, gdtype):
    C, pd = shape[1], pdtype(gdtype)
    x0, x, dy0, dy = inputs(shape, layout, gdtype, 1)
    w, b = params(C, 2, pd) if affine else (None, None)
    y, mean, rstd = F.group_norm_forward(x, groups, w, b, eps=EPS)
    dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, w, bias=b)

    gx = to_gpu(x)
    gy, gmean, grstd = F.group_norm_forward(gx, groups, to_gpu(w), to_gpu(b), eps=EPS)
    gdx, gdw, gdb = F.group_norm_backward(to_gpu(dy), gx, gmean, grstd, to_gpu(w), bias=to_gpu(b))

    assert type(gy).__module__.startswith("cupy") and gy.dtype == gdtype and gy.shape == shape
    if layout in ("contiguous", "channels_last", "fortran"):
        assert gy.strides == gx.strides, "output not allocated in the input's layout"
    assert gmean.shape == (shape[0], groups) and gmean.dtype == pd and grstd.dtype == pd
    for name, g, c in [("y", gy, y), ("mean", gmean, mean), ("rstd", grstd, rstd),
                       ("dx", gdx, dx), ("dweight", gdw, dw), ("dbias", gdb, db)]:
        if c is None:
            assert g is None, name
        else:
            same(g, c, gdtype if name in ("y", "dx") else pd, name)
    ry, rmean, _, rrstd = ref_forward(x0, groups, w, b, EPS)
    rdx, rdw, rdb = ref_backward(dy0, x0, groups, w, EPS)
    assert_close_dtype(to_host(gy), ry, gdtype, "y vs numpy")
    assert_close_dtype(to_host(gdx), rdx, gdtype, "dx vs numpy", factor=4)
    assert_close(to_host(gmean), rmean, 1e-5 if pd == np.float32 else 1e-12, 1e-5)
    assert_close(to_host(grstd), rrstd, 1e-5 if pd == np.float32 else 1e-12, 1e-5)
    if affine:
        assert_close(to_host(gdb), rdb, 1e-5, 1e-5, "dbias vs numpy")
        assert_close(to_host(gdw), rdw, 1e-4, 1e-4, "dweight vs numpy")


@pytest.mark.parametrize("shape,groups,layout", CASES, ids=CASE_IDS)
def test_split_ops(shape, groups, layout, gdtype):
    N, C, pd = shape[0], shape[1], pdtype(gdtype)
    x0, x, dy0, dy = inputs(shape, layout, gdtype, 31)
    gx, gdy = to_gpu(x), to_gpu(dy)
    g = np.random.default_rng(32)

    mean, var = F.group_norm_stats(x, groups)
    gmean, gvar = F.group_norm_stats(gx, groups)
    same(gmean, mean, pd, "mean")
    same(gvar, var, pd, "var")
    _, rmean, rvar, _ = ref_forward(x0, groups, None, None, EPS)
    assert_close(gvar.get(), rvar, 1e-5 if pd == np.float32 else 1e-12, 1e-5, "var vs numpy")

    scale, shift = (g.uniform(-1.5, 1.5, (N, C)).astype(pd) for _ in range(2))
    out = make_layout(np.empty(shape, gdtype), other_layout(layout, len(shape)))
    gout = to_gpu(out)
    assert F.group_norm_affine(gx, to_gpu(mean), to_gpu(scale), to_gpu(shift), out=gout) is gout
    same(gout, F.group_norm_affine(x, mean, scale, shift), gdtype, "affine into out")

    s1, s2 = F.group_norm_backward_reduce(dy, x, mean)
    gs1, gs2 = F.group_norm_backward_reduce(gdy, gx, to_gpu(mean))
    same(gs1, s1, pd, "sum_dy")
    same(gs2, s2, pd, "sum_dy_xmu")
    cg = C // groups
    rs1 = np.asarray(dy0, np.float64).reshape(N, C, -1).sum(-1)
    rs2 = (np.asarray(dy0, np.float64).reshape(N, groups, cg, -1)
           * (np.asarray(x0, np.float64).reshape(N, groups, cg, -1)
              - mean.astype(np.float64)[:, :, None, None])).sum(-1).reshape(N, C)
    assert_close(gs1.get(), rs1, 1e-5, 1e-5, "sum_dy vs numpy")
    assert_close(gs2.get(), rs2, 1e-5, 1e-5, "sum_dy_xmu vs numpy")

    a = g.uniform(-1.5, 1.5, (N, C)).astype(pd)
    b, c = (g.uniform(-1.5, 1.5, (N, groups)).astype(pd) for _ in range(2))
    for bc_ in [(b, c), (None, None)]:
        cpu = F.group_norm_backward_elemt(dy, x, mean, a, *bc_)
        gpu = F.group_norm_backward_elemt(gdy, gx, to_gpu(mean), to_gpu(a),
                                          *(to_gpu(v) for v in bc_))
        same(gpu, cpu, gdtype, f"backward_elemt with b, c: {bc_[0] is not None}")


def test_in_place_affine_and_elemt():
    x0 = randn((3, 8, 9, 5), 41, np.float32, offset=0.4)
    mean, _ = F.group_norm_stats(x0, 4)
    scale = np.random.default_rng(42).uniform(0.5, 1.5, (3, 8)).astype(np.float32)
    shift = np.random.default_rng(43).uniform(-1, 1, (3, 8)).astype(np.float32)
    gx = to_gpu(x0.copy())
    assert F.group_norm_affine(gx, to_gpu(mean), to_gpu(scale), to_gpu(shift), out=gx) is gx
    same(gx, F.group_norm_affine(x0, mean, scale, shift), np.float32, "affine in place")
    gdy = to_gpu(x0.copy())
    assert F.group_norm_backward_elemt(gdy, to_gpu(x0), to_gpu(mean), to_gpu(scale),
                                       out=gdy) is gdy
    same(gdy, F.group_norm_backward_elemt(x0, x0, mean, scale), np.float32, "elemt in place")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_exact_when_the_mean_dwarfs_the_std(layout):
    """float32 data with |mean| = 1e4 and std 1: Chan merges keep the variance exact."""
    shape = (2, 8, 33, 31)
    x0 = (1e4 + np.random.default_rng(51).standard_normal(shape)).astype(np.float32)
    mean, var = F.group_norm_stats(to_gpu(make_layout(x0, layout)), 2)
    _, rmean, rvar, _ = ref_forward(x0, 2, None, None, EPS)
    assert_close(mean.get(), rmean, 1e-6, 1e-6)
    assert_close(var.get(), rvar, 1e-4, 1e-4)


@pytest.mark.parametrize("shape,groups,layout", [((1, 2, 1024, 1031), 1, "contiguous"),
                                                 ((1, 6, 777, 901), 2, "channels_last"),
                                                 ((2, 3, 300001), 3, "strided")])
def test_split_reductions_are_deterministic_through_a_reused_workspace(shape, groups, layout):
    """N * G far below the device's blocks and S large: the reductions split across blocks. The
    same workspace, reused (and first filled with garbage), gives bit-identical results."""
    import cupy as cp

    x0, x, dy0, dy = inputs(shape, layout, np.float32, 61)
    gx, gdy = to_gpu(x), to_gpu(dy)
    N, C = shape[:2]
    ws = cp.full(normkit._C.group_norm_workspace_size(gx, groups), np.nan, cp.float64)
    stream = cp.cuda.get_current_stream().ptr
    results = []
    for _ in range(2):
        y = cp.empty_like(gx)
        dx = cp.empty_like(gx)
        mean, var, rstd = (cp.full((N, groups), np.nan, cp.float32) for _ in range(3))
        s1, s2 = (cp.full((N, C), np.nan, cp.float32) for _ in range(2))
        normkit._C.group_norm_forward(gx, None, None, EPS, y, mean, var, rstd, stream=stream,
                                      workspace=ws)
        normkit._C.group_norm_backward(gdy, gx, mean, rstd, None, dx, s1, s2, stream=stream,
                                       workspace=ws)
        results.append([a.get() for a in (y, mean, var, rstd, dx, s1, s2)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    y, mean, var, rstd, dx = results[0][:5]
    ry, rmean, rvar, _ = ref_forward(x0, groups, None, None, EPS)
    assert_close(mean, rmean, 1e-6, 1e-6)
    assert_close(var, rvar, 1e-5, 1e-5)
    assert_close_dtype(y, ry, np.float32, factor=4)
    assert_close_dtype(dx, ref_backward(dy0, x0, groups, None, EPS)[0], np.float32, factor=10)


def test_workspace_too_small_is_a_value_error():
    import cupy as cp

    x = to_gpu(randn((2, 4, 9, 9), 71, np.float32))
    mean, var = cp.empty((2, 2), cp.float32), cp.empty((2, 2), cp.float32)
    need = normkit._C.group_norm_workspace_size(x, 2)
    assert need > 0
    with pytest.raises(ValueError, match="workspace"):
        normkit._C.group_norm_stats(x, mean, var, stream=0, workspace=cp.empty(need - 1))
    with pytest.raises(ValueError, match="workspace"):
        normkit._C.group_norm_stats(x, mean, var, stream=0, workspace=None)


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 4, 0), (0, 4)])
def test_empty_inputs(shape, gdtype):
    import cupy as cp

    x = cp.empty(shape, gdtype)
    mean, var = F.group_norm_stats(x, 2)
    assert mean.shape == (shape[0], 2)
    assert not np.any(mean.get()) and not np.any(var.get())
    y, mean, rstd = F.group_norm_forward(x, 2)
    assert y.shape == shape
    s1, s2 = F.group_norm_backward_reduce(x, x, mean)
    assert not np.any(s1.get()) and not np.any(s2.get())
    assert F.group_norm_backward(x, x, mean, rstd)[0].shape == shape


@pytest.mark.parametrize("shape,groups,layout", [((3, 4, 5), 2, "contiguous"),
                                                 ((2, 6, 4, 5), 3, "strided"),
                                                 ((2, 4, 3, 2, 3), 4, "channels_last")])
def test_finite_differences_float64(shape, groups, layout):
    C = shape[1]
    x = to_gpu(make_layout(randn(shape, 81, offset=0.3, scale=1.7), layout))
    w, b = (to_gpu(p) for p in params(C, 82))
    r = to_gpu(randn(shape, 83, scale=1.1, offset=0.4))

    def loss():
        return float((F.group_norm_forward(x, groups, w, b, eps=EPS)[0] * r).sum())

    def fd(a):  # central differences on the GPU array, element by element
        host = a.get()
        grad = np.empty(host.shape)
        for idx in np.ndindex(*host.shape):
            orig = host[idx]
            a[idx] = orig + 1e-6
            fp = loss()
            a[idx] = orig - 1e-6
            fm = loss()
            a[idx] = orig
            grad[idx] = (fp - fm) / 2e-6
        return grad

    _, m, i = F.group_norm_forward(x, groups, w, b, eps=EPS)
    dx, dw, db = F.group_norm_backward(r, x, m, i, w, bias=b)
    assert_close(dx.get(), fd(x), 1e-6, 1e-6, "dx")
    assert_close(dw.get(), fd(w), 1e-6, 1e-6, "dweight")
    assert_close(db.get(), fd(b), 1e-6, 1e-6, "dbias")


def test_instance_norm_on_gpu_matches_cpu():
    x0, x, dy0, dy = inputs((4, 6, 9, 7), "channels_last", np.float32, 91)
    w, b = params(6, 92, np.float32)
    y, mean, rstd = F.instance_norm_forward(x, weight=w, bias=b)[:3]
    gy, gmean, grstd = F.instance_norm_forward(to_gpu(x), weight=to_gpu(w), bias=to_gpu(b))[:3]
    same(gy, y, np.float32, "y")
    assert_close_dtype(gy.get(), ref_forward(x0, 6, w, b, 1e-5)[0], np.float32)


# --------------------------------------------------------------------------------------------------
# bfloat16 (through DLPack; CuPy has no bfloat16 dtype)


@pytest.mark.parametrize("shape,groups,layout", [((3, 6, 7, 9), 3, "contiguous"),
                                                 ((3, 6, 7, 9), 6, "channels_last"),
                                                 ((4, 16, 8, 8), 4, "channels_last"),
                                                 ((9, 6), 2, "contiguous")])
def test_bfloat16_against_float32_reference(shape, groups, layout):
    import cupy as cp

    N, C = shape[:2]
    x32 = bf16_values(bf16_bits(randn(shape, 101, np.float32, offset=0.5, scale=1.2)))
    dy32 = bf16_values(bf16_bits(randn(shape, 102, np.float32, offset=-0.1)))
    w, b = params(C, 103, np.float32)
    X = BFloat16(to_gpu(make_layout(bf16_bits(x32), layout)))
    DY = BFloat16(to_gpu(make_layout(bf16_bits(dy32), layout)))
    Y = BFloat16(to_gpu(make_layout(np.zeros(shape, np.uint16), layout)))
    DX = BFloat16(to_gpu(make_layout(np.zeros(shape, np.uint16), layout)))
    mean, var, rstd = (cp.full((N, groups), np.nan, cp.float32) for _ in range(3))
    s1, s2 = (cp.full((N, C), np.nan, cp.float32) for _ in range(2))
    stream = cp.cuda.get_current_stream().ptr
    ws = cp.empty(normkit._C.group_norm_workspace_size(X, groups), cp.float64)
    normkit._C.group_norm_forward(X, to_gpu(w), to_gpu(b), EPS, Y, mean, var, rstd,
                                  stream=stream, workspace=ws)
    normkit._C.group_norm_backward(DY, X, mean, rstd, to_gpu(w), DX, s1, s2, stream=stream,
                                   workspace=ws)
    ry, rmean, rvar, _ = ref_forward(x32, groups, w, b, EPS)
    rdx, _, rdb = ref_backward(dy32, x32, groups, w, EPS)
    assert_close(mean.get(), rmean, 1e-5, 1e-5)  # float32 statistics of exact bfloat16 values
    assert_close(var.get(), rvar, 1e-5, 1e-5)
    assert_close(s1.get().sum(axis=0), rdb, 1e-5, 1e-5)
    assert_close(bf16_values(Y.bits.get()), ry, 8e-3, 8e-3, "y")  # rounded to bfloat16
    assert_close(bf16_values(DX.bits.get()), rdx, 8e-3, 8e-3, "dx")
    m2, v2 = cp.empty((N, groups), cp.float32), cp.empty((N, groups), cp.float32)
    normkit._C.group_norm_stats(X, m2, v2, stream=stream, workspace=ws)
    assert_close(m2.get(), mean.get(), 1e-6, 1e-6)


# --------------------------------------------------------------------------------------------------
# Streams and CUDA graphs


_SPIN = r"""
extern "C" __global__ void spin_then_copy(float* out, const float* src, long long n,
                                          long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {}
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    out[i] = src[i];
}
"""


def test_ops_run_on_the_current_non_default_stream():
    import cupy as cp

    x_host = randn((8, 12, 16, 16), 111, np.float32, offset=1.5)
    src = to_gpu(x_host)
    x = cp.zeros_like(src)
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    kernel = cp.RawKernel(_SPIN, "spin_then_copy")
    with stream:  # a late copy into x on this stream; normkit must queue behind it
        kernel((64,), (256,), (x, src, np.int64(x.size), np.int64(10 ** 8)))
        y, mean, rstd = F.group_norm_forward(x, 4)
    stream.synchronize()
    ry, rmean, _, _ = ref_forward(x_host, 4, None, None, 1e-5)
    assert_close_dtype(mean.get(), rmean, np.float32)
    assert_close_dtype(y.get(), ry, np.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_core_ops_capture_in_global_mode(layout):
    """With every buffer allocated beforehand, a training step's core ops capture under
    cudaStreamCaptureModeGlobal, which fails on any host synchronization or device allocation."""
    import cupy as cp

    shape, C, G = (8, 6, 12, 12), 6, 3
    x_host = randn(shape, 121, np.float32, offset=0.3)
    dy_host = randn(shape, 122, np.float32)
    x, dy = to_gpu(make_layout(x_host, layout)), to_gpu(make_layout(dy_host, layout))
    w, b = (to_gpu(p) for p in params(C, 123, np.float32))
    y, dx = cp.empty_like(x), cp.empty_like(x)
    mean, var, rstd = (cp.empty((8, G), cp.float32) for _ in range(3))
    s1, s2 = (cp.empty((8, C), cp.float32) for _ in range(2))
    ws = cp.empty(normkit._C.group_norm_workspace_size(x, G), cp.float64)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream:
        stream.begin_capture(mode=getattr(cp.cuda.runtime, "streamCaptureModeGlobal", 0))
        normkit._C.group_norm_forward(x, w, b, 1e-5, y, mean, var, rstd, stream=stream.ptr,
                                      workspace=ws)
        normkit._C.group_norm_backward(dy, x, mean, rstd, w, dx, s1, s2, stream=stream.ptr,
                                       workspace=ws)
        graph = stream.end_capture()
    graph.launch(stream=stream)
    stream.synchronize()
    assert_close_dtype(y.get(), ref_forward(x_host, G, w.get(), b.get(), 1e-5)[0], np.float32)
    assert_close_dtype(dx.get(), ref_backward(dy_host, x_host, G, w.get(), 1e-5)[0], np.float32,
                       factor=4)


@pytest.mark.parametrize("shape,groups", [((70000, 2, 3), 2), ((3, 70000, 2), 70000)])
def test_more_than_65535_samples_or_groups(shape, groups):
    x0 = randn(shape, 131, np.float32, offset=0.2)
    mean, var = F.group_norm_stats(to_gpu(x0), groups)
    _, rmean, rvar, _ = ref_forward(x0, groups, None, None, EPS)
    assert_close(mean.get(), rmean, 1e-5, 1e-5)
    assert_close(var.get(), rvar, 1e-5, 1e-5)
