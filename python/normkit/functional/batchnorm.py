"""Batch normalization over (N, C, *) arrays, statistics per channel (dim 1).

Two levels:

* ``batch_norm_forward`` / ``batch_norm_backward``: the whole op for one process, with PyTorch's
  semantics (biased variance to normalize, unbiased variance into ``running_var``).
* The split ops a synchronized batch norm composes, one collective between each pair:
  ``batch_norm_stats`` -> combine across ranks -> ``batch_norm_normalize``, and
  ``batch_norm_backward_reduce`` -> all-reduce -> ``batch_norm_backward_elemt``.

Parameters and statistics have the input's dtype, except for float16 inputs, which take float32
ones. Outputs are allocated by the input's array library in the input's layout. On CuPy arrays the
ops run on CuPy's current stream and never wait for the GPU.
"""
import math

from .. import _C
from .._backend import (array_module, check_eps, kernel_input, launch_args, like, on_array_device,
                        param_dtype, writeable)


def _channels(x, dtype=None):
    return array_module(x).empty(x.shape[1], dtype=dtype or param_dtype(x.dtype))


def _reducing(x):
    """Stream and workspace of an op that reduces over `x`."""
    return launch_args(x, _C.batch_norm_workspace_size)


def _count(x):
    return x.size // x.shape[1] if x.shape[1] else 0


def _check_running(name, stat, x):
    """Running statistics are updated in place by NumPy/CuPy arithmetic, which would broadcast or
    upcast silently: check them first, before anything is written."""
    if stat is None:
        return
    array_module(stat, name)
    if type(stat) is not type(x):
        raise TypeError(f"{name} must be a {type(x).__module__} array like the input, got "
                        f"{type(stat).__module__}.{type(stat).__name__}")
    if stat.dtype != param_dtype(x.dtype):
        raise TypeError(f"{name} must be {param_dtype(x.dtype)} for {x.dtype} input, got "
                        f"{stat.dtype}")
    if stat.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape ({x.shape[1]},) to match the channels of the "
                         f"input, got {tuple(stat.shape)}")
    if not writeable(stat):
        raise ValueError(f"{name} is read-only; it is updated in place in training")


def _invstd(var, eps):
    return 1.0 / array_module(var).sqrt(var + eps)


@on_array_device
def batch_norm_stats(x):
    """Per-channel ``(mean, var)`` of ``x`` with var biased; an empty batch gives zeros."""
    x = kernel_input(x)
    mean, var = _channels(x), _channels(x)
    _C.batch_norm_stats(x, mean, var, **_reducing(x))
    return mean, var


@on_array_device
def batch_norm_normalize(x, mean, invstd, weight=None, bias=None, out=None):
    """``(x - mean) * invstd * weight + bias`` per channel; ``out`` if given, else a new array."""
    x = kernel_input(x)
    y = array_module(x).empty_like(x) if out is None else out
    _C.batch_norm_normalize(x, mean, invstd, weight, bias, y, **launch_args(x))
    return y


@on_array_device
def batch_norm_backward_reduce(dy, x, mean):
    """Per-channel ``(sum dy, sum dy * (x - mean))``: the sums a synchronized backward all-reduces."""
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    sum_dy, sum_dy_xmu = _channels(x), _channels(x)
    _C.batch_norm_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, **_reducing(x))
    return sum_dy, sum_dy_xmu


@on_array_device
def batch_norm_backward_elemt(dy, x, mean, invstd, weight=None, sum_dy=None, sum_dy_xmu=None,
                              count=None, out=None):
    """dx of batch norm. With ``sum_dy``/``sum_dy_xmu`` (reduced over ``count`` values per channel,
    all ranks together), the gradient through the batch statistics; without them, through
    constant statistics (eval)."""
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    dx = array_module(x).empty_like(x) if out is None else out
    if sum_dy is not None and count is None:
        count = _count(x)
    if count is not None and not math.isfinite(count):
        raise ValueError(f"batch_norm_backward_elemt: count must be finite, got {count}")
    _C.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                 float(count or 0), dx, **launch_args(x))
    return dx


