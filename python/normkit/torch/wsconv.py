"""Weight-standardized convolutions for PyTorch (elektronn3's ``wsconv`` module, fixed): torch runs
the convolution (padding_mode, string paddings and output_size behave as in torch), normkit's core
the standardization (a fused statistics pass and write; a fused backward through mean, var and
gain).

Eagerly, on plain CPU/CUDA tensors, a layer's forward is one autograd node (``_WSConv``): the
standardization into a buffer the layer keeps between steps (one weight-sized tensor per layer on
the CPU, never reused while a graph may read it), ``torch.convolution``, and a backward that runs
torch's ``convolution_backward`` and then the standardization's backward in place on its weight
gradient, so a training step allocates no weight-sized tensor beyond a plain convolution's. Under
torch.compile/torch.export (and tensor subclasses, functorch transforms, autocast) the layers run
torch's convolution on the custom op ``torch.ops.normkit.ws_standardize`` (normkit.torch._ops)
instead, which those see. Neither is differentiable twice.

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

from .. import _C
from ..functional.wsconv import convention_id
from . import _ops as _registered  # defines torch.ops.normkit
from ._dlpack import dl, launch, like, param_dtype

_ops = torch.ops.normkit
# eps when none is given: elektronn3's and NFNets' 1e-4, timm's StdConv2d's 1e-6.
_DEFAULT_EPS = {"elektronn3": 1e-4, "nfnet": 1e-4, "timm": 1e-6}


class _EagerWSStandardize(torch.autograd.Function):
    """The eager path of ``ws_standardize``: the kernels of the custom op
    ``normkit::ws_standardize`` in a Function with one output (autograd's bookkeeping of the op's
    three outputs, two marked non-differentiable, cost 30-50 us more per forward+backward);
    torch.compile and torch.export still see the custom op (``ws_standardize`` picks it while
    compiling). Saved for the backward: w, gain and the per-channel mean and rstd (not w_hat)."""

    @staticmethod
    def forward(ctx, weight, gain, convention, eps):
        ctx.set_materialize_grads(False)
        w_hat, mean, rstd = _registered._ws_standardize(weight, gain, convention, eps)
        ctx.save_for_backward(weight, gain, mean, rstd)
        ctx.convention, ctx.eps = convention, eps
        return w_hat

    @staticmethod
    def backward(ctx, dw_hat):
        # The custom op's own backward: through the backward op where a graph is recorded
        # (differentiating it, double backward, is its clear error), else through its kernel
        # directly, since the dispatcher's round trip costs more than the kernel on a small weight
        # (64x64x3x3: 0.19 ms for the function's forward and backward against torch's batch_norm
        # composition's 0.17).
        direct = None if torch.is_grad_enabled() else _registered._ws_standardize_backward
        return _registered._ws_standardize_grad(ctx, dw_hat, backward=direct)


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
    if not torch.compiler.is_compiling() and weight.device.type != "meta":  # meta: fake kernel
        return _EagerWSStandardize.apply(weight, gain, cid, float(eps))
    return _ops.ws_standardize(weight, gain, cid, float(eps))[0]


_PLAIN = (torch.Tensor, nn.Parameter)


class _BufferPool:
    """A layer's free w_hat buffer on the CPU (at most one), so that a 9 MB weight is not
    allocated again every step: glibc hands allocations that large back to the OS on free, and the
    next step faults each page in again (~2 us per 4 KiB). A buffer leaves the pool while a graph
    may still read it (``_Lease``). CUDA tensors are not pooled (torch's caching allocator already
    keeps them, and knows their streams). A copied or pickled layer gets an empty pool."""

    __slots__ = ("free",)

    def __init__(self):
        self.free = []

    def take(self, wk):
        """A buffer laid out like ``wk`` (``_ops._empty(wk)``), pooled when one fits."""
        if not wk.is_cuda:
            try:
                buf = self.free.pop()  # atomic: two threads never take the same one
            except IndexError:
                buf = None
            # (a buffer made under inference_mode cannot be saved for a backward outside it)
            if (buf is not None and buf.dtype == wk.dtype and buf.device == wk.device
                    and buf.shape == wk.shape and buf.stride() == wk.stride()
                    and (not buf.is_inference() or torch.is_inference_mode_enabled())):
                return buf
        return _registered._empty(wk)

    def give_back(self, buf):
        if not buf.is_cuda and not self.free:
            self.free.append(buf)

    def __reduce__(self):
        return _BufferPool, ()

    def __deepcopy__(self, memo):
        return _BufferPool()


class _Lease:
    """Holds a pooled w_hat for the graph node (the ctx) that saved it, and gives it back to the
    pool when that node is freed: after the last backward through it (retain_graph keeps it), or
    when the graph is dropped without one. Never earlier, so no live graph reads a reused buffer."""

    __slots__ = ("pool", "buf")

    def __init__(self, pool, buf):
        self.pool, self.buf = pool, buf

    def __del__(self):
        self.pool.give_back(self.buf)


def _standardize_into(pool, weight, gain, convention, eps):
    """w_hat (in a buffer of ``pool``, in the layout of ``_ops._ws_weight(weight)``), mean and rstd:
    the kernels of ``normkit::ws_standardize`` without its allocation."""
    wk = _registered._ws_weight(weight)
    w_hat = pool.take(wk)
    mean, rstd = _registered._per_filter(weight), _registered._per_filter(weight)
    _C.ws_standardize_forward(dl(wk), dl(gain), convention, eps, dl(w_hat), dl(mean), dl(rstd),
                              **launch(wk))
    return w_hat, mean, rstd


class _OnceDifferentiable(torch.autograd.Function):
    """Hands the gradients of a backward run with create_graph=True on, as outputs of a node that
    depends on everything they do (the incoming gradient, input, weight, gain), whose own backward
    is a clear error: differentiating them would otherwise miss terms silently (w_hat, computed
    inside ``_WSConv``, is not on the graph)."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tensors[:count]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("normkit's weight-standardized convolutions are not differentiable "
                           "twice (double backward through normkit's layers is not supported)")


