"""Minimal N-d convolution layers (Conv1d/2d/3d) over NumPy / CuPy arrays, as torch.nn.Conv*d
(every padding_mode, padding="same"/"valid"): what the composite layers (UpsampleConv2d,
weight-standardized convolutions) build on. normkit is not a general framework; these exist so
that its layers run."""
import math

import numpy as np

from .. import functional as F
from .. import random as nk_random
from .._backend import array_module, param_dtype, parse_device
from .module import Module, Parameter


def _ntuple(name, value, dims, minimum):
    values = (value,) * dims if np.ndim(value) == 0 else tuple(value)
    if len(values) != dims or any(int(v) != v or v < minimum for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or {dims} of them, got {value!r}")
    return tuple(int(v) for v in values)


def _float_dtype(cls, dtype):
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{cls}: dtype must be float32 or float64, got {dtype}")
    return dtype


def _uniform(rng, low, high, shape, dtype):
    return rng.uniform(low, high, shape).astype(dtype)


def accumulate_grad(param, grad):
    """Adds `grad` to ``param.grad`` (sets it when None), as PyTorch accumulates gradients."""
    grad = grad.astype(param.dtype, copy=False)
    param.grad = grad if param.grad is None else param.grad + grad


class _SavesInput(Module):
    """A layer whose backward consumes what its last forward kept (one backward per forward)."""

    def __init__(self):
        super().__init__()
        self._saved = None

    def _take_saved(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first (each forward "
                               f"allows one backward)")
        saved, self._saved = self._saved, None
        return saved


def conv_extra_repr(layer):
    """torch.nn.Conv*d's summary of a convolution layer's geometry (normkit.nn's and
    normkit.torch's layers alike): the non-default arguments only."""
    s = (f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, "
         f"stride={layer.stride}")
    if isinstance(layer.padding, str) or any(layer.padding):
        s += f", padding={layer.padding}"
    if any(d != 1 for d in layer.dilation):
        s += f", dilation={layer.dilation}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        s += f", padding_mode={layer.padding_mode}"
    return s + (", bias=False" if layer.bias is None else "")


def parse_padding(name, padding, kernel_size, stride, dilation):
    """torch's Conv padding argument as (left, right) per spatial dim: an int, ints, "valid" (none)
    or "same" (stride 1 only; an odd total puts the extra value on the right, as torch)."""
    dims = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        if padding != "same":
            raise ValueError(f"{name}: padding must be an int, {dims} ints, 'valid' or 'same', "
                             f"got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _ntuple("padding", padding, dims, 0)]


_PARAMETERS = """
    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out, each divisible by ``groups``.
    kernel_size : int or tuple of ints
        One per spatial dim, or one for all.
    stride, dilation : int or tuple of ints
        Positive, one per spatial dim or one for all.
    padding : int, tuple of ints, "valid" or "same"
        Values added on both sides of each spatial dim ("same": stride 1 only; an odd total puts
        the extra value on the right, as torch).
    groups : int
        Blocked connections from input to output channels.
    bias : bool
        Whether the layer has a bias.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the initialization; None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.
    padding_mode : str
        'zeros' (the default), 'reflect', 'replicate' or 'circular' (keyword-only).

    Raises
    ------
    ValueError
        Non-positive sizes, channels not divisible by groups, a bad padding or padding_mode.
    TypeError
        A dtype other than float32 or float64.
"""


class _ConvNd(_SavesInput):
    """Convolution over (B, C_in, *spatial) inputs with ``weight`` (C_out, C_in / groups, *kernel)
    and optional ``bias`` (C_out,), initialized as PyTorch does: U(-b, b) with
    b = 1 / sqrt(C_in / groups * prod(kernel)), drawn from ``generator`` (normkit's default
    generator when None)."""

    _dims = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, device=None, dtype=None, generator=None, *,
                 padding_mode="zeros"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("groups", groups)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        if in_channels % groups:
            raise ValueError(f"{name}: in_channels ({in_channels}) must be divisible by groups "
                             f"({groups})")
        if out_channels % groups:
            raise ValueError(f"{name}: out_channels ({out_channels}) must be divisible by groups "
                             f"({groups})")
        d = self._dims
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.groups = int(groups)
        self.kernel_size = _ntuple("kernel_size", kernel_size, d, 1)
        self.stride = _ntuple("stride", stride, d, 1)
        self.dilation = _ntuple("dilation", dilation, d, 1)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{name}: padding_mode must be 'zeros', 'reflect', 'replicate' or "
                             f"'circular', got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._pads = parse_padding(name, padding, self.kernel_size, self.stride, self.dilation)
        # As torch: the string stays, ints become a tuple.
        self.padding = padding if isinstance(padding, str) else tuple(p for p, _ in self._pads)
        dtype = _float_dtype(name, dtype)
        self.weight = Parameter(np.empty((self.out_channels, self.in_channels // self.groups)
                                         + self.kernel_size, dtype))
        if bias:
            self.bias = Parameter(np.empty(self.out_channels, dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator)
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def reset_parameters(self, generator=None):
        rng = nk_random.resolve(generator, type(self).__name__)
        bound = 1.0 / math.sqrt(self.in_channels // self.groups * math.prod(self.kernel_size))
        xp = array_module(self.weight.data, "weight")
        w = _uniform(rng, -bound, bound, self.weight.shape, self.weight.dtype)
        self.weight.data[...] = xp.asarray(w)
        if self.bias is not None:
            self.bias.data[...] = xp.asarray(_uniform(rng, -bound, bound, self.bias.shape,
                                                      self.bias.dtype))

    def _check_input(self, x):
        name = type(self).__name__
        array_module(x, "input")
        if x.ndim != self._dims + 2:
            raise ValueError(f"{name}: expected {self._dims + 2}D input (got {x.ndim}D input)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}({self.in_channels}, ...): input has {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        if x.dtype.kind != "f" or param_dtype(x.dtype) != x.dtype:
            raise TypeError(f"{name}: input has dtype {x.dtype}; float32 or float64 is supported")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{name}: {x.dtype} input needs {x.dtype} parameters, this layer's are "
                            f"{self.weight.dtype} (convert it with .to(dtype=...))")

    def _padded(self, x):
        """(x as the GEMM sees it, the padding left to im2col): symmetric zero padding is
        im2col's; anything else is padded here (and folded back in the backward)."""
        if self.padding_mode == "zeros" and all(lo == hi for lo, hi in self._pads):
            return x, [lo for lo, _ in self._pads]
        return F.pad(x, self._pads, self.padding_mode), [0] * self._dims

    def _conv(self, x, weight=None):
        x, padding = self._padded(x)
        weight = self.weight.data if weight is None else weight
        return F.convolution(x, weight, None if self.bias is None else self.bias.data,
                             self.stride, padding, self.dilation, self.groups)

    def _conv_grads(self, dy, x, weight):
        """(dx, dweight) of _conv; accumulates ``bias.grad``."""
        xp_, padding = self._padded(x)
        dx, dw, db = F.convolution_backward(dy, xp_, weight, self.stride, padding,
                                            self.dilation, self.groups,
                                            bias_grad=self.bias is not None)
        if xp_ is not x:
            dx = F.pad_backward(dx, self._pads, self.padding_mode)
        if self.bias is not None:
            accumulate_grad(self.bias, db)
        return dx, dw

    def _conv_backward(self, dy, x):
        dx, dw = self._conv_grads(dy, x, self.weight.data)
        accumulate_grad(self.weight, dw)
        return dx

    def forward(self, x):
        self._check_input(x)
        y = self._conv(x)
        self._saved = x
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` and ``bias.grad``."""
        return self._conv_backward(dy, self._take_saved())

    def extra_repr(self):
        return conv_extra_repr(self)


class Conv1d(_ConvNd):
    __doc__ = """Convolution over (B, C, L) inputs, as torch.nn.Conv1d.
""" + _PARAMETERS
    _dims = 1


class Conv2d(_ConvNd):
    __doc__ = """Convolution over (B, C, H, W) inputs, as torch.nn.Conv2d.
""" + _PARAMETERS
    _dims = 2


class Conv3d(_ConvNd):
    __doc__ = """Convolution over (B, C, D, H, W) inputs, as torch.nn.Conv3d.
""" + _PARAMETERS
    _dims = 3


__all__ = ["Conv1d", "Conv2d", "Conv3d"]
