"""Shared helpers of the test suite: random data, memory layouts, independent float64 NumPy
reference implementations of batch norm, a torch reference, finite differences and comparisons.

Nothing here calls normkit: the references must stay independent of the code under test.
"""
import numpy as np

# --------------------------------------------------------------------------------------------------
# Random data. Never zeros or ones: offsets and scales keep every statistic away from trivial values.


def rng(seed):
    return np.random.default_rng(seed)


def randn(shape, seed, dtype=np.float64, offset=0.0, scale=1.0):
    """Normal data with a per-channel offset/scale pattern on top of `offset` and `scale`, so that
    channels have distinct means and variances (a bug mixing channels shows)."""
    g = rng(seed)
    x = g.standard_normal(shape)
    if len(shape) >= 2 and shape[1] > 0:
        C = shape[1]
        ch_off = g.uniform(-1.5, 1.5, C).reshape((1, C) + (1,) * (len(shape) - 2))
        ch_scale = g.uniform(0.5, 2.0, C).reshape((1, C) + (1,) * (len(shape) - 2))
        x = x * ch_scale + ch_off
    return (x * scale + offset).astype(dtype)


def params(C, seed, dtype=np.float64):
    """Random affine weight (away from 1) and bias (away from 0)."""
    g = rng(seed)
    w = g.uniform(0.5, 1.5, C) * g.choice([-1.0, 1.0], C)
    b = g.uniform(-0.8, 0.8, C) + 0.1
    return w.astype(dtype), b.astype(dtype)


def running(C, seed, dtype=np.float64):
    """Random running statistics (positive variances)."""
    g = rng(seed)
    return g.uniform(-0.7, 0.7, C).astype(dtype), g.uniform(0.4, 2.5, C).astype(dtype)


# --------------------------------------------------------------------------------------------------
# Memory layouts. Each maker returns an array equal to `x` element for element, stored differently.


def channels_last(x):
    """(N, C, *) stored as (N, *, C): NLC for 3D, NHWC for 4D, NDHWC for 5D."""
    nd = x.ndim
    if nd < 3:
        raise ValueError("channels-last needs spatial dims")
    perm = (0,) + tuple(range(2, nd)) + (1,)
    inv = tuple(np.argsort(perm))
    return np.ascontiguousarray(x.transpose(perm)).transpose(inv)


def last_dim_strided(x):
    """x[..., ::2] of a twice-as-wide buffer: collapsible but not unit-stride (generic path)."""
    base = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, dtype=x.dtype)
    base[..., ::2] = x
    return base[..., ::2]


def channel_slice(x):
    """x[:, ::2] of a buffer with twice the channels (unit inner stride, odd channel stride)."""
    base = np.full((x.shape[0], 2 * x.shape[1]) + x.shape[2:], np.nan, dtype=x.dtype)
    base[:, ::2] = x
    return base[:, ::2]


def non_collapsible(x):
    """x[:, :, ..., ::2, 1::3]: spatial strides that cannot be flattened into one (needs >= 2
    spatial dims)."""
    if x.ndim < 4:
        raise ValueError("non-collapsible strides need two spatial dims")
    shape = x.shape[:-2] + (2 * x.shape[-2], 3 * x.shape[-1])
    base = np.full(shape, np.nan, dtype=x.dtype)
    base[..., ::2, 1::3] = x
    out = base[..., ::2, 1::3]
    assert not out.flags.c_contiguous
    return out


def fortran(x):
    return np.asfortranarray(x)


def reversed_strides(x):
    """Every dim read backwards: negative strides in all dims (a view of a reversed copy)."""
    rev = (slice(None, None, -1),) * x.ndim
    return np.ascontiguousarray(x[rev])[rev]


LAYOUT_MAKERS = {
    "contiguous": np.ascontiguousarray,
    "channels_last": channels_last,
    "strided": last_dim_strided,
    "channel_slice": channel_slice,
    "non_collapsible": non_collapsible,
    "fortran": fortran,
    "reversed": reversed_strides,
}


def layouts_for(ndim):
    """The layouts that make sense for an ndim."""
    if ndim == 2:
        return ["contiguous", "fortran", "strided", "reversed"]
    if ndim == 3:
        return ["contiguous", "channels_last", "strided", "channel_slice", "fortran", "reversed"]
    return ["contiguous", "channels_last", "strided", "channel_slice", "non_collapsible",
            "reversed"]


def make_layout(x, layout):
    out = LAYOUT_MAKERS[layout](x)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, x)
    return out


def other_layout(layout, ndim):
    """A layout for dy different from x's (so the op must cope with mixed layouts)."""
    if ndim == 2:
        return "fortran" if layout != "fortran" else "contiguous"
    return "channels_last" if layout != "channels_last" else "contiguous"


# --------------------------------------------------------------------------------------------------
# Float64 NumPy references.


def axes(x):
    return (0,) + tuple(range(2, x.ndim))


def bc(v, ndim):
    """A per-channel vector broadcast against (N, C, *)."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def count(x):
    return x.size // x.shape[1]


def ref_stats(x):
    """mean and biased var per channel, in float64."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=axes(x))
    var = ((x - bc(mean, x.ndim)) ** 2).mean(axis=axes(x))
    return mean, var


