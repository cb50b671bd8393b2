"""The batch-norm family on CuPy arrays (GPU): the functional ops and the layers in every layout and
dtype, against normkit's CPU results on the same values (float64 to 1e-12) and the float64
references; float16 and bfloat16 against float32 references; CUDA-graph capture of a training
step; non-default streams and the CUDA Array Interface's stream; sizes past 32-bit indexing and
past the 65535 grid limit; deterministic results.

Marked `gpu` and skipped with a reason where CuPy or a CUDA device is missing.
"""
import numpy as np
import pytest

import normkit
import normkit.functional as F
import normkit.nn as nn
from gpu_helpers import (
    BFloat16,
    CudaArrayInterface,
    bf16_bits,
    bf16_values,
    gpu_skip_reason,
    to_gpu,
    to_host,
)
from helpers import (
    assert_close,
    assert_close_dtype,
    axes,
    bc,
    count,
    layouts_for,
    make_layout,
    other_layout,
    params,
    randn,
    ref_backward_eval,
    ref_backward_train,
    ref_forward_eval,
    ref_forward_train,
    ref_stats,
    running,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_skip_reason() is not None,
                                                  reason=str(gpu_skip_reason()))]

SHAPES = [(5, 3), (2, 3, 5), (3, 5, 7, 9), (2, 3, 5, 4, 3), (4, 8, 16, 16), (3, 64, 6, 6),
          (130, 7), (2, 300, 3, 2)]
CASES = [(s, lay) for s in SHAPES for lay in layouts_for(len(s))]
CASE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in CASES]
EPS = 1e-3
MOMENTUM = 0.3

# GPU result vs the CPU result on the same values: both accumulate in float32 (float64 for
# float64 data) and differ only in summation order and in rounding the stored value.
GPU_VS_CPU = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-3}


@pytest.fixture(params=[np.float32, np.float64, np.float16], ids=["f32", "f64", "f16"])
def gdtype(request):
    return np.dtype(request.param)


def pdtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def same(gpu, cpu, dtype, what=""):
    """The GPU result equals the CPU one to GPU_VS_CPU[dtype], relative to the largest value."""
    tol = GPU_VS_CPU[np.dtype(dtype)]
    assert_close(to_host(gpu), cpu, tol, tol, what)


def inputs(shape, layout, dtype, seed):
    x0 = randn(shape, seed, dtype, offset=0.7, scale=1.3)
    dy0 = randn(shape, seed + 1, dtype, offset=0.2, scale=0.9)
    x = make_layout(x0, layout)
    dy = make_layout(dy0, other_layout(layout, len(shape)))
    return x0, x, dy0, dy


