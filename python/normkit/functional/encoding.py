"""The Encoding layer family (Deep TEN / EncNet / MSG-Net) over NumPy or CuPy arrays.

Notation: X (B, N, D) features, C (K, D) codewords, s (K,) scales,
``D2[b,i,k] = ||x[b,i] - c[k]||^2``, ``SL = s * D2``, ``A = softmax_k(SL)``,
``E[b,k] = sum_i A[b,i,k] (x[b,i] - c[k])``.

Every product here is a matrix product, so it runs on the array library's BLAS (``matmul``), and
the native core does the rest in one fused pass per direction over the (B, N, K) arrays (distances,
softmax and their gradients); nothing of size B*N*K*D is ever formed, and N is unbounded. Distances
use ``||x||^2 - 2 x.c + ||c||^2``; where that cancels (|x| >> |x - c|, by more than
``_C.encoding_cancellation_ratio``) the core recomputes them from the residual, so they keep the
accuracy of the residual form: they are squared and exponentiated, so their errors would grow. E
(``A^T X - (sum_i A) c``) and the gradients keep the GEMM form, whose rounding is eps * |x| -- what
perturbing x by its own rounding gives, and more than the residual form's eps * |x - c| only when
|x| >> |x - c|. The scale gradient is ``sum dSL * D2``, finite at s = 0 (upstream divides SL by s).

Layout: X may be any (B, N, D) view. A (B, D, N) array seen as (B, N, D) (a layer's input,
transposed without a copy) keeps N contiguous, and the (B, N, K) arrays are then stored (B, K, N)
alike, so that every GEMM reads and writes unit-stride rows; anything BLAS cannot read in place is
copied once.

Dtypes: float32 and float64 (the same for X, C, s and everything derived), and float16 X with
float32 C and s, computed in float32 (the accumulation type of the kernels and the GEMMs): outputs
in X's role (E, SL, dX) come back in float16; A, D2 and the parameter gradients stay float32.

CuPy arrays run on CuPy's current stream, with a workspace from CuPy's memory pool.

Threads: the core's kernels alternate with the BLAS products, whose thread pool keeps spinning on
the other cores for a while after each one; a second pool competing for them loses more than it
gains, so the kernels run on the calling thread unless ``set_between_gemm_threads`` says otherwise.
"""
import math
import numbers

from .. import _C
from .._backend import array_module, launch_args, on_array_device, param_dtype

# --------------------------------------------------------------------------------------------------
# Threads


_MAX_THREADS = 4096  # more than any machine's cores; a larger count is a mistake, not a setting


def set_between_gemm_threads(threads):
    """Threads of the CPU kernels that run between BLAS matrix products (this family's, and the
    convolution's im2col/col2im): 1 (the default) runs them on the calling thread, n > 1 on up to n
    OpenMP threads, 0 on OpenMP's default. Worth raising where the BLAS runs single-threaded
    (``OPENBLAS_NUM_THREADS=1``) or leaves cores idle: its spinning thread pool otherwise holds the
    cores these kernels would use.

    Parameters
    ----------
    threads : int
        0 to 4096: 0 for OpenMP's default, else the most threads these kernels use.
    """
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"set_between_gemm_threads: threads must be an int, got "
                        f"{type(threads).__name__} {threads!r}")
    if not 0 <= threads <= _MAX_THREADS:
        raise ValueError(f"set_between_gemm_threads: threads must be >= 0 (0: OpenMP's default) "
                         f"and at most {_MAX_THREADS}, got {threads}")
    _C.set_between_gemm_threads(int(threads))


def get_between_gemm_threads():
    """The count set by ``set_between_gemm_threads``."""
    return _C.between_gemm_threads()


# --------------------------------------------------------------------------------------------------
# Checks and layouts


def _check_float(op, name, a, xp):
    if array_module(a, name) is not xp:
        raise TypeError(f"{op}: {name} is a {type(a).__module__} array but X is a "
                        f"{xp.__name__} array")
    if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"{op}: {name} has dtype {a.dtype}; the encoding ops take float16, "
                        f"float32 or float64 arrays")


