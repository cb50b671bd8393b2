"""Independent references for the Encoding layer family: the formulas of LAYERS.md written out in
float64, with PyTorch autograd (the broadcast composition, residuals materialized) and with plain
NumPy for the gradients. Nothing here calls normkit."""
import numpy as np
import torch

from helpers import rng


def features(shape, seed, offset=0.0, scale=1.0):
    """Random (B, N, D) features with a distinct offset per feature dim."""
    g = rng(seed)
    x = g.standard_normal(shape) * scale
    return x + offset + g.uniform(-0.5, 0.5, shape[-1])


def codebook(K, D, seed, spread=0.6):
    g = rng(seed)
    C = g.uniform(-spread, spread, (K, D)) + g.uniform(-0.3, 0.3, D)
    s = -g.uniform(0.2, 1.2, K) * g.choice([1.0, 0.5], K)
    return C, s


def n_major(X):
    """X (B, N, D) stored as (B, D, N): the transposed view a layer's input gives."""
    return np.ascontiguousarray(X.swapaxes(1, 2)).swapaxes(1, 2)


def strided_rows(X):
    """X[..., ::2] of a buffer twice as wide: no unit stride in either of the last two dims."""
    base = np.full(X.shape[:-1] + (2 * X.shape[-1],), np.nan, X.dtype)
    base[..., ::2] = X
    return base[..., ::2]


def reversed_view(a):
    rev = (slice(None, None, -1),) * a.ndim
    return np.ascontiguousarray(a[rev])[rev]


FEATURE_LAYOUTS = {"rows": np.ascontiguousarray, "n_major": n_major, "strided": strided_rows,
                   "reversed": reversed_view}


def t64(a, grad=False):
    t = torch.tensor(np.array(a, dtype=np.float64))  # a copy: torch takes no negative strides
    return t.requires_grad_(grad)


def torch_scaled_l2(X, C, s):
    R = X[:, :, None, :] - C[None, None]
    return s * (R * R).sum(-1)


def torch_aggregate(A, X, C):
    R = X[:, :, None, :] - C[None, None]
    return (A[..., None] * R).sum(1)


def torch_encoding(X, C, s):
    return torch_aggregate(torch.softmax(torch_scaled_l2(X, C, s), dim=2), X, C)


def torch_op(fn, inputs, grad_out):
    """fn over float64 torch copies of `inputs`; returns (output, [gradient of each input])."""
    ts = [t64(a, grad=True) for a in inputs]
    out = fn(*ts)
    out.backward(t64(grad_out))
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def numpy_scaled_l2_backward(g, X, C, s):
    """LAYERS.md's formulas: dX = sum_k 2 s g (x - c), dC = -sum 2 s g (x - c),
    ds = sum g |x - c|^2."""
    R = X[:, :, None, :] - C[None, None]
    w = 2 * s * g
    return ((w[..., None] * R).sum(2), -(w[..., None] * R).sum((0, 1)),
            (g * (R * R).sum(-1)).sum((0, 1)))


def numpy_aggregate_backward(g, A, X, C):
    """dA = <g[b,k], x - c>, dX = sum_k A g, dC = -sum_b (sum_i A) g."""
    R = X[:, :, None, :] - C[None, None]
    return ((g[:, None] * R).sum(-1), np.einsum("bik,bkd->bid", A, g),
            -(A.sum(1)[..., None] * g).sum(0))