# --------------------------------------------------------------------------------------------------
# Functional ops: every layout, dtype, affine or not, training and eval


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_backward_training(shape, layout, affine, gdtype):
    C, pd = shape[1], pdtype(gdtype)
    x0, x, dy0, dy = inputs(shape, layout, gdtype, 1)
    w, b = params(C, 2, pd) if affine else (None, None)
    rm0, rv0 = running(C, 3, pd)

    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=True, momentum=MOMENTUM,
                                           eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=True)

    gx, grm, grv = to_gpu(x), to_gpu(rm0.copy()), to_gpu(rv0.copy())
    gy, gmean, ginvstd = F.batch_norm_forward(gx, to_gpu(w), to_gpu(b), grm, grv, training=True,
                                              momentum=MOMENTUM, eps=EPS)
    gdx, gdw, gdb = F.batch_norm_backward(to_gpu(dy), gx, gmean, ginvstd, to_gpu(w),
                                          training=True)

    assert type(gy).__module__.startswith("cupy") and gy.dtype == gdtype and gy.shape == shape
    if layout in ("contiguous", "channels_last", "fortran"):
        assert gy.strides == gx.strides, "output not allocated in the input's layout"
    assert gmean.dtype == pd and ginvstd.dtype == pd
    for name, g, c in [("y", gy, y), ("mean", gmean, mean), ("invstd", ginvstd, invstd),
                       ("running_mean", grm, rm), ("running_var", grv, rv), ("dx", gdx, dx),
                       ("dweight", gdw, dw), ("dbias", gdb, db)]:
        if c is None:
            assert g is None, name
        else:
            same(g, c, gdtype if name in ("y", "dx") else pd, name)
    ry, rmean, _, rinvstd = ref_forward_train(x0, w, b, EPS)
    rdx, rdw, rdb = ref_backward_train(dy0, x0, w, EPS)
    assert_close_dtype(to_host(gy), ry, gdtype, "y vs numpy")
    assert_close_dtype(to_host(gdx), rdx, gdtype, "dx vs numpy")
    if gdtype == np.float16:  # float32 statistics of exact float16 values
        assert_close(to_host(gmean), rmean, 1e-5, 1e-5)
        assert_close(to_host(ginvstd), rinvstd, 1e-5, 1e-5)
    if affine:
        assert_close(to_host(gdb), rdb, 1e-5, 1e-5, "dbias vs numpy")


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_forward_backward_eval(shape, layout, gdtype):
    C, pd = shape[1], pdtype(gdtype)
    x0, x, dy0, dy = inputs(shape, layout, gdtype, 11)
    w, b = params(C, 12, pd)
    rm, rv = running(C, 13, pd)
    y, mean, invstd = F.batch_norm_forward(x, w, b, rm, rv, training=False, eps=EPS)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=False)
    grm, grv = to_gpu(rm), to_gpu(rv)
    gx = to_gpu(x)
    gy, gmean, ginvstd = F.batch_norm_forward(gx, to_gpu(w), to_gpu(b), grm, grv, training=False,
                                              eps=EPS)
    gdx, gdw, gdb = F.batch_norm_backward(to_gpu(dy), gx, gmean, ginvstd, to_gpu(w),
                                          training=False)
    np.testing.assert_array_equal(grm.get(), rm)  # eval leaves the running statistics alone
    same(gy, y, gdtype, "y")
    same(gdx, dx, gdtype, "dx")
    same(gdw, dw, pd, "dweight")
    same(gdb, db, pd, "dbias")
    assert_close_dtype(to_host(gy), ref_forward_eval(x0, w, b, rm, rv, EPS), gdtype)
    assert_close_dtype(to_host(gdx), ref_backward_eval(dy0, x0, w, rm, rv, EPS)[0], gdtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_flags(training, gdtype):
    shape, pd = (3, 5, 7, 9), pdtype(gdtype)
    _, x, _, dy = inputs(shape, "channels_last", gdtype, 21)
    w, b = params(5, 22, pd)
    rm, rv = running(5, 23, pd)
    gx, gdy, gw = to_gpu(x), to_gpu(dy), to_gpu(w)
    _, m, i = F.batch_norm_forward(gx, gw, to_gpu(b), to_gpu(rm), to_gpu(rv), training=training)
    dx, dw, db = F.batch_norm_backward(gdy, gx, m, i, gw, training=training)
    dx2, dw2, db2 = F.batch_norm_backward(gdy, gx, m, i, gw, training=training, input_grad=False)
    assert dx2 is None
    same(dw2, dw.get(), pd)
    dx3, dw3, db3 = F.batch_norm_backward(gdy, gx, m, i, gw, training=training, weight_grad=False)
    assert dw3 is None and db3 is None
    same(dx3, dx.get(), gdtype)
    dx4, dw4, _ = F.batch_norm_backward(gdy, gx, m, i, None, training=training)
    cpu = F.batch_norm_backward(dy, x, m.get(), i.get(), None, training=training)[0]
    assert dw4 is None
    same(dx4, cpu, gdtype)


@pytest.mark.parametrize("shape,layout", CASES, ids=CASE_IDS)
def test_split_ops(shape, layout, gdtype):
    C, pd = shape[1], pdtype(gdtype)
    x0, x, dy0, dy = inputs(shape, layout, gdtype, 31)
    w, b = params(C, 32, pd)
    gx, gdy = to_gpu(x), to_gpu(dy)

    mean, var = F.batch_norm_stats(x)
    gmean, gvar = F.batch_norm_stats(gx)
    same(gmean, mean, pd, "mean")
    same(gvar, var, pd, "var")
    invstd = (1 / np.sqrt(var.astype(np.float64) + EPS)).astype(pd)

    out = make_layout(np.empty(shape, gdtype), other_layout(layout, len(shape)))
    gout = to_gpu(out)
    assert F.batch_norm_normalize(gx, to_gpu(mean), to_gpu(invstd), to_gpu(w), to_gpu(b),
                                  out=gout) is gout
    same(gout, F.batch_norm_normalize(x, mean, invstd, w, b), gdtype, "normalize into out")

    s1, s2 = F.batch_norm_backward_reduce(dy, x, mean)
    gs1, gs2 = F.batch_norm_backward_reduce(gdy, gx, to_gpu(mean))
    same(gs1, s1, pd, "sum_dy")
    same(gs2, s2, pd, "sum_dy_xmu")
    n = count(x0)
    for sums, cnt in [((s1, s2), None), ((s1, s2), 3 * n), ((None, None), None)]:
        cpu = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, *sums, count=cnt)
        gpu = F.batch_norm_backward_elemt(gdy, gx, to_gpu(mean), to_gpu(invstd), to_gpu(w),
                                          *(to_gpu(s) for s in sums), count=cnt)
        same(gpu, cpu, gdtype, f"backward_elemt count={cnt} sums={sums[0] is not None}")