def _check_same_dtype(op, ref_name, ref, arrays):
    for name, a in arrays:
        if a.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {a.dtype} but {ref_name} has {ref.dtype}")


def _check_param_dtype(op, X, arrays):
    """C, s, A, D2 and the like have param_dtype(X.dtype): X's own, float32 for float16 X."""
    want = param_dtype(X.dtype)
    for name, a in arrays:
        if a.dtype != want:
            raise TypeError(f"{op}: {name} must be {want} for {X.dtype} X, got {a.dtype}")


def _compute(a):
    """`a` in the dtype the ops compute in: float16 -> float32, others as they are."""
    return a.astype(param_dtype(a.dtype)) if a.dtype.itemsize == 2 else a


def _workspace_size(a, B, N, K):
    """The encoding ops' workspace size query for launch_args (a function of B, N, K alone)."""
    return _C.encoding_workspace_size(B, N, K)


def _launch(a, B, N, K):
    """Stream and workspace keywords of the core encoding ops for `a`'s device (none on the CPU)."""
    return launch_args(a, _workspace_size, B, N, K)


def _check_shape(op, name, a, expected, letters):
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape ({letters}) = {tuple(expected)}, got "
                         f"{tuple(a.shape)}")


def _check_codebook(op, X, C, s):
    """X (B, N, D), C (K, D), s (K,): same array library and float dtype.
    Returns (xp, B, N, D, K)."""
    xp = array_module(X, "X")
    _check_float(op, "X", X, xp)
    if X.ndim != 3:
        raise ValueError(f"{op}: X must have shape (B, N, D), got {X.ndim}D input of shape "
                         f"{tuple(X.shape)}")
    B, N, D = X.shape
    _check_float(op, "C", C, xp)
    if C.ndim != 2 or C.shape[1] != D:
        raise ValueError(f"{op}: C (codewords) must have shape (K, D) with D = {D} (from X of "
                         f"shape {tuple(X.shape)}), got {tuple(C.shape)}")
    K = C.shape[0]
    _check_float(op, "s", s, xp)
    _check_shape(op, "s", s, (K,), "K")
    _check_param_dtype(op, X, [("C", C), ("s", s)])
    return xp, B, N, D, K


def _check_grad(op, name, g, shape, letters, X, xp, param=False):
    """A gradient in X's dtype, or (param) an array in X's parameter dtype, of `shape`."""
    _check_float(op, name, g, xp)
    _check_shape(op, name, g, shape, letters)
    if param:
        _check_param_dtype(op, X, [(name, g)])
    else:
        _check_same_dtype(op, "X", X, [(name, g)])


def _blas_view(a, xp):
    """(a, n_major): `a` (.., R, M) itself when BLAS can read its matrices in place (unit stride
    along one of the last two dims), else a contiguous copy. n_major says the unit stride runs
    along dim -2 (a (B, N, D) view of (B, D, N) storage)."""
    item = a.itemsize
    if a.shape[-2] > 1 and a.strides[-2] == item and a.strides[-1] >= a.shape[-2] * item:
        return a, True
    if a.strides[-1] == item and a.strides[-2] >= a.shape[-1] * item:
        return a, False
    if a.shape[-1] == 1 and a.strides[-2] == item:  # one column: it is contiguous along N
        return a, True
    return xp.ascontiguousarray(a), False


def _bnk(xp, B, N, K, dtype, n_major):
    """A new (B, N, K) array stored like X: as (B, K, N) when X is N-major."""
    if n_major:
        return xp.empty((B, K, N), dtype).transpose(0, 2, 1)
    return xp.empty((B, N, K), dtype)


def _t(a):
    return a.swapaxes(-1, -2)


def _x_times(X, M, n_major, xp, out=None):
    """X M^T for M (K, D) or (B, K, D): (B, N, K), computed in X's orientation so that BLAS writes
    the result in place (``out``, a (B, N, K) view, optional)."""
    if n_major:
        res = xp.matmul(M, _t(X), out=None if out is None else _t(out))
        return _t(res)
    return xp.matmul(X, _t(M), out=out)


