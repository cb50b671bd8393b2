"""GroupNorm with PyTorch's semantics (torch.nn.GroupNorm), over NumPy / CuPy arrays."""
import numpy as np

from .. import functional as F
from .._backend import array_module, param_dtype, parse_device
from .module import Module, Parameter


def _param_dtype(layer, dtype):
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{type(layer).__name__}: dtype must be float32 or float64 (float16 "
                        f"inputs run with float32 parameters), got {dtype}")
    return dtype


def _check_layer_dtype(layer, x, own):
    """A layer's parameters or statistics (dtype `own`, None without any) must suit x."""
    if own is not None and param_dtype(x.dtype) != own:
        raise TypeError(f"{type(layer).__name__}: {x.dtype} input needs {param_dtype(x.dtype)} "
                        f"parameters, this layer's are {own} (convert it with .to(dtype=...))")


def _accumulate(params_grads):
    """Adds each gradient to its parameter's .grad, as PyTorch accumulates (None: absent)."""
    for p, g in params_grads:
        if p is None or g is None:
            continue
        g = g.astype(p.dtype, copy=False)
        p.grad = g if p.grad is None else p.grad + g


class GroupNorm(Module):
    """Group norm over (N, C, *) inputs: statistics per (sample, group of C/G channels) over the
    group's channels and all spatial dims, biased variance, then a per-channel affine
    (``affine=True``; keyword-only ``bias=False`` keeps the weight only). Any layout; the output
    keeps the input's (channels-last in, channels-last out).

    Parameters
    ----------
    num_groups : int
        G, dividing num_channels.
    num_channels : int
        C, the channels of the input.
    eps : float
        Added to the variance.
    affine : bool
        Whether the layer has a per-channel ``weight`` (ones) and ``bias`` (zeros).
    bias : bool
        Keyword-only: False with ``affine=True`` keeps the weight only.
    dtype : numpy dtype or None
        Of the parameters: float32 (the default) or float64; float16 inputs run with float32
        ones (keyword-only).
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays) (keyword-only).

    Shape
    -----
    (N, C, *) -> (N, C, *), in the input's layout.

    Raises
    ------
    ValueError
        num_groups or num_channels not a positive integer, or G not dividing C.
    TypeError
        A dtype other than float32 or float64.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True, dtype=None,
                 device=None):
        super().__init__()
        if int(num_groups) != num_groups or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
        if int(num_channels) != num_channels or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        if num_channels % num_groups:
            raise ValueError(f"num_channels must be divisible by num_groups (got {num_channels} "
                             f"channels, {num_groups} groups)")
        dtype = _param_dtype(self, dtype)
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = Parameter(np.ones(self.num_channels, dtype))
            if bias:
                self.bias = Parameter(np.zeros(self.num_channels, dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._saved = None
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def reset_parameters(self):
        if self.weight is not None:
            self.weight.data[...] = 1
        if self.bias is not None:
            self.bias.data[...] = 0

    def _weight_bias(self):
        return tuple(None if p is None else p.data for p in (self.weight, self.bias))

    def forward(self, x):
        array_module(x, "input")
        if x.ndim < 2:
            raise ValueError(f"GroupNorm: expected input of shape (N, C, ...), got {x.ndim}D "
                             f"input")
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}): input has "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")
        _check_layer_dtype(self, x, None if self.weight is None else self.weight.dtype)
        w, b = self._weight_bias()
        y, mean, rstd = F.group_norm_forward(x, self.num_groups, w, b, self.eps)
        self._saved = (x, mean, rstd)
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` and ``bias.grad``."""
        if self._saved is None:
            raise RuntimeError("GroupNorm.backward: call forward first (each forward allows one "
                               "backward)")
        x, mean, rstd = self._saved
        array_module(dy, "dy")
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(f"GroupNorm.backward: dy has shape {tuple(dy.shape)} but the input "
                             f"had shape {tuple(x.shape)}")
        w, b = self._weight_bias()
        dx, dw, db = F.group_norm_backward(dy, x, mean, rstd, w, b)
        self._saved = None
        _accumulate(((self.weight, dw), (self.bias, db)))
        return dx

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


__all__ = ["GroupNorm"]
