"""Weight-standardized convolutions over NumPy / CuPy arrays (elektronn3's ``wsconv`` module,
fixed), on normkit's convolution (im2col/col2im + the array library's GEMM) and the core's fused
standardization. Same arguments, keys and conventions as normkit.torch's layers (see
normkit.functional.wsconv for the formulas):

    WSConv1d/2d/3d          Conv*d with gain (C_out,); forward(x, eps=None)
    WSConvTranspose2d/3d    transposed convolutions standardized per input channel (gain (C_in,));
                            forward(x, output_size=None, eps=None); padding_mode "zeros" only
    FWS(layer, ...)         standardizes a normkit.nn Conv*d's weight in place, learnable gain

The "elektronn3" convention's fan_in counts C_out, so at gain 1 a filter's norm is
~1/sqrt(C_out): harmless before a BN/GN, not in a normalizer-free net ("nfnet" is unit-norm).
"""
import math

import numpy as np

from .. import functional as F
from .. import random as nk_random
from .._backend import array_module, parse_device
from ..functional.wsconv import convention_id, ws_standardize, ws_standardize_backward
from .conv import _ConvNd, _float_dtype, _ntuple, _SavesInput, _uniform, accumulate_grad
from .conv import conv_extra_repr
from .module import Module, Parameter

_DEFAULT_EPS = {"elektronn3": 1e-4, "nfnet": 1e-4, "timm": 1e-6}


def _kaiming_normal(rng, shape, dtype):
    """torch.nn.init.kaiming_normal_ (fan_in, a=0): N(0, 2 / fan_in), fan_in = prod(shape[1:])."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[1:]))).astype(dtype)


def _eps(layer, eps):
    eps = layer.eps if eps is None else eps
    if not eps > 0:
        raise ValueError(f"{type(layer).__name__}: eps must be > 0, got {eps!r}")
    return float(eps)


class _WSMixin:
    def _init_ws(self, convention, eps, channels, dtype, rng):
        convention_id(convention)
        self.convention = convention
        self.eps = _DEFAULT_EPS[convention] if eps is None else float(eps)
        _eps(self, None)
        xp = array_module(self.weight.data, "weight")
        self.weight.data[...] = xp.asarray(_kaiming_normal(rng, self.weight.shape, dtype))
        self.gain = Parameter(np.ones(channels, dtype))

    def _standardize(self, eps):
        w_hat, mean, rstd = ws_standardize(self.weight.data, self.gain.data, eps, self.convention)
        return w_hat, (mean, rstd, eps)

    def _standardize_backward(self, dw_hat, stats):
        mean, rstd, eps = stats
        dw, dgain = ws_standardize_backward(dw_hat, self.weight.data, self.gain.data, mean, rstd,
                                            eps, self.convention)
        accumulate_grad(self.weight, dw)
        accumulate_grad(self.gain, dgain)

    def _ws_repr(self):
        return f", convention={self.convention!r}" if self.convention != "elektronn3" else ""


_CONV_PARAMETERS = """
    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, dilation : int or tuple of ints
        As ``normkit.nn.Conv*d``'s (padding also "same" or "valid").
    groups : int
        Blocked connections, dividing both channel counts.
    bias : bool
        Whether the layer has a bias.
    padding_mode : str
        'zeros' (the default), 'reflect', 'replicate' or 'circular'.
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm' (see normkit.functional.wsconv).
    eps : float or None
        The standardization's eps, > 0; None: the convention's default (1e-4, 1e-4, 1e-6).
        ``forward(x, eps=...)`` overrides it per call.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the kaiming-normal weight (and the bias); None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.

    Raises
    ------
    ValueError
        Bad sizes, groups, padding, convention or eps.
    TypeError
        A dtype other than float32 or float64.
"""


class _WSConvNd(_WSMixin, _ConvNd):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", convention="elektronn3", eps=None,
                 device=None, dtype=None, generator=None):
        rng = nk_random.resolve(generator, type(self).__name__)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device=None, dtype=dtype, generator=rng,
                         padding_mode=padding_mode)
        self._init_ws(convention, eps, self.out_channels, self.weight.dtype, rng)
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def forward(self, x, eps=None):
        self._check_input(x)
        w_hat, stats = self._standardize(_eps(self, eps))
        y = self._conv(x, w_hat)
        self._saved = (x, w_hat, stats)
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates weight.grad, gain.grad and bias.grad."""
        x, w_hat, stats = self._take_saved()
        dx, dw_hat = self._conv_grads(dy, x, w_hat)
        self._standardize_backward(dw_hat, stats)
        return dx

    def extra_repr(self):
        return conv_extra_repr(self) + self._ws_repr()


