"""InstanceNorm1d/2d/3d with PyTorch's semantics (torch.nn.InstanceNorm*d), and IBN-Net's
InstanceBatchNorm2d (seed 002), over NumPy / CuPy arrays."""
import warnings

import numpy as np

from .. import functional as F
from .._backend import array_module, parse_device
from .batchnorm import BatchNorm2d, register_norm_state
from .groupnorm import _accumulate, _check_layer_dtype, _param_dtype
from .module import Module


_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        C, the channels of the input.
    eps : float
        Added to the variance.
    momentum : float or None
        Factor of each batch's statistics in the running ones; None: their cumulative average.
    affine : bool
        Whether the layer has a per-channel ``weight`` (ones) and ``bias`` (zeros); default False,
        as torch.
    track_running_stats : bool
        Whether the layer keeps running statistics (and eval normalizes with them); default False.
    bias : bool
        Keyword-only: False with ``affine=True`` keeps the weight only.
    dtype : numpy dtype or None
        Of the parameters and buffers: float32 (the default) or float64; float16 inputs run with
        float32 ones (keyword-only).
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays) (keyword-only).

    Raises
    ------
    ValueError
        num_features not a positive integer.
    TypeError
        A dtype other than float32 or float64.
"""


class _InstanceNorm(Module):
    """Instance norm: statistics per (sample, channel) over the spatial dims, biased variance.

    With ``track_running_stats=True``, training updates ``running_mean``/``running_var`` with
    ``momentum`` toward the batch average of the per-instance mean and unbiased variance, and eval
    normalizes with them. ``momentum=None`` is the cumulative average over
    ``num_batches_tracked``, which training counts (torch leaves both unmoved: a documented
    difference). Unbatched input (one sample without the N dim) is accepted as in torch.
    """

    _no_batch_ndim = 0  # input ndim of one unbatched sample (C, *spatial)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, bias=True, dtype=None, device=None):
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        dtype = _param_dtype(self, dtype)
        self.num_features = C = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
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
        if self.weight is not None:
            self.weight.data[...] = 1
        if self.bias is not None:
            self.bias.data[...] = 0

    def _weight_bias(self):
        return tuple(None if p is None else p.data for p in (self.weight, self.bias))

    def _check_input(self, x):
        array_module(x, "input")
        name = type(self).__name__
        nb = self._no_batch_ndim
        if x.ndim not in (nb, nb + 1):
            raise ValueError(f"{name}: expected {nb}D (unbatched) or {nb + 1}D input (got "
                             f"{x.ndim}D input)")
        channels = x.shape[x.ndim - nb]
        if channels != self.num_features:
            if self.affine or self.track_running_stats:
                raise ValueError(f"{name}({self.num_features}): expected input's size at "
                                 f"dim={x.ndim - nb} to match num_features, got {channels}")
            warnings.warn(f"{name}: input's size at dim={x.ndim - nb} does not match "
                          f"num_features ({self.num_features}); it is not used because "
                          f"affine=False", stacklevel=3)
        own = self.weight.dtype if self.weight is not None else (
            self.running_mean.dtype if self.running_mean is not None else None)
        _check_layer_dtype(self, x, own)

    def _momentum(self):
        if self.momentum is None:
            count = self.num_batches_tracked
            return 1.0 / float(count) if isinstance(count, np.ndarray) else 1.0 / count
        return self.momentum

    def forward(self, x):
        self._check_input(x)
        unbatched = x.ndim == self._no_batch_ndim
        if unbatched:
            x = x[None]
        use_input_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked += 1
        w, b = self._weight_bias()
        stats = update or not use_input_stats
        y, mean, rstd = F.instance_norm_forward(
            x, self.running_mean if stats else None, self.running_var if stats else None, w, b,
            use_input_stats, self._momentum() if update else 0.0, self.eps)
        self._saved = (x, mean, rstd, use_input_stats, unbatched)
        return y[0] if unbatched else y

    def backward(self, dy):
        """dx of the last forward; accumulates ``weight.grad`` and ``bias.grad``."""
        name = type(self).__name__
        if self._saved is None:
            raise RuntimeError(f"{name}.backward: call forward first (each forward allows one "
                               f"backward)")
        x, mean, rstd, use_input_stats, unbatched = self._saved
        array_module(dy, "dy")
        if unbatched:
            dy = dy[None]
        if tuple(dy.shape) != tuple(x.shape):
            raise ValueError(f"{name}.backward: dy has shape {tuple(dy.shape)} but the input "
                             f"had shape {tuple(x.shape)}")
        w, b = self._weight_bias()
        dx, dw, db = F.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats, b)
        self._saved = None
        _accumulate(((self.weight, dw), (self.bias, db)))
        return dx[0] if unbatched else dx

    def _upgrade_state_dict(self, state_dict, prefix):
        stats = [prefix + k for k in ("running_mean", "running_var") if prefix + k in state_dict]
        if not self.track_running_stats and stats:
            # torch's handling of checkpoints from before 0.4, where instance norm tracked
            # running statistics by default: an error, after which the keys are dropped
            for key in stats:
                state_dict.pop(key)
            state_dict.pop(prefix + "num_batches_tracked", None)
            raise RuntimeError(
                f"Unexpected running stats buffer(s) {' and '.join(stats)} for "
                f"{type(self).__name__} with track_running_stats=False. If the state_dict is a "
                f"checkpoint saved before torch 0.4.0, this may be expected; remove these keys, "
                f"or set track_running_stats=True to use them")
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = np.array(0, dtype=np.int64)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class InstanceNorm1d(_InstanceNorm):
    __doc__ = """Instance norm over (N, C, L) inputs, or unbatched (C, L), as
    torch.nn.InstanceNorm1d.
