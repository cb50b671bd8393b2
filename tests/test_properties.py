"""Property tests (hypothesis): shapes, strides, offsets, layouts, dtypes and values drawn at
random, every CPU op family compared with a plain float64 NumPy reference. Few examples each and no
deadline: the point is breadth of input, the other test files cover each op in depth."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from normkit import _C  # noqa: E402
from normkit import functional as F  # noqa: E402

from helpers import ref_backward_train, ref_forward_train  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
DTYPES = st.sampled_from([np.float32, np.float64])
TOL = {np.float32: 2e-4, np.float64: 1e-10}


@st.composite
def arrays(draw, shape, dtype):
    """A float array of `shape` with drawn values (a drawn offset and scale, so |mean| >> std
    happens), in a drawn layout: C-contiguous, a dim permutation (channels-last among them),
    reversed or stepped strides, or starting at an element offset into a larger buffer."""
    offset = draw(st.sampled_from([0.0, 3.0, -250.0, 1e4]))
    scale = draw(st.sampled_from([1.0, 0.01, 30.0]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    values = offset + scale * np.random.default_rng(seed).standard_normal(shape)
    layout = draw(st.sampled_from(["contiguous", "permuted", "reversed", "stepped", "offset"]))
    if layout == "permuted":
        perm = draw(st.permutations(range(len(shape))))
        a = np.empty([shape[p] for p in perm], dtype).transpose(np.argsort(perm))
    elif layout == "reversed":
        a = np.empty(shape, dtype)[(slice(None, None, -1),) * len(shape)]
    elif layout == "stepped":
        a = np.empty([n * 2 for n in shape], dtype)[(slice(None, None, 2),) * len(shape)]
    elif layout == "offset":
        k = draw(st.integers(1, 7))
        a = np.empty(int(np.prod(shape)) + k, dtype)[k:].reshape(shape)
    else:
        a = np.empty(shape, dtype)
    a[...] = values
    return a


def nc_shape(max_spatial=2):
    return hnp.array_shapes(min_dims=2, max_dims=2 + max_spatial, min_side=1, max_side=7).filter(
        lambda s: int(np.prod(s)) // s[1] > 1)


def _close(actual, expected, dtype, scale=1.0):
    expected = np.asarray(expected, np.float64)
    atol = TOL[dtype] * scale * max(1.0, float(np.abs(expected).max(initial=0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=TOL[dtype],
                               atol=atol)


def _ratio(x64, var):
    """max |x| / std: how much the rounding of x (and of the mean) is magnified in x - mean."""
    return max(1.0, float(np.abs(x64).max() / np.sqrt(var.min() + 1e-5)))


def _channels(C, seed, dtype, low=0.5, high=1.5):
    return np.random.default_rng(seed).uniform(low, high, C).astype(dtype)


# --- batch norm: the fused ops and the split ones ----------------------------------------------

@SETTINGS
@given(data=st.data(), shape=nc_shape(), dtype=DTYPES)
def test_batch_norm_forward_and_backward(data, shape, dtype):
    x = data.draw(arrays(shape, dtype))
    dy = data.draw(arrays(shape, dtype))
    C = shape[1]
    w, b = _channels(C, 1, dtype), _channels(C, 2, dtype, -1, 1)
    x64 = x.astype(np.float64)
    y, mean, invstd = F.batch_norm_forward(x, w, b, training=True)
    ry, rmean, rvar, _ = ref_forward_train(x64, w.astype(np.float64), b.astype(np.float64), 1e-5)
    _close(mean, rmean, dtype)
    _close(1 / invstd.astype(np.float64) ** 2, rvar + 1e-5, dtype)
    # x - mean in the input's precision: errors grow with |x| / std (float32 data at 1e4 +- 0.01)
    ratio = _ratio(x64, rvar)
    _close(y, ry, dtype, scale=ratio)
    dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = ref_backward_train(dy.astype(np.float64), x64, w.astype(np.float64), 1e-5)
    _close(db, rdb, dtype, scale=10)
    _close(dw, rdw, dtype, scale=10 * ratio)
    _close(dx, rdx, dtype, scale=10 * ratio ** 2)


@SETTINGS
@given(data=st.data(), shape=nc_shape(), dtype=DTYPES)
def test_batch_norm_split_ops(data, shape, dtype):
    x = data.draw(arrays(shape, dtype))
    dy = data.draw(arrays(shape, dtype))
    C = shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    bc = (1, C) + (1,) * (x.ndim - 2)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean, var = F.batch_norm_stats(x)
    _close(mean, x64.mean(axis=axes), dtype)
    _close(var, x64.var(axis=axes), dtype, scale=1.0)
    m, invstd = mean.astype(np.float64), 1 / np.sqrt(var.astype(np.float64) + 1e-3)
    w, b = _channels(C, 3, dtype), _channels(C, 4, dtype, -1, 1)
    y = F.batch_norm_normalize(x, mean, invstd.astype(dtype), w, b)
    ratio = _ratio(x64, var.astype(np.float64))
    _close(y, (x64 - m.reshape(bc)) * (invstd * w).reshape(bc) + b.reshape(bc), dtype,
           scale=10 * ratio)
    sum_dy, sum_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean)
    _close(sum_dy, dy64.sum(axis=axes), dtype, scale=10)
    _close(sum_dy_xmu, (dy64 * (x64 - m.reshape(bc))).sum(axis=axes), dtype, scale=10 * ratio)
    n = x.size // C
    dx = F.batch_norm_backward_elemt(dy, x, mean, invstd.astype(dtype), w, sum_dy, sum_dy_xmu,
                                     count=n)
    p = (w * invstd).reshape(bc)
    ref = p * (dy64 - sum_dy.reshape(bc) / n
               - (x64 - m.reshape(bc)) * (invstd ** 2 * sum_dy_xmu / n).reshape(bc))
    _close(dx, ref, dtype, scale=10 * ratio)


# --- the Encoding family -----------------------------------------------------------------------

@st.composite
def codebooks(draw, dtype):
    B, N, D, K = (draw(st.integers(1, n)) for n in (3, 40, 6, 5))
    X = draw(arrays((B, N, D), dtype))
    X = X / max(1.0, float(np.abs(X).max()))  # Encoding features: the softmax wants moderate ones
    C = np.random.default_rng(draw(st.integers(0, 999))).uniform(-1, 1, (K, D)).astype(dtype)
    s = np.random.default_rng(7).uniform(-1.5, -0.5, K).astype(dtype)
    return X, C, s


@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_encoding_ops(data, dtype):
    X, C, s = data.draw(codebooks(dtype))
    X64, C64, s64 = (a.astype(np.float64) for a in (X, C, s))
    R = X64[:, :, None, :] - C64  # (B, N, K, D) residuals: fine at these sizes
    D2 = (R ** 2).sum(-1)
    SL = s64 * D2
    _close(F.scaled_l2(X, C, s), SL, dtype, scale=10)
    A = np.exp(SL - SL.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    _close(F.aggregate(A.astype(dtype), X, C), np.einsum("bnk,bnkd->bkd", A, R), dtype, scale=10)
    E, A_out, _ = F.encoding_forward(X, C, s)
    _close(A_out, A, dtype, scale=10)
    _close(E, np.einsum("bnk,bnkd->bkd", A, R), dtype, scale=10)
    # backward of sum(E * G): dX against the float64 formula through the softmax
    G = np.random.default_rng(3).standard_normal(E.shape).astype(dtype)
    dX, dC, ds = F.encoding_backward(G, X, C, s, A_out, D2.astype(dtype))
    G64 = G.astype(np.float64)
    dA = np.einsum("bkd,bnkd->bnk", G64, R)
    dSL = A * (dA - (A * dA).sum(-1, keepdims=True))
    rdX = np.einsum("bnk,bkd->bnd", A, G64) + np.einsum("bnk,bnkd->bnd", 2 * s64 * dSL, R)
    _close(dX, rdX, dtype, scale=30)
    _close(ds, (dSL * D2).sum((0, 1)), dtype, scale=30)


# --- im2col / col2im ---------------------------------------------------------------------------

def _ref_im2col(x, kernel, stride, padding, dilation):
    B, C = x.shape[:2]
    dims = x.ndim - 2
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    cols = np.zeros((B, C, int(np.prod(kernel)), int(np.prod(out))))
    for kk, koff in enumerate(np.ndindex(*kernel)):
        for l, o in enumerate(np.ndindex(*out)):
            idx = tuple(o[d] * stride[d] + koff[d] * dilation[d] for d in range(dims))
            cols[:, :, kk, l] = xp[(slice(None), slice(None)) + idx]
    return cols.reshape(B, C * int(np.prod(kernel)), -1), out


@SETTINGS
@given(data=st.data(), dims=st.integers(1, 3), dtype=DTYPES)
def test_im2col_and_col2im(data, dims, dtype):
    kernel = [data.draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(dims)]
    padding = [data.draw(st.integers(0, 2)) for _ in range(dims)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(dims)]
    spatial = [data.draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 6))
               for k, d in zip(kernel, dilation)]
    shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), *spatial)
    x = data.draw(arrays(shape, dtype))
    ref, out = _ref_im2col(x, kernel, stride, padding, dilation)
    assert out == [_C.conv_output_size(*a) for a in zip(spatial, kernel, stride, padding, dilation)]
    cols = data.draw(arrays(ref.shape, dtype))
    _C.im2col(x, cols, kernel, stride, padding, dilation)
    _close(cols, ref, dtype)
    # col2im is im2col's adjoint: <im2col(x), g> = <x, col2im(g)>
    g = data.draw(arrays(ref.shape, dtype))
    back = data.draw(arrays(shape, dtype))
    _C.col2im(g, back, kernel, stride, padding, dilation)
    lhs = float((ref * g.astype(np.float64)).sum())
    rhs = float((x.astype(np.float64) * back.astype(np.float64)).sum())
    assert abs(lhs - rhs) <= TOL[dtype] * 10 * (np.abs(ref).sum() * np.abs(g).max() + 1)