def test_uneven_shards_equal_whole_batch():
    """The split ops over two uneven 'ranks' of a batch, combined by count, equal batch norm of the
    whole batch (what SyncBatchNorm does), on the GPU in float64."""
    shape = (7, 3, 5, 4)
    x0, _, dy0, _ = inputs(shape, "contiguous", np.float64, 41)
    w, b = params(3, 42)
    shards = [to_gpu(np.ascontiguousarray(x0[:2])), to_gpu(np.ascontiguousarray(x0[2:]))]
    dshards = [to_gpu(np.ascontiguousarray(dy0[:2])), to_gpu(np.ascontiguousarray(dy0[2:]))]
    stats = [F.batch_norm_stats(s) for s in shards]
    ns = [s.size // 3 for s in shards]
    n = sum(ns)
    mean = sum(k * m for k, (m, _) in zip(ns, stats)) / n
    var = sum(k * (v + (m - mean) ** 2) for k, (m, v) in zip(ns, stats)) / n
    invstd = 1 / np.sqrt(var.get() + EPS)
    gw, gi = to_gpu(w), to_gpu(invstd)
    y = np.concatenate([F.batch_norm_normalize(s, mean, gi, gw, to_gpu(b)).get() for s in shards])
    assert_close(y, ref_forward_train(x0, w, b, EPS)[0], 1e-12, 1e-12)
    sums = [F.batch_norm_backward_reduce(d, s, mean) for d, s in zip(dshards, shards)]
    s1, s2 = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    dx = np.concatenate([F.batch_norm_backward_elemt(d, s, mean, gi, gw, s1, s2, count=n).get()
                         for d, s in zip(dshards, shards)])
    assert_close(dx, ref_backward_train(dy0, x0, w, EPS)[0], 1e-12, 1e-12)


@pytest.mark.parametrize("shape,layout", [((3, 4, 5), "contiguous"), ((2, 3, 4, 5), "strided"),
                                          ((2, 3, 3, 2, 3), "channels_last"), ((6, 3), "fortran")])
def test_finite_differences_float64(shape, layout):
    C = shape[1]
    x = to_gpu(make_layout(randn(shape, 51, offset=0.3, scale=1.7), layout))
    w, b = (to_gpu(p) for p in params(C, 52))
    r = to_gpu(randn(shape, 53, scale=1.1, offset=0.4))

    def loss():
        return float((F.batch_norm_forward(x, w, b, training=True, eps=EPS)[0] * r).sum())

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

    _, m, i = F.batch_norm_forward(x, w, b, training=True, eps=EPS)
    dx, dw, db = F.batch_norm_backward(r, x, m, i, w, training=True)
    assert_close(dx.get(), fd(x), 1e-6, 1e-6, "dx")
    assert_close(dw.get(), fd(w), 1e-6, 1e-6, "dweight")
    assert_close(db.get(), fd(b), 1e-6, 1e-6, "dbias")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_batchnormtrain_and_eval(layout, gdtype):
    shape, pd = (4, 3, 7), pdtype(gdtype)
    _, x, _, dy = inputs(shape, layout, gdtype, 61)
    gamma, beta = params(3, 62, pd)
    mean = np.random.default_rng(63).uniform(-0.5, 1.2, 3).astype(pd)
    std = np.random.default_rng(64).uniform(0.6, 1.9, 3).astype(pd)
    g = [to_gpu(a) for a in (x, gamma, beta, mean, std)]
    same(F.batchnormtrain(*g), F.batchnormtrain(x, gamma, beta, mean, std), gdtype)
    same(F.batchnormeval(*g), F.batchnormeval(x, gamma, beta, mean, std), gdtype)
    for backward in (F.batchnormtrain_backward, F.batchnormeval_backward):
        gpu = backward(to_gpu(dy), g[0], g[1], g[3], g[4])
        cpu = backward(dy, x, gamma, mean, std)
        assert len(gpu) == len(cpu)
        for k, (a, c) in enumerate(zip(gpu, cpu)):
            assert a.dtype == c.dtype
            same(a, c, gdtype if k == 0 else pd, f"{backward.__name__} output {k}")


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5, 4), (2, 3, 0, 4)])
def test_empty_batches(shape, gdtype):
    import cupy as cp

    x = cp.empty(shape, gdtype)
    mean, var = F.batch_norm_stats(x)
    assert mean.get().tolist() == [0.0] * 3 and var.get().tolist() == [0.0] * 3
    m, i = (to_gpu(a) for a in running(3, 71, pdtype(gdtype)))
    assert F.batch_norm_normalize(x, m, i).shape == shape
    s1, s2 = F.batch_norm_backward_reduce(x, x, m)
    assert s1.get().tolist() == [0.0] * 3 and s2.get().tolist() == [0.0] * 3
    assert F.batch_norm_backward_elemt(x, x, m, i, None, s1, s2, count=10).shape == shape


def test_broadcast_input():
    import cupy as cp

    base = to_gpu(randn((4, 3, 1, 1), 72, np.float32, offset=0.5))
    x = cp.broadcast_to(base, (4, 3, 5, 7))
    mean, var = F.batch_norm_stats(x)
    rmean, rvar = ref_stats(np.broadcast_to(base.get(), (4, 3, 5, 7)))
    assert_close_dtype(mean.get(), rmean, np.float32)
    assert_close_dtype(var.get(), rvar, np.float32)


