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
from wsconv_reference import ref_standardize  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
DTYPES = st.sampled_from([np.float32, np.float64])
TOL = {np.float16: 4e-3, np.float32: 2e-4, np.float64: 1e-10}
HALF = st.sampled_from([np.float16, np.float32, np.float64])  # ops whose CPU kernels take float16


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


# --- group norm: the fused ops and the split ones ----------------------------------------------

@st.composite
def grouped_shapes(draw):
    """(N, C, *spatial) with G dividing C and more than one value per (sample, group)."""
    G, per = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 5), max_size=2))
    shape = (draw(st.integers(1, 3)), G * per, *spatial)
    if per * int(np.prod(spatial)) < 2:
        shape = shape + (2,)
    return shape, G


def _grouped(a, G):
    """(N, G, C/G, *spatial) float64 view of a (N, C, *spatial) array."""
    return a.astype(np.float64).reshape(a.shape[0], G, a.shape[1] // G, *a.shape[2:])


def _group_axes(ndim):
    return tuple(range(2, ndim + 1))


@SETTINGS
@given(data=st.data(), case=grouped_shapes(), dtype=HALF)
def test_group_norm_forward_and_backward(data, case, dtype):
    shape, G = case
    x, dy = data.draw(arrays(shape, dtype)), data.draw(arrays(shape, dtype))
    pd = np.float64 if dtype == np.float64 else np.float32
    C = shape[1]
    w, b = _channels(C, 5, pd), _channels(C, 6, pd, -1, 1)
    ax = _group_axes(x.ndim)
    xg = _grouped(x, G)
    mean, var = xg.mean(axis=ax, keepdims=True), xg.var(axis=ax, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5)
    xhat = ((xg - mean) * rstd).reshape(shape)
    bc = (1, C) + (1,) * (x.ndim - 2)
    y, m, r = F.group_norm_forward(x, G, w, b, eps=1e-5)
    ratio = _ratio(x.astype(np.float64), var)
    _close(m, mean.reshape(-1, G), pd)
    _close(r, rstd.reshape(-1, G), pd, scale=ratio)
    _close(y, xhat * w.reshape(bc) + b.reshape(bc), dtype, scale=10 * ratio)
    dx, dw, db = F.group_norm_backward(dy, x, m, r, w, b)
    dxhat = (dy.astype(np.float64) * w.reshape(bc)).reshape(xg.shape)
    xh = xhat.reshape(xg.shape)
    rdx = rstd * (dxhat - dxhat.mean(axis=ax, keepdims=True)
                  - xh * (dxhat * xh).mean(axis=ax, keepdims=True))
    red = (0,) + tuple(range(2, x.ndim))
    _close(db, dy.astype(np.float64).sum(axis=red), pd, scale=10)
    _close(dw, (dy.astype(np.float64) * xhat).sum(axis=red), pd, scale=10 * ratio)
    _close(dx, rdx.reshape(shape), dtype, scale=10 * ratio ** 2)


@SETTINGS
@given(data=st.data(), case=grouped_shapes(), dtype=HALF)
def test_group_norm_split_ops(data, case, dtype):
    shape, G = case
    x, dy = data.draw(arrays(shape, dtype)), data.draw(arrays(shape, dtype))
    pd = np.float64 if dtype == np.float64 else np.float32
    N, C = shape[:2]
    ax = _group_axes(x.ndim)
    xg, dyg = _grouped(x, G), _grouped(dy, G)
    mean, var = F.group_norm_stats(x, G)
    _close(mean, xg.mean(axis=ax), pd)
    _close(var, xg.var(axis=ax), pd)
    m = mean.astype(np.float64).reshape((N, G, 1) + (1,) * (x.ndim - 2))
    rng = np.random.default_rng(8)
    scale, shift = (rng.uniform(0.5, 1.5, (N, C)).astype(pd) for _ in range(2))
    per_c = (N, G, C // G) + (1,) * (x.ndim - 2)  # (N, C) coefficients over the grouped view
    y = F.group_norm_affine(x, mean, scale, shift)
    ratio = _ratio(x.astype(np.float64), xg.var(axis=ax))
    ref = (xg - m) * scale.reshape(per_c) + shift.reshape(per_c)
    _close(y, ref.reshape(shape), dtype, scale=10 * ratio)
    sum_dy, sum_dy_xmu = F.group_norm_backward_reduce(dy, x, mean)
    sp = tuple(range(3, x.ndim + 1))
    _close(sum_dy, dyg.sum(axis=sp).reshape(N, C), pd, scale=10)
    _close(sum_dy_xmu, (dyg * (xg - m)).sum(axis=sp).reshape(N, C), pd, scale=10 * ratio)
    a = rng.uniform(0.5, 1.5, (N, C)).astype(pd)
    bb, cc = rng.uniform(-1, 1, (N, G)).astype(pd), rng.uniform(-1, 1, (N, G)).astype(pd)
    per_g = (N, G, 1) + (1,) * (x.ndim - 2)
    dx = F.group_norm_backward_elemt(dy, x, mean, a, bb, cc)
    ref = a.reshape(per_c) * dyg + bb.reshape(per_g) * (xg - m) + cc.reshape(per_g)
    _close(dx, ref.reshape(shape), dtype, scale=10 * ratio)


@SETTINGS
@given(data=st.data(), case=grouped_shapes(), low=st.sampled_from(["bfloat16", "float16"]))
def test_group_norm_low_precision_through_torch(data, case, low):
    """bfloat16 (which NumPy lacks) and float16 tensors: float32 statistics, so the error is the
    output's own rounding, against float64 over the same rounded input."""
    torch = pytest.importorskip("torch")
    import normkit.torch as nkt
    shape, G = case
    dtype = getattr(torch, low)
    x = torch.from_numpy(np.ascontiguousarray(data.draw(arrays(shape, np.float32)))).to(dtype)
    if data.draw(st.booleans()):  # channels-last strides, for any number of spatial dims
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x64 = x.double()
    ref = torch.nn.functional.group_norm(x64, G, eps=1e-5)
    y = nkt.group_norm(x, G, eps=1e-5)
    assert y.dtype == dtype
    var = x64.reshape(shape[0], G, -1).var(-1, unbiased=False).numpy()
    ratio = _ratio(x64.numpy(), var)
    tol = {"bfloat16": 2e-2, "float16": 4e-3}[low] * ratio
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * 4)


# --- weight standardization --------------------------------------------------------------------

def _ws_backward_ref(dw_hat, w, gain, eps, convention):
    """The float64 gradient of ws_standardize: w_hat = gain * (w - mean) * rstd with
    rstd = 1 / sqrt(d), d = max(k * var_biased, eps) or var_biased + eps (the module's table)."""
    w, dw_hat = w.astype(np.float64), dw_hat.astype(np.float64)
    C0, n = w.shape[0], w[0].size
    flat, dflat = w.reshape(C0, n), dw_hat.reshape(C0, n)
    g = np.ones(C0) if gain is None else gain.astype(np.float64)
    xc = flat - flat.mean(axis=1, keepdims=True)
    var = (xc ** 2).mean(axis=1, keepdims=True)
    if convention == "timm":
        k, d, floor = 1.0, var + eps, np.zeros_like(var, bool)
    else:
        k = w.size * n / (n - 1) if convention == "elektronn3" else n
        d = np.maximum(k * var, eps)
        floor = k * var < eps  # where the floor holds, d does not depend on w
    r = 1 / np.sqrt(d)
    gd = g[:, None] * dflat
    dw = r * (gd - gd.mean(axis=1, keepdims=True))
    dw -= np.where(floor, 0.0, r ** 3 * k * xc * (gd * xc).mean(axis=1, keepdims=True))
    dgain = (dflat * xc * r).sum(axis=1)
    return dw.reshape(w.shape), dgain


@SETTINGS
@given(data=st.data(), dtype=DTYPES,
       shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4).filter(
           lambda s: int(np.prod(s[1:])) > 1),
       convention=st.sampled_from(["elektronn3", "nfnet", "timm"]), with_gain=st.booleans())
