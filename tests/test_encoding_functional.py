"""normkit.functional's Encoding ops (scaled_l2, aggregate, encoding) against float64 PyTorch
compositions of LAYERS.md's formulas, NumPy gradient formulas and float64 finite differences, over
both dtypes and the feature layouts a caller can pass; N > 65536; s = 0; the cancelling regime of
the GEMM form; the core's strided paths."""
import numpy as np
import pytest
import torch

import normkit.functional as F
from normkit import _C
from encoding_reference import (
    FEATURE_LAYOUTS,
    codebook,
    features,
    n_major,
    numpy_aggregate_backward,
    numpy_scaled_l2_backward,
    reversed_view,
    t64,
    torch_aggregate,
    torch_encoding,
    torch_op,
    torch_scaled_l2,
)
from helpers import assert_close, assert_close_dtype, fd_grad, rng

# (B, N, D, K): one tile, several tiles with a ragged end, one feature, one codeword.
SHAPES = [(2, 5, 3, 4), (3, 70, 6, 5), (1, 130, 9, 2), (2, 1, 4, 3), (2, 9, 4, 1)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = list(FEATURE_LAYOUTS)

# float32 results are compared with float64 references; the softmax and the sums over N and K
# amplify float32 rounding by a few units.
F32_FACTOR = 10


def _problem(shape, layout, dtype, seed=11):
    B, N, D, K = shape
    X0 = features((B, N, D), seed, offset=0.3)
    C0, s0 = codebook(K, D, seed + 1)
    X = FEATURE_LAYOUTS[layout](X0.astype(dtype))
    return X, C0.astype(dtype), s0.astype(dtype)


def _check(actual, expected, dtype, what):
    assert actual.dtype == dtype, (what, actual.dtype)
    factor = 1 if dtype == np.float64 else F32_FACTOR
    assert_close_dtype(actual, expected, dtype, what, factor=factor)


def _softmax_weights(B, N, K, seed):
    z = rng(seed).standard_normal((B, N, K)) * 1.5
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# scaled_l2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scaled_l2_forward(shape, layout, dtype):
    X, C, s = _problem(shape, layout, dtype)
    X_before = X.copy()
    SL, D2 = F.scaled_l2_forward(X, C, s)
    assert SL.shape == D2.shape == shape[:2] + (shape[3],)
    np.testing.assert_array_equal(X, X_before)
    tX, tC, ts = (t64(a) for a in (X, C, s))
    _check(SL, torch_scaled_l2(tX, tC, ts).numpy(), dtype, "SL")
    R = np.asarray(X, np.float64)[:, :, None, :] - np.asarray(C, np.float64)
    _check(D2, (R * R).sum(-1), dtype, "D2")
    np.testing.assert_array_equal(F.scaled_l2(X, C, s), SL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_scaled_l2_backward(shape, layout, dtype):
    X, C, s = _problem(shape, layout, dtype)
    B, N, D, K = shape
    g0 = rng(3).standard_normal((B, N, K))
    g = reversed_view(g0.astype(dtype))  # dSL in a layout of its own
    _, D2 = F.scaled_l2_forward(X, C, s)
    dX, dC, ds = F.scaled_l2_backward(g, X, C, s, D2)
    _, (tdX, tdC, tds) = torch_op(torch_scaled_l2, (X, C, s), g0)
    ndX, ndC, nds = numpy_scaled_l2_backward(g0, *(np.asarray(a, np.float64) for a in (X, C, s)))
    for name, got, ref_t, ref_n in (("dX", dX, tdX, ndX), ("dC", dC, tdC, ndC),
                                    ("ds", ds, tds, nds)):
        _check(got, ref_t, dtype, name + " vs torch")
        assert_close(ref_t, ref_n, 1e-12, 1e-12, name + ": the two references disagree")
    assert dX.shape == X.shape and dC.shape == C.shape and ds.shape == s.shape


# --------------------------------------------------------------------------------------------------
# aggregate


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_aggregate(shape, layout, dtype):
    X, C, _ = _problem(shape, layout, dtype)
    B, N, D, K = shape
    A0 = _softmax_weights(B, N, K, 4)
    A = n_major(A0.astype(dtype)) if layout == "rows" else A0.astype(dtype)
    gE = rng(5).standard_normal((B, K, D))
    E = F.aggregate(A, X, C)
    dA, dX, dC = F.aggregate_backward(gE.astype(dtype), A, X, C)
    tE, (tdA, tdX, tdC) = torch_op(torch_aggregate, (A, X, C), gE)
    _check(E, tE, dtype, "E")
    X64, C64 = np.asarray(X, np.float64), np.asarray(C, np.float64)
    ndA, ndX, ndC = numpy_aggregate_backward(gE, np.asarray(A, np.float64), X64, C64)
    for name, got, ref_t, ref_n in (("dA", dA, tdA, ndA), ("dX", dX, tdX, ndX),
                                    ("dC", dC, tdC, ndC)):
        _check(got, ref_t, dtype, name + " vs torch")
        assert_close(ref_t, ref_n, 1e-12, 1e-12, name + ": the two references disagree")


# --------------------------------------------------------------------------------------------------
# encoding


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_encoding_forward_backward(shape, layout, dtype):
    X, C, s = _problem(shape, layout, dtype)
    B, N, D, K = shape
    gE = rng(6).standard_normal((B, K, D))
    X_before, C_before, s_before = X.copy(), C.copy(), s.copy()
    E, A, D2 = F.encoding_forward(X, C, s)
    dX, dC, ds = F.encoding_backward(gE.astype(dtype), X, C, s, A, D2)
    for a, before in ((X, X_before), (C, C_before), (s, s_before)):
        np.testing.assert_array_equal(a, before)
    tE, (tdX, tdC, tds) = torch_op(torch_encoding, (X, C, s), gE)
    _check(E, tE, dtype, "E")
    tA = torch.softmax(torch_scaled_l2(*(t64(a) for a in (X, C, s))), dim=2).numpy()
    _check(A, tA, dtype, "A")
    np.testing.assert_allclose(A.sum(-1), 1.0, rtol=1e-6 if dtype == np.float32 else 1e-14)
    _check(dX, tdX, dtype, "dX")
    _check(dC, tdC, dtype, "dC")
    _check(ds, tds, dtype, "ds")
    np.testing.assert_array_equal(F.encoding(X, C, s), E)


# --------------------------------------------------------------------------------------------------
# Finite differences (float64): every input of every op.


def _fd_case(seed=21, shape=(2, 5, 3, 4)):
    B, N, D, K = shape
    X = features((B, N, D), seed, offset=0.2)
    C, s = codebook(K, D, seed + 1)
    return X, C, s


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_fd_scaled_l2(layout):
    X, C, s = _fd_case()
    X = FEATURE_LAYOUTS[layout](X)
    R = rng(22).standard_normal(X.shape[:2] + C.shape[:1])
    loss = lambda: float((F.scaled_l2(X, C, s) * R).sum())  # noqa: E731
    _, D2 = F.scaled_l2_forward(X, C, s)
    dX, dC, ds = F.scaled_l2_backward(R, X, C, s, D2)
    for name, got, arg in (("X", dX, X), ("C", dC, C), ("s", ds, s)):
        assert_close(got, fd_grad(loss, arg), 1e-7, 1e-8, "d" + name)


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_fd_aggregate(layout):
    X, C, _ = _fd_case(seed=31)
    X = FEATURE_LAYOUTS[layout](X)
    A = _softmax_weights(X.shape[0], X.shape[1], C.shape[0], 32)
    R = rng(33).standard_normal((X.shape[0],) + C.shape)
    loss = lambda: float((F.aggregate(A, X, C) * R).sum())  # noqa: E731
    dA, dX, dC = F.aggregate_backward(R, A, X, C)
    for name, got, arg in (("A", dA, A), ("X", dX, X), ("C", dC, C)):
        assert_close(got, fd_grad(loss, arg), 1e-7, 1e-8, "d" + name)


@pytest.mark.parametrize("layout", ["rows", "n_major", "strided"])
def test_fd_encoding(layout):
    X, C, s = _fd_case(seed=41, shape=(2, 7, 3, 4))
    X = FEATURE_LAYOUTS[layout](X)
    R = rng(42).standard_normal((X.shape[0],) + C.shape)
    loss = lambda: float((F.encoding(X, C, s) * R).sum())  # noqa: E731
    E, A, D2 = F.encoding_forward(X, C, s)
    dX, dC, ds = F.encoding_backward(R, X, C, s, A, D2)
    for name, got, arg in (("X", dX, X), ("C", dC, C), ("s", ds, s)):
        assert_close(got, fd_grad(loss, arg), 1e-7, 1e-8, "d" + name)


# --------------------------------------------------------------------------------------------------
# Scale zero, large N, cancellation


def test_zero_scale_gives_finite_exact_gradients():
    """At s = 0 upstream's ds = sum g SL / s is 0/0; normkit's is sum g D2."""
    X, C, s = _fd_case(seed=51, shape=(2, 6, 3, 4))
    s[[0, 2]] = 0.0
    gE = rng(52).standard_normal((2, 4, 3))
    E, A, D2 = F.encoding_forward(X, C, s)
    dX, dC, ds = F.encoding_backward(gE, X, C, s, A, D2)
    tE, (tdX, tdC, tds) = torch_op(torch_encoding, (X, C, s), gE)
    for got, ref in ((E, tE), (dX, tdX), (dC, tdC), (ds, tds)):
        assert np.all(np.isfinite(got))
        assert_close(got, ref, 1e-12, 1e-12)
    assert np.all(ds[[0, 2]] != 0)  # the gradient at s = 0 is a real one, not a masked NaN
    g = rng(53).standard_normal(A.shape)
    _, D2 = F.scaled_l2_forward(X, C, s)
    _, _, ds_l2 = F.scaled_l2_backward(g, X, C, s, D2)
    assert_close(ds_l2, (g * D2).sum((0, 1)), 1e-12, 1e-12)


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_float16_features_compute_in_float32(layout):
    """float16 X with float32 C and s: the ops compute in float32, E / SL / dX come back in
    float16 (the float32 result rounded once), A, D2 and the parameter gradients in float32."""
    X, C, s = _problem((2, 37, 5, 4), layout, np.float16)
    C, s = C.astype(np.float32), s.astype(np.float32)
    X32 = X.astype(np.float32)  # exactly the values the float16 call sees
    gE = rng(7).standard_normal((2, 4, 5)).astype(np.float16)
    E, A, D2 = F.encoding_forward(X, C, s)
    dX, dC, ds = F.encoding_backward(gE, X, C, s, A, D2)
    E32, A32, D232 = F.encoding_forward(X32, C, s)
    dX32, dC32, ds32 = F.encoding_backward(gE.astype(np.float32), X32, C, s, A32, D232)
    assert E.dtype == dX.dtype == np.float16
    assert A.dtype == D2.dtype == dC.dtype == ds.dtype == np.float32
    np.testing.assert_array_equal(E, E32.astype(np.float16))
    np.testing.assert_array_equal(dX, dX32.astype(np.float16))
    for got, ref in ((A, A32), (D2, D232), (dC, dC32), (ds, ds32)):
        np.testing.assert_array_equal(got, ref)
    tE, (tdX, _, _) = torch_op(torch_encoding, (X32, C, s), gE.astype(np.float64))
    assert_close_dtype(E, tE, np.float16, "E", factor=2)
    assert_close_dtype(dX, tdX, np.float16, "dX", factor=2)
    SL, D2 = F.scaled_l2_forward(X, C, s)
    assert SL.dtype == np.float16 and D2.dtype == np.float32
    g = rng(8).standard_normal(SL.shape).astype(np.float16)
    dX, dC, ds = F.scaled_l2_backward(g, X, C, s, D2)
    ref = F.scaled_l2_backward(g.astype(np.float32), X32, C, s, D2)
    assert dX.dtype == np.float16 and dC.dtype == ds.dtype == np.float32
    np.testing.assert_array_equal(dX, ref[0].astype(np.float16))
    np.testing.assert_array_equal(dC, ref[1])
    E = F.aggregate(A, X, C)
    assert E.dtype == np.float16
    np.testing.assert_array_equal(E, F.aggregate(A, X32, C).astype(np.float16))


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_encoding_more_than_65536_features(layout):
    B, N, D, K = 1, 70001, 3, 4
    X0 = features((B, N, D), 61, offset=0.1)
    C, s = codebook(K, D, 62)
    X = FEATURE_LAYOUTS[layout](X0.astype(np.float32))
    gE = rng(63).standard_normal((B, K, D))
    E, A, D2 = F.encoding_forward(X, C.astype(np.float32), s.astype(np.float32))
    dX, dC, ds = F.encoding_backward(gE.astype(np.float32), X, C.astype(np.float32),
                                     s.astype(np.float32), A, D2)
    tE, (tdX, tdC, tds) = torch_op(torch_encoding, (X, C, s), gE)
    # Sums over 70001 features: float32 rounding grows with sqrt(N).
    for name, got, ref in (("E", E, tE), ("dX", dX, tdX), ("dC", dC, tdC), ("ds", ds, tds)):
        assert_close(got, ref, 1e-3, 2e-5, name)
    # the last features (beyond 65536) are assigned like the first
    assert_close(dX[:, 65536:], tdX[:, 65536:], 1e-3, 2e-5, "dX beyond 65536")


def test_cancelling_distances_keep_float32_accuracy():
    """|x| ~ 1000 and |x - c| ~ 0.05: the GEMM form of the distances loses every digit in float32
    (and the softmax of s * D2 with it); normkit recomputes those distances from the residual, so
    D2 stays within float32 ulps of the exact distances and A follows. E = A^T X - sumA c keeps the
    GEMM form's error, bounded by (N + 2) eps (A^T |X| + sumA |c|): that of perturbing x by its own
    rounding."""
    B, N, D, K = 2, 67, 8, 3
    g = rng(71)
    base = 1000.0 + g.uniform(-1, 1, D)
    C = (base + g.uniform(-0.05, 0.05, (K, D))).astype(np.float32)
    X = (base + g.uniform(-0.05, 0.05, (B, N, D))).astype(np.float32)
    s = np.array([-300.0, -200.0, -500.0], np.float32)
    X64, C64, s64 = X.astype(np.float64), C.astype(np.float64), s.astype(np.float64)
    exact = ((X64[:, :, None] - C64) ** 2).sum(-1)
    naive = ((X * X).sum(-1)[..., None] - 2 * X @ C.T + (C * C).sum(-1)).astype(np.float64)
    assert np.max(np.abs(naive - exact)) > 100 * np.max(exact) * 1e-5  # the test is a hard one
    tA = torch.softmax(torch.tensor(s64 * exact), dim=2).numpy()
    eps = np.finfo(np.float32).eps
    for layout in ("rows", "n_major"):
        Xl = FEATURE_LAYOUTS[layout](X)
        SL, D2 = F.scaled_l2_forward(Xl, C, s)
        np.testing.assert_allclose(D2, exact, rtol=2e-6)
        E, A, _ = F.encoding_forward(Xl, C, s)
        np.testing.assert_allclose(A, tA, rtol=1e-4, atol=1e-6)
        tE = np.einsum("bik,bikd->bkd", tA, X64[:, :, None] - C64)
        bound = (N + 2) * eps * (np.einsum("bik,bid->bkd", tA, np.abs(X64))
                                 + tA.sum(1)[..., None] * np.abs(C64))
        assert np.all(np.abs(E - tE) <= bound), layout


def test_softmax_is_exact_over_the_whole_range_of_exp(dtype):
    """Two codewords at 0 with scales -1 and 0: A[:, :, 0] = e^-d / (e^-d + 1) with d = x^2 (D = 1)
    swept over every exponent the softmax evaluates, down to the smallest normal number and past
    it (where terms are flushed to zero). Compared with float64 from the same rounded d: the
    softmax's own exp and division add only a few ulps."""
    tiny = np.finfo(dtype).tiny
    top = np.sqrt(-np.log(tiny))
    x = np.concatenate([np.linspace(0, top, 3001), top * np.array([1.001, 1.01, 1.1, 2.0])])
    X = x.astype(dtype).reshape(1, -1, 1)
    C = np.zeros((2, 1), dtype)
    s = np.array([-1.0, 0.0], dtype)
    _, A, D2 = F.encoding_forward(X, C, s)
    np.testing.assert_array_equal(D2[..., 0], (X * X)[..., 0])  # exact: the test sees only exp
    e = np.exp(-D2[..., 0].astype(np.float64))
    expected = np.where(e < tiny, 0.0, e / (1.0 + e))
    ulp = np.finfo(dtype).eps
    np.testing.assert_allclose(A[..., 0], expected, rtol=4 * ulp, atol=0)
    np.testing.assert_allclose(A[..., 1], 1.0 / (1.0 + e), rtol=4 * ulp, atol=0)
    assert np.all(A[0, -4:, 0] == 0) and np.all(A[0, :-5, 0] > 0)  # flushed only past the range


# --------------------------------------------------------------------------------------------------
# The core with strides the functional layer never produces


def test_core_accepts_any_strides(dtype):
    B, N, D, K = 2, 70, 5, 3
    X0 = features((B, N, D), 81).astype(dtype)
    C, s = (a.astype(dtype) for a in codebook(K, D, 82))
    X = reversed_view(X0)[:, :, :]  # negative strides everywhere
    base = np.zeros((B, N, 2 * K + 1), dtype)
    XC = base[:, :, 1::2]  # non-unit strides in both N and K
    XC[...] = X0 @ C.T
    D2 = reversed_view(np.zeros((B, N, K), dtype))
    SL = np.zeros((B, K, N), dtype).swapaxes(1, 2)
    _C.scaled_l2_forward(X, C, s, XC, D2, SL)
    exact = ((X0.astype(np.float64)[:, :, None] - C.astype(np.float64)) ** 2).sum(-1)
    assert_close_dtype(D2, exact, dtype, "D2")
    assert_close_dtype(SL, exact * s.astype(np.float64), dtype, "SL")
    r = reversed_view(rng(83).standard_normal((B, N)).astype(dtype))
    dX = np.ones((B, D, N), dtype).swapaxes(1, 2)[:, ::-1]
    _C.add_scaled_features(X[:, ::-1], r[:, ::-1], dX)  # dX += r x
    expected = 1 + np.asarray(r[:, ::-1], np.float64)[..., None] * X0[:, ::-1]
    assert_close_dtype(dX, expected, dtype, "dX")


# --------------------------------------------------------------------------------------------------
# Errors: the right exception and a message naming the problem


def test_encoding_op_errors():
    X, C, s = _problem((2, 5, 3, 4), "rows", np.float32)
    with pytest.raises(ValueError, match=r"encoding: X must have shape \(B, N, D\), got 2D input"):
        F.encoding(X[0], C, s)
    with pytest.raises(ValueError, match=r"C \(codewords\) must have shape \(K, D\) with D = 3 .* "
                                         r"got \(4, 2\)"):
        F.encoding(X, C[:, :2], s)
    with pytest.raises(ValueError, match=r"scaled_l2: s must have shape \(K\) = \(4,\), "
                                         r"got \(3,\)"):
        F.scaled_l2(X, C, s[:3])
    with pytest.raises(TypeError, match="C must be float32 for float32 X, got float64"):
        F.encoding(X, C.astype(np.float64), s)
    with pytest.raises(TypeError, match="X has dtype int32; the encoding ops take float16, "
                                        "float32 or float64"):
        F.encoding(X.astype(np.int32), C, s)
    with pytest.raises(TypeError, match="C must be float32 for float16 X, got float16"):
        F.encoding(X.astype(np.float16), C.astype(np.float16), s.astype(np.float16))
    with pytest.raises(TypeError, match="X must be a NumPy or CuPy array, got torch.Tensor"):
        F.encoding(torch.ones(2, 5, 3), C, s)
    E, A, D2 = F.encoding_forward(X, C, s)
    with pytest.raises(ValueError, match=r"dE must have shape \(B, K, D\) = \(2, 4, 3\), "
                                         r"got \(2, 3, 4\)"):
        F.encoding_backward(np.ones((2, 3, 4), np.float32), X, C, s, A, D2)
    with pytest.raises(ValueError, match=r"A must have shape \(B, N, K\) = \(2, 5, 4\), "
                                         r"got \(2, 4, 5\)"):
        F.encoding_backward(E, X, C, s, A.swapaxes(1, 2), D2)
    with pytest.raises(TypeError, match="D2 must be float32 for float32 X, got float64"):
        F.scaled_l2_backward(A, X, C, s, D2.astype(np.float64))
    with pytest.raises(ValueError, match=r"aggregate: A must have shape \(B, N, K\) = \(2, 5, 4\)"):
        F.aggregate(A[:, :4], X, C)
    with pytest.raises(ValueError, match=r"dE must have shape \(B, K, D\)"):
        F.aggregate_backward(E[:1], A, X, C)


def test_core_encoding_errors():
    X, C, s = _problem((2, 5, 3, 4), "rows", np.float32)
    XC, D2 = X @ C.T, np.empty((2, 5, 4), np.float32)
    A, sumA = np.empty((2, 5, 4), np.float32), np.empty((2, 4), np.float32)
    _C.encoding_forward(X, C, s, XC, D2, A, sumA)
    D2.flags.writeable = False
    with pytest.raises(ValueError, match="encoding_forward: output D2 is read-only"):
        _C.encoding_forward(X, C, s, XC, D2, A, sumA)
    D2 = np.empty((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match=r"XC must have shape \(B, N, K\) = \(2, 5, 4\), "
                                         r"got \(2, 4, 5\)"):
        _C.encoding_forward(X, C, s, XC.swapaxes(1, 2), D2, A, sumA)
    with pytest.raises(ValueError, match=r"sumA must have shape \(B, K\) = \(2, 4\), got \(4,\)"):
        _C.encoding_forward(X, C, s, XC, D2, A, sumA[0])
    with pytest.raises(ValueError, match="C has 2 features per codeword but X has 3"):
        _C.scaled_l2_forward(X, C[:, :2], s, XC, D2, None)
    with pytest.raises(TypeError, match="A must be float32 \\(like X\\), got float64"):
        _C.encoding_forward(X, C, s, XC, D2, A.astype(np.float64), sumA)
    with pytest.raises(TypeError, match="float16 is not supported on the CPU"):
        h = np.float16
        _C.scaled_l2_forward(X.astype(h), C, s, XC, D2, None)
    with pytest.raises(ValueError, match=r"r must have shape \(B, N\) = \(2, 5\)"):
        _C.add_scaled_features(X, np.ones(5, np.float32), np.zeros_like(X))
    with pytest.raises(ValueError, match="encoding_backward: A is required"):
        _C.encoding_backward(None, C, s, None, D2, XC, A, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Threads


@pytest.fixture
def between_gemm_threads():
    """Restores the thread setting after a test changes it."""
    before = F.get_between_gemm_threads()
    yield F.set_between_gemm_threads
    F.set_between_gemm_threads(before)


@pytest.mark.parametrize("layout", ["rows", "n_major"])
def test_threaded_kernels_agree_with_the_calling_thread(layout, between_gemm_threads):
    """Big enough for several threads (which the default, 1, never uses): same results up to the
    order of the sums, which is fixed for a given thread count."""
    assert F.get_between_gemm_threads() == 1
    B, N, D, K = 3, 1500, 7, 40
    X = FEATURE_LAYOUTS[layout](features((B, N, D), 91).astype(np.float32))
    C, s = (a.astype(np.float32) for a in codebook(K, D, 92))
    gE = rng(93).standard_normal((B, K, D)).astype(np.float32)
    g = rng(94).standard_normal((B, N, K)).astype(np.float32)

    def run():
        E, A, D2 = F.encoding_forward(X, C, s)
        SL, _ = F.scaled_l2_forward(X, C, s)
        return (E, A, D2, SL) + F.encoding_backward(gE, X, C, s, A, D2) + \
            F.scaled_l2_backward(g, X, C, s, D2)

    one = run()
    for threads in (2, 3, 0):
        between_gemm_threads(threads)
        many = run()
        for a, b in zip(one, many):
            assert_close(b, a, 1e-5, 1e-6)
        np.testing.assert_array_equal(run()[-1], many[-1])  # reproducible for a thread count
    with pytest.raises(ValueError, match="threads must be >= 0"):
        F.set_between_gemm_threads(-1)
