"""Hostile and unusual input (issue 16): each case once gave a crash, undefined behaviour, a silent
wrong answer or an unclear error. Every test here failed before its fix."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit as nk
from normkit import _C
from normkit import functional as F

from helpers import randn

torch = pytest.importorskip("torch")
import normkit.torch as nkt  # noqa: E402

# Under the sanitizer run (tools/sanitize.sh) address-space limits cannot be set: ASan reserves
# terabytes of shadow memory.
SANITIZED = bool(os.environ.get("NORMKIT_SANITIZED"))


def _x(shape=(4, 3, 5), seed=0, dtype=np.float32):
    return randn(shape, seed, dtype)


def _ones(C, dtype=np.float32):
    return np.full(C, 1.25, dtype)


# --- crashes and undefined behaviour -------------------------------------------------------------

@pytest.mark.skipif(SANITIZED, reason="RLIMIT_AS cannot be set under AddressSanitizer")
def test_failed_allocation_inside_threaded_kernels_is_memory_error():
    """Per-thread scratch too large for the address space: a MemoryError, not std::terminate (the
    scratch was allocated inside the OpenMP region, where an exception aborts the process)."""
    script = textwrap.dedent("""
        import resource
        import numpy as np
        from normkit import functional as F
        B, N, D, K = 2, 4000, 1, 1 << 21   # scratch: 2 * K * 64 float32 values per thread (1 GiB)
        g = np.random.default_rng(0)
        X = g.standard_normal((B, N, D)).astype(np.float32)
        C = g.standard_normal((K, D)).astype(np.float32)
        s = g.uniform(0.5, 1.5, K).astype(np.float32)
        F.set_between_gemm_threads(2)
        F.scaled_l2(X[:, :8], C[:8], s[:8])            # start the OpenMP pool first
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize")) * 1024
        limit = vm + (B * N * K * 4) * 3 + (1 << 28)   # the outputs fit, the scratch does not
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            F.scaled_l2(X, C, s)
        except MemoryError:
            print("MemoryError")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MemoryError" in out.stdout.splitlines()


@pytest.mark.parametrize("args,match", [
    ((5, 3, 0, 0, 1), "stride 0"),
    ((5, 3, 1, 2 ** 62, 1), "overflows"),
    ((5, 3, 1, 0, 2 ** 62), "overflows"),
    ((5, 2 ** 40, 1, 0, 2 ** 40), "overflows"),
    ((5, 3, 1, -1, 1), "padding -1"),
])
def test_conv_output_size_checks_its_arithmetic(args, match):
    with pytest.raises(ValueError, match=match):
        _C.conv_output_size(*args)


