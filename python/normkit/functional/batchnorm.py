"""Batch normalization over (N, C, *) arrays, statistics per channel (dim 1).

Two levels:

* ``batch_norm_forward`` / ``batch_norm_backward``: the whole op for one process, with PyTorch's
  semantics (biased variance to normalize, unbiased variance into ``running_var``).
* The split ops a synchronized batch norm composes, one collective between each pair:
  ``batch_norm_stats`` -> combine across ranks -> ``batch_norm_normalize``, and
  ``batch_norm_backward_reduce`` -> all-reduce -> ``batch_norm_backward_elemt``.
* ``batch_norm_forward_masked`` / ``batch_norm_backward_masked``: StochNorm's training step for
  one process in the fused passes of the first level, with a per-channel choice between the batch
  statistics and the running ones.

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
    """Per-channel ``(mean, var)`` of ``x`` with var biased; an empty batch gives zeros.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; any layout.

    Returns
    -------
    mean, var : arrays (C,)
        float32 for half-precision input, else x's dtype; the local partial statistics a
        synchronized batch norm combines across ranks.
    """
    x = kernel_input(x)
    mean, var = _channels(x), _channels(x)
    _C.batch_norm_stats(x, mean, var, **_reducing(x))
    return mean, var


@on_array_device
def batch_norm_normalize(x, mean, invstd, weight=None, bias=None, out=None):
    """``(x - mean) * invstd * weight + bias`` per channel; ``out`` if given, else a new array.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        Any layout.
    mean, invstd : arrays (C,)
        The statistics, of the parameter dtype (float32 for half-precision input).
    weight, bias : arrays (C,) or None
        The affine parameters; None: 1 and 0.
    out : array like x, or None
        Written in place (writable, not overlapping x unless it is x itself).

    Returns
    -------
    array like x
        ``out``, or a new array of x's shape, dtype and layout.
    """
    x = kernel_input(x)
    y = array_module(x).empty_like(x) if out is None else out
    _C.batch_norm_normalize(x, mean, invstd, weight, bias, y, **launch_args(x))
    return y


@on_array_device
def batch_norm_backward_reduce(dy, x, mean):
    """Per-channel ``(sum dy, sum dy * (x - mean))``: the sums a synchronized backward all-reduces.

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        The forward's input.
    mean : array (C,)
        The mean the forward normalized with.

    Returns
    -------
    sum_dy, sum_dy_xmu : arrays (C,)
        Of the parameter dtype.
    """
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
    constant statistics (eval).

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        The forward's input.
    mean, invstd : arrays (C,)
        The statistics the forward normalized with.
    weight : array (C,) or None
        The affine weight; None: 1.
    sum_dy, sum_dy_xmu : arrays (C,) or None
        ``batch_norm_backward_reduce``'s sums (all-reduced over the ranks); None: eval's
        gradient.
    count : int, float or None
        The number of values per channel the sums cover (all ranks); None: x's own.
    out : array like x, or None
        Written in place; None: a new array.

    Returns
    -------
    array like x
        dx.

    Raises
    ------
    ValueError
        ``count`` is not finite; shapes or dtypes that do not fit (also TypeError).
    """
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

    Raises
    ------
    ValueError
        Eval without running statistics; one value per channel in training; a bad eps; shapes
        that do not fit.
    TypeError
        Statistics or parameters of another dtype or array type than x needs.
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

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        The forward's input.
    mean, invstd : arrays (C,)
        What ``batch_norm_forward`` returned.
    weight : array (C,) or None
        The affine weight; None: no affine (and no dweight, dbias).
    training : bool
        Whether the forward used batch statistics.
    input_grad : bool
        Whether to compute dx.
    weight_grad : bool
        Whether to compute dweight and dbias.

    Returns
    -------
    dx : array like x, or None
    dweight, dbias : arrays (C,) or None
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


def _use_batch(use_batch, x):
    """The per-channel choice as the kernels take it: 1.0 / 0.0 in the parameter dtype."""
    xp = array_module(x)
    flags = xp.asarray(use_batch)
    if flags.shape != (x.shape[1],):
        raise ValueError(f"use_batch must have shape ({x.shape[1]},) to match the channels of the "
                         f"input, got {tuple(flags.shape)}")
    return (flags != 0).astype(param_dtype(x.dtype))


@on_array_device
def batch_norm_forward_masked(x, use_batch, running_mean, running_var, weight=None, bias=None,
                              momentum=0.1, eps=1e-5):
    """StochNorm's training forward for one process, in batch_norm_forward's fused passes.

    Channels where ``use_batch`` is true are normalized with the batch statistics; the others
    with ``running_mean`` / ``running_var`` as they are on entry. Then the running statistics of
    every channel are updated in place with the batch ones, as in ``batch_norm_forward``
    (``momentum``, unbiased variance).

    Parameters
    ----------
    x : array (N, C, *)
        float16, float32 or float64, NumPy or CuPy, any strides.
    use_batch : array (C,)
        bool or 0/1: which channels use the batch statistics.
    running_mean, running_var : arrays (C,)
        Required, in the parameter dtype (float32 for float16 input); updated in place.
    weight, bias : arrays (C,) or None
        The affine parameters; None: 1 and 0.
    momentum : float
        The running statistics' update factor.
    eps : float
        Added to the variances, > 0.

    Raises
    ------
    ValueError
        A missing running statistic, one value per channel or fewer, a ``use_batch`` of the wrong
        shape, eps <= 0.

    Returns
    -------
    y : array like x
    mean, invstd : arrays (C,)
        The statistics each channel was normalized with, which ``batch_norm_backward_masked``
        needs.
    """
    x = kernel_input(x)
    xp = array_module(x)
    eps = check_eps("batch_norm_forward_masked", eps, True)
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None:
            raise ValueError(f"batch_norm_forward_masked: {name} is required (the channels "
                             f"without batch statistics use it)")
        _check_running(name, stat, x)
    n = _count(x)
    if n <= 1:
        raise ValueError(f"batch_norm_forward_masked: expected more than 1 value per channel "
                         f"when training, got input of shape {tuple(x.shape)}")
    flags = _use_batch(use_batch, x)
    y = xp.empty_like(x)
    mean, var, used_mean, used_invstd = (_channels(x) for _ in range(4))
    _C.batch_norm_forward_train_masked(x, weight, bias, flags, running_mean, running_var, eps, y,
                                       mean, var, used_mean, used_invstd, **_reducing(x))
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += (momentum * n / (n - 1)) * var
    return y, used_mean, used_invstd


