"""Weight-standardized convolutions for PyTorch (elektronn3's ``wsconv`` module, fixed): torch runs
the convolution (``_conv_forward`` / ``F.conv_transpose*d``, so padding_mode, string paddings and
output_size behave as in torch), normkit's core the standardization, as one torch custom op
(``torch.ops.normkit.ws_standardize``, see normkit.torch._ops: a fused statistics pass and write;
a fused backward through mean, var and gain), which torch.compile and torch.export see.

    WSConv1d/2d/3d            torch.nn.Conv*d with ``gain`` (C_out,); forward(input, eps=None)
    WSConvTranspose2d/3d      torch.nn.ConvTranspose*d, standardized per input channel
                              (gain (C_in,)); forward(input, output_size=None, eps=None)
    FWS(layer, ...)           standardizes the wrapped layer's weight in place, learnable gain
    ws_standardize            the function: (weight, gain, eps, convention) -> w_hat

Conventions (LAYERS.md "Weight standardization"): ``"elektronn3"`` (default, elektronn3's
formula: unbiased var, fan_in = prod(weight.shape) *including C_out*, so at gain 1 a filter's norm
is ~1/sqrt(C_out): harmless before a BN/GN, not in a normalizer-free net), ``"nfnet"`` (biased
var, fan_in = prod(shape[1:]): unit-norm filters) and ``"timm"`` (biased var, 1/sqrt(var + eps)).
State dicts (weight, bias, gain; FWS: gain, fan_in, eps, layer.*) interchange with elektronn3's.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..functional.wsconv import convention_id
from . import _ops as _registered  # noqa: F401 (defines torch.ops.normkit)
from ._dlpack import param_dtype

_ops = torch.ops.normkit
# eps when none is given: elektronn3's and NFNets' 1e-4, timm's StdConv2d's 1e-6.
_DEFAULT_EPS = {"elektronn3": 1e-4, "nfnet": 1e-4, "timm": 1e-6}


def ws_standardize(weight, gain=None, eps=1e-4, convention="elektronn3"):
    """``(weight - mean) * gain * rstd`` per channel of dim 0 (see the module docstring), with
    autograd through mean, var and gain. gain (weight.shape[0],) or None (1).

    Parameters
    ----------
    weight : torch.Tensor (C0, *)
        float16, bfloat16, float32 or float64.
    gain : torch.Tensor (C0,) or None
        Per-channel gain (cast to float32 for half-precision weights); None: 1.
    eps : float
        The floor of the variance term (its meaning per convention).
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm'.

    Returns
    -------
    torch.Tensor like weight

    Raises
    ------
    ValueError
        An unknown convention.
    """
    cid = convention_id(convention)
    if gain is not None and gain.dtype != param_dtype(weight.dtype):
        gain = gain.to(param_dtype(weight.dtype))
    return _ops.ws_standardize(weight, gain, cid, float(eps))[0]


class _WSConvMixin:
    """The standardization shared by the WS layers: kaiming-normal weight, ``gain`` ones,
    ``convention`` and its default eps."""

    def _init_ws(self, convention, eps):
        convention_id(convention)
        self.convention = convention
        self.eps = _DEFAULT_EPS[convention] if eps is None else float(eps)
        if not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        nn.init.kaiming_normal_(self.weight)
        self.gain = nn.Parameter(torch.ones(self.weight.shape[0], device=self.weight.device,
                                            dtype=self.weight.dtype))

    def standardize_weight(self, eps=None):
        eps = self.eps if eps is None else eps
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        return ws_standardize(self.weight, self.gain, eps, self.convention)

    def extra_repr(self):
        return super().extra_repr() + (f", convention={self.convention!r}"
                                       if self.convention != "elektronn3" else "")


_CONV_PARAMETERS = """

    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, dilation : int, tuple of ints (padding also a str)
        As torch.nn.Conv*d's.
    groups : int
        Blocked connections, dividing both channel counts.
    bias : bool
        Whether the layer has a bias.
    padding_mode : str
        'zeros' (the default), 'reflect', 'replicate' or 'circular'.
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm'.
    eps : float or None
        The standardization's eps, > 0; None: the convention's default (1e-4, 1e-4, 1e-6).
    device, dtype
        torch's factory arguments of the parameters.

    Raises
    ------
    ValueError
        An unknown convention, eps not > 0, or what torch's constructor refuses.
"""
_TRANSPOSE_PARAMETERS = """

    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, output_padding, dilation : int or tuple of ints
        As torch.nn.ConvTranspose*d's.
    groups : int
        Blocked connections, dividing both channel counts.
    bias : bool
        Whether the layer has a bias.
    padding_mode : str
        'zeros' (the default), 'reflect', 'replicate' or 'circular'.
    convention : str
        'elektronn3' (the default), 'nfnet' or 'timm'.
    eps : float or None
        The standardization's eps, > 0; None: the convention's default (1e-4, 1e-4, 1e-6).
    device, dtype
        torch's factory arguments of the parameters.

    Raises
    ------
    ValueError
        An unknown convention, eps not > 0, or what torch's constructor refuses.
