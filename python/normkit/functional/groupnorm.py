"""Per-sample statistics over (N, C, *) arrays: group norm and instance norm (G = C).

Statistics are per (sample, group of C/G channels) over the group's channels and every spatial
dim; the core's ops are split like the batch-norm ones:

* ``group_norm_stats`` (local moments) -> ``group_norm_affine`` with per-(sample, channel)
  coefficients, and ``group_norm_backward_reduce`` -> ``group_norm_backward_elemt``; the small
  (N, C) coefficient arrays in between are computed here with O(N * C) array ops.
* ``group_norm_forward`` / ``group_norm_backward``: the whole op of one process, fused in the core.
* ``instance_norm_forward`` / ``instance_norm_backward``: ``torch.nn.functional.instance_norm``
  (running statistics, ``use_input_stats``) built on the above.

Statistics and parameters have the input's dtype, except for float16 inputs (float32). Outputs
keep the input's layout (channels-last in, channels-last out). On CuPy arrays the ops run on CuPy's
current stream and never wait for the GPU.
"""
from .. import _C
from .._backend import (array_module, kernel_input, launch_args, like, on_array_device,
                        param_dtype, writeable)


def _per_sample(x, k):
    return array_module(x).empty((x.shape[0], k), dtype=param_dtype(x.dtype))


def _reducing(x, groups):
    """Stream and workspace of an op that reduces over `x` in `groups` groups."""
    return launch_args(x, _C.group_norm_workspace_size, groups)


def _check_groups(op, x, num_groups):
    if isinstance(num_groups, bool) or int(num_groups) != num_groups or num_groups < 1:
        raise ValueError(f"{op}: num_groups must be a positive integer, got {num_groups!r}")
    if x.shape[1] % num_groups:
        raise ValueError(f"{op}: the {x.shape[1]} channels of x are not divisible into "
                         f"{num_groups} groups")
    return int(num_groups)


def _spread(v, c):
    """An (N, G) array repeated over the C/G channels of each group: (N, C)."""
    return v if v.shape[1] == c else array_module(v).repeat(v, c // v.shape[1], axis=1)


@on_array_device
def group_norm_stats(x, num_groups):
    """Per-(sample, group) ``(mean, var)`` of ``x``, each (N, G), var biased.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    num_groups : int
        G, dividing C.

    Returns
    -------
    mean, var : arrays (N, G)
        float32 for half-precision input, else x's dtype.

    Raises
    ------
    ValueError
        G does not divide C, or is not positive.
    """
    x = kernel_input(x)
    g = _check_groups("group_norm_stats", x, num_groups)
    mean, var = _per_sample(x, g), _per_sample(x, g)
    _C.group_norm_stats(x, mean, var, **_reducing(x, g))
    return mean, var


@on_array_device
def group_norm_affine(x, mean, scale, shift, out=None):
    """``(x - mean[n, g(c)]) * scale[n, c] + shift[n, c]``, mean (N, G), scale and shift (N, C);
    ``out`` if given (it may be ``x``), else a new array in ``x``'s layout.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    mean : array (N, G)
        The per-(sample, group) means.
    scale, shift : arrays (N, C)
        Per-(sample, channel) coefficients (``rstd * weight``, ``bias``), parameter dtype.
    out : array like x, or None
        Written in place (may be x itself); None: a new array.

    Returns
    -------
    array like x
    """
    x = kernel_input(x)
    y = array_module(x).empty_like(x) if out is None else out
    _C.group_norm_affine(x, mean, scale, shift, y, **launch_args(x))
    return y


@on_array_device
def group_norm_backward_reduce(dy, x, mean):
    """Per-(sample, channel) ``(sum dy, sum dy * (x - mean[n, g(c)]))``, each (N, C).

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    mean : array (N, G)
        The forward's means.

    Returns
    -------
    sum_dy, sum_dy_xmu : arrays (N, C)
    """
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    sum_dy, sum_dy_xmu = _per_sample(x, x.shape[1]), _per_sample(x, x.shape[1])
    _C.group_norm_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, **_reducing(x, mean.shape[1]))
    return sum_dy, sum_dy_xmu


@on_array_device
def group_norm_backward_elemt(dy, x, mean, a, b=None, c=None, out=None):
    """``dx = a[n, c] * dy + b[n, g] * (x - mean[n, g]) + c[n, g]``; b, c None mean 0 (statistics
    held constant).

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    mean : array (N, G)
        The forward's means.
    a : array (N, C)
        The coefficient of dy.
    b, c : arrays (N, G) or None
        The coefficient of (x - mean) and the constant term; None: 0.
    out : array like x, or None
        Written in place; None: a new array.

    Returns
    -------
    array like x
        dx.
    """
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    dx = array_module(x).empty_like(x) if out is None else out
    _C.group_norm_backward_elemt(dy, x, mean, a, b, c, dx, **launch_args(x))
    return dx