# --------------------------------------------------------------------------------------------------
# bfloat16 (through DLPack; CuPy has no bfloat16 dtype)


@pytest.mark.parametrize("shape,layout", [((3, 5, 7, 9), "contiguous"),
                                          ((3, 5, 7, 9), "channels_last"),
                                          ((4, 16, 8, 8), "channels_last"), ((9, 6), "contiguous"),
                                          ((2, 3, 5), "fortran")])
def test_bfloat16_against_float32_reference(shape, layout):
    import cupy as cp

    C = shape[1]
    x32 = bf16_values(bf16_bits(randn(shape, 81, np.float32, offset=0.5, scale=1.2)))
    dy32 = bf16_values(bf16_bits(randn(shape, 82, np.float32, offset=-0.1)))
    w, b = params(C, 83, np.float32)
    X = BFloat16(to_gpu(make_layout(bf16_bits(x32), layout)))
    DY = BFloat16(to_gpu(make_layout(bf16_bits(dy32), layout)))
    Y = BFloat16(to_gpu(make_layout(np.zeros(shape, np.uint16), layout)))
    DX = BFloat16(to_gpu(make_layout(np.zeros(shape, np.uint16), layout)))
    mean, var, invstd, s1, s2 = (cp.full(C, np.nan, cp.float32) for _ in range(5))
    stream = cp.cuda.get_current_stream().ptr
    ws = cp.empty(normkit._C.batch_norm_workspace_size(X), cp.float64)
    normkit._C.batch_norm_forward_train(X, to_gpu(w), to_gpu(b), EPS, Y, mean, var, invstd,
                                        stream=stream, workspace=ws)
    normkit._C.batch_norm_backward_train(DY, X, mean, invstd, to_gpu(w), DX, s1, s2,
                                         stream=stream, workspace=ws)
    assert X.streams and all(s == (stream or 1) for s in X.streams)  # DLPack's stream protocol
    ry, rmean, rvar, rinvstd = ref_forward_train(x32, w, b, EPS)
    rdx, rdw, rdb = ref_backward_train(dy32, x32, w, EPS)
    # statistics: float32 accumulation over exact bfloat16 values
    assert_close(mean.get(), rmean, 1e-5, 1e-5)
    assert_close(var.get(), rvar, 1e-5, 1e-5)
    assert_close(s1.get(), rdb, 1e-5, 1e-5)
    # outputs: rounded to bfloat16 (8 significant bits: half an ulp is 2^-9 relative)
    assert_close(bf16_values(Y.bits.get()), ry, 8e-3, 8e-3, "y")
    assert_close(bf16_values(DX.bits.get()), rdx, 8e-3, 8e-3, "dx")
    # and normalize / backward_elemt / stats agree with the fused ops
    Y2 = BFloat16(to_gpu(make_layout(np.zeros(shape, np.uint16), layout)))
    normkit._C.batch_norm_normalize(X, mean, invstd, to_gpu(w), to_gpu(b), Y2, stream=stream)
    assert_close(bf16_values(Y2.bits.get()), bf16_values(Y.bits.get()), 0, 0)
    m2, v2 = cp.empty(C, cp.float32), cp.empty(C, cp.float32)
    normkit._C.batch_norm_stats(X, m2, v2, stream=stream, workspace=ws)
    assert_close(m2.get(), mean.get(), 1e-6, 1e-6)


def test_bfloat16_parameters_must_be_float32():
    import cupy as cp

    X = BFloat16(cp.zeros((4, 3), cp.uint16))
    with pytest.raises(TypeError, match="weight must be float32 for bfloat16 input, got float64"):
        normkit._C.batch_norm_normalize(X, cp.zeros(3, cp.float32), cp.ones(3, cp.float32),
                                        cp.ones(3, cp.float64), None,
                                        BFloat16(cp.zeros((4, 3), cp.uint16)))


# --------------------------------------------------------------------------------------------------
# Layers


LAYER_CASES = [(nn.BatchNorm1d, (7, 5), "contiguous"), (nn.BatchNorm1d, (4, 5, 9), "channels_last"),
               (nn.BatchNorm2d, (3, 5, 7, 9), "contiguous"),
               (nn.BatchNorm2d, (3, 5, 7, 9), "channels_last"),
               (nn.BatchNorm2d, (3, 5, 7, 9), "non_collapsible"),
               (nn.BatchNorm3d, (2, 3, 5, 4, 3), "channels_last")]
