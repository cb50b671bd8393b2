"""N-d convolution over NumPy / CuPy arrays, as im2col (native core) + the array library's GEMM,
its adjoint the transposed convolution, torch's padding modes, and the pixel shuffle that
UpsampleConv2d builds on.

``convolution(x, weight, bias, stride, padding, dilation, groups)`` follows
``torch.nn.functional.conv1d/2d/3d`` (zero padding): x (B, C_in, *spatial), weight
(C_out, C_in / groups, *kernel). The backward recomputes the columns instead of keeping them, so a
forward holds no more memory than its input and output. im2col/col2im run on the calling thread
unless ``set_between_gemm_threads`` says otherwise (see normkit.functional.encoding); on CuPy arrays
they run on CuPy's current stream.

``conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation)`` follows
``torch.nn.functional.conv_transpose1d/2d/3d``: weight (C_in, C_out / groups, *kernel); it is
col2im of weight^T x (the adjoint of ``convolution``), its backward im2col of dy.
``pad(x, pads, mode)`` pads as torch's Conv layers' padding_mode does ("zeros", "reflect",
"replicate", "circular", with (left, right) per spatial dim); ``pad_backward`` folds the padded
gradient back onto the input.

Dtypes: float32 and float64; on CuPy also float16 (cuBLAS's half GEMM, col2im sums in float32).
"""
import math
import operator

from .. import _C
from .._backend import array_module, launch_args, on_array_device