def _weights_times(P, Q, n_major, xp):
    """P Q for P (B, N, J) and Q (J, D) or (B, J, D): (B, N, D) in X's orientation."""
    if n_major:
        return _t(xp.matmul(_t(Q), _t(P)))
    return xp.matmul(P, Q)


# --------------------------------------------------------------------------------------------------
# scaled_l2


@on_array_device
def scaled_l2_forward(X, C, s):
    """``SL[b,i,k] = s[k] ||x[b,i] - c[k]||^2`` and what the backward needs: returns ``(SL, D2)``
    with ``D2 = ||x - c||^2`` (B, N, K).

    Parameters
    ----------
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.

    Returns
    -------
    SL : array (B, N, K), X's dtype
    D2 : array (B, N, K)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    op = "scaled_l2"
    xp, B, N, D, K = _check_codebook(op, X, C, s)
    Xc, n_major = _blas_view(_compute(X), xp)
    XC = _x_times(Xc, C, n_major, xp)
    D2 = _bnk(xp, B, N, K, Xc.dtype, n_major)
    _C.scaled_l2_forward(Xc, C, s, XC, D2, XC, **_launch(Xc, B, N, K))  # SL over XC
    return XC.astype(X.dtype, copy=False), D2


@on_array_device
def scaled_l2(X, C, s):
    """``SL[b,i,k] = s[k] ||x[b,i] - c[k]||^2`` for X (B, N, D), C (K, D), s (K,).

    Parameters
    ----------
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.

    Returns
    -------
    array (B, N, K)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    return scaled_l2_forward(X, C, s)[0]


@on_array_device
def scaled_l2_backward(dSL, X, C, s, D2):
    """Gradients ``(dX, dC, ds)`` of ``scaled_l2`` given the forward's ``D2``:
    ``dX = sum_k 2 s g (x - c)``, ``dC = -sum_{b,i} 2 s g (x - c)``, ``ds = sum_{b,i} g D2``.

    Parameters
    ----------
    dSL : array (B, N, K)
        g, the gradient of SL.
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.
    D2 : array (B, N, K)
        What ``scaled_l2_forward`` returned.

    Returns
    -------
    dX : array like X
    dC : array like C
    ds : array like s
    """
    op = "scaled_l2_backward"
    xp, B, N, D, K = _check_codebook(op, X, C, s)
    _check_grad(op, "dSL", dSL, (B, N, K), "B, N, K", X, xp)
    _check_grad(op, "D2", D2, (B, N, K), "B, N, K", X, xp, param=True)
    Xc, n_major = _blas_view(_compute(X), xp)
    dtype = Xc.dtype
    W = _bnk(xp, B, N, K, dtype, n_major)
    r = xp.empty((B, N), dtype)
    sumW, ds = xp.empty(K, dtype), xp.empty(K, dtype)
    _C.scaled_l2_backward(_compute(dSL), s, D2, W, r, sumW, ds, **_launch(Xc, B, N, K))
    dX = _weights_times(W, -C, n_major, xp)
    _C.add_scaled_features(Xc, r, dX, **launch_args(Xc))
    dC = sumW[:, None] * C - xp.matmul(_t(W), Xc).sum(axis=0)
    return dX.astype(X.dtype, copy=False), dC, ds


# --------------------------------------------------------------------------------------------------
# aggregate


