"""The Encoding layer family of PyTorch-Encoding (encoding.functions / encoding.nn) on torch
tensors: the ops ``scaled_l2``, ``aggregate`` and ``encoding``, and the modules Encoding (Deep
TEN's residual encoder) and MSG-Net's GramMatrix, Inspiration and UpsampleConv2d.

Notation as in ``normkit.functional.encoding``: X (B, N, D) features, C (K, D) codewords, s (K,)
scales, ``D2 = ||x - c||^2``, ``SL = s D2``, ``A = softmax_k(SL)``, ``E = sum_i A (x - c)``.

``scaled_l2`` and ``encoding`` run as the custom ops ``torch.ops.normkit.scaled_l2`` /
``encoding`` (normkit.torch._ops: compiled and exported as one node each, with registered
backwards), whose kernels are split like the NumPy ops: torch runs
every matrix product (``torch.matmul``, so PyTorch's BLAS or cuBLAS), the core's fused kernels the
rest (distances, softmax, their gradients), on tensors handed over through DLPack, so nothing of
size B*N*K*D is formed. A (B, D, N) tensor seen as (B, N, D) keeps N contiguous, and the (B, N, K)
arrays are then allocated (B, K, N) alike, so that every product reads and writes unit-stride rows.
``aggregate`` is all matrix products: plain torch ops, differentiated by autograd. The backwards are
once-differentiable.

dtypes: the core computes in float32 or float64, with C and s of X's dtype. float16 and bfloat16 X
are computed in float32 (with float32 parameters) and the outputs and X's gradient returned in X's
dtype. The modules follow the same rule; those built from torch ops alone (GramMatrix, Inspiration,
UpsampleConv2d) also run in any floating dtype their parameters have.
"""
import math

import torch

from .. import _C
from ..nn.conv import conv_extra_repr
from ._dlpack import dl

_ops = torch.ops.normkit  # registered by normkit.torch._ops

_HALF = (torch.float16, torch.bfloat16)


def _launch_encoding(x, B, N, K):
    """Keyword arguments that run a core encoding op of sizes (B, N, K) on ``x``'s device: none for
    CPU tensors; for CUDA tensors torch's current stream on that device and a float64 workspace from
    torch's caching allocator (so the op neither allocates nor synchronizes). The workspace capsule
    is consumed by the call: one dict per call."""
    if not x.is_cuda:
        return {}
    size = _C.encoding_workspace_size(B, N, K)
    return {"stream": torch.cuda.current_stream(x.device).cuda_stream,
            "workspace": dl(torch.empty(size, dtype=torch.float64, device=x.device))}


def _launch_stream(x):
    """The stream keyword alone, for add_scaled_features (it reduces nothing: no workspace)."""
    return {"stream": torch.cuda.current_stream(x.device).cuda_stream} if x.is_cuda else {}


# --------------------------------------------------------------------------------------------------
# Checks


def _check_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _core_dtype(op, X):
    """The dtype the core computes ``X``'s op in: X's own, float32 for float16/bfloat16 X."""
    if X.dtype in (torch.float32, torch.float64):
        return X.dtype
    if X.dtype in _HALF:
        return torch.float32
    raise TypeError(f"{op}: X has dtype {X.dtype}; the encoding ops take float16, bfloat16, "
                    f"float32 or float64 tensors")


def _check_like(op, name, t, ref_name, ref, dtype):
    """``t`` has ``dtype`` and ``ref``'s device."""
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {dtype} for {ref.dtype} {ref_name}, got {t.dtype}")
    if t.device != ref.device:
        raise TypeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_features(op, X):
    if X.dim() != 3:
        raise ValueError(f"{op}: X must have shape (B, N, D), got {X.dim()}D input of shape "
                         f"{tuple(X.shape)}")


def _check_codewords(op, C, X):
    _check_tensor(op, "C", C)
    D = X.shape[2]
    if C.dim() != 2 or C.shape[1] != D:
        raise ValueError(f"{op}: C (codewords) must have shape (K, D) with D = {D} (from X of "
                         f"shape {tuple(X.shape)}), got {tuple(C.shape)}")