def _geometry(name, value, dims, minimum):
    """An int or a sequence of `dims` ints, each >= minimum, as a list."""
    try:
        values = [operator.index(value)] * dims if not hasattr(value, "__len__") else [
            operator.index(v) for v in value]
    except TypeError:
        values = None
    if values is None or len(values) != dims:
        raise ValueError(f"convolution: {name} must be an int or {dims} ints (one per spatial "
                         f"dim), got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"convolution: {name} must be >= {minimum}, got {value!r}")
    return values


def _check(x, weight, bias, stride, padding, dilation, groups):
    """Validates a call; returns (xp, stride, padding, dilation, output spatial size)."""
    xp = array_module(x, "x")
    if array_module(weight, "weight") is not xp:
        raise TypeError("convolution: weight and x must both be NumPy or both CuPy arrays")
    sizes = (4, 8) if xp.__name__ == "numpy" else (2, 4, 8)
    for name, a in (("x", x), ("weight", weight)):
        if a.dtype.kind != "f" or a.dtype.itemsize not in sizes:
            raise TypeError(f"convolution: {name} has dtype {a.dtype}; float32 or float64 arrays "
                            f"are supported (and float16 on CuPy)")
    if weight.dtype != x.dtype:
        raise TypeError(f"convolution: weight has dtype {weight.dtype} but x has {x.dtype}")
    dims = weight.ndim - 2
    if dims < 1:
        raise ValueError(f"convolution: weight must have shape (C_out, C_in / groups, *kernel), "
                         f"got {tuple(weight.shape)}")
    if x.ndim != dims + 2:
        raise ValueError(f"convolution: a {dims}-d kernel needs x of shape (B, C_in, {dims} "
                         f"spatial dims) ({dims + 2}D), got {x.ndim}D input of shape "
                         f"{tuple(x.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"convolution: groups must be a positive int, got {groups!r}")
    C_out, C_group = weight.shape[:2]
    if C_out % groups:
        raise ValueError(f"convolution: {C_out} output channels are not divisible by groups="
                         f"{groups}")
    if x.shape[1] != C_group * groups:
        raise ValueError(f"convolution: x has {x.shape[1]} channels but weight "
                         f"{tuple(weight.shape)} with groups={groups} expects {C_group * groups}")
    if bias is not None:
        if array_module(bias, "bias") is not xp or bias.dtype != x.dtype:
            raise TypeError(f"convolution: bias must be a {x.dtype} array like x")
        if tuple(bias.shape) != (C_out,):
            raise ValueError(f"convolution: bias must have shape ({C_out},), got "
                             f"{tuple(bias.shape)}")
    stride = _geometry("stride", stride, dims, 1)
    padding = _geometry("padding", padding, dims, 0)
    dilation = _geometry("dilation", dilation, dims, 1)
    kernel = list(weight.shape[2:])
    out = [_C.conv_output_size(n, k, s, p, d)
           for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    for d, o in enumerate(out):
        if o < 1:
            raise ValueError(f"convolution: spatial dim {d} of x has size {x.shape[2 + d]}, "
                             f"smaller than the kernel's extent {dilation[d] * (kernel[d] - 1) + 1}"
                             f" with padding {padding[d]} on each side")
    return xp, stride, padding, dilation, out


def _columns(x, kernel, stride, padding, dilation, out, xp):
    """im2col of x: (B, C_in * prod(kernel), prod(out)). A 1x1 kernel with unit stride and no
    padding reads x itself."""
    B, C = x.shape[:2]
    L = math.prod(out)
    if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding):
        return x.reshape(B, C, L)
    cols = xp.empty((B, C * math.prod(kernel), L), x.dtype)
    _C.im2col(x, cols, kernel, stride, padding, dilation, **launch_args(x))
    return cols


@on_array_device
def convolution(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = weight * x (+ bias), as ``torch.nn.functional.conv{1,2,3}d`` with zero padding.

    Parameters
    ----------
    x : NumPy or CuPy array (B, C_in, *spatial)
        float32 or float64, 1 to 3 spatial dims.
    weight : array (C_out, C_in / groups, *kernel)
        Of x's dtype and array type.
    bias : array (C_out,) or None
    stride, padding, dilation : int or sequence of ints
        One per spatial dim, or one for all (stride, dilation >= 1; padding >= 0, zeros).
    groups : int
        Dividing both channel counts.

    Returns
    -------
    array (B, C_out, *out_spatial)

    Raises
    ------
    TypeError
        Mixed array types or dtypes, or a dtype other than float32/float64.
    ValueError
        Shapes, groups or geometry that do not fit (naming which).
    """
    xp, stride, padding, dilation, out = _check(x, weight, bias, stride, padding, dilation, groups)
    B = x.shape[0]
    C_out, C_group = weight.shape[:2]
    kernel = list(weight.shape[2:])
    rows = C_group * math.prod(kernel)
    cols = _columns(x, kernel, stride, padding, dilation, out, xp)
    L = cols.shape[2]
    y = xp.matmul(weight.reshape(groups, C_out // groups, rows), cols.reshape(B, groups, rows, L))
    y = y.reshape((B, C_out) + tuple(out))
    if bias is not None:
        y += bias.reshape((1, C_out) + (1,) * len(out))
    return y


@on_array_device
def convolution_backward(dy, x, weight, stride=1, padding=0, dilation=1, groups=1,
                         input_grad=True, weight_grad=True, bias_grad=True):
    """Gradients ``(dx, dweight, dbias)`` of ``convolution``; each is None when not asked for
    (``dbias`` is the sum of dy over all dims but the channels).

    Parameters
    ----------
    dy : array (B, C_out, *out_spatial)
        The gradient of the output.
    x, weight : arrays
        The forward's input and weight.
    stride, padding, dilation : int or sequence of ints
        One per spatial dim, or one for all (stride, dilation >= 1; padding >= 0, zeros).
    groups : int
        Dividing both channel counts.
    input_grad, weight_grad, bias_grad : bool
        Which gradients to compute.

    Returns
    -------
    dx : array like x, or None
    dweight : array like weight, or None
    dbias : array (C_out,) or None
    """
    xp, stride, padding, dilation, out = _check(x, weight, None, stride, padding, dilation, groups)
    B = x.shape[0]
    C_out, C_group = weight.shape[:2]
    expected = (B, C_out) + tuple(out)
    if array_module(dy, "dy") is not xp or dy.dtype != x.dtype:
        raise TypeError(f"convolution_backward: dy must be a {x.dtype} array like x")
    if tuple(dy.shape) != expected:
        raise ValueError(f"convolution_backward: dy must have the output's shape {expected}, got "
                         f"{tuple(dy.shape)}")
    kernel = list(weight.shape[2:])
    rows = C_group * math.prod(kernel)
    L = math.prod(out)
    dy_groups = dy.reshape(B, groups, C_out // groups, L)
    dx = dweight = dbias = None
    if weight_grad:
        cols = _columns(x, kernel, stride, padding, dilation, out, xp)
        dweight = xp.matmul(dy_groups, cols.reshape(B, groups, rows, L).swapaxes(-1, -2))
        dweight = dweight.sum(axis=0).reshape(weight.shape)
    if input_grad:
        w = weight.reshape(groups, C_out // groups, rows)
        dcols = xp.matmul(w.swapaxes(-1, -2), dy_groups)
        dcols = dcols.reshape(B, x.shape[1] * math.prod(kernel), L)
        if all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding):
            dx = dcols.reshape(x.shape)
        else:
            dx = xp.empty(x.shape, x.dtype)
            _C.col2im(dcols, dx, kernel, stride, padding, dilation, **launch_args(dx))
    if bias_grad:
        dbias = dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    return dx, dweight, dbias


def _transpose_check(x, weight, bias, stride, padding, output_padding, dilation, groups):
    """Validates a transposed convolution; returns (xp, stride, padding, dilation, output size)."""
    xp = array_module(x, "x")
    dims = weight.ndim - 2
    if dims < 1 or x.ndim != dims + 2:
        raise ValueError(f"conv_transpose: weight (C_in, C_out / groups, *kernel) of shape "
                         f"{tuple(weight.shape)} needs x with {weight.ndim} dims, got "
                         f"{tuple(x.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"conv_transpose: groups must be a positive int, got {groups!r}")
    if weight.shape[0] != x.shape[1] or x.shape[1] % groups:
        raise ValueError(f"conv_transpose: x has {x.shape[1]} channels, weight "
                         f"{tuple(weight.shape)} with groups={groups} expects {weight.shape[0]} "
                         f"(divisible by groups)")
    stride = _geometry("stride", stride, dims, 1)
    padding = _geometry("padding", padding, dims, 0)
    dilation = _geometry("dilation", dilation, dims, 1)
    output_padding = _geometry("output_padding", output_padding, dims, 0)
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(f"conv_transpose: output_padding {output_padding} must be smaller than "
                         f"the stride {stride}")
    kernel = weight.shape[2:]
    out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
           zip(x.shape[2:], stride, padding, dilation, kernel, output_padding)]
    if any(o < 1 for o in out):
        raise ValueError(f"conv_transpose: the output of x {tuple(x.shape)} would have spatial "
                         f"size {out}; the padding {padding} is too large")
    C_out = weight.shape[1] * groups
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"conv_transpose: bias must have shape ({C_out},), got "
                         f"{tuple(bias.shape)}")
    sizes = (4, 8) if xp.__name__ == "numpy" else (2, 4, 8)
    for name, a in (("x", x), ("weight", weight), ("bias", bias)):
        if a is None:
            continue
        if array_module(a, name) is not xp or a.dtype.kind != "f" or a.dtype.itemsize not in sizes:
            raise TypeError(f"conv_transpose: {name} must be a float32 or float64 array (float16 "
                            f"on CuPy) of x's library, got {a.dtype}")
        if a.dtype != x.dtype:
            raise TypeError(f"conv_transpose: {name} has dtype {a.dtype} but x has {x.dtype}")
    return xp, stride, padding, dilation, out


def conv_transpose_output_padding(input_size, output_size, kernel, stride, padding, dilation):
    """torch's output_padding for a requested output_size (the spatial sizes, or with the batch
    and channel dims in front): a ValueError when no output_padding < stride gives it.

    Parameters
    ----------
    input_size : sequence of int
        The input's spatial sizes.
    output_size : sequence of int
        The wanted output's spatial sizes (or the whole shape).
    kernel, stride, padding, dilation : sequences of int
        One per spatial dim.

    Returns
    -------
    list of int
        The output_padding per spatial dim.

    Raises
    ------
    ValueError
        ``output_size`` has the wrong length or is out of reach.
    """
    dims = len(kernel)
    output_size = list(output_size)[-dims:]
    if len(output_size) != dims:
        raise ValueError(f"conv_transpose: output_size must have {dims} or {dims + 2} elements, "
                         f"got {output_size!r}")
    pads = []
    for d in range(dims):
        smallest = ((input_size[d] - 1) * stride[d] - 2 * padding[d]
                    + dilation[d] * (kernel[d] - 1) + 1)
        if not smallest <= output_size[d] < smallest + stride[d]:
            raise ValueError(f"conv_transpose: requested an output size of {output_size}, but "
                             f"dim {d} must lie in [{smallest}, {smallest + stride[d] - 1}] for "
                             f"input spatial size {list(input_size)}")
        pads.append(output_size[d] - smallest)
    return pads


@on_array_device
def conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                   dilation=1):
    """y = weight^T * x (+ bias), as ``torch.nn.functional.conv_transpose{1,2,3}d``.

    Parameters
    ----------
    x : NumPy or CuPy array (B, C_in, *spatial)
        float32 or float64, 1 to 3 spatial dims.
    weight : array (C_in, C_out / groups, *kernel)
        Of x's dtype and array type.
    bias : array (C_out,) or None
    stride, padding, output_padding, dilation : int or sequence of ints
        One per spatial dim, or one for all (output_padding < stride or dilation).
    groups : int
        Dividing both channel counts.

    Returns
    -------
    array (B, C_out, *out_spatial)

    Raises
    ------
    TypeError, ValueError
        As ``convolution``.
    """
    xp, stride, padding, dilation, out = _transpose_check(x, weight, bias, stride, padding,
                                                          output_padding, dilation, groups)
    B, C_in = x.shape[:2]
    C_group = weight.shape[1]
    kernel = list(weight.shape[2:])
    rows = C_group * math.prod(kernel)
    L = math.prod(x.shape[2:])
    w = weight.reshape(groups, C_in // groups, rows)
    cols = xp.matmul(w.swapaxes(-1, -2), x.reshape(B, groups, C_in // groups, L))
    y = xp.empty((B, C_group * groups) + tuple(out), x.dtype)
    _C.col2im(cols.reshape(B, groups * rows, L), y, kernel, stride, padding, dilation,
              **launch_args(y))
    if bias is not None:
        y += bias.reshape((1, -1) + (1,) * len(out))
    return y


@on_array_device
def conv_transpose_backward(dy, x, weight, stride=1, padding=0, output_padding=0, groups=1,
                            dilation=1, input_grad=True, weight_grad=True, bias_grad=True):
    """Gradients ``(dx, dweight, dbias)`` of ``conv_transpose``; each None when not asked for.

    Parameters
    ----------
    dy : array (B, C_out, *out_spatial)
        The gradient of the output.
    x, weight : arrays
        The forward's input and weight.
    stride, padding, output_padding, dilation : int or sequence of ints
        As in the forward.
    groups : int
        As in the forward.
    input_grad, weight_grad, bias_grad : bool
        Which gradients to compute.

    Returns
    -------
    dx : array like x, or None
    dweight : array like weight, or None
    dbias : array (C_out,) or None
    """
    xp, stride, padding, dilation, out = _transpose_check(x, weight, None, stride, padding,
                                                          output_padding, dilation, groups)
    B, C_in = x.shape[:2]
    expected = (B, weight.shape[1] * groups) + tuple(out)
    if array_module(dy, "dy") is not xp or dy.dtype != x.dtype:
        raise TypeError(f"conv_transpose_backward: dy must be a {x.dtype} array like x")
    if tuple(dy.shape) != expected:
        raise ValueError(f"conv_transpose_backward: dy must have the output's shape {expected}, "
                         f"got {tuple(dy.shape)}")
    kernel = list(weight.shape[2:])
    rows = weight.shape[1] * math.prod(kernel)
    L = math.prod(x.shape[2:])
    dcols = _columns(dy, kernel, stride, padding, dilation, list(x.shape[2:]), xp)
    dcols = dcols.reshape(B, groups, rows, L)
    x_groups = x.reshape(B, groups, C_in // groups, L)
    dx = dweight = dbias = None
    if input_grad:
        w = weight.reshape(groups, C_in // groups, rows)
        dx = xp.matmul(w, dcols).reshape(x.shape)
    if weight_grad:
        dweight = xp.matmul(x_groups, dcols.swapaxes(-1, -2)).sum(axis=0).reshape(weight.shape)
    if bias_grad:
        dbias = dy.sum(axis=(0,) + tuple(range(2, dy.ndim)))
    return dx, dweight, dbias


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}


@on_array_device
def pad(x, pads, mode="zeros"):
    """x with (left, right) = pads[d] values added around spatial dim d, as torch's Conv layers
    pad for ``padding_mode`` (reflect: pad < size; circular: pad <= size).

    Parameters
    ----------
    x : NumPy or CuPy array (B, C, *spatial)
    pads : sequence of (int, int)
        (left, right) per spatial dim.
    mode : str
        'zeros', 'reflect', 'replicate' or 'circular'.

    Returns
    -------
    array (B, C, *padded)

    Raises
    ------
    ValueError
        An unknown mode, or padding too large for reflect / circular.
    """
    if mode not in _PAD_MODES:
        raise ValueError(f"padding_mode must be one of {sorted(_PAD_MODES)}, got {mode!r}")
    for d, (lo, hi) in enumerate(pads):
        n = x.shape[2 + d]
        if (mode == "reflect" and max(lo, hi) >= n) or (mode == "circular" and max(lo, hi) > n):
            raise ValueError(f"padding_mode={mode!r}: padding ({lo}, {hi}) of spatial dim {d} "
                             f"must be {'<' if mode == 'reflect' else '<='} its size {n}")
    xp = array_module(x, "x")
    return xp.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads], mode=_PAD_MODES[mode])


@on_array_device
def pad_backward(dxp, pads, mode="zeros"):
    """The gradient of ``pad``'s input: each padded value's gradient folded back onto the value
    it copied (dims in reverse order, the adjoint of padding them one after another).

    Parameters
    ----------
    dxp : NumPy or CuPy array (B, C, *padded)
        The gradient of ``pad``'s output.
    pads : sequence of (int, int)
        As given to ``pad``.
    mode : str
        As given to ``pad``.

    Returns
    -------
    array (B, C, *spatial)
    """
    g = dxp
    for d in reversed(range(len(pads))):
        lo, hi = pads[d]
        axis = 2 + d
        n = g.shape[axis] - lo - hi

        def at(a, b, step=None):
            index = [slice(None)] * g.ndim
            index[axis] = slice(a, b, step)
            return tuple(index)

        r = g[at(lo, lo + n)].copy()
        left, right = g[at(0, lo)], g[at(lo + n, lo + n + hi)]
        if mode == "circular":
            r[at(n - lo, n)] += left
            r[at(0, hi)] += right
        elif mode == "replicate":
            r[at(0, 1)] += left.sum(axis=axis, keepdims=True)
            r[at(n - 1, n)] += right.sum(axis=axis, keepdims=True)
        elif mode == "reflect":
            r[at(1, lo + 1)] += left[at(None, None, -1)]
            r[at(n - 1 - hi, n - 1)] += right[at(None, None, -1)]
        g = r
    return g


@on_array_device
def pixel_shuffle(x, scale):
    """(B, C * s^2, H, W) -> (B, C, H * s, W * s): ``out[b, c, h*s + i, w*s + j] =
    x[b, c*s^2 + i*s + j, h, w]`` (as ``torch.nn.functional.pixel_shuffle``).

    Parameters
    ----------
    x : NumPy or CuPy array (B, C * s^2, H, W)
    scale : int
        s.

    Returns
    -------
    array (B, C, H * s, W * s)
    """
    B, Cs, H, W = x.shape
    C = Cs // (scale * scale)
    return x.reshape(B, C, scale, scale, H, W).transpose(0, 1, 4, 2, 5, 3).reshape(
        B, C, H * scale, W * scale)


@on_array_device
def pixel_unshuffle(y, scale):
    """The inverse (and adjoint) of ``pixel_shuffle``:
    (B, C, H * s, W * s) -> (B, C * s^2, H, W).

    Parameters
    ----------
    y : NumPy or CuPy array (B, C, H * s, W * s)
    scale : int
        s.

    Returns
    -------
    array (B, C * s^2, H, W)
    """
    B, C, Hs, Ws = y.shape
    H, W = Hs // scale, Ws // scale
    return y.reshape(B, C, H, scale, W, scale).transpose(0, 1, 3, 5, 2, 4).reshape(
        B, C * scale * scale, H, W)


__all__ = ["conv_transpose", "conv_transpose_backward", "conv_transpose_output_padding",
           "convolution", "convolution_backward", "pad", "pad_backward", "pixel_shuffle",
           "pixel_unshuffle"]