@on_array_device
def aggregate(A, X, C):
    """``E[b,k] = sum_i A[b,i,k] (x[b,i] - c[k])`` for A (B, N, K), X (B, N, D), C (K, D):
    (B, K, D).

    Parameters
    ----------
    A : array (B, N, K)
        The assignment weights (parameter dtype).
    X : NumPy or CuPy array (B, N, D)
        float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype).

    Returns
    -------
    array (B, K, D)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    op = "aggregate"
    xp = _check_aggregate(op, A, X, C)
    A, _ = _blas_view(A, xp)
    Xc, _ = _blas_view(_compute(X), xp)
    E = xp.matmul(_t(A), Xc)
    E -= A.sum(axis=1)[:, :, None] * C
    return E.astype(X.dtype, copy=False)


@on_array_device
def aggregate_backward(dE, A, X, C):
    """Gradients ``(dA, dX, dC)`` of ``aggregate``: ``dA = <g[b,k], x[b,i] - c[k]>``,
    ``dX = sum_k A g``, ``dC = -sum_b (sum_i A) g``.

    Parameters
    ----------
    dE : array (B, K, D)
        g, the gradient of E.
    A, X, C : arrays
        As given to ``aggregate``.

    Returns
    -------
    dA : array like A
    dX : array like X
    dC : array like C
    """
    op = "aggregate_backward"
    xp = _check_aggregate(op, A, X, C)
    B, N, D = X.shape
    K = C.shape[0]
    _check_grad(op, "dE", dE, (B, K, D), "B, K, D", X, xp)
    A, _ = _blas_view(A, xp)
    Xc, n_major = _blas_view(_compute(X), xp)
    dE = _compute(dE)
    dA = _x_times(Xc, dE, n_major, xp)
    dA -= (dE * C).sum(axis=2)[:, None, :]
    dX = _weights_times(A, dE, n_major, xp)
    dC = -(A.sum(axis=1)[:, :, None] * dE).sum(axis=0)
    return dA, dX.astype(X.dtype, copy=False), dC


def _check_aggregate(op, A, X, C):
    xp = array_module(X, "X")
    for name, a in (("A", A), ("X", X), ("C", C)):
        _check_float(op, name, a, xp)
    if X.ndim != 3:
        raise ValueError(f"{op}: X must have shape (B, N, D), got {X.ndim}D input of shape "
                         f"{tuple(X.shape)}")
    B, N, D = X.shape
    if C.ndim != 2 or C.shape[1] != D:
        raise ValueError(f"{op}: C (codewords) must have shape (K, D) with D = {D} (from X of "
                         f"shape {tuple(X.shape)}), got {tuple(C.shape)}")
    _check_shape(op, "A", A, (B, N, C.shape[0]), "B, N, K")
    _check_param_dtype(op, X, [("A", A), ("C", C)])
    return xp


# --------------------------------------------------------------------------------------------------
# The Encoding: aggregate(softmax_k(scaled_l2(X, C, s)), X, C), fused


@on_array_device
def encoding_forward(X, C, s):
    """The Encoding layer's op on X (B, N, D): returns ``(E, A, D2)``, E (B, K, D) and the
    assignment weights A and distances D2 (B, N, K) its backward needs.

    Parameters
    ----------
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.

    Returns
    -------
    E : array (B, K, D)
    A, D2 : arrays (B, N, K)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    op = "encoding"
    xp, B, N, D, K = _check_codebook(op, X, C, s)
    Xc, n_major = _blas_view(_compute(X), xp)
    XC = _x_times(Xc, C, n_major, xp)
    D2 = _bnk(xp, B, N, K, Xc.dtype, n_major)
    sumA = xp.empty((B, K), Xc.dtype)
    _C.encoding_forward(Xc, C, s, XC, D2, XC, sumA, **_launch(Xc, B, N, K))  # A over XC
    A = XC
    E = xp.matmul(_t(A), Xc)
    E -= sumA[:, :, None] * C
    return E.astype(X.dtype, copy=False), A, D2