class WSConv1d(_WSConvNd):
    __doc__ = """Conv1d on the weight standardized per output channel (gain (C_out,), init 1).
""" + _CONV_PARAMETERS
    _dims = 1


class WSConv2d(_WSConvNd):
    __doc__ = """Conv2d on the weight standardized per output channel (gain (C_out,), init 1).
""" + _CONV_PARAMETERS
    _dims = 2


class WSConv3d(_WSConvNd):
    __doc__ = """Conv3d on the weight standardized per output channel (gain (C_out,), init 1).
""" + _CONV_PARAMETERS
    _dims = 3


_TRANSPOSE_PARAMETERS = """
    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, output_padding, dilation : int or tuple of ints
        As torch.nn.ConvTranspose*d's (output_padding < stride or dilation).
    groups : int
        Blocked connections, dividing both channel counts.
    bias : bool
        Whether the layer has a bias.
    padding_mode : str
        'zeros' (the default), 'reflect', 'replicate' or 'circular'.
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm' (see normkit.functional.wsconv).
    eps : float or None
        The standardization's eps, > 0; None: the convention's default (1e-4, 1e-4, 1e-6).
        ``forward(x, eps=...)`` overrides it per call.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the kaiming-normal weight (and the bias); None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.

    Raises
    ------
    ValueError
        Bad sizes, groups, padding, convention or eps.
    TypeError
        A dtype other than float32 or float64.
"""


class _WSConvTransposeNd(_WSMixin, _SavesInput):
    _dims = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 convention="elektronn3", eps=None, device=None, dtype=None, generator=None):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("groups", groups)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ValueError(f"{name}: {arg} ({value}) must be divisible by groups "
                                 f"({groups})")
        if padding_mode != "zeros":
            raise ValueError(f"{name}: only padding_mode='zeros' is supported for transposed "
                             f"convolutions (as torch), got {padding_mode!r}")
        d = self._dims
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.kernel_size = _ntuple("kernel_size", kernel_size, d, 1)
        self.stride = _ntuple("stride", stride, d, 1)
        self.padding = _ntuple("padding", padding, d, 0)
        self.output_padding = _ntuple("output_padding", output_padding, d, 0)
        self.dilation = _ntuple("dilation", dilation, d, 1)
        if any(op >= s for op, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"{name}: output_padding {self.output_padding} must be smaller than "
                             f"the stride {self.stride}")
        dtype = _float_dtype(name, dtype)
        rng = nk_random.resolve(generator, name)
        shape = (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        self.weight = Parameter(np.empty(shape, dtype))
        if bias:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            self.bias = Parameter(_uniform(rng, -bound, bound, (self.out_channels,), dtype))
        else:
            self.register_parameter("bias", None)
        self._init_ws(convention, eps, self.in_channels, dtype, rng)
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def _output_padding(self, x, output_size):
        if output_size is None:
            return list(self.output_padding)
        return F.conv_transpose_output_padding(x.shape[2:], output_size, self.kernel_size,
                                               self.stride, self.padding, self.dilation)

    def forward(self, x, output_size=None, eps=None):
        name = type(self).__name__
        array_module(x, "input")
        if x.ndim != self._dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name}({self.in_channels}, ...): expected {self._dims + 2}D input "
                             f"with {self.in_channels} channels, got shape {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{name}: {x.dtype} input needs {x.dtype} parameters, this layer's "
                            f"are {self.weight.dtype}")
        output_padding = self._output_padding(x, output_size)
        w_hat, stats = self._standardize(_eps(self, eps))
        y = F.conv_transpose(x, w_hat, None if self.bias is None else self.bias.data, self.stride,
                             self.padding, output_padding, self.groups, self.dilation)
        self._saved = (x, w_hat, stats, output_padding)
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates weight.grad, gain.grad and bias.grad."""
        x, w_hat, stats, output_padding = self._take_saved()
        dx, dw_hat, db = F.conv_transpose_backward(dy, x, w_hat, self.stride, self.padding,
                                                   output_padding, self.groups, self.dilation,
                                                   bias_grad=self.bias is not None)
        self._standardize_backward(dw_hat, stats)
        if self.bias is not None:
            accumulate_grad(self.bias, db)
        return dx

    def extra_repr(self):
        s = conv_extra_repr(self)
        if any(self.output_padding):
            s += f", output_padding={self.output_padding}"
        return s + self._ws_repr()


class WSConvTranspose2d(_WSConvTransposeNd):
    __doc__ = """ConvTranspose2d on its weight (C_in, C_out / groups, kh, kw) standardized per
    input channel (gain (C_in,)); output_size honoured.