""" + _PARAMETERS
    _no_batch_ndim = 2


class InstanceNorm2d(_InstanceNorm):
    __doc__ = """Instance norm over (N, C, H, W) inputs (NCHW or channels-last), or unbatched
    (C, H, W), as torch.nn.InstanceNorm2d.
""" + _PARAMETERS
    _no_batch_ndim = 3


class InstanceNorm3d(_InstanceNorm):
    __doc__ = """Instance norm over (N, C, D, H, W) inputs, or unbatched (C, D, H, W), as
    torch.nn.InstanceNorm3d.
""" + _PARAMETERS
    _no_batch_ndim = 4


class InstanceBatchNorm2d(Module):
    """IBN-Net's IBN-a block (seed 002): the first ``half = int(planes * ratio)`` channels through
    ``InstanceNorm2d(half, affine=True)`` (submodule ``IN``), the other ``planes - half`` through
    ``BatchNorm2d`` (submodule ``BN``), the halves concatenated along the channels. Any planes and
    ratio: half = 0 or half = planes leave out the empty part's submodule. The output keeps the
    input's layout.

    Parameters
    ----------
    planes : int
        C, the channels of the input.
    ratio : float
        The share of channels instance-normalized, in [0, 1].
    dtype : numpy dtype or None
        Of the parameters and buffers: float32 (the default) or float64 (keyword-only).
    device : str or None
        'cpu' (the default) or 'cuda[:N]' (keyword-only).

    Shape
    -----
    (N, planes, H, W) -> (N, planes, H, W).

    Raises
    ------
    ValueError
        planes not a positive integer, or ratio outside [0, 1].
    """

    def __init__(self, planes, ratio=0.5, *, dtype=None, device=None):
        super().__init__()
        if int(planes) != planes or planes < 1:
            raise ValueError(f"planes must be a positive integer, got {planes!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
        self.planes = int(planes)
        self.half = int(self.planes * ratio)
        if self.half > 0:
            self.IN = InstanceNorm2d(self.half, affine=True, dtype=dtype, device=device)
        if self.planes - self.half > 0:
            self.BN = BatchNorm2d(self.planes - self.half, dtype=dtype, device=device)

    def _parts(self):
        """(module, channel slice) of the parts that exist."""
        parts = []
        if self.half > 0:
            parts.append((self._modules["IN"], slice(0, self.half)))
        if self.planes - self.half > 0:
            parts.append((self._modules["BN"], slice(self.half, self.planes)))
        return parts

    def forward(self, x):
        xp = array_module(x, "input")
        if x.ndim != 4:
            raise ValueError(f"InstanceBatchNorm2d: expected 4D input (got {x.ndim}D input)")
        if x.shape[1] != self.planes:
            raise ValueError(f"InstanceBatchNorm2d({self.planes}): input has {x.shape[1]} "
                             f"channels (shape {tuple(x.shape)})")
        y = xp.empty_like(x)
        for module, part in self._parts():
            y[:, part] = module(x[:, part])
        return y

    def backward(self, dy):
        """dx of the last forward; accumulates the halves' parameter gradients."""
        xp = array_module(dy, "dy")
        if dy.ndim != 4 or dy.shape[1] != self.planes:
            raise ValueError(f"InstanceBatchNorm2d.backward: dy has shape {tuple(dy.shape)}, "
                             f"expected (N, {self.planes}, H, W)")
        dx = xp.empty_like(dy)
        for module, part in self._parts():
            dx[:, part] = module.backward(dy[:, part])
        return dx

    def extra_repr(self):
        return f"{self.planes}, half={self.half}"


__all__ = ["InstanceBatchNorm2d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