@on_array_device
def encoding(X, C, s):
    """``E[b,k] = sum_i softmax_k(s[k] ||x[b,i] - c[k]||^2) (x[b,i] - c[k])``: (B, K, D).

    Parameters
    ----------
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.

    Returns
    -------
    array (B, K, D)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    return encoding_forward(X, C, s)[0]


@on_array_device
def encoding_backward(dE, X, C, s, A, D2):
    """Gradients ``(dX, dC, ds)`` of ``encoding`` given the forward's A and D2.

    Parameters
    ----------
    dE : array (B, K, D)
        The gradient of E.
    X : NumPy or CuPy array (B, N, D)
        The features: float16, float32 or float64.
    C : array (K, D)
        The codewords (parameter dtype: float32 for float16 X).
    s : array (K,)
        The smoothing factors, as C.
    A, D2 : arrays (B, N, K)
        What ``encoding_forward`` returned.

    Returns
    -------
    dX : array like X
    dC : array like C
    ds : array like s
    """
    op = "encoding_backward"
    xp, B, N, D, K = _check_codebook(op, X, C, s)
    _check_grad(op, "dE", dE, (B, K, D), "B, K, D", X, xp)
    _check_grad(op, "A", A, (B, N, K), "B, N, K", X, xp, param=True)
    _check_grad(op, "D2", D2, (B, N, K), "B, N, K", X, xp, param=True)
    Xc, n_major = _blas_view(_compute(X), xp)
    dE, dtype = _compute(dE), Xc.dtype
    # [A | W] side by side, so that dX = A dE - W C is one GEMM against [dE; -C].
    AW = _bnk(xp, B, N, 2 * K, dtype, n_major)
    AW[:, :, :K] = A
    W = AW[:, :, K:]
    _x_times(Xc, dE, n_major, xp, out=W)  # XG = X dE^T, replaced by W in place
    r = xp.empty((B, N), dtype)
    sumW, sumA, ds = xp.empty(K, dtype), xp.empty((B, K), dtype), xp.empty(K, dtype)
    _C.encoding_backward(dE, C, s, A, D2, W, W, r, sumW, sumA, ds, **_launch(Xc, B, N, K))
    dEC = xp.concatenate([dE, xp.broadcast_to(-C, (B, K, D))], axis=1)
    dX = _weights_times(AW, dEC, n_major, xp)
    _C.add_scaled_features(Xc, r, dX, **launch_args(Xc))
    dC = sumW[:, None] * C - xp.matmul(_t(W), Xc).sum(axis=0) - (sumA[:, :, None] * dE).sum(axis=0)
    return dX.astype(X.dtype, copy=False), dC, ds


# --------------------------------------------------------------------------------------------------
# MSG-Net's style layers: the Gram matrix and the Inspiration (CoMatch) layer


def _check_maps(op, name, y):
    xp = array_module(y, name)
    _check_float(op, name, y, xp)
    if y.ndim < 3:
        raise ValueError(f"{op}: {name} must have shape (B, C, H, W) (or (B, C, *spatial)), got "
                         f"{y.ndim}D input of shape {tuple(y.shape)}")
    return xp


def _features(y):
    """y (B, C, *spatial) as F (B, C, prod(spatial)); explicit sizes, since reshape(B, C, -1)
    cannot infer the last one of an empty array."""
    return y.reshape(y.shape[0], y.shape[1], math.prod(y.shape[2:]))


def _gram_scale(F):
    """The divisor C * H * W of the Gram matrix; 1 for empty maps, whose Gram matrix is the empty
    sum 0 (not 0 / 0)."""
    return max(F.shape[1] * F.shape[2], 1)


@on_array_device
def gram_matrix(y):
    """``G[b] = F[b] F[b]^T / (C H W)`` with ``F = y.reshape(B, C, H*W)``: (B, C, C).

    Parameters
    ----------
    y : NumPy or CuPy array (B, C, *spatial)
        float16, float32 or float64, at least one spatial dim (an empty one gives zeros).

    Returns
    -------
    array (B, C, C)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    xp = _check_maps("gram_matrix", "y", y)
    F = _features(y)
    return xp.matmul(F, _t(F)) / _gram_scale(F)


@on_array_device
def gram_matrix_backward(dG, y):
    """Gradient of ``gram_matrix`` with respect to y: ``(dG + dG^T) F / (C H W)``, shaped like y.

    Parameters
    ----------
    dG : array (B, C, C)
        The gradient of G.
    y : NumPy or CuPy array (B, C, *spatial)
        The forward's input.

    Returns
    -------
    array like y
    """
    op = "gram_matrix_backward"
    xp = _check_maps(op, "y", y)
    B, C = y.shape[:2]
    _check_grad(op, "dG", dG, (B, C, C), "B, C, C", y, xp)
    F = _features(y)
    return (xp.matmul(dG + _t(dG), F) / _gram_scale(F)).reshape(y.shape)