@on_array_device
def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm as ``torch.nn.functional.group_norm``; returns ``(y, mean, rstd)``, the (N, G)
    statistics ``group_norm_backward`` needs.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    num_groups : int
        G, dividing C.
    weight, bias : arrays (C,) or None
        The affine parameters (parameter dtype: float32 for half-precision input).
    eps : float
        Added to the variance.

    Returns
    -------
    y : array like x
    mean, rstd : arrays (N, G)

    Raises
    ------
    ValueError, TypeError
        G does not divide C; parameters of another shape or dtype.
    """
    y, mean, _, rstd = _forward(x, num_groups, weight, bias, eps, "group_norm_forward")
    return y, mean, rstd


def _forward(x, num_groups, weight, bias, eps, op):
    x = kernel_input(x)
    g = _check_groups(op, x, num_groups)
    y = array_module(x).empty_like(x)
    mean, var, rstd = _per_sample(x, g), _per_sample(x, g), _per_sample(x, g)
    _C.group_norm_forward(x, weight, bias, float(eps), y, mean, var, rstd, **_reducing(x, g))
    return y, mean, var, rstd


@on_array_device
def group_norm_backward(dy, x, mean, rstd, weight=None, bias=None):
    """Gradients ``(dx, dweight, dbias)`` of ``group_norm_forward`` given its ``mean, rstd``.
    ``dweight`` is None without ``weight``, ``dbias`` None without ``bias`` (only whether it is
    given matters: pass the bias array, or True).

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    mean, rstd : arrays (N, G)
        What ``group_norm_forward`` returned.
    weight : array (C,) or None
        The affine weight.
    bias : array, True or None
        Whether to return dbias.

    Returns
    -------
    dx : array like x
    dweight, dbias : arrays (C,) or None
    """
    x = kernel_input(x)
    dy = like(x, kernel_input(dy, "dy"))
    c = x.shape[1]
    dx = array_module(x).empty_like(x)
    sum_dy, sum_dy_xmu = _per_sample(x, c), _per_sample(x, c)
    _C.group_norm_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xmu,
                           **_reducing(x, mean.shape[1]))
    dweight = (sum_dy_xmu * _spread(rstd, c)).sum(axis=0) if weight is not None else None
    dbias = sum_dy.sum(axis=0) if bias is not None and bias is not False else None
    return dx, dweight, dbias


# --- instance norm --------------------------------------------------------------------------------

def _check_running(name, stat, x):
    """Running statistics are updated in place by array arithmetic, which would broadcast or
    upcast silently: check them first, before anything is written."""
    if stat is None:
        return
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


@on_array_device
def instance_norm_forward(x, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm as ``torch.nn.functional.instance_norm``; returns ``(y, mean, rstd)``, each
    (N, C): the statistics used (per instance with ``use_input_stats``, else the running ones
    broadcast over the batch) are what ``instance_norm_backward`` needs. With
    ``use_input_stats`` the running statistics (if given) move by ``momentum`` toward the batch
    average of the per-instance mean and unbiased variance.

    Parameters
    ----------
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    running_mean, running_var : arrays (C,) or None
        Updated in place with ``use_input_stats``; normalize without it (then required).
    weight, bias : arrays (C,) or None
        The affine parameters.
    use_input_stats : bool
        Per-instance statistics (True) or the running ones.
    momentum : float
        Factor of the batch's statistics in the running ones.
    eps : float
        Added to the variance.

    Returns
    -------
    y : array like x
    mean, rstd : arrays (N, C)

    Raises
    ------
    ValueError
        ``use_input_stats=False`` without running statistics; one spatial value with
        ``use_input_stats``.
    TypeError
        Running statistics of another array type or dtype.
    """
    x = kernel_input(x)
    xp = array_module(x)
    n, c = x.shape[0], x.shape[1]
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm_forward: use_input_stats=False needs running_mean "
                             "and running_var")
        _check_running("running_mean", running_mean, x)
        _check_running("running_var", running_var, x)
        rstd_c = 1.0 / xp.sqrt(running_var + eps)
        scale = rstd_c if weight is None else rstd_c * weight
        shift = xp.zeros(c, param_dtype(x.dtype)) if bias is None else bias
        mean = xp.broadcast_to(running_mean, (n, c))
        y = group_norm_affine(x, mean, xp.broadcast_to(scale, (n, c)),
                              xp.broadcast_to(shift, (n, c)))
        return y, mean, xp.broadcast_to(rstd_c, (n, c))
    _check_running("running_mean", running_mean, x)
    _check_running("running_var", running_var, x)
    spatial = x.size // (n * c) if n * c else 0
    if spatial <= 1:
        raise ValueError(f"instance_norm_forward: expected more than 1 spatial element when "
                         f"training, got input of shape {tuple(x.shape)}")
    y, mean, var, rstd = _forward(x, c, weight, bias, eps, "instance_norm_forward")
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean.mean(axis=0)
    if running_var is not None:
        running_var *= 1.0 - momentum
        running_var += (momentum * spatial / (spatial - 1)) * var.mean(axis=0)
    return y, mean, rstd


@on_array_device
def instance_norm_backward(dy, x, mean, rstd, weight=None, use_input_stats=True, bias=None):
    """Gradients ``(dx, dweight, dbias)`` of ``instance_norm_forward`` given its ``mean, rstd``
    ((N, C)); ``use_input_stats`` says whether they were per-instance statistics (gradient flows
    through them) or running ones. ``dweight``/``dbias`` are None without ``weight``/``bias``.

    Parameters
    ----------
    dy : array like x
        The gradient of the output.
    x : NumPy or CuPy array (N, C, *)
        float16, float32 or float64; channels-first or channels-last (any
        other strides through one copy).
    mean, rstd : arrays (N, C)
        What ``instance_norm_forward`` returned.
    weight : array (C,) or None
        The affine weight.
    use_input_stats : bool
        As in the forward.
    bias : array, True or None
        Whether to return dbias.

    Returns
    -------
    dx : array like x
    dweight, dbias : arrays (C,) or None
    """
    if use_input_stats:
        return group_norm_backward(dy, x, mean, rstd, weight, bias)
    x = kernel_input(x)
    a = rstd if weight is None else rstd * weight
    dx = group_norm_backward_elemt(dy, x, mean, a)
    want_bias = bias is not None and bias is not False
    if weight is None and not want_bias:
        return dx, None, None
    sum_dy, sum_dy_xmu = group_norm_backward_reduce(dy, x, mean)
    dweight = (sum_dy_xmu * rstd).sum(axis=0) if weight is not None else None
    return dx, dweight, sum_dy.sum(axis=0) if want_bias else None