def _check_codebook(op, X, C, s):
    """X (B, N, D), C (K, D), s (K,) on one device, C and s of the dtype the core computes X in,
    which is returned."""
    _check_tensor(op, "X", X)
    dtype = _core_dtype(op, X)
    _check_features(op, X)
    _check_codewords(op, C, X)
    _check_tensor(op, "s", s)
    K = C.shape[0]
    if tuple(s.shape) != (K,):
        raise ValueError(f"{op}: s (scale) must have shape (K,) = ({K},), got {tuple(s.shape)}")
    _check_like(op, "C", C, "X", X, dtype)
    _check_like(op, "s", s, "X", X, dtype)
    return dtype


def _check_aggregate(op, A, X, C):
    for name, t in (("A", A), ("X", X)):
        _check_tensor(op, name, t)
    dtype = _core_dtype(op, X)
    _check_features(op, X)
    _check_codewords(op, C, X)
    B, N = X.shape[:2]
    if tuple(A.shape) != (B, N, C.shape[0]):
        raise ValueError(f"{op}: A must have shape (B, N, K) = {(B, N, C.shape[0])}, got "
                         f"{tuple(A.shape)}")
    _check_like(op, "A", A, "X", X, X.dtype)
    _check_like(op, "C", C, "X", X, dtype)
    return dtype


# --------------------------------------------------------------------------------------------------
# Layouts (as normkit.functional.encoding's)


def _n_major(a):
    """Whether BLAS reads the matrices of ``a`` (.., R, M) in place with the unit stride along dim
    -2 (a (B, N, D) view of (B, D, N) storage); False also when ``_blas_view`` copies ``a``."""
    R, M = a.shape[-2:]
    stride_r, stride_m = a.stride()[-2:]
    if R > 1 and stride_r == 1 and stride_m >= R:
        return True
    return M == 1 and stride_r == 1 and not (stride_m == 1 and stride_r >= M)


def _blas_view(a):
    """(a, n_major): ``a`` (.., R, M) itself when BLAS can read its matrices in place (unit stride
    along one of the last two dims), else a contiguous copy (see ``_n_major``)."""
    if _n_major(a):
        return a, True
    R, M = a.shape[-2:]
    stride_r, stride_m = a.stride()[-2:]
    if stride_m == 1 and stride_r >= M:
        return a, False
    return a.contiguous(), False


def _bnk(X, K, n_major):
    """A new (B, N, K) tensor stored like X: as (B, K, N) when X is N-major."""
    B, N = X.shape[:2]
    if n_major:
        return X.new_empty((B, K, N)).transpose(1, 2)
    return X.new_empty((B, N, K))


def _batched(M, B):
    """M (R, S) as (B, R, S) without a copy (stride 0), M itself when it is (B, R, S) already.
    torch.matmul of a matrix that requires grad by a batch of matrices copies its operands
    (6x slower than bmm for the Encoding layer's shapes), even under no_grad."""
    return M.expand(B, *M.shape) if M.dim() == 2 else M


def _x_times(X, M, n_major, out=None):
    """X M^T for M (K, D) or (B, K, D): (B, N, K), computed in X's orientation so that BLAS writes
    the result in place (``out``, a (B, N, K) view, optional)."""
    if n_major:
        M = _batched(M, X.shape[0])
        return torch.matmul(M, X.mT, out=None if out is None else out.mT).mT
    return torch.matmul(X, M.mT, out=out)  # a matrix M: one product over all B*N rows


def _weights_times(P, Q, n_major):
    """P Q for P (B, N, J) and Q (J, D) or (B, J, D): (B, N, D) in X's orientation."""
    if n_major:
        return torch.matmul(_batched(Q, P.shape[0]).mT, P.mT).mT
    return torch.matmul(P, Q)


def _features_grad(W, C, X, r, n_major):
    """dX = r x - W C (the distances' gradient), or with W = [A | W] and C = [G; -C] stacked, the
    Encoding's dX = A G - W C + r x in one product."""
    dX = _weights_times(W, C, n_major)
    _C.add_scaled_features(dl(X), dl(r), dl(dX), **_launch_stream(X))
    return dX


