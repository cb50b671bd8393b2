"""The Encoding layer family of PyTorch-Encoding (encoding.nn) over NumPy / CuPy arrays: Encoding
(Deep TEN's residual encoder), and MSG-Net's GramMatrix, Inspiration and UpsampleConv2d."""
import math

import numpy as np

from .. import _C
from .. import functional as F
from .. import random as nk_random
from .._backend import array_module, param_dtype, parse_device
from .conv import _ConvNd, _float_dtype, _SavesInput, _uniform, accumulate_grad
from .module import Parameter, _as_numpy


def _check_dtype(layer, x, own, mixed=False):
    """x's dtype must be the parameters' (float32 or float64); with `mixed`, float16 input runs
    with float32 parameters."""
    if x.dtype.kind != "f" or x.dtype.itemsize not in ((2, 4, 8) if mixed else (4, 8)):
        supported = "float16 (with float32 parameters), float32 or float64" if mixed else \
            "float32 or float64"
        raise TypeError(f"{layer}: input has dtype {x.dtype}; {supported} is supported")
    need = param_dtype(x.dtype) if mixed else x.dtype
    if need != own:
        raise TypeError(f"{layer}: {x.dtype} input needs {need} parameters, this layer's are "
                        f"{own} (convert it with .to(dtype=...))")


class Encoding(_SavesInput):
    """Encoding layer: a learnable residual encoder (encoding.nn.Encoding(D, K)).

    Input (B, D, H, W) or (B, D, N): N = H*W features of dimension D. Output (B, K, D):
    ``E[b,k] = sum_i A[b,i,k] (x[b,i] - c[k])`` with ``A = softmax_k(s[k] ||x[b,i] - c[k]||^2)``.
    ``codewords`` (K, D) start U(-1/sqrt(K*D), 1/sqrt(K*D)), ``scale`` (K,) U(-1, 0).
    Any input layout works without a copy when its features or its positions are contiguous
    (NCHW, channels-last). float16 input runs with float32 parameters (computed in float32) and
    gives float16 output and input gradient.

    Parameters
    ----------
    D : int
        The feature dimension (the input's channels).
    K : int
        The number of codewords.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters: float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the initialization; None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.

    Shape
    -----
    (B, D, H, W) or (B, D, N) -> (B, K, D).

    Raises
    ------
    ValueError
        D or K not a positive integer.
    TypeError
        A dtype other than float32 or float64.
    """

    def __init__(self, D, K, device=None, dtype=None, generator=None):
        super().__init__()
        for arg, value in (("D", D), ("K", K)):
            if int(value) != value or value < 1:
                raise ValueError(f"Encoding: {arg} must be a positive integer, got {value!r}")
        self.D, self.K = int(D), int(K)
        dtype = _float_dtype("Encoding", dtype)
        self.codewords = Parameter(np.empty((self.K, self.D), dtype))
        self.scale = Parameter(np.empty(self.K, dtype))
        self.reset_parameters(generator)
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def reset_parameters(self, generator=None):
        rng = nk_random.resolve(generator, type(self).__name__)
        xp = array_module(self.codewords.data, "codewords")
        bound = 1.0 / math.sqrt(self.K * self.D)
        self.codewords.data[...] = xp.asarray(
            _uniform(rng, -bound, bound, (self.K, self.D), self.codewords.dtype))
        self.scale.data[...] = xp.asarray(_uniform(rng, -1.0, 0.0, self.K, self.scale.dtype))

    def forward(self, x):
        array_module(x, "input")
        if x.ndim not in (3, 4):
            raise ValueError(f"Encoding: expected 3D (B, D, N) or 4D (B, D, H, W) input (got "
                             f"{x.ndim}D input)")
        if x.shape[1] != self.D:
            raise ValueError(f"Encoding(D={self.D}, K={self.K}): input has {x.shape[1]} features "
                             f"in dim 1 (shape {tuple(x.shape)})")
        _check_dtype("Encoding", x, self.codewords.dtype, mixed=True)
        X = x.reshape(x.shape[0], self.D, -1).swapaxes(1, 2)  # (B, N, D), a view when it can be
        E, A, D2 = F.encoding_forward(X, self.codewords.data, self.scale.data)
        self._saved = (x.shape, X, A, D2)
        return E

    def backward(self, dy):
        """dx of the last forward; accumulates ``codewords.grad`` and ``scale.grad``."""
        shape, X, A, D2 = self._take_saved()
        dX, dC, ds = F.encoding_backward(dy, X, self.codewords.data, self.scale.data, A, D2)
        accumulate_grad(self.codewords, dC)
        accumulate_grad(self.scale, ds)
        return dX.swapaxes(1, 2).reshape(shape)

    def extra_repr(self):
        return f"N x {self.D} => {self.K} x {self.D}"