@on_array_device
def batch_norm_backward_masked(dy, x, mean, invstd, use_batch, weight=None, input_grad=True,
                               weight_grad=True):
    """Gradients ``(dx, dweight, dbias)`` of ``batch_norm_forward_masked``: through the batch
    statistics on the channels that used them, through constants (dx = weight * invstd * dy) on
    the others, in one fused pass.

    Parameters
    ----------
    dy : array like x
        The output gradient.
    x : array (N, C, *)
        The forward's input.
    mean, invstd : arrays (C,)
        What ``batch_norm_forward_masked`` returned (the statistics each channel used).
    use_batch : array (C,)
        The forward's ``use_batch``.
    weight : array (C,) or None
        The forward's weight.
    input_grad : bool
        Compute dx (else it is None).
    weight_grad : bool
        Compute dweight and dbias (they are None without ``weight`` too).

    Returns
    -------
    dx, dweight, dbias : arrays or None
    """
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    dx = array_module(x).empty_like(x) if input_grad else None
    sum_dy, sum_dy_xmu = _channels(x), _channels(x)
    _C.batch_norm_backward_train_masked(dy, x, mean, invstd, weight, _use_batch(use_batch, x), dx,
                                        sum_dy, sum_dy_xmu, **_reducing(x))
    if weight is None or not weight_grad:
        return dx, None, None
    return dx, sum_dy_xmu * invstd, sum_dy


# --- The functional form of PyTorch-Encoding (seed 001): given mean and std ------------------------

@on_array_device
def batchnormtrain(input, gamma, beta, mean, std):
    """``(input - mean) / std * gamma + beta`` per channel, for (N, C) or (N, C, L) inputs; the
    mean and std (usually computed from ``input``) receive gradients in
    ``batchnormtrain_backward``.

    Parameters
    ----------
    input : NumPy or CuPy array (N, C) or (N, C, L)
        float32 or float64 (float16 with float32 parameters).
    gamma, beta : arrays (C,)
        The affine parameters.
    mean, std : arrays (C,)
        The statistics (std > 0).

    Returns
    -------
    array like input
    """
    return batch_norm_normalize(input, mean, 1.0 / std, gamma, beta)


@on_array_device
def batchnormtrain_backward(dy, input, gamma, mean, std):
    """Gradients ``(dinput, dgamma, dbeta, dmean, dstd)`` of ``batchnormtrain`` (``dinput`` holds
    only the direct path; the caller chains ``dmean``/``dstd`` to wherever mean and std came from).

    Parameters
    ----------
    dy : array like input
        The gradient of the output.
    input : NumPy or CuPy array (N, C) or (N, C, L)
        The forward's input.
    gamma : array (C,)
        The affine weight.
    mean, std : arrays (C,)
        The forward's statistics.

    Returns
    -------
    dinput : array like input
    dgamma, dbeta, dmean, dstd : arrays (C,)
    """
    invstd = 1.0 / std
    dx = batch_norm_backward_elemt(dy, input, mean, invstd, gamma)
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(dy, input, mean)
    dgamma = sum_dy_xmu * invstd
    return dx, dgamma, sum_dy, -gamma * invstd * sum_dy, -gamma * invstd * invstd * sum_dy_xmu


@on_array_device
def batchnormeval(input, gamma, beta, mean, std):
    """As ``batchnormtrain``, but ``mean`` and ``std`` are constants: no gradient reaches them.

    Parameters
    ----------
    input : NumPy or CuPy array (N, C) or (N, C, L)
        float32 or float64 (float16 with float32 parameters).
    gamma, beta : arrays (C,)
        The affine parameters.
    mean, std : arrays (C,)
        The (running) statistics.

    Returns
    -------
    array like input
    """
    return batch_norm_normalize(input, mean, 1.0 / std, gamma, beta)


@on_array_device
def batchnormeval_backward(dy, input, gamma, mean, std):
    """Gradients ``(dinput, dgamma, dbeta)`` of ``batchnormeval``.

    Parameters
    ----------
    dy : array like input
        The gradient of the output.
    input : NumPy or CuPy array (N, C) or (N, C, L)
        The forward's input.
    gamma : array (C,)
        The affine weight.
    mean, std : arrays (C,)
        The forward's statistics.

    Returns
    -------
    dinput : array like input
    dgamma, dbeta : arrays (C,)
    """
    dx, dgamma, dbeta = batch_norm_backward(dy, input, mean, 1.0 / std, gamma, training=False)
    return dx, dgamma, dbeta
