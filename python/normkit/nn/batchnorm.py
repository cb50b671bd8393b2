"""BatchNorm1d/2d/3d with PyTorch's semantics (torch.nn.BatchNorm*d), over NumPy / CuPy arrays."""
import numpy as np

from .. import functional as F
from .._backend import array_module, check_num_features, param_dtype, parse_device
from .module import Module, Parameter


_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        C, the channels of the (N, C, *) input.
    eps : float
        Added to the variance before its square root; must be positive in training (as in torch).
    momentum : float or None
        Factor of each batch's statistics in the running ones; None: their cumulative average.
    affine : bool
        Whether the layer has a learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool
        Whether the layer keeps ``running_mean``, ``running_var`` and ``num_batches_tracked``;
        without them eval normalizes with batch statistics too.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters and buffers: float32 (the default) or float64; float16 inputs run with
        float32 ones.
    bias : bool
        Keyword-only, as in torch 2.13: False with ``affine=True`` gives a weight and no bias.

    Raises
    ------
    ValueError, TypeError
        A bad num_features (not a positive int), eps or dtype.
"""


def register_norm_state(layer, C, dtype, affine, bias, track_running_stats):
    """The parameters and buffers of torch's norm layers on `layer`, with torch's names and
    defaults: weight 1 and bias 0 (bias absent for bias=False), running_mean 0, running_var 1 and
    num_batches_tracked 0 when tracked; each None where absent, as torch registers them."""
    if affine:
        layer.weight = Parameter(np.ones(C, dtype))
        if bias:
            layer.bias = Parameter(np.zeros(C, dtype))
        else:
            layer.register_parameter("bias", None)
    else:
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)
    if track_running_stats:
        layer.register_buffer("running_mean", np.zeros(C, dtype))
        layer.register_buffer("running_var", np.ones(C, dtype))
        layer.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
    else:
        layer.register_buffer("running_mean", None)
        layer.register_buffer("running_var", None)
        layer.register_buffer("num_batches_tracked", None)


class _BatchNorm(Module):
    """Batch norm over (N, C, *) inputs, statistics per channel.

    Training normalizes with the batch mean and biased variance and updates ``running_mean`` and
    ``running_var`` (unbiased) with ``momentum`` (None: the cumulative average over
    ``num_batches_tracked``). Eval normalizes with the running statistics, or with batch statistics
    when ``track_running_stats=False``. ``dtype`` is the parameters' dtype (float32 or float64);
    float16 inputs run with float32 parameters. ``bias=False`` (keyword-only, as in torch 2.13)
    with ``affine=True`` gives a weight and no bias.
    """

    _expected_ndim = ()  # allowed input ndims; empty means any >= 2

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        num_features = check_num_features(type(self).__name__, num_features)
        dtype = np.dtype(np.float32 if dtype is None else dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64 (float16 "
                            f"inputs run with float32 parameters), got {dtype}")
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        C = self.num_features
        register_norm_state(self, C, dtype, affine, bias, track_running_stats)
        self._saved = None
        if device is not None and parse_device(device) != "cpu":
            self.to(device)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight.data[...] = 1
            if self.bias is not None:
                self.bias.data[...] = 0

    def _check_input(self, x):
        array_module(x, "input")
        if self._expected_ndim and x.ndim not in self._expected_ndim:
            expected = " or ".join(f"{d}D" for d in self._expected_ndim)
            raise ValueError(f"{type(self).__name__}: expected {expected} input (got {x.ndim}D "
                             f"input)")
        if x.ndim < 2:
            raise ValueError(f"{type(self).__name__}: expected input of shape (N, C, ...), got "
                             f"{x.ndim}D input")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}): input has "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)})")
        own = next((a.dtype for a in (self.weight.data if self.affine else None,
                                      self.running_mean) if a is not None), None)
        if own is not None and param_dtype(x.dtype) != own:
            raise TypeError(f"{type(self).__name__}: {x.dtype} input needs "
                            f"{param_dtype(x.dtype)} parameters, this layer's are {own} "
                            f"(convert it with .to(dtype=...))")

    def _momentum(self, ahead=0):
        """The factor of this training step's statistics in the running ones; `ahead`: batches
        to count in beyond num_batches_tracked (1 before the counter is incremented)."""
        if self.momentum is None:
            count = self.num_batches_tracked + ahead
            # on a GPU the counter stays there: no host round trip in a training step
            return 1.0 / float(count) if isinstance(count, np.ndarray) else 1.0 / count
        return self.momentum

    def forward(self, x):
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        w, b = self._weight_bias()
        # The counter moves only once the forward has passed its checks (momentum=None reads the
        # count this batch will make).
        y, mean, invstd = F.batch_norm_forward(
            x, w, b,
            self.running_mean if update or not use_batch_stats else None,
            self.running_var if update or not use_batch_stats else None,
            training=use_batch_stats, momentum=self._momentum(1) if update else 0.0,
            eps=self.eps)
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, use_batch_stats)
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` and ``bias.grad``."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first (each forward "
                               f"allows one backward)")
        x, mean, invstd, batch_stats = self._saved
        self._check_dy(dy, x)
        w = self.weight.data if self.affine else None
        dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, w, training=batch_stats)
        self._saved = None
        self._accumulate_grads(dw, db)
        return dx

    def _weight_bias(self):
        """The affine parameters' arrays, None for those the layer lacks."""
        return tuple(None if p is None else p.data for p in (self.weight, self.bias))

    def _check_dy(self, dy, x):
        array_module(dy, "dy")
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(f"{type(self).__name__}.backward: dy has shape {tuple(dy.shape)} "
                             f"but the input had shape {tuple(x.shape)}")

    def _accumulate_grads(self, dweight, dbias):
        """Adds to weight.grad / bias.grad, as PyTorch accumulates gradients."""
        if not self.affine:
            return
        for p, g in ((self.weight, dweight), (self.bias, dbias)):
            if p is None:
                continue
            g = g.astype(p.dtype, copy=False)
            p.grad = g if p.grad is None else p.grad + g

    def _upgrade_state_dict(self, state_dict, prefix):
        # Checkpoints from before num_batches_tracked existed load with it at 0, as in PyTorch.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = np.array(0, dtype=np.int64)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    __doc__ = """Batch norm over (N, C) or (N, C, L) inputs, as torch.nn.BatchNorm1d.
""" + _PARAMETERS
    _expected_ndim = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = """Batch norm over (N, C, H, W) inputs (NCHW or channels-last NHWC strides), as
    torch.nn.BatchNorm2d.
""" + _PARAMETERS
    _expected_ndim = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = """Batch norm over (N, C, D, H, W) inputs (NCDHW or channels-last NDHWC strides), as
    torch.nn.BatchNorm3d.
""" + _PARAMETERS
    _expected_ndim = (5,)


__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