def test_ws_standardize_forward_and_backward(data, dtype, shape, convention, with_gain):
    torch = pytest.importorskip("torch")
    w, dw_hat = data.draw(arrays(shape, dtype)), data.draw(arrays(shape, dtype))
    gain = _channels(shape[0], 9, dtype) if with_gain else None
    w_hat, mean, rstd = F.ws_standardize(w, gain, eps=1e-4, convention=convention)
    w64 = torch.from_numpy(w.astype(np.float64))
    g64 = None if gain is None else torch.from_numpy(gain.astype(np.float64))
    ref = ref_standardize(w64, g64, 1e-4, convention).numpy()
    flat = w.astype(np.float64).reshape(shape[0], -1)
    ratio = _ratio(flat, flat.var(axis=1))
    _close(mean, flat.mean(axis=1), dtype)
    _close(w_hat, ref, dtype, scale=10 * ratio)
    dw, dgain = F.ws_standardize_backward(dw_hat, w, gain, mean, rstd, eps=1e-4,
                                          convention=convention)
    rdw, rdgain = _ws_backward_ref(dw_hat, w, gain, 1e-4, convention)
    _close(dgain, rdgain, dtype, scale=30 * ratio)
    # dw subtracts the mean of gain * dw_hat: its rounding scales with |dw_hat| * rstd, not |dw|
    dy_scale = float(np.abs(dw_hat).max() * rstd.max()) * (1 if gain is None else gain.max())
    _close(dw, rdw, dtype, scale=30 * ratio ** 2 * max(1.0, dy_scale))