"""


def _conv_class(base, dims):
    class WSConv(_WSConvMixin, base):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                     dilation=1, groups=1, bias=True, padding_mode="zeros",
                     convention="elektronn3", eps=None, device=None, dtype=None):
            super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias,
                             padding_mode=padding_mode, device=device, dtype=dtype)
            self._init_ws(convention, eps)

        def forward(self, input, eps=None):
            return self._conv_forward(input, self.standardize_weight(eps), self.bias)

    WSConv.__name__ = WSConv.__qualname__ = f"WSConv{dims}d"
    WSConv.__doc__ = (f"torch.nn.Conv{dims}d on the weight standardized per output channel "
                      f"(``gain`` (C_out,), init 1; weight kaiming normal). forward(input, "
                      f"eps=None): eps defaults to the layer's (1e-4; 1e-6 for 'timm')."
                      + _CONV_PARAMETERS)
    return WSConv


def _transpose_class(base, dims):
    conv = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]

    class WSConvTranspose(_WSConvMixin, base):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                     output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                     convention="elektronn3", eps=None, device=None, dtype=None):
            super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, output_padding=output_padding, groups=groups,
                             bias=bias, dilation=dilation, padding_mode=padding_mode,
                             device=device, dtype=dtype)
            self._init_ws(convention, eps)

        def forward(self, input, output_size=None, eps=None):
            output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                                  self.kernel_size, dims, self.dilation)
            return conv(input, self.standardize_weight(eps), self.bias, self.stride,
                        self.padding, output_padding, self.groups, self.dilation)

    WSConvTranspose.__name__ = WSConvTranspose.__qualname__ = f"WSConvTranspose{dims}d"
    WSConvTranspose.__doc__ = (
        f"torch.nn.ConvTranspose{dims}d on its weight (C_in, C_out / groups, *k) standardized "
        f"per input channel (``gain`` (C_in,)); output_size honoured (elektronn3 convolves the "
        f"raw weight or calls conv_transpose2d on 5-D input)." + _TRANSPOSE_PARAMETERS)
    return WSConvTranspose


WSConv1d = _conv_class(nn.Conv1d, 1)
WSConv2d = _conv_class(nn.Conv2d, 2)
WSConv3d = _conv_class(nn.Conv3d, 3)
WSConvTranspose2d = _transpose_class(nn.ConvTranspose2d, 2)
WSConvTranspose3d = _transpose_class(nn.ConvTranspose3d, 3)


class FWS(nn.Module):
    """Wraps a layer with a ``weight`` (C, ...) and standardizes that weight in place (elektronn3
    convention, gain 1) before each forward (skipped in eval when ``const_eval``); the forward
    then runs the layer with ``gain * weight``. Keys: gain, fan_in, eps (buffers, as upstream;
    gain a Parameter when learnable), layer.*. Unlike upstream, which bakes the gain into the
    stored weight under no_grad, the learnable gain here receives its gradient.

    Parameters
    ----------
    layer : torch.nn.Module
        Any layer with a ``weight`` tensor (C, ...), standardized in place.
    learnable_gain : bool
        Whether the gain (C,, init 1) is a Parameter (else a buffer).
    const_eval : bool
        Whether eval skips the standardization.
    eps : float
        The standardization's eps, > 0.

    Raises
    ------
    TypeError
        ``layer`` has no weight tensor.
    ValueError
        eps not > 0.
    """

    def __init__(self, layer, learnable_gain=True, const_eval=False, eps=1e-4):
        super().__init__()
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise TypeError(f"FWS: the layer must have a weight tensor, got {type(layer).__name__}")
        if not eps > 0:
            raise ValueError(f"FWS: eps must be > 0, got {eps!r}")
        self.layer = layer
        self.const_eval = const_eval
        w = layer.weight
        gain = torch.ones(w.shape[0], device=w.device)
        if learnable_gain:
            self.gain = nn.Parameter(gain)
        else:
            self.register_buffer("gain", gain)
        # fan_in and eps are kept as upstream's buffers (state-dict interchange); the core computes
        # fan_in = prod(weight.shape) itself.
        self.register_buffer("fan_in", torch.prod(torch.tensor(w.shape)))
        self.register_buffer("eps", torch.tensor(eps))

    def standardize_weight(self):
        """weight <- (weight - mean) * rstd in place (no gradient flows through it)."""
        w = self.layer.weight
        with torch.no_grad():
            # A functional op and a copy (not a write into w through DLPack): torch.compile
            # traces it, and copy_ bumps w's version, so a graph that saved the old weight
            # fails loudly instead of using the new values.
            w.copy_(_ops.ws_standardize(w, None, 0, float(self.eps))[0])

    def forward(self, *args, **kwargs):
        if self.training or not self.const_eval:
            self.standardize_weight()
        w = self.layer.weight
        gain = self.gain.to(w.dtype).view((-1,) + (1,) * (w.dim() - 1))
        return torch.func.functional_call(self.layer, {"weight": w * gain}, args, kwargs)


__all__ = ["FWS", "WSConv1d", "WSConv2d", "WSConv3d", "WSConvTranspose2d", "WSConvTranspose3d",
           "ws_standardize"]