class _WSConv(torch.autograd.Function):
    """The eager path of the WS layers: standardization and convolution in one node. The forward
    standardizes into a pooled buffer and runs ``torch.convolution``; the backward runs
    ``aten.convolution_backward`` and then normkit's standardization backward in place on its
    weight gradient (a fresh tensor of this node), so that a step allocates no weight-sized
    tensor beyond a plain convolution's. torch.compile and torch.export see the custom op
    ``normkit::ws_standardize`` and torch's convolution instead (``_runs_fused``).

    Saved: input, w_hat (only when input needs a gradient), weight, gain, mean and rstd.
    ``geometry`` is torch.convolution's (stride, padding, dilation, transposed, output_padding,
    groups), with padding_mode and string paddings already applied to the input."""

    @staticmethod
    def forward(ctx, input, weight, gain, bias, pool, geometry, convention, eps):
        ctx.set_materialize_grads(False)
        w_hat, mean, rstd = _standardize_into(pool, weight, gain, convention, eps)
        out = torch.convolution(input, w_hat, bias, *geometry)
        need_x = ctx.needs_input_grad[0]
        ctx.save_for_backward(input, w_hat if need_x else None, weight, gain, mean, rstd)
        if need_x:
            ctx.lease = _Lease(pool, w_hat)
        else:
            pool.give_back(w_hat)
        ctx.geometry, ctx.convention, ctx.eps = geometry, convention, eps
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return out

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 8
        if not torch.is_grad_enabled():
            return _WSConv._grads(ctx, dy) + (None,) * 4
        # create_graph=True: the gradients are computed as usual, but differentiating them again
        # is an error.
        input, _, weight, gain, _, _ = ctx.saved_tensors
        with torch.no_grad():
            grads = _WSConv._grads(ctx, dy)
        present = [g for g in grads if g is not None]
        deps = [t for t in (dy, input, weight, gain) if t is not None]
        it = iter(_OnceDifferentiable.apply(len(present), *present, *deps))
        return tuple(None if g is None else next(it) for g in grads) + (None,) * 4

    @staticmethod
    def _grads(ctx, dy):
        input, w_hat, weight, gain, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        need_w_hat = need_w or need_g
        # Without an input gradient w_hat was not saved: the weight gradient reads only the
        # weight's shape and layout (the same as w_hat's), not its values.
        dx, g, db = torch.ops.aten.convolution_backward(
            dy, input, weight if w_hat is None else w_hat, ctx.bias_sizes, *ctx.geometry,
            [need_x, need_w_hat, need_b])
        dw = dgain = None
        if need_w_hat:
            wk = _registered._ws_weight(weight)
            g = like(wk, g)  # a copy only when torch returned another layout: ours as well
            dgain = torch.empty_like(mean) if need_g else None
            _C.ws_standardize_backward(dl(g), dl(wk), dl(gain), dl(mean), dl(rstd),
                                       ctx.convention, ctx.eps, dl(g) if need_w else None,
                                       dl(dgain), **launch(wk))
            dw = g if need_w else None
        return dx, dw, dgain, (db if need_b else None)