def test_conv_output_size_matches_torch():
    for n, k, s, p, d in [(7, 3, 2, 1, 1), (1, 1, 1, 0, 1), (10, 3, 3, 0, 2), (4, 5, 1, 0, 1)]:
        expected = max(0, (n + 2 * p - d * (k - 1) - 1) // s + 1)
        assert _C.conv_output_size(n, k, s, p, d) == expected


def test_convolution_with_huge_padding_is_a_clear_error():
    x, w = _x((1, 2, 5, 5)), _x((4, 2, 3, 3), seed=1)
    with pytest.raises(ValueError, match="overflows"):
        F.convolution(x, w, padding=(2 ** 62, 0))
    with pytest.raises(ValueError, match="overflows"):
        _C.im2col(x, np.empty((1, 18, 9), np.float32), [3, 3], [1, 1], [0, 0], [2 ** 62, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_misaligned_buffers_give_exact_results(dtype, layout):
    """Arrays starting one byte into their buffer: every access would be misaligned (undefined
    behaviour that UBSan flags; tools/sanitize.sh runs this test). normkit.functional reads an
    aligned copy; the core refuses them with a clear error."""
    shape = (3, 5, 7, 9)
    itemsize = np.dtype(dtype).itemsize
    src = randn(shape, 1, np.float64)
    raw = np.zeros(src.size * itemsize + 1, np.uint8)
    x = np.frombuffer(raw.data, dtype, src.size, offset=1).reshape(shape)
    assert not x.flags.aligned
    if layout == "channels_last":
        x = np.frombuffer(raw.data, dtype, src.size, offset=1).reshape(
            (3, 7, 9, 5)).transpose(0, 3, 1, 2)
    x[...] = src
    mean, var = F.batch_norm_stats(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-5)
    y = F.batch_norm_normalize(x, mean, 1 / np.sqrt(var + 1e-5))
    ref = (x64 - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not aligned"):
        _C.batch_norm_stats(x, np.empty(5, dtype), np.empty(5, dtype))


# --- silent wrong answers ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_nan_in_the_input_propagates_to_mean_and_variance(layout):
    x = _x((4, 3, 50))
    x[2, 1, 7] = np.nan
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    mean, var = F.batch_norm_stats(x)
    ref = torch.var_mean(torch.from_numpy(np.ascontiguousarray(x)), dim=(0, 2), unbiased=False)
    assert np.isnan(mean[1]) and np.isnan(var[1])
    np.testing.assert_array_equal(np.isnan(var), torch.isnan(ref[0]).numpy())
    y, m, invstd = F.batch_norm_forward(x, training=True)
    assert np.isnan(invstd[1]) and not np.isnan(invstd[[0, 2]]).any()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_float32_variance_exact_whatever_the_order_of_the_data(seed, layout):
    """The issue's repro: the first 64 values of each channel (the shift's pilot) are zeros, the
    rest near 1e8. var was off by 2e-3 relative; float64's is the reference."""
    g = np.random.default_rng(seed)
    x = (1e8 + g.standard_normal((1, 2, 100000))).astype(np.float32)
    x[:, :, :64] = 0
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    ref = x.astype(np.float64).var(axis=(0, 2))
    _, var = F.batch_norm_stats(x)
    np.testing.assert_allclose(var, ref, rtol=1e-6)
    _, _, invstd = F.batch_norm_forward(x, training=True)
    np.testing.assert_allclose(1 / invstd.astype(np.float64) ** 2 - 1e-5, ref, rtol=1e-6)


@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_bfloat16_statistics_exact_whatever_the_order_of_the_data(layout):
    """The same unrepresentative pilot in bfloat16 takes the float64 re-sum, which reads bfloat16
    as float64 lanes (it once read 16 float64 lanes out of 16 float32 ones: means of 4e16)."""
    g = torch.Generator().manual_seed(0)
    x = (300 + torch.randn(4, 3, 5000, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    x[:, :, :64] = 0
    if layout == "channels_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    xr = x.double()
    mean, var = xr.mean((0, 2)), xr.var((0, 2), unbiased=False)
    m = nkt.BatchNorm1d(3)
    y = m(x)
    torch.testing.assert_close(m.running_mean.double(), 0.1 * mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(m.running_var.double(), 0.9 + 0.1 * var * 20000 / 19999,
                               rtol=1e-6, atol=0)
    ref = (xr - mean[:, None]) / (var[:, None] + 1e-5).sqrt()
    torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=0, atol=0.04)


def test_float32_variance_of_sorted_data():
    """Sorted data: the first values are all from the lowest tail."""
    x = np.sort(1e4 + randn((2, 3, 20000), 3)).astype(np.float32)
    ref = x.astype(np.float64).var(axis=(0, 2))
    np.testing.assert_allclose(F.batch_norm_stats(x)[1], ref, rtol=1e-6)


def test_torch_negative_view_is_read_with_its_sign():
    xt = torch.randn(4, 3, 5, dtype=torch.float64)
    neg = torch._neg_view(xt)
    assert neg.is_neg()
    expected = torch.nn.functional.batch_norm(-xt, None, None, training=True)
    torch.testing.assert_close(nkt.batch_norm(neg, None, None, training=True), expected)
    w = torch._neg_view(torch.rand(3, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(
        nkt.batch_norm(xt, None, None, weight=w, training=True),
        torch.nn.functional.batch_norm(xt, None, None, weight=w.resolve_neg(), training=True))


def test_core_refuses_torch_negative_views_through_dlpack():
    neg = torch._neg_view(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="negative or conjugate bit"):
        _C.batch_norm_stats(neg, np.empty(3, np.float32), np.empty(3, np.float32))


def _conj_view():
    c = torch.randn(4, 3, 5, dtype=torch.complex64).conj()
    assert c.is_conj()
    return c


@pytest.mark.parametrize("call", [
    lambda c: nkt.batch_norm(c, None, None, training=True),
    lambda c: nkt.BatchNorm1d(3)(c),
    lambda c: nkt.GroupNorm(1, 3)(c),
], ids=["batch_norm", "BatchNorm1d", "GroupNorm"])
def test_torch_conjugate_view_is_a_dtype_error(call):
    """A conjugate view (complex: the conjugate bit lives only on complex tensors) is resolved
    before DLPack, then refused for its dtype: never read with its imaginary part's sign lost."""
    with pytest.raises(TypeError, match="complex64"):
        call(_conj_view())


def test_core_refuses_torch_conjugate_views_through_dlpack():
    with pytest.raises(ValueError, match="negative or conjugate bit"):
        _C.batch_norm_stats(_conj_view(), np.empty(3, np.float32), np.empty(3, np.float32))


def _normalize_into(x, out):
    return F.batch_norm_normalize(x, np.zeros(3, np.float32), _ones(3), out=out)


def test_output_partly_overlapping_the_input_is_refused():
    buf = np.zeros((4, 3, 6), np.float32)
    buf[...] = _x((4, 3, 6))
    with pytest.raises(ValueError, match="overlaps input x"):
        _normalize_into(buf[:, :, :5], buf[:, :, 1:])


def test_exactly_in_place_is_allowed():
    x = _x()
    expected = (x - 0) * 1.25
    out = _normalize_into(x, x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: np.broadcast_to(np.zeros((1, 3, 5), np.float32), (4, 3, 5)),
    lambda: np.lib.stride_tricks.as_strided(np.zeros(64, np.float32), (4, 3, 5), (12, 4, 4)),
], ids=["stride0", "revisits"])
def test_self_overlapping_output_is_refused(make):
    out = make()
    if not out.flags.writeable:
        out = np.lib.stride_tricks.as_strided(out.base if out.base is not None else out,
                                              out.shape, out.strides, writeable=True)
    with pytest.raises(ValueError, match="overlapping elements"):
        _normalize_into(_x(), out)


def test_statistics_outputs_overlapping_each_other_are_refused():
    x = _x()
    both = np.empty(3, np.float32)
    with pytest.raises(ValueError, match="outputs mean and var overlap"):
        _C.batch_norm_stats(x, both, both)
    with pytest.raises(ValueError, match="overlaps input x"):
        flat = x.reshape(-1)
        _C.batch_norm_stats(x, flat[:3], np.empty(3, np.float32))


def test_encoding_outputs_overlapping_inputs_are_refused():
    B, N, D, K = 2, 5, 3, 4
    X, C = randn((B, N, D), 1), randn((K, D), 2)
    s = np.linspace(0.5, 1.5, K)
    XC = np.einsum("bnd,kd->bnk", X, C)
    D2 = np.empty_like(XC)
    with pytest.raises(ValueError, match="overlaps input XC"):
        _C.scaled_l2_forward(X, C, s, XC, XC, None)  # D2 must not alias XC (SL may)
    _C.scaled_l2_forward(X, C, s, XC, D2, XC)           # SL over XC: allowed
    np.testing.assert_allclose(D2, ((X[:, :, None] - C) ** 2).sum(-1), rtol=1e-12)


def test_im2col_output_overlapping_input_is_refused():
    buf = _x((1, 1, 40), dtype=np.float64).reshape(-1)
    x = buf[:9].reshape(1, 1, 9)
    cols = buf[5:5 + 21].reshape(1, 3, 7)
    with pytest.raises(ValueError, match="overlaps input x"):
        _C.im2col(x, cols, [3], [1], [0], [1])


def test_masked_arrays_are_refused():
    x = np.ma.masked_array(_x(), mask=_x() > 1)
    with pytest.raises(TypeError, match="masked array"):
        F.batch_norm_stats(x)
    with pytest.raises(TypeError, match="masked array"):
        nk.nn.BatchNorm1d(3)(x)
    with pytest.raises(TypeError, match="masked array"):
        _C.batch_norm_stats(x, np.empty(3, np.float32), np.empty(3, np.float32))


@pytest.mark.parametrize("count", [np.inf, -np.inf, np.nan])
def test_non_finite_count_is_refused(count):
    x = _x()
    z = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="count must be finite"):
        F.batch_norm_backward_elemt(x, x, z, _ones(3), None, z, z, count=count)
    with pytest.raises(ValueError, match="count must be finite"):
        _C.batch_norm_backward_elemt(x, x, z, _ones(3), None, z, z, float(count), np.empty_like(x))


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (0, 3, 4, 4), (2, 0, 4, 4)])
def test_gram_matrix_of_empty_maps_is_zeros(shape):
    y = np.zeros(shape, np.float32)
    G = F.gram_matrix(y)
    assert G.shape == (shape[0], shape[1], shape[1])
    assert not np.isnan(G).any() and not G.any()
    dy = F.gram_matrix_backward(np.ones(G.shape, np.float32), y)
    assert dy.shape == shape and not np.isnan(dy).any()
    Gt = nkt.GramMatrix()(torch.zeros(shape))
    assert Gt.shape == G.shape and not torch.isnan(Gt).any()


def test_failed_forward_does_not_count_a_batch():
    bn = nk.nn.BatchNorm2d(3, momentum=None)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(np.zeros((1, 3, 1, 1), np.float32) + 0.5)
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(TypeError):
        bn(np.zeros((2, 3, 2, 2), np.float64) + 0.5)
    assert int(bn.num_batches_tracked) == 0
    x = _x((4, 3, 2, 2))
    bn(x)  # momentum=None after a failure: the cumulative average of one batch is that batch
    np.testing.assert_allclose(bn.running_mean, x.astype(np.float64).mean(axis=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    tb = nkt.BatchNorm2d(3)
    with pytest.raises(ValueError):
        tb(torch.zeros(1, 3, 1, 1))
    assert int(tb.num_batches_tracked) == 0


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_negative_eps_is_an_error_as_in_torch(eps):
    x = _x()
    with pytest.raises(ValueError, match="eps must be"):
        F.batch_norm_forward(x, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        F.batch_norm_forward(x, running_mean=np.zeros(3, np.float32), running_var=_ones(3),
                             training=False, eps=eps)
    with pytest.raises(ValueError, match="eps must be"):
        nk.nn.BatchNorm1d(3, eps=eps)(x)
    xt = torch.from_numpy(x)
    for fn in (torch.nn.functional.batch_norm, nkt.batch_norm) if eps < 0 else (nkt.batch_norm,):
        with pytest.raises(ValueError, match="eps must be"):  # torch takes a NaN eps; we do not
            fn(xt, None, None, training=True, eps=eps)


def test_eps_zero_matches_torch():
    """torch 2.13: eps = 0 is an error in training, and in eval a zero running_var gives inf/NaN."""
    x = np.full((4, 3, 5), 2.5, np.float32)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        F.batch_norm_forward(x, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        nkt.batch_norm(torch.from_numpy(x), None, None, training=True, eps=0.0)
    rm, rv = np.full(3, 2.5, np.float32), np.zeros(3, np.float32)
    with np.errstate(divide="ignore"):
        y = F.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False,
                                 eps=0.0)[0]
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.from_numpy(rm),
                                         torch.from_numpy(rv), training=False, eps=0.0)
    np.testing.assert_array_equal(np.isnan(y), torch.isnan(ref).numpy())


# --- unclear errors ------------------------------------------------------------------------------

def test_running_stats_errors_name_the_running_stat():
    x = _x()
    with pytest.raises(TypeError, match="running_var must be a NumPy or CuPy array"):
        F.batch_norm_forward(x, running_mean=np.zeros(3, np.float32), running_var=[1.0] * 3)
    for training in (True, False):
        with pytest.raises(TypeError, match="running_var must be float32"):
            F.batch_norm_forward(x, running_mean=np.zeros(3, np.float32), running_var=np.ones(3),
                                 training=training)


@pytest.mark.parametrize("value,exc", [(float("inf"), ValueError), (float("nan"), ValueError),
                                       (None, TypeError), (True, TypeError), ("3", TypeError),
                                       (2.5, ValueError), (0, ValueError)])
@pytest.mark.parametrize("family", ["nn", "torch"])
def test_bad_num_features_is_named(value, exc, family):
    layer = nk.nn.BatchNorm1d if family == "nn" else nkt.BatchNorm1d
    with pytest.raises(exc, match="num_features must be a positive integer"):
        layer(value)


@pytest.mark.parametrize("value,exc", [("abc", TypeError), (None, TypeError), (2.5, ValueError)])
def test_bad_num_batches_tracked_in_a_state_dict(value, exc):
    bn = nk.nn.BatchNorm1d(3)
    sd = bn.state_dict()
    sd["num_batches_tracked"] = value
    sd["running_mean"] = np.full(3, 0.5, np.float32)
    with pytest.raises(exc, match="num_batches_tracked"):
        bn.load_state_dict(sd)
    assert not bn.running_mean.any()  # nothing was written


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (10 ** 9, ValueError),
                                       (2 ** 70, ValueError), ("x", TypeError),
                                       (1.5, TypeError)])
def test_set_between_gemm_threads_out_of_range(value, exc):
    before = F.get_between_gemm_threads()
    with pytest.raises(exc, match="set_between_gemm_threads: threads must be"):
        F.set_between_gemm_threads(value)
    assert F.get_between_gemm_threads() == before


@pytest.mark.parametrize("layer", ["nn", "torch"])
def test_comm_must_be_a_communicator(layer):
    make = nk.nn.SyncBatchNorm if layer == "nn" else nkt.SyncBatchNorm
    with pytest.raises(TypeError, match="comm must be a normkit communicator"):
        make(3, comm="world")


def test_sparse_tensors_are_type_errors():
    with pytest.raises(TypeError, match="normkit takes strided CPU and CUDA tensors"):
        nkt.batch_norm(torch.randn(4, 3).to_sparse(), None, None, training=True)


def test_meta_tensors_propagate_shapes_as_in_torch():
    # The core ops are torch custom ops with fake kernels: a meta tensor gets a meta result of
    # the right shape and layout, as torch's own batch_norm gives (no data pointer is touched).
    x = torch.randn(4, 3, 5, 6, device="meta").contiguous(memory_format=torch.channels_last)
    y = nkt.batch_norm(x, None, None, training=True)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert y.device.type == "meta" and y.shape == ref.shape and y.stride() == ref.stride()


# --- rough edges ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
                                  "Conv2d", "Encoding", "Inspiration", "UpsampleConv2d"])
def test_nn_layers_take_device_then_dtype_as_torch(name):
    import inspect
    params = list(inspect.signature(getattr(nk.nn, name)).parameters)
    assert params.index("device") + 1 == params.index("dtype")
    if hasattr(torch.nn, name):
        torch_params = list(inspect.signature(getattr(torch.nn, name)).parameters)
        assert torch_params.index("device") < torch_params.index("dtype")


def test_nn_batchnorm_positional_device_and_dtype():
    bn = nk.nn.BatchNorm1d(3, 1e-5, 0.1, True, True, "cpu", np.float64)
    assert bn.weight.dtype == np.float64 and bn.running_var.dtype == np.float64
    assert nk.nn.BatchNorm1d(3, dtype=np.float64, device="cpu").weight.dtype == np.float64


@pytest.mark.parametrize("obj", [nk.nn.BatchNorm1d, nk.nn.BatchNorm2d, nk.nn.BatchNorm3d,
                                 F.batch_norm_forward, F.set_between_gemm_threads,
                                 nk.nn.Module.load_state_dict, nkt.BatchNorm2d])
def test_help_documents_parameters(obj):
    import pydoc
    text = pydoc.render_doc(obj)
    assert ("Parameters\n" in text and "----------" in text) or "Args:" in text  # torch's style
    assert "num_features" in text or "eps" in text or "threads" in text or "state_dict" in text