@on_array_device
def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None,
                       training=True, momentum=0.1, eps=1e-5):
    """Batch norm forward, as ``torch.nn.functional.batch_norm``.

    In training, ``running_mean``/``running_var`` (if given) are updated in place with
    ``momentum`` and the unbiased batch variance.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; any layout (channels-last takes its own fast path).
    weight, bias : arrays (C,) or None
        The affine parameters, of the parameter dtype (float32 for float16 input).
    running_mean, running_var : arrays (C,) or None
        Updated in place in training; normalize in eval (then required).
    training : bool
        Batch statistics (True) or the running ones (False).
    momentum : float
        Factor of the batch statistics in the running ones.
    eps : float
        Added to the variance; positive in training, non-negative in eval (as in torch).

    Returns
    -------
    y : array like x
    mean, invstd : arrays (C,)
        The statistics used, which ``batch_norm_backward`` needs.
    """
    x = kernel_input(x)
    xp = array_module(x)
    eps = check_eps("batch_norm_forward", eps, training)
    _check_running("running_mean", running_mean, x)
    _check_running("running_var", running_var, x)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm_forward: eval mode (training=False) needs running_mean "
                             "and running_var")
        invstd = _invstd(running_var, eps)
        return batch_norm_normalize(x, running_mean, invstd, weight, bias), running_mean, invstd
    n = _count(x)
    if n <= 1:
        raise ValueError(f"batch_norm_forward: expected more than 1 value per channel when "
                         f"training, got input of shape {tuple(x.shape)}")
    y = xp.empty_like(x)
    mean, var, invstd = _channels(x), _channels(x), _channels(x)
    _C.batch_norm_forward_train(x, weight, bias, eps, y, mean, var, invstd, **_reducing(x))
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1.0 - momentum
        running_var += (momentum * n / (n - 1)) * var
    return y, mean, invstd


@on_array_device
def batch_norm_backward(dy, x, mean, invstd, weight=None, training=True, input_grad=True,
                        weight_grad=True):
    """Gradients ``(dx, dweight, dbias)`` of ``batch_norm_forward`` given its ``mean, invstd``.

    ``training`` says whether those were batch statistics (gradient flows through them) or
    running ones. ``dweight``/``dbias`` are None without ``weight`` or when not ``weight_grad``;
    ``dx`` is None when not ``input_grad``.
    """
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    xp = array_module(x)
    dx = xp.empty_like(x) if input_grad else None
    want_params = weight is not None and weight_grad
    if training:
        sum_dy, sum_dy_xmu = _channels(x), _channels(x)
        _C.batch_norm_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu,
                                     **_reducing(x))
    else:
        if input_grad:
            _C.batch_norm_backward_elemt(dy, x, mean, invstd, weight, None, None, 0.0, dx,
                                         **launch_args(x))
        if want_params:
            sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, x, mean)
    if not want_params:
        return dx, None, None
    return dx, sum_dy_xmu * invstd, sum_dy


# --- The functional form of PyTorch-Encoding (seed 001): given mean and std ------------------------

@on_array_device
def batchnormtrain(input, gamma, beta, mean, std):
    """``(input - mean) / std * gamma + beta`` per channel, for (N, C) or (N, C, L) inputs; the
    mean and std (usually computed from ``input``) receive gradients in
    ``batchnormtrain_backward``."""
    return batch_norm_normalize(input, mean, 1.0 / std, gamma, beta)


@on_array_device
def batchnormtrain_backward(dy, input, gamma, mean, std):
    """Gradients ``(dinput, dgamma, dbeta, dmean, dstd)`` of ``batchnormtrain`` (``dinput`` holds
    only the direct path; the caller chains ``dmean``/``dstd`` to wherever mean and std came from)."""
    invstd = 1.0 / std
    dx = batch_norm_backward_elemt(dy, input, mean, invstd, gamma)
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, input, mean)
    dgamma = sum_dy_xmu * invstd
    return dx, dgamma, sum_dy, -gamma * invstd * sum_dy, -gamma * invstd * invstd * sum_dy_xmu


@on_array_device
def batchnormeval(input, gamma, beta, mean, std):
    """As ``batchnormtrain``, but ``mean`` and ``std`` are constants: no gradient reaches them."""
    return batch_norm_normalize(input, mean, 1.0 / std, gamma, beta)


@on_array_device
def batchnormeval_backward(dy, input, gamma, mean, std):
    """Gradients ``(dinput, dgamma, dbeta)`` of ``batchnormeval``."""
    dx, dgamma, dbeta = batch_norm_backward(dy, input, mean, 1.0 / std, gamma, training=False)
    return dx, dgamma, dbeta