def _runs_fused(input, layer, dims):
    """Whether the layer's forward may run ``_WSConv`` (plain tensors, eager, no autocast, a
    batched or unbatched input of the layer's dims); else torch's convolution on
    ``ws_standardize`` (whose errors for other inputs are torch's own)."""
    weight, gain, bias = layer.weight, layer.gain, layer.bias
    return (_registered.runs_directly(input) and input.dim() in (dims + 1, dims + 2)
            and type(weight) in _PLAIN and type(gain) in _PLAIN
            and (bias is None or type(bias) in _PLAIN) and weight.device == input.device
            and not torch.is_autocast_enabled(input.device.type))


def _ws_conv(layer, input, eps, padding, transposed, output_padding, dims):
    """``_WSConv`` of the layer on ``input`` (unbatched inputs as a batch of one)."""
    unbatched = input.dim() == dims + 1
    if unbatched:
        input = input.unsqueeze(0)
    geometry = (layer.stride, padding, layer.dilation, transposed, output_padding, layer.groups)
    cid = convention_id(layer.convention)
    weight, gain, bias = layer.weight, layer.gain, layer.bias
    if gain.dtype != param_dtype(weight.dtype):  # a half-precision layer's gain: float32
        gain = gain.to(param_dtype(weight.dtype))
    if _registered.records_graph(input, weight, gain, bias):
        out = _WSConv.apply(input, weight, gain, bias, layer._ws_pool, geometry, cid, eps)
    else:  # nothing to save: the buffer is free again right after the convolution
        w_hat, _, _ = _standardize_into(layer._ws_pool, weight, gain, cid, eps)
        out = torch.convolution(input, w_hat, bias, *geometry)
        layer._ws_pool.give_back(w_hat)
    return out.squeeze(0) if unbatched else out


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
        self._ws_pool = _BufferPool()

    def _eps(self, eps):
        eps = self.eps if eps is None else eps
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        return float(eps)

    def standardize_weight(self, eps=None):
        return ws_standardize(self.weight, self.gain, self._eps(eps), self.convention)

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
            if not _runs_fused(input, self, dims):
                return self._conv_forward(input, self.standardize_weight(eps), self.bias)
            eps = self._eps(eps)
            padding = self.padding
            pad = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
            if self.padding_mode != "zeros":  # as torch's _conv_forward
                input = F.pad(input, pad, mode=self.padding_mode)
                padding = (0,) * dims
            elif isinstance(padding, str):
                # 'valid', or 'same': symmetric where the total is even, one more on the right
                # where it is odd (as torch's convolution does for 'same')
                padding = tuple(pad[0::2][::-1])
                extra = [0 if i % 2 == 0 else pad[i] - pad[i - 1] for i in range(len(pad))]
                if any(extra):
                    input = F.pad(input, extra)
            return _ws_conv(self, input, eps, padding, False, (0,) * dims, dims)

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
            if _runs_fused(input, self, dims):
                return _ws_conv(self, input, self._eps(eps), self.padding, True,
                                tuple(output_padding), dims)
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