CONFIGS = {"default": {}, "momentum_none": {"momentum": None},
           "no_running_stats": {"track_running_stats": False}, "no_affine": {"affine": False}}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cls,shape,layout", LAYER_CASES,
                         ids=[f"{c.__name__}-{lay}" for c, _, lay in LAYER_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_layer_on_gpu_matches_layer_on_cpu(cls, shape, layout, config, dtype):
    C = shape[1]
    cpu = cls(C, dtype=dtype, **CONFIGS[config])
    if cpu.affine:
        cpu.weight.data[...], cpu.bias.data[...] = params(C, 91, dtype)
    gpu = cls(C, dtype=dtype, **CONFIGS[config])
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.to("cuda") is gpu
    for _, a in gpu.state_dict().items():
        assert type(a).__module__.startswith("cupy")
    for step in range(3):
        x = make_layout(randn(shape, 92 + step, dtype, offset=0.5 * step), layout)
        dy = make_layout(randn(shape, 95 + step, dtype), other_layout(layout, len(shape)))
        same(gpu(to_gpu(x)), cpu(x), dtype, f"y step {step}")
        same(gpu.backward(to_gpu(dy)), cpu.backward(dy), dtype, f"dx step {step}")
        for p, q in zip(gpu.parameters(), cpu.parameters()):
            same(p.grad, q.grad, dtype, "grad")
    for (k, a), (_, c) in zip(gpu.state_dict().items(), cpu.state_dict().items()):
        if k == "num_batches_tracked":
            assert int(a) == int(c) == 3
        else:
            same(a, c, dtype, k)
    gpu.eval()
    cpu.eval()
    x = make_layout(randn(shape, 99, dtype, offset=-0.3), layout)
    same(gpu(to_gpu(x)), cpu(x), dtype, "eval y")
    gpu.to("cpu")
    assert all(isinstance(a, np.ndarray) for a in gpu.state_dict().values())
    same(gpu(x), cpu(x), dtype, "eval y after to('cpu')")


def test_layer_float16_input_on_gpu():
    layer_cpu, layer_gpu = nn.BatchNorm2d(6), nn.BatchNorm2d(6, device="cuda")
    x = make_layout(randn((4, 6, 5, 7), 101, np.float16, offset=0.6), "channels_last")
    dy = randn((4, 6, 5, 7), 102, np.float16)
    y = layer_gpu(to_gpu(x))
    assert y.dtype == np.float16 and layer_gpu.running_mean.dtype == np.float32
    same(y, layer_cpu(x), np.float16)
    same(layer_gpu.backward(to_gpu(dy)), layer_cpu.backward(dy), np.float16)
    same(layer_gpu.weight.grad, layer_cpu.weight.grad, np.float32)
    same(layer_gpu.running_var, layer_cpu.running_var, np.float32)


def test_sync_batchnorm_device_buffers_in_process():
    """SyncBatchNorm on CuPy arrays with a communicator of two identical 'ranks' (the sum of two
    equal buffers) is batch norm over the batch seen twice: the device-buffer path of its two
    collectives, the count read back to the host, the global count in the backward."""
    import cupy as cp

    class Twins:
        rank, size, debug = 0, 2, False

        def allreduce_sum(self, a):
            assert isinstance(a, cp.ndarray)
            a *= 2
            return a

    shape = (3, 4, 5, 2)
    x = randn(shape, 111, np.float64, offset=0.4)
    dy = randn(shape, 112, np.float64)
    sync = nn.SyncBatchNorm(4, comm=Twins(), dtype=np.float64, device="cuda")
    ref = nn.BatchNorm2d(4, dtype=np.float64)
    y = sync(to_gpu(x))
    dx = sync.backward(to_gpu(dy))
    y2 = ref(np.concatenate([x, x]))
    dx2 = ref.backward(np.concatenate([dy, dy]))
    assert_close(y.get(), y2[:3], 1e-12, 1e-12)
    # the gradient of the sum of both ranks' losses, with respect to this rank's input
    assert_close(dx.get(), dx2[:3], 1e-12, 1e-12)
    assert_close(sync.running_var.get(), ref.running_var, 1e-12, 1e-12)


# --------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("shape,layout", [((16, 3, 31, 33), "contiguous"),
                                          ((16, 3, 31, 33), "channels_last"),
                                          ((7, 3, 1001), "strided"), ((4001, 3), "contiguous"),
                                          ((4001, 3), "fortran")])