def _codewords_grad(sumW, C, W, X):
    """sumW c - sum_b W_b^T X_b: the distances' gradient with respect to the codewords."""
    return sumW.unsqueeze(1) * C - torch.matmul(W.mT, X).sum(0)


# --------------------------------------------------------------------------------------------------
# scaled_l2


def _scaled_l2_forward(X, C, s):
    """(SL, D2, X as the products read it): the kernel of the op ``normkit::scaled_l2``."""
    X, n_major = _blas_view(X)
    B, N = X.shape[:2]
    K = C.shape[0]
    XC = _x_times(X, C, n_major)
    D2 = _bnk(X, K, n_major)
    _C.scaled_l2_forward(dl(X), dl(C), dl(s), dl(XC), dl(D2), dl(XC),  # SL over XC
                         **_launch_encoding(X, B, N, K))
    return XC, D2, X


def _scaled_l2_backward(dSL, X, C, s, D2, need_x, need_c):
    """(dX, dC, ds) of ``SL[b,i,k] = s[k] ||x[b,i] - c[k]||^2``; dX and dC are None unless
    needed. The scale's gradient is ``sum dSL D2``, finite at s = 0 (upstream divides SL by s)."""
    X, n_major = _blas_view(X)
    B, N = X.shape[:2]
    K = C.shape[0]
    W = _bnk(X, K, n_major)
    r, sumW, ds = X.new_empty((B, N)), C.new_empty(K), C.new_empty(K)
    _C.scaled_l2_backward(dl(dSL), dl(s), dl(D2), dl(W), dl(r), dl(sumW), dl(ds),
                          **_launch_encoding(X, B, N, K))
    dX = _features_grad(W, -C, X, r, n_major) if need_x else None
    dC = _codewords_grad(sumW, C, W, X).contiguous() if need_c else None
    return dX, dC, ds


def scaled_l2(X, C, s):
    """``SL[b,i,k] = s[k] ||x[b,i] - c[k]||^2`` for X (B, N, D), C (K, D), s (K,): (B, N, K), with
    gradients to all three.

    Parameters
    ----------
    X : torch.Tensor (B, N, D)
        The features: float16, bfloat16, float32 or float64.
    C : torch.Tensor (K, D)
        The codewords (float32 for half-precision X, else X's dtype).
    s : torch.Tensor (K,)
        The smoothing factors, as C.

    Returns
    -------
    torch.Tensor (B, N, K), X's dtype

    Raises
    ------
    TypeError
        Dtypes or devices that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    dtype = _check_codebook("scaled_l2", X, C, s)
    return _ops.scaled_l2(X.to(dtype), C, s)[0].to(X.dtype)


# --------------------------------------------------------------------------------------------------
# aggregate


def aggregate(A, X, C):
    """``E[b,k] = sum_i A[b,i,k] (x[b,i] - c[k])`` for A (B, N, K), X (B, N, D), C (K, D):
    (B, K, D), as ``A^T X - (sum_i A) c``: matrix products, differentiated by autograd.

    Parameters
    ----------
    A : torch.Tensor (B, N, K)
        The assignment weights.
    X : torch.Tensor (B, N, D)
        The features: float16, bfloat16, float32 or float64.
    C : torch.Tensor (K, D)
        The codewords.

    Returns
    -------
    torch.Tensor (B, K, D), X's dtype

    Raises
    ------
    TypeError
        Dtypes or devices that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    dtype = _check_aggregate("aggregate", A, X, C)
    Ac, Xc = A.to(dtype), X.to(dtype)
    E = torch.baddbmm(Ac.sum(1).unsqueeze(2) * C, Ac.mT, Xc, beta=-1)
    return E.to(X.dtype)


# --------------------------------------------------------------------------------------------------
# encoding: aggregate(softmax_k(scaled_l2(X, C, s)), X, C), fused