""" + _TRANSPOSE_PARAMETERS
    _dims = 2


class WSConvTranspose3d(_WSConvTransposeNd):
    __doc__ = """ConvTranspose3d on its weight (C_in, C_out / groups, kd, kh, kw) standardized per
    input channel (gain (C_in,)); output_size honoured.
""" + _TRANSPOSE_PARAMETERS
    _dims = 3


class FWS(Module):
    """Wraps a normkit.nn Conv1d/2d/3d: standardizes its weight in place (elektronn3 convention,
    gain 1) before each forward (skipped in eval when ``const_eval``), then convolves with
    ``gain * weight``. Keys gain, fan_in, eps (buffers as upstream; gain a Parameter when
    learnable), layer.*. The learnable gain receives its gradient (upstream's never does).

    Parameters
    ----------
    layer : normkit.nn.Conv1d, Conv2d or Conv3d
        The wrapped convolution (not a WSConv*d); its weight is standardized in place.
    learnable_gain : bool
        Whether the gain (C_out, init 1) is a Parameter (else a buffer).
    const_eval : bool
        Whether eval skips the standardization (the weight is already standardized).
    eps : float
        The standardization's eps, > 0.

    Raises
    ------
    TypeError
        ``layer`` is not a normkit.nn convolution.
    ValueError
        eps not > 0.
    """

    def __init__(self, layer, learnable_gain=True, const_eval=False, eps=1e-4):
        super().__init__()
        if not isinstance(layer, _ConvNd) or isinstance(layer, _WSConvNd):
            raise TypeError(f"FWS: wraps a normkit.nn Conv1d/2d/3d, got {type(layer).__name__}")
        if not eps > 0:
            raise ValueError(f"FWS: eps must be > 0, got {eps!r}")
        self.layer = layer
        self.const_eval = const_eval
        xp = array_module(layer.weight.data, "weight")
        gain = xp.ones(layer.weight.shape[0], np.float32)
        if learnable_gain:
            self.gain = Parameter(gain)
        else:
            self.register_buffer("gain", gain)
        self.register_buffer("fan_in", xp.asarray(np.int64(math.prod(layer.weight.shape))))
        self.register_buffer("eps", xp.asarray(np.float32(eps)))
        self._saved = None

    def _gain(self):
        g = self.gain.data if isinstance(self.gain, Parameter) else self.gain
        w = self.layer.weight.data
        return g.astype(w.dtype, copy=False).reshape((-1,) + (1,) * (w.ndim - 1))

    def standardize_weight(self):
        """weight <- (weight - mean) * rstd, in place."""
        w = self.layer.weight.data
        w[...] = ws_standardize(w, None, float(self.eps), "elektronn3")[0]

    def forward(self, x):
        if self.training or not self.const_eval:
            self.standardize_weight()
        self.layer._check_input(x)
        w_used = self.layer.weight.data * self._gain()
        self._saved = (x, w_used)
        return self.layer._conv(x, w_used)

    def backward(self, dy):
        """dx of the last forward; accumulates layer.weight.grad, layer.bias.grad, gain.grad."""
        if self._saved is None:
            raise RuntimeError("FWS.backward: call forward first (each forward allows one "
                               "backward)")
        (x, w_used), self._saved = self._saved, None
        dx, dw_used = self.layer._conv_grads(dy, x, w_used)
        w = self.layer.weight.data
        accumulate_grad(self.layer.weight, dw_used * self._gain())
        if isinstance(self.gain, Parameter):
            accumulate_grad(self.gain, (dw_used * w).sum(axis=tuple(range(1, w.ndim))))
        return dx


__all__ = ["FWS", "WSConv1d", "WSConv2d", "WSConv3d", "WSConvTranspose2d", "WSConvTranspose3d"]
