"""Weight standardization over NumPy / CuPy arrays: the core's fused op (one statistics pass over
the weight, one pass writing it; a fused backward through mean, variance and gain).

Each channel of dim 0 of ``w`` (the output channel of a Conv weight, the input channel of a
ConvTranspose weight, as torch stores both) is standardized over all its other dims:
``w_hat = (w - mean) * gain * rstd`` with, per ``convention``,

* ``"elektronn3"``: rstd = 1 / sqrt(max(var_unbiased * prod(w.shape), eps)) (fan_in counts C_out
  too, as elektronn3 does: at gain 1 a filter's norm is ~1 / sqrt(C_out));
* ``"nfnet"``: rstd = 1 / sqrt(max(var_biased * prod(w.shape[1:]), eps)) (unit-norm filters);
* ``"timm"``: rstd = 1 / sqrt(var_biased + eps) (timm's StdConv2d, BiT).

Dtypes: float32 and float64 (on CuPy also float16, with float32 statistics; normkit.torch also
passes bfloat16); ``gain`` (or None for 1), ``mean`` and ``rstd`` have the parameter dtype. On CuPy arrays the ops run on CuPy's current
stream.
"""
from .. import _C
from .._backend import array_module, launch_args, on_array_device, param_dtype

CONVENTIONS = {"elektronn3": 0, "nfnet": 1, "timm": 2}


def convention_id(convention):
    """The core's number of a convention name; a ValueError naming the known ones otherwise."""
    try:
        return CONVENTIONS[convention]
    except (KeyError, TypeError):
        raise ValueError(f"weight standardization: unknown convention {convention!r}; expected "
                         f"one of {sorted(CONVENTIONS)}") from None


def _dense(w, xp):
    """``w`` itself when the kernels can read it (C-contiguous), else a contiguous copy."""
    return w if w.flags.c_contiguous else xp.ascontiguousarray(w)


@on_array_device
def ws_standardize(w, gain=None, eps=1e-4, convention="elektronn3"):
    """``(w_hat, mean, rstd)``: the standardized weight and what ``ws_standardize_backward``
    needs.

    Parameters
    ----------
    w : NumPy or CuPy array (C0, *)
        The weight, standardized per slice of dim 0 (see the module's docstring).
    gain : array (C0,) or None
        Per-channel gain (parameter dtype); None: 1.
    eps : float
        The floor of the variance term (its meaning per convention, see the module).
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm'.

    Returns
    -------
    w_hat : array like w
    mean, rstd : arrays (C0,)
        Of the parameter dtype.

    Raises
    ------
    ValueError
        An unknown convention; shapes that do not fit.
    TypeError
        Dtypes that do not fit.
    """
    xp = array_module(w, "w")
    cid = convention_id(convention)
    w = _dense(w, xp)
    pd = param_dtype(w.dtype)
    w_hat = xp.empty_like(w)
    mean = xp.empty(w.shape[0], pd)
    rstd = xp.empty(w.shape[0], pd)
    _C.ws_standardize_forward(w, gain, cid, float(eps), w_hat, mean, rstd, **launch_args(w))
    return w_hat, mean, rstd


@on_array_device
def ws_standardize_backward(dw_hat, w, gain, mean, rstd, eps=1e-4, convention="elektronn3",
                            weight_grad=True, gain_grad=True):
    """``(dw, dgain)`` of ``ws_standardize``; each is None when not asked for.

    Parameters
    ----------
    dw_hat : array like w
        The gradient of w_hat.
    w : NumPy or CuPy array (C0, *)
        The weight, standardized per slice of dim 0 (see the module's docstring).
    gain : array (C0,) or None
        Per-channel gain (parameter dtype); None: 1.
    eps : float
        The floor of the variance term (its meaning per convention, see the module).
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm'.
    mean, rstd : arrays (C0,)
        What ``ws_standardize`` returned.
    weight_grad, gain_grad : bool
        Which gradients to compute.

    Returns
    -------
    dw : array like w, or None
    dgain : array (C0,) or None
    """
    xp = array_module(w, "w")
    cid = convention_id(convention)
    w = _dense(w, xp)
    dw_hat = _dense(dw_hat, xp)
    dw = xp.empty_like(w) if weight_grad else None
    dgain = xp.empty(w.shape[0], param_dtype(w.dtype)) if gain_grad else None
    _C.ws_standardize_backward(dw_hat, w, gain, mean, rstd, cid, float(eps), dw, dgain,
                               **launch_args(w))
    return dw, dgain


__all__ = ["ws_standardize", "ws_standardize_backward"]