def _encoding_forward(X, C, s):
    """(E, A, D2, X as the products read it): the kernel of the op ``normkit::encoding``."""
    X, n_major = _blas_view(X)
    B, N = X.shape[:2]
    K = C.shape[0]
    XC = _x_times(X, C, n_major)
    D2 = _bnk(X, K, n_major)
    sumA = X.new_empty((B, K))
    _C.encoding_forward(dl(X), dl(C), dl(s), dl(XC), dl(D2), dl(XC), dl(sumA),  # A over XC
                        **_launch_encoding(X, B, N, K))
    A = XC
    E = torch.baddbmm(sumA.unsqueeze(2) * C, A.mT, X, beta=-1).contiguous()
    return E, A, D2, X


def _encoding_backward(dE, X, C, s, A, D2, need_x, need_c):
    """(dX, dC, ds) of ``E = aggregate(softmax_k(scaled_l2(X, C, s)), X, C)`` in one pass of the
    core between torch's products; dX and dC are None unless needed."""
    X, n_major = _blas_view(X)
    B, N, D = X.shape
    K = C.shape[0]
    if need_x:
        # [A | W] side by side, so that dX = A dE - W C is one product with [dE; -C].
        AW = _bnk(X, 2 * K, n_major)
        AW[:, :, :K] = A
        W = AW[:, :, K:]
    else:
        W = _bnk(X, K, n_major)
    _x_times(X, dE, n_major, out=W)  # XG = X dE^T, replaced by W in place
    r, sumA = X.new_empty((B, N)), X.new_empty((B, K))
    sumW, ds = C.new_empty(K), C.new_empty(K)
    _C.encoding_backward(dl(dE), dl(C), dl(s), dl(A), dl(D2), dl(W), dl(W), dl(r), dl(sumW),
                         dl(sumA), dl(ds), **_launch_encoding(X, B, N, K))
    dX = dC = None
    if need_x:
        dEC = torch.cat([dE, (-C).expand(B, K, D)], dim=1)
        dX = _features_grad(AW, dEC, X, r, n_major)
    if need_c:
        dC = (_codewords_grad(sumW, C, W, X) - (sumA.unsqueeze(2) * dE).sum(0)).contiguous()
    return dX, dC, ds


def encoding(X, C, s):
    """``E[b,k] = sum_i softmax_k(s[k] ||x[b,i] - c[k]||^2) (x[b,i] - c[k])`` for X (B, N, D),
    C (K, D), s (K,): (B, K, D), with gradients to all three.

    Parameters
    ----------
    X : torch.Tensor (B, N, D)
        The features: float16, bfloat16, float32 or float64.
    C : torch.Tensor (K, D)
        The codewords (float32 for half-precision X, else X's dtype).
    s : torch.Tensor (K,)
        The smoothing factors, as C.

    Returns
    -------
    torch.Tensor (B, K, D), X's dtype

    Raises
    ------
    TypeError
        Dtypes or devices that do not fit.
    ValueError
        Shapes that do not fit (naming which).
    """
    dtype = _check_codebook("encoding", X, C, s)
    return _ops.encoding(X.to(dtype), C, s)[0].to(X.dtype)


# --------------------------------------------------------------------------------------------------
# Modules


def _positive_int(layer, arg, value):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{layer}: {arg} must be a positive integer, got {value!r}")
    return int(value)


def _pair(layer, arg, value, minimum):
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or any(int(v) != v or v < minimum for v in values):
        raise ValueError(f"{layer}: {arg} must be an int >= {minimum} or 2 of them, got {value!r}")
    return tuple(int(v) for v in values)


def _input_dtype(layer, x, own):
    """The dtype ``layer`` computes input ``x`` in, given its parameters' dtype ``own``: ``own``,
    when ``x`` has it or is float16/bfloat16 with float32 parameters (mixed precision). Checks that
    ``x`` is a floating tensor on the parameters' device."""
    _check_tensor(layer, "input", x)
    if not x.is_floating_point():
        raise TypeError(f"{layer}: input has dtype {x.dtype}; floating point input is supported")
    if x.dtype != own and not (x.dtype in _HALF and own == torch.float32):
        need = torch.float32 if x.dtype in _HALF else x.dtype
        raise TypeError(f"{layer}: {x.dtype} input needs {need} parameters, this layer's are {own} "
                        f"(convert it with .to(dtype))")
    return own