def _check_inspiration(op, X, weight, G):
    xp = _check_maps(op, "X", X)
    B, C = X.shape[:2]
    for name, a in (("weight", weight), ("G", G)):
        _check_float(op, name, a, xp)
    _check_shape(op, "weight", weight, (1, C, C), "1, C, C")
    if G.ndim != 3 or G.shape[1:] != (C, C) or G.shape[0] not in (1, B):
        raise ValueError(f"{op}: the target G must have shape (1, C, C) or (B, C, C) with "
                         f"C = {C} and B = {B} (from X of shape {tuple(X.shape)}), got "
                         f"{tuple(G.shape)}")
    _check_same_dtype(op, "X", X, [("weight", weight), ("G", G)])
    return xp


@on_array_device
def inspiration_forward(X, weight, G):
    """MSG-Net's CoMatch: ``P = weight G`` (weight (1, C, C) broadcast over G's batch) and
    ``Y[b] = P[b]^T X[b].reshape(C, H*W)``, shaped like X; G (1 or B, C, C). Returns (Y, P).

    Parameters
    ----------
    X : NumPy or CuPy array (B, C, *spatial)
        float16, float32 or float64.
    weight : array (1, C, C)
        The layer's weight, of X's dtype.
    G : array (1, C, C) or (B, C, C)
        The target's Gram matrix, of X's dtype.

    Returns
    -------
    Y : array like X
    P : array (1 or B, C, C)

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    xp = _check_inspiration("inspiration", X, weight, G)
    B, C = X.shape[:2]
    P = xp.matmul(weight, G)
    Y = xp.matmul(_t(P), X.reshape(B, C, -1))
    return Y.reshape(X.shape), P


@on_array_device
def inspiration(X, weight, G):
    """``Y[b] = (weight G[b])^T X[b]`` over X's flattened spatial dims, shaped like X.

    Parameters
    ----------
    X : NumPy or CuPy array (B, C, *spatial)
        float16, float32 or float64.
    weight : array (1, C, C)
        The layer's weight, of X's dtype.
    G : array (1, C, C) or (B, C, C)
        The target's Gram matrix, of X's dtype.

    Returns
    -------
    array like X

    Raises
    ------
    TypeError
        Mixed array types, or dtypes that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    return inspiration_forward(X, weight, G)[0]


@on_array_device
def inspiration_backward(dY, X, weight, G, P, target_grad=False):
    """Gradients ``(dX, dweight, dG)`` of ``inspiration`` given the forward's P; dG is None unless
    ``target_grad``.

    Parameters
    ----------
    dY : array like X
        The gradient of Y.
    X : NumPy or CuPy array (B, C, *spatial)
        float16, float32 or float64.
    weight : array (1, C, C)
        The layer's weight, of X's dtype.
    G : array (1, C, C) or (B, C, C)
        The target's Gram matrix, of X's dtype.
    P : array (1 or B, C, C)
        What ``inspiration_forward`` returned.
    target_grad : bool
        Whether to compute dG.

    Returns
    -------
    dX : array like X
    dweight : array (1, C, C)
    dG : array like G, or None
    """
    op = "inspiration_backward"
    xp = _check_inspiration(op, X, weight, G)
    B, C = X.shape[:2]
    _check_grad(op, "dY", dY, X.shape, "B, C, *spatial", X, xp)
    _check_grad(op, "P", P, G.shape, "1 or B, C, C", X, xp)
    dYf, Xf = dY.reshape(B, C, -1), X.reshape(B, C, -1)
    dX = xp.matmul(P, dYf).reshape(X.shape)
    dP = xp.matmul(Xf, _t(dYf))  # (B, C, C): Y = P^T X
    if G.shape[0] == 1:
        dP = dP.sum(axis=0, keepdims=True)
    dweight = xp.matmul(dP, _t(G)).sum(axis=0, keepdims=True)
    dG = xp.matmul(_t(weight), dP) if target_grad else None
    return dX, dweight, dG


__all__ = ["aggregate", "aggregate_backward", "encoding", "encoding_backward", "encoding_forward",
           "get_between_gemm_threads", "gram_matrix", "gram_matrix_backward", "inspiration",
           "inspiration_backward", "inspiration_forward", "scaled_l2", "scaled_l2_backward",
           "scaled_l2_forward", "set_between_gemm_threads"]