class GramMatrix(_SavesInput):
    """Gram matrix of (B, C, H, W) feature maps: ``G[b] = F F^T / (C H W)``, F = y.reshape(B, C,
    H*W); (B, C, C). Other (B, C, *spatial) shapes work alike."""

    def forward(self, y):
        G = F.gram_matrix(y)
        self._saved = y
        return G

    def backward(self, dG):
        return F.gram_matrix_backward(dG, self._take_saved())


class Inspiration(_SavesInput):
    """MSG-Net's Inspiration (CoMatch) layer: ``Y[b] = (W G)^T X[b]`` over flattened spatial dims.

    ``weight`` (1, C, C) starts U(0, 0.02). The target Gram matrix ``G`` (B, C, C) is a buffer:
    saved in the state_dict and moved with the layer (upstream keeps it outside both). It starts
    at zero (so is the output until a target is set); ``set_target(G)`` (alias ``setTarget``)
    replaces it, with any batch; a target's batch must be 1 or the input's. ``backward`` returns dx
    and accumulates ``weight.grad``; with ``set_target(G, requires_grad=True)`` it also
    accumulates ``target_grad``, the gradient with respect to the target.

    Parameters
    ----------
    C : int
        The channels of the input.
    B : int
        The batch of the initial (zero) target.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters: float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the initialization; None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.

    Shape
    -----
    (B, C, H, W) -> (B, C, H, W).

    Raises
    ------
    ValueError
        C or B not a positive integer.
    TypeError
        A dtype other than float32 or float64.
    """

    def __init__(self, C, B=1, device=None, dtype=None, generator=None):
        super().__init__()
        for arg, value in (("C", C), ("B", B)):
            if int(value) != value or value < 1:
                raise ValueError(f"Inspiration: {arg} must be a positive integer, got {value!r}")
        self.C = int(C)
        dtype = _float_dtype("Inspiration", dtype)
        self.weight = Parameter(np.empty((1, self.C, self.C), dtype))
        self.register_buffer("G", np.zeros((int(B), self.C, self.C), dtype))
        self.target_requires_grad = False
        self.target_grad = None
        self.reset_parameters(generator)
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def reset_parameters(self, generator=None):
        rng = nk_random.resolve(generator, type(self).__name__)
        xp = array_module(self.weight.data, "weight")
        self.weight.data[...] = xp.asarray(
            _uniform(rng, 0.0, 0.02, self.weight.shape, self.weight.dtype))

    def set_target(self, target, requires_grad=False):
        """Sets the target Gram matrix (b, C, C) (an array or torch tensor, copied into the
        layer's dtype and device); ``requires_grad`` asks backward for ``target_grad``."""
        target = _as_numpy(target)
        shape = tuple(np.shape(target))
        if len(shape) != 3 or shape[1:] != (self.C, self.C) or shape[0] < 1:
            raise ValueError(f"Inspiration(C={self.C}).set_target: the target must have shape "
                             f"(B, {self.C}, {self.C}), got {shape}")
        xp = array_module(self.G, "G")
        self.G = xp.array(target, dtype=self.G.dtype)  # a copy, like the buffer it replaces
        self.target_requires_grad = bool(requires_grad)
        self.target_grad = None

    setTarget = set_target

    def _upgrade_state_dict(self, state_dict, prefix):
        # A checkpoint's target may have another batch: the buffer takes its shape before loading.
        value = state_dict.get(prefix + "G")
        if value is not None and np.ndim(value) == 3 and tuple(np.shape(value)) != self.G.shape:
            xp = array_module(self.G, "G")
            self.G = xp.zeros(tuple(np.shape(value)), self.G.dtype)

    def forward(self, x):
        array_module(x, "input")
        if x.ndim < 3:
            raise ValueError(f"Inspiration: expected input of shape (B, C, H, W) (got {x.ndim}D "
                             f"input)")
        if x.shape[1] != self.C:
            raise ValueError(f"Inspiration(C={self.C}): input has {x.shape[1]} channels (shape "
                             f"{tuple(x.shape)})")
        if self.G.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Inspiration: the target has batch {self.G.shape[0]} but the input "
                             f"has batch {x.shape[0]}; the target's batch must be 1 or the input's")
        _check_dtype("Inspiration", x, self.weight.dtype)
        Y, P = F.inspiration_forward(x, self.weight.data, self.G)
        self._saved = (x, self.G, P)
        return Y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` (and ``target_grad`` if asked)."""
        x, G, P = self._take_saved()
        dx, dw, dG = F.inspiration_backward(dy, x, self.weight.data, G, P,
                                            target_grad=self.target_requires_grad)
        accumulate_grad(self.weight, dw)
        if dG is not None:
            self.target_grad = dG if self.target_grad is None else self.target_grad + dG
        return dx

    def extra_repr(self):
        return f"N x {self.C}"


class UpsampleConv2d(_ConvNd):
    """A convolution producing ``scale_factor``^2 outputs per window, pixel-shuffled into an image
    ``scale_factor`` times larger (MSG-Net's checkerboard-free upsampling).

    ``weight`` is (out_channels * s^2, in_channels / groups, kh, kw) and ``bias``
    (out_channels * s^2,), both U(+-1/sqrt(in_channels / groups * kh * kw)). Output
    (B, out_channels, s * H_conv, s * W_conv) with H_conv = floor((H + 2p - d (kh - 1) - 1) / stride
    + 1) (upstream's docstring formula is wrong; upstream also fails to construct).

    Parameters
    ----------
    in_channels, out_channels : int
        Of the input and of the upsampled output.
    kernel_size, stride, padding, dilation : int or tuple of 2 ints
        The convolution's, as ``normkit.nn.Conv2d``'s.
    groups : int
        Dividing in_channels and out_channels * scale_factor^2.
    scale_factor : int
        s, the upsampling factor (positive).
    bias : bool
        Whether the convolution has a bias.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters: float32 (the default) or float64.
    generator : numpy.random.Generator or None
        Draws the initialization; None: normkit's default generator, which
        ``normkit.manual_seed`` reseeds.

    Raises
    ------
    ValueError
        Non-positive sizes or scale_factor, channels not divisible by groups.
    """

    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, scale_factor=1, bias=True, device=None, dtype=None, generator=None):
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"UpsampleConv2d: scale_factor must be a positive integer, got "
                             f"{scale_factor!r}")
        if int(out_channels) != out_channels or out_channels < 1:
            raise ValueError(f"UpsampleConv2d: out_channels must be a positive integer, got "
                             f"{out_channels!r}")
        s = int(scale_factor)
        if int(groups) == groups and groups >= 1 and (out_channels * s * s) % groups:
            raise ValueError(f"UpsampleConv2d: out_channels * scale_factor^2 "
                             f"({out_channels * s * s}) must be divisible by groups ({groups})")
        super().__init__(in_channels, int(out_channels) * s * s, kernel_size, stride, padding,
                         dilation, groups, bias, device=None, dtype=dtype, generator=generator)
        self.out_channels = int(out_channels)
        self.scale_factor = s
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def forward(self, x):
        self._check_input(x)
        y = F.pixel_shuffle(self._conv(x), self.scale_factor)
        self._saved = x
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` and ``bias.grad``."""
        x = self._take_saved()
        s = self.scale_factor
        expected = (x.shape[0], self.out_channels) + tuple(
            s * _C.conv_output_size(n, k, st, p, d) for n, k, st, p, d in
            zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation))
        if tuple(getattr(dy, "shape", ())) != expected:
            raise ValueError(f"UpsampleConv2d.backward: dy must have the output's shape "
                             f"{expected}, got {tuple(getattr(dy, 'shape', ()))}")
        return self._conv_backward(F.pixel_unshuffle(dy, self.scale_factor), x)

    def extra_repr(self):
        return super().extra_repr() + f", scale_factor={self.scale_factor}"


__all__ = ["Encoding", "GramMatrix", "Inspiration", "UpsampleConv2d"]