def _check_device(layer, x, own):
    if x.device != own.device:
        raise TypeError(f"{layer}: input is on {x.device} but this layer is on {own.device} "
                        f"(move it with .to(device))")


class _LoadsArrays:
    """Lets ``load_state_dict`` take the NumPy (or CuPy) arrays of a normkit.nn layer's state_dict
    as well as tensors."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in (*self._parameters, *self._buffers):
            value = state_dict.get(prefix + name)
            if value is not None and not isinstance(value, torch.Tensor):
                state_dict[prefix + name] = torch.as_tensor(value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Encoding(_LoadsArrays, torch.nn.Module):
    """Encoding layer: a learnable residual encoder (encoding.nn.Encoding(D, K)).

    Input (B, D, H, W) or (B, D, N): N = H*W features of dimension D. Output (B, K, D):
    ``E[b,k] = sum_i A[b,i,k] (x[b,i] - c[k])`` with ``A = softmax_k(s[k] ||x[b,i] - c[k]||^2)``.
    ``codewords`` (K, D) start U(-1/sqrt(K*D), 1/sqrt(K*D)), ``scale`` (K,) U(-1, 0); float32 or
    float64 (float16/bfloat16 inputs run with float32 ones). NCHW and channels_last inputs are read
    without a copy. The state_dict is normkit.nn.Encoding's.

    Parameters
    ----------
    D : int
        The feature dimension (the input's channels).
    K : int
        The number of codewords.
    device, dtype
        torch's factory arguments of the parameters: float32 (the default) or float64.

    Shape
    -----
    (B, D, H, W) or (B, D, N) -> (B, K, D).

    Raises
    ------
    ValueError
        D or K not a positive integer.
    """

    def __init__(self, D, K, device=None, dtype=None):
        super().__init__()
        self.D, self.K = _positive_int("Encoding", "D", D), _positive_int("Encoding", "K", K)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"Encoding: dtype must be torch.float32 or torch.float64, got {dtype}")
        factory = {"device": device, "dtype": dtype}
        self.codewords = torch.nn.Parameter(torch.empty(self.K, self.D, **factory))
        self.scale = torch.nn.Parameter(torch.empty(self.K, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.K * self.D)
        torch.nn.init.uniform_(self.codewords, -bound, bound)
        torch.nn.init.uniform_(self.scale, -1.0, 0.0)

    def forward(self, x):
        _check_tensor("Encoding", "input", x)
        if x.dim() not in (3, 4):
            raise ValueError(f"Encoding: expected 3D (B, D, N) or 4D (B, D, H, W) input (got "
                             f"{x.dim()}D input)")
        if x.shape[1] != self.D:
            raise ValueError(f"Encoding(D={self.D}, K={self.K}): input has {x.shape[1]} features "
                             f"in dim 1 (shape {tuple(x.shape)})")
        _input_dtype("Encoding", x, self.codewords.dtype)
        _check_device("Encoding", x, self.codewords)
        X = x.reshape(x.shape[0], self.D, -1).transpose(1, 2)  # (B, N, D), a view when it can be
        return encoding(X, self.codewords, self.scale)

    def extra_repr(self):
        return f"N x {self.D} => {self.K} x {self.D}"


class GramMatrix(torch.nn.Module):
    """Gram matrix of (B, C, H, W) feature maps: ``G[b] = F F^T / (C H W)``, F = y.reshape(B, C,
    H*W); (B, C, C). Other (B, C, *spatial) shapes work alike; float16/bfloat16 maps are multiplied
    in float32 and the result returned in their dtype.

    Parameters
    ----------
    *args, **kwargs
        Forwarded to ``torch.nn.Module`` (GramMatrix itself takes no arguments).

    Shape
    -----
    (B, C, *spatial) -> (B, C, C).
    """

    def forward(self, y):
        _check_tensor("GramMatrix", "input", y)
        if y.dim() < 3:
            raise ValueError(f"GramMatrix: expected input of shape (B, C, H, W) (or (B, C, "
                             f"*spatial)), got {y.dim()}D input of shape {tuple(y.shape)}")
        if not y.is_floating_point():
            raise TypeError(f"GramMatrix: input has dtype {y.dtype}; floating point input is "
                            f"supported")
        B, C = y.shape[:2]
        # Explicit sizes: reshape(B, C, -1) cannot infer the last one of an empty tensor. Empty
        # maps give the empty sum 0, not 0 / 0.
        HW = math.prod(y.shape[2:])
        F = y.reshape(B, C, HW).to(torch.promote_types(y.dtype, torch.float32))
        G = torch.baddbmm(F.new_empty(B, C, C), F, F.mT, beta=0, alpha=1.0 / max(C * HW, 1))
        return G.to(y.dtype)


class Inspiration(_LoadsArrays, torch.nn.Module):
    """MSG-Net's Inspiration (CoMatch) layer: ``Y[b] = (W G[b])^T X[b]`` over X's flattened
    spatial dims, shaped like X (B, C, H, W) (or (B, C, *spatial)).

    ``weight`` (1, C, C) starts U(0, 0.02). The target Gram matrix ``G`` is a buffer (B, C, C),
    zero until ``set_target(G)`` (alias ``setTarget``) sets one of any batch; a target's batch
    must be 1 or the input's. The buffer is in the state_dict (a checkpoint's target batch replaces
    the layer's) and moves with ``.to()`` (upstream keeps it outside both). As upstream, the layer
    keeps the tensor it is given (converted when its dtype or device differ from the layer's), so a
    target that requires grad receives gradients. The state_dict is normkit.nn.Inspiration's.

    Parameters
    ----------
    C : int
        The channels of the input.
    B : int
        The batch of the initial (zero) target.
    device, dtype
        torch's factory arguments of the parameters: float32 (the default) or float64.

    Shape
    -----
    (B, C, *spatial) -> (B, C, *spatial).

    Raises
    ------
    ValueError
        C or B not a positive integer.
    """

    def __init__(self, C, B=1, device=None, dtype=None):
        super().__init__()
        self.C = _positive_int("Inspiration", "C", C)
        B = _positive_int("Inspiration", "B", B)
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(1, self.C, self.C, **factory))
        self.register_buffer("G", torch.zeros(B, self.C, self.C, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.uniform_(self.weight, 0.0, 0.02)

    def set_target(self, target):
        """Sets the target Gram matrix (b, C, C)."""
        if not isinstance(target, torch.Tensor):
            target = torch.as_tensor(target)
        shape = tuple(target.shape)
        if len(shape) != 3 or shape[1:] != (self.C, self.C) or shape[0] < 1:
            raise ValueError(f"Inspiration(C={self.C}).set_target: the target must have shape "
                             f"(B, {self.C}, {self.C}), got {shape}")
        if not target.is_floating_point():
            raise TypeError(f"Inspiration.set_target: the target has dtype {target.dtype}; a "
                            f"floating point target is needed")
        self.G = target.to(device=self.weight.device, dtype=self.weight.dtype)

    setTarget = set_target

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's target may have another batch: the layer takes a new buffer of its shape
        # (never writing into a tensor that set_target was given).
        value = state_dict.get(prefix + "G")
        shape = tuple(getattr(value, "shape", ()))
        if len(shape) == 3 and shape[1:] == (self.C, self.C):
            self.G = torch.zeros(shape, dtype=self.G.dtype, device=self.G.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        _check_tensor("Inspiration", "input", x)
        if x.dim() < 3:
            raise ValueError(f"Inspiration: expected input of shape (B, C, H, W) (got {x.dim()}D "
                             f"input)")
        if x.shape[1] != self.C:
            raise ValueError(f"Inspiration(C={self.C}): input has {x.shape[1]} channels (shape "
                             f"{tuple(x.shape)})")
        B = x.shape[0]
        if self.G.shape[0] not in (1, B):
            raise ValueError(f"Inspiration: the target has batch {self.G.shape[0]} but the input "
                             f"has batch {B}; the target's batch must be 1 or the input's")
        dtype = _input_dtype("Inspiration", x, self.weight.dtype)
        _check_device("Inspiration", x, self.weight)
        P = torch.matmul(self.weight, self.G)  # (1 or B, C, C)
        Y = torch.matmul(P.mT, x.reshape(B, self.C, -1).to(dtype))
        return Y.reshape(x.shape).to(x.dtype)

    def extra_repr(self):
        return f"N x {self.C}"


class UpsampleConv2d(_LoadsArrays, torch.nn.Module):
    """A convolution producing ``scale_factor``^2 outputs per window, pixel-shuffled into an image
    ``scale_factor`` times larger (MSG-Net's checkerboard-free upsampling), on torch's conv2d and
    pixel_shuffle.

    ``weight`` is (out_channels * s^2, in_channels / groups, kh, kw) and ``bias``
    (out_channels * s^2,), both U(+-1/sqrt(in_channels / groups * kh * kw)). Output
    (B, out_channels, s * H_conv, s * W_conv) with H_conv = floor((H + 2p - d (kh - 1) - 1) / stride
    + 1) (upstream's docstring formula is wrong; upstream also fails to construct). The state_dict
    is normkit.nn.UpsampleConv2d's.

    Parameters
    ----------
    in_channels, out_channels : int
        Of the input and of the upsampled output.
    kernel_size, stride, padding, dilation : int or pair of ints
        The convolution's.
    groups : int
        Dividing in_channels and out_channels * scale_factor^2.
    scale_factor : int
        s, the upsampling factor (positive).
    bias : bool
        Whether the convolution has a bias.
    device, dtype
        torch's factory arguments of the parameters: float32 (the default) or float64.

    Raises
    ------
    ValueError
        Non-positive sizes or scale_factor, channels not divisible by groups.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, scale_factor=1, bias=True, device=None, dtype=None):
        super().__init__()
        name = "UpsampleConv2d"
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.out_channels = _positive_int(name, "out_channels", out_channels)
        self.groups = _positive_int(name, "groups", groups)
        self.scale_factor = s = _positive_int(name, "scale_factor", scale_factor)
        if self.in_channels % self.groups:
            raise ValueError(f"{name}: in_channels ({self.in_channels}) must be divisible by "
                             f"groups ({self.groups})")
        if (self.out_channels * s * s) % self.groups:
            raise ValueError(f"{name}: out_channels * scale_factor^2 ({self.out_channels * s * s}) "
                             f"must be divisible by groups ({self.groups})")
        self.kernel_size = _pair(name, "kernel_size", kernel_size, 1)
        self.stride = _pair(name, "stride", stride, 1)
        self.padding = _pair(name, "padding", padding, 0)
        self.dilation = _pair(name, "dilation", dilation, 1)
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(
            self.out_channels * s * s, self.in_channels // self.groups, *self.kernel_size,
            **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(self.out_channels * s * s, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_channels // self.groups * math.prod(self.kernel_size))
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        name = "UpsampleConv2d"
        _check_tensor(name, "input", x)
        if x.dim() != 4:
            raise ValueError(f"{name}: expected 4D input (got {x.dim()}D input)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}({self.in_channels}, ...): input has {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        dtype = _input_dtype(name, x, self.weight.dtype)
        _check_device(name, x, self.weight)
        y = torch.nn.functional.conv2d(x.to(dtype), self.weight, self.bias, self.stride,
                                       self.padding, self.dilation, self.groups)
        return torch.nn.functional.pixel_shuffle(y, self.scale_factor).to(x.dtype)

    def extra_repr(self):
        return conv_extra_repr(self) + f", scale_factor={self.scale_factor}"


__all__ = ["Encoding", "GramMatrix", "Inspiration", "UpsampleConv2d", "aggregate", "encoding",
           "scaled_l2"]