def test_large_mean_keeps_variance(shape, layout):
    g = np.random.default_rng(121)
    C = shape[1]
    x0 = (1e4 + g.uniform(-3, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
          + g.standard_normal(shape)).astype(np.float32)
    x0[(0, slice(None)) + (0,) * (len(shape) - 2)] = 1e4 + 300  # an outlier first value
    mean, var = F.batch_norm_stats(to_gpu(make_layout(x0, layout)))
    rmean, rvar = ref_stats(x0)
    assert np.max(np.abs(var.get() / rvar - 1)) < 1e-3
    assert np.max(np.abs(mean.get() / rmean - 1)) < 1e-6


def test_float64_huge_mean():
    x0 = 1e8 + np.random.default_rng(122).standard_normal((6, 3, 17, 19))
    for layout in ("contiguous", "channels_last", "strided"):
        mean, var = F.batch_norm_stats(to_gpu(make_layout(x0, layout)))
        rmean, rvar = ref_stats(x0)
        assert np.max(np.abs(var.get() / rvar - 1)) < 1e-7, layout


SIZES = [(8, 16, 33, 35), (64, 3, 50, 50), (4, 3, 9, 17, 19), (5, 7, 3001), (20001, 3), (7, 2049)]


@pytest.mark.parametrize("shape", SIZES, ids=["x".join(map(str, s)) for s in SIZES])
def test_larger_shapes_match_cpu(shape, gdtype):
    layouts = ["contiguous", "fortran"] if len(shape) == 2 else ["contiguous", "channels_last"]
    for layout in layouts:
        x0, x, _, dy = inputs(shape, layout, gdtype, 131)
        w, b = params(shape[1], 132, pdtype(gdtype))
        y, m, i = F.batch_norm_forward(x, w, b, training=True)
        dx, dw, db = F.batch_norm_backward(dy, x, m, i, w)
        gy, gm, gi = F.batch_norm_forward(to_gpu(x), to_gpu(w), to_gpu(b), training=True)
        gdx, gdw, gdb = F.batch_norm_backward(to_gpu(dy), to_gpu(x), gm, gi, to_gpu(w))
        same(gy, y, gdtype, f"{layout} y")
        same(gdx, dx, gdtype, f"{layout} dx")
        same(gdb, db, pdtype(gdtype), f"{layout} db")
        scale = (np.abs(dy.astype(np.float64))
                 * np.abs((x0 - bc(m, x0.ndim)) * bc(i, x0.ndim))).sum(axis=axes(x0))
        assert np.all(np.abs(gdw.get() - dw) <= 2e-5 * scale + 1e-12), f"{layout} dweight"


def test_results_are_deterministic():
    import cupy as cp

    x = to_gpu(randn((64, 3, 50, 50), 141, np.float32, offset=3.0))
    dy = to_gpu(randn((64, 3, 50, 50), 142, np.float32))
    first = F.batch_norm_forward(x, training=True)
    second = F.batch_norm_forward(x, training=True)
    for a, b in zip(first, second):
        assert cp.array_equal(a, b)
    g1 = F.batch_norm_backward(dy, x, first[1], first[2])
    g2 = F.batch_norm_backward(dy, x, first[1], first[2])
    assert cp.array_equal(g1[0], g2[0])


# --------------------------------------------------------------------------------------------------
# Errors on the GPU


def test_gpu_errors():
    import cupy as cp

    x = to_gpu(randn((3, 4, 5), 151, np.float32))
    m, v = cp.zeros(4, cp.float32), cp.ones(4, cp.float32)
    with pytest.raises(TypeError, match="weight is on cpu:0 but x is on cuda"):
        F.batch_norm_normalize(x, m, v, np.ones(4, np.float32))
    with pytest.raises(TypeError, match="running_mean must be a cupy array"):
        F.batch_norm_forward(x, None, None, np.zeros(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match="mean must be float32 for float32 input"):
        F.batch_norm_normalize(x, m.astype(cp.float64), v)
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        F.batch_norm_normalize(x, m[:3], v)
    with pytest.raises(TypeError, match="dtype"):
        F.batch_norm_stats(x.astype(cp.int32))
    with pytest.raises(ValueError, match="workspace"):
        normkit._C.batch_norm_stats(x, m, v)
    with pytest.raises(ValueError, match="workspace has 1 float64 values"):
        normkit._C.batch_norm_stats(x, m, v, workspace=cp.empty(1, cp.float64))
    with pytest.raises(TypeError, match="x is a CUDA array|y is on cpu"):
        F.batch_norm_normalize(x, m, v, out=np.empty((3, 4, 5), np.float32))
    with pytest.raises(TypeError, match="running_mean must be a cupy array"):
        nn.BatchNorm1d(4)(x)  # a CPU layer given a GPU input
    with pytest.raises(ValueError, match="broadcast"):
        F.batch_norm_normalize(x, m, v, out=cp.broadcast_to(cp.zeros((1, 4, 1), cp.float32),
                                                            (3, 4, 5)))
    with pytest.raises(ValueError, match="output y is read-only"):
        normkit._C.batch_norm_normalize(x, m, v, None, None,
                                        CudaArrayInterface(cp.empty_like(x), readonly=True))


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


def _late_copy(dst, src, stream):
    """Copies src into dst on `stream` after ~50 ms of spinning: work that reads dst on another
    stream without waiting for this one sees the old values."""
    import cupy as cp

    kernel = cp.RawKernel(_SPIN, "spin_then_copy")
    with stream:
        kernel((64,), (256,), (dst, src, np.int64(dst.size), np.int64(10 ** 8)))


def test_ops_run_on_the_current_non_default_stream():
    import cupy as cp

    x_host = randn((8, 4, 16, 16), 161, np.float32, offset=1.5)
    src = to_gpu(x_host)
    x = cp.zeros_like(src)
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    _late_copy(x, src, stream)
    with stream:  # normkit must queue behind the copy on this stream
        y, mean, invstd = F.batch_norm_forward(x, training=True)
    stream.synchronize()
    rmean = ref_stats(x_host)[0]
    assert_close_dtype(mean.get(), rmean, np.float32)
    assert_close_dtype(y.get(), ref_forward_train(x_host, None, None, 1e-5)[0], np.float32)


def test_cuda_array_interface_stream_is_waited_for():
    """An array whose __cuda_array_interface__ names a producer stream: the op, queued on another
    stream, must wait for the producer's work (CAI v3)."""
    import cupy as cp

    x_host = randn((8, 4, 16, 16), 162, np.float32, offset=-2.0)
    src = to_gpu(x_host)
    x = cp.zeros_like(src)
    mean, var = cp.empty(4, cp.float32), cp.empty(4, cp.float32)
    ws = cp.empty(normkit._C.batch_norm_workspace_size(x), cp.float64)
    cp.cuda.Device().synchronize()
    producer, consumer = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    _late_copy(x, src, producer)
    normkit._C.batch_norm_stats(CudaArrayInterface(x, producer.ptr), mean, var,
                                stream=consumer.ptr, workspace=ws)
    consumer.synchronize()
    assert_close_dtype(mean.get(), ref_stats(x_host)[0], np.float32)
    assert_close_dtype(var.get(), ref_stats(x_host)[1], np.float32)


def test_core_ops_capture_in_global_mode():
    """With every buffer allocated beforehand, a training step's core ops capture under
    cudaStreamCaptureModeGlobal, which fails on any host synchronization or device allocation."""
    import cupy as cp

    shape, C = (8, 6, 12, 12), 6
    x_host = randn(shape, 171, np.float32, offset=0.3)
    dy_host = randn(shape, 172, np.float32)
    x, dy = to_gpu(x_host), to_gpu(dy_host)
    w, b = (to_gpu(p) for p in params(C, 173, np.float32))
    y, dx = cp.empty_like(x), cp.empty_like(x)
    mean, var, invstd, s1, s2 = (cp.empty(C, cp.float32) for _ in range(5))
    ws = cp.empty(normkit._C.batch_norm_workspace_size(x), cp.float64)
    stream = cp.cuda.Stream(non_blocking=True)
    cp.cuda.Device().synchronize()
    with stream:  # the arrays' interface then names the capturing stream: nothing to wait for
        stream.begin_capture(mode=getattr(cp.cuda.runtime, "streamCaptureModeGlobal", 0))
        normkit._C.batch_norm_forward_train(x, w, b, 1e-5, y, mean, var, invstd,
                                            stream=stream.ptr, workspace=ws)
        normkit._C.batch_norm_backward_train(dy, x, mean, invstd, w, dx, s1, s2,
                                             stream=stream.ptr, workspace=ws)
        graph = stream.end_capture()
    graph.launch(stream=stream)
    stream.synchronize()
    assert_close_dtype(y.get(), ref_forward_train(x_host, w.get(), b.get(), 1e-5)[0], np.float32)
    assert_close_dtype(dx.get(), ref_backward_train(dy_host, x_host, w.get(), 1e-5)[0], np.float32)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_training_step_in_a_cuda_graph(layout):
    """A BatchNorm2d forward + backward captured once and replayed on new data in the same input
    buffer: outputs, gradients and running statistics match the CPU layer stepping eagerly."""
    import cupy as cp

    shape = (6, 5, 9, 11)
    cpu = nn.BatchNorm2d(5)
    cpu.weight.data[...], cpu.bias.data[...] = params(5, 181, np.float32)
    gpu = nn.BatchNorm2d(5)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda")
    x = to_gpu(make_layout(np.zeros(shape, np.float32), layout))
    dy = to_gpu(make_layout(np.zeros(shape, np.float32), layout))
    pool = cp.cuda.MemoryPool()  # the graph's memory, used by nothing else
    stream = cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        y = gpu(x)
        dx = gpu.backward(dy)
        graph = stream.end_capture()
    for step in range(3):
        xs = randn(shape, 182 + step, np.float32, offset=step - 1.0)
        dys = randn(shape, 185 + step, np.float32)
        with stream:  # new data into the captured input buffers, then the step
            x[...] = to_gpu(xs)
            dy[...] = to_gpu(dys)
            graph.launch(stream=stream)
        stream.synchronize()
        same(y, cpu(xs), np.float32, f"y replay {step}")
        same(dx, cpu.backward(dys), np.float32, f"dx replay {step}")
        # the captured step wrote this step's gradients into the arrays it made at capture
        same(gpu.weight.grad, cpu.weight.grad, np.float32, f"weight.grad replay {step}")
        same(gpu.bias.grad, cpu.bias.grad, np.float32, f"bias.grad replay {step}")
        cpu.zero_grad()
    same(gpu.running_mean, cpu.running_mean, np.float32, "running_mean")
    same(gpu.running_var, cpu.running_var, np.float32, "running_var")
    assert int(gpu.num_batches_tracked) == 3


# --------------------------------------------------------------------------------------------------
# Sizes past the grid and 32-bit limits


@pytest.mark.parametrize("shape,layout", [((70001, 3), "contiguous"), ((70001, 2, 3), "contiguous"),
                                          ((70001, 2, 3), "channels_last"),
                                          ((2, 70001, 3), "contiguous"), ((3, 70001), "contiguous")],
                         ids=["N70001xC3", "N70001-ncl", "N70001-nlc", "C70001-planar",
                              "C70001-rows"])
def test_more_than_65535_samples_or_channels(shape, layout):
    x0, x, _, dy = inputs(shape, layout, np.float32, 191)
    w, b = params(shape[1], 192, np.float32)
    y, m, i = F.batch_norm_forward(x, w, b, training=True)
    dx = F.batch_norm_backward(dy, x, m, i, w)[0]
    gy, gm, gi = F.batch_norm_forward(to_gpu(x), to_gpu(w), to_gpu(b), training=True)
    gdx = F.batch_norm_backward(to_gpu(dy), to_gpu(x), gm, gi, to_gpu(w))[0]
    same(gm, m, np.float32, "mean")
    same(gy, y, np.float32, "y")
    same(gdx, dx, np.float32, "dx")


def _chunks(n, size=1 << 27):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


@pytest.mark.parametrize("shape", [(1, 1, 2 ** 31 + 8), (2 ** 28 + 1, 8)],
                         ids=["one-channel-planar", "channels-last-2D"])
def test_more_than_2_31_values(shape):
    """float16 tensors of more than 2^31 values (offsets past 32 bits; one channel alone holds
    2^31 + 8 of them): statistics against float64 sums, outputs checked at the tail and at random
    positions, where 32-bit offsets would wrap."""
    import cupy as cp

    n = int(np.prod(shape))
    free = cp.cuda.runtime.memGetInfo()[0]
    if free < 5 * 2 * n + (4 << 30):
        pytest.skip(f"needs ~{(10 * n + (4 << 30)) / 2 ** 30:.0f} GiB of free GPU memory, "
                    f"{free / 2 ** 30:.0f} GiB free")
    C = shape[1]
    rng = cp.random.default_rng(201)
    x, dy = cp.empty(shape, cp.float16), cp.empty(shape, cp.float16)
    xf, dyf = x.reshape(-1), dy.reshape(-1)
    for k, (lo, hi) in enumerate(_chunks(n)):
        xf[lo:hi] = (rng.standard_normal(hi - lo, dtype=cp.float32) * (1 + 0.1 * k) + 3).astype(
            cp.float16)
        dyf[lo:hi] = rng.standard_normal(hi - lo, dtype=cp.float32).astype(cp.float16)
    w = cp.asarray(params(C, 202, np.float32)[0])
    y, mean, invstd = F.batch_norm_forward(x, w, None, training=True)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w)

    # float64 references, channel by channel, in chunks (x viewed as (count, C) or (C, count))
    per_channel = x.reshape(-1, C) if shape[1] == 8 else x.reshape(C, -1).T
    dper_channel = dy.reshape(-1, C) if shape[1] == 8 else dy.reshape(C, -1).T
    rows = per_channel.shape[0]
    s = cp.zeros(C)
    for lo, hi in _chunks(rows, 1 << 24):
        s += per_channel[lo:hi].astype(cp.float64).sum(axis=0)
    rmean = s / rows
    q, sdy, sdyx = cp.zeros(C), cp.zeros(C), cp.zeros(C)
    for lo, hi in _chunks(rows, 1 << 24):
        d = per_channel[lo:hi].astype(cp.float64) - rmean
        g = dper_channel[lo:hi].astype(cp.float64)
        q += (d * d).sum(axis=0)
        sdy += g.sum(axis=0)
        sdyx += (g * d).sum(axis=0)
    rvar = q / rows
    assert_close(mean.get(), rmean.get(), 1e-6, 1e-6, "mean")
    assert_close(1 / invstd.get() ** 2 - 1e-5, rvar.get(), 1e-5, 1e-5, "var")
    assert_close(db.get(), sdy.get(), 1e-5, 1e-5, "sum dy")
    assert_close(dw.get(), (sdyx / cp.sqrt(rvar + 1e-5)).get(), 1e-4, 1e-4, "dweight")

    # elementwise outputs at the last values and at random positions
    positions = np.concatenate([np.arange(n - 4096, n),
                                np.random.default_rng(203).integers(0, n, 4096)])
    idx = np.unravel_index(positions, shape)
    c = idx[1]
    gidx = tuple(cp.asarray(i) for i in idx)
    xs, ys, dys, dxs = (a[gidx].get().astype(np.float64) for a in (x, y, dy, dx))
    m, i, wv = rmean.get()[c], 1 / np.sqrt(rvar.get()[c] + 1e-5), w.get()[c]
    assert_close(ys, (xs - m) * i * wv, 2e-3, 2e-3, "y")
    rdx = wv * i * (dys - sdy.get()[c] / rows - (xs - m) * i * i * sdyx.get()[c] / rows)
    assert_close(dxs, rdx, 2e-3, 2e-3, "dx")