def ref_forward_train(x, w, b, eps):
    """Returns y, mean, biased var, invstd (all float64)."""
    x = np.asarray(x, dtype=np.float64)
    mean, var = ref_stats(x)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - bc(mean, x.ndim)) * bc(invstd, x.ndim)
    y = xhat
    if w is not None:
        y = y * bc(w, x.ndim)
    if b is not None:
        y = y + bc(b, x.ndim)
    return y, mean, var, invstd


def ref_running_update(rm, rv, mean, var, n, momentum):
    """PyTorch's running-statistics update with the unbiased batch variance."""
    rm = np.asarray(rm, np.float64)
    rv = np.asarray(rv, np.float64)
    return ((1 - momentum) * rm + momentum * mean,
            (1 - momentum) * rv + momentum * var * n / (n - 1))


def ref_forward_eval(x, w, b, rm, rv, eps):
    x = np.asarray(x, dtype=np.float64)
    invstd = 1.0 / np.sqrt(np.asarray(rv, np.float64) + eps)
    y = (x - bc(rm, x.ndim)) * bc(invstd, x.ndim)
    if w is not None:
        y = y * bc(w, x.ndim)
    if b is not None:
        y = y + bc(b, x.ndim)
    return y


def ref_backward_train(dy, x, w, eps):
    """(dx, dw, db) of training batch norm, float64, textbook formula."""
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    nd = x.ndim
    M = count(x)
    mean, var = ref_stats(x)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - bc(mean, nd)) * bc(invstd, nd)
    wb = bc(np.ones(x.shape[1]) if w is None else w, nd)
    g = dy * wb
    dx = bc(invstd, nd) / M * (M * g - g.sum(axis=axes(x), keepdims=True)
                               - xhat * (g * xhat).sum(axis=axes(x), keepdims=True))
    dw = (dy * xhat).sum(axis=axes(x))
    db = dy.sum(axis=axes(x))
    return dx, dw, db


def ref_backward_eval(dy, x, w, rm, rv, eps):
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    nd = x.ndim
    invstd = 1.0 / np.sqrt(np.asarray(rv, np.float64) + eps)
    xhat = (x - bc(rm, nd)) * bc(invstd, nd)
    wb = bc(np.ones(x.shape[1]) if w is None else w, nd)
    dx = dy * wb * bc(invstd, nd)
    return dx, (dy * xhat).sum(axis=axes(x)), dy.sum(axis=axes(x))


def ref_formula(x, gamma, beta, mean, std):
    """The batchnormtrain/batchnormeval formula: (x - mean) / std * gamma + beta."""
    x = np.asarray(x, dtype=np.float64)
    nd = x.ndim
    return (x - bc(mean, nd)) / bc(std, nd) * bc(gamma, nd) + bc(beta, nd)


# --------------------------------------------------------------------------------------------------
# Finite differences.


def fd_grad(loss, a, h=1e-6):
    """Central-difference gradient of the scalar `loss()` with respect to the float64 array `a`,
    perturbed in place (a may be a strided view)."""
    assert a.dtype == np.float64
    g = np.empty(a.shape, dtype=np.float64)
    for idx in np.ndindex(*a.shape):
        orig = a[idx]
        a[idx] = orig + h
        fp = loss()
        a[idx] = orig - h
        fm = loss()
        a[idx] = orig
        g[idx] = (fp - fm) / (2 * h)
    return g


# --------------------------------------------------------------------------------------------------
# Comparisons.

# Tolerances by dtype: (rtol, atol relative to the largest magnitude of the reference).
TOL = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (1e-5, 1e-5),
    np.dtype(np.float16): (2e-3, 2e-3),
}


def assert_close(actual, expected, rtol, atol_scale, err_msg=""):
    """allclose with an absolute tolerance relative to the reference's largest magnitude (so that
    values that cancel to ~0 are judged on the scale of the whole array)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"non-finite values {err_msg}"
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_scale * scale,
                               err_msg=err_msg)


def assert_close_dtype(actual, expected, dtype, err_msg="", factor=1.0):
    rtol, atol = TOL[np.dtype(dtype)]
    assert_close(actual, expected, rtol * factor, atol * factor, err_msg)


# --------------------------------------------------------------------------------------------------
# Torch references (CPU).


def to_torch(a, requires_grad=False):
    import torch

    if a is None:
        return None
    t = torch.from_numpy(np.array(a, copy=True))
    if requires_grad:
        t.requires_grad_(True)
    return t


def torch_batch_norm(x, w, b, rm, rv, training, momentum, eps, dy=None):
    """torch.nn.functional.batch_norm with autograd: (y, dx, dw, db, running_mean, running_var),
    the running stats after the call (None if not given), gradients None if dy is None."""
    import torch

    tx = to_torch(x, requires_grad=dy is not None)
    tw = to_torch(w, requires_grad=dy is not None)
    tb = to_torch(b, requires_grad=dy is not None)
    trm, trv = to_torch(rm), to_torch(rv)
    y = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training,
                                       momentum=momentum, eps=eps)
    dx = dw = db = None
    if dy is not None:
        y.backward(to_torch(dy))
        dx = tx.grad.numpy()
        dw = None if tw is None else tw.grad.numpy()
        db = None if tb is None else tb.grad.numpy()
    return (y.detach().numpy(), dx, dw, db,
            None if trm is None else trm.numpy(), None if trv is None else trv.numpy())