@SETTINGS
@given(data=st.data(), shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=4),
       convention=st.sampled_from(["elektronn3", "nfnet", "timm"]))
def test_ws_standardize_bfloat16_through_torch(data, shape, convention):
    """bfloat16 weights through normkit.torch (the CPU kernels take bfloat16; float16 only runs
    on CUDA): float32 statistics, so the error is the output's own rounding."""
    torch = pytest.importorskip("torch")
    import normkit.torch as nkt
    dtype = torch.bfloat16
    w = torch.from_numpy(np.ascontiguousarray(data.draw(arrays(shape, np.float32)))).to(dtype)
    w_hat = nkt.ws_standardize(w, None, eps=1e-4, convention=convention)
    assert w_hat.dtype == dtype
    ref = ref_standardize(w.double(), None, 1e-4, convention)
    flat = w.double().reshape(shape[0], -1).numpy()
    tol = 2e-2 * _ratio(flat, flat.var(axis=1))
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(w_hat.double(), ref, rtol=tol, atol=tol * scale)


# --- convolution -------------------------------------------------------------------------------

def _ref_conv2d(x, w, b, stride, padding, dilation, groups):
    """float64 convolution as a sum over kernel offsets of strided slices (einsum per group)."""
    B, C = x.shape[:2]
    O, Cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    oh, ow = ((xp.shape[2 + i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
              for i, k in enumerate((kh, kw)))
    y = np.zeros((B, O, oh, ow))
    og = O // groups
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            patch = xp[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                       c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
            for g in range(groups):
                y[:, g * og:(g + 1) * og] += np.einsum(
                    "bchw,oc->bohw", patch[:, g * Cg:(g + 1) * Cg],
                    w[g * og:(g + 1) * og, :, i, j].astype(np.float64))
    return y + (0 if b is None else b.astype(np.float64)[None, :, None, None])


@SETTINGS
@given(data=st.data(), dtype=DTYPES)
def test_conv2d_forward(data, dtype):
    groups = data.draw(st.integers(1, 3))
    Cg, og = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(2)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(2)]
    padding = [data.draw(st.integers(0, 2)) for _ in range(2)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(2)]
    spatial = [data.draw(st.integers(max(1, d * (k - 1) + 1 - 2 * p), d * (k - 1) + 6))
               for k, d, p in zip(kernel, dilation, padding)]
    x = data.draw(arrays((data.draw(st.integers(1, 2)), groups * Cg, *spatial), dtype))
    x = x / max(1.0, float(np.abs(x).max()))
    w = data.draw(arrays((groups * og, Cg, *kernel), dtype))
    w = w / max(1.0, float(np.abs(w).max()))
    b = _channels(groups * og, 10, dtype, -1, 1) if data.draw(st.booleans()) else None
    y = F.convolution(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    ref = _ref_conv2d(x, w, b, stride, padding, dilation, groups)
    assert y.shape == ref.shape
    _close(y, ref, dtype, scale=10)
