"""StochNorm1d/2d/3d (tllib's stochastic normalization, seed 002) over NumPy / CuPy arrays.

Built on the split batch-norm ops, with no kernel of its own: one statistics pass, one elementwise
pass with per-channel selected (mean, invstd), and a backward of one reduction and one elementwise
pass in which the channels on running statistics have their reduction sums zeroed (their
statistics are constants).
"""
import numpy as np

from .. import functional as F
from .. import random as nk_random
from .._backend import array_module
from ..distributed import check_communicator
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from .sync_batchnorm import global_backward_sums, global_batch_stats


def check_p(p, who):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        C, the channels of the (N, C, *) input.
    eps : float
        Added to the variance before its square root; must be positive in training.
    momentum : float or None
        Factor of each batch's statistics in the running ones; None: their cumulative average.
    affine : bool
        Whether the layer has a learnable per-channel ``weight`` and ``bias``.
    track_running_stats : bool
        Whether the layer keeps ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    p : float
        The probability that a channel uses the batch statistics, in [0, 1].
    generator : numpy.random.Generator or None
        Draws ``s`` and the initial weight; None: normkit's default (``normkit.manual_seed``).
    comm : communicator or None
        Batch statistics over all ranks (a ``normkit.distributed`` communicator); None: local.
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters and buffers: float32 (the default) or float64; float16 inputs run with
        float32 ones.
    bias : bool
        Keyword-only: False with ``affine=True`` gives a weight and no bias.

    Raises
    ------
    ValueError
        p outside [0, 1]; a bad num_features or eps.
    TypeError
        A bad dtype, generator or comm.
"""


class _StochNorm(_BatchNorm):
    """Batch norm whose channels each pick, per training call, the batch statistics
    (probability ``p``) or the running statistics.

    Training: ``s`` = one Bernoulli(p) draw per channel per call from ``generator`` (a
    ``numpy.random.Generator``; default: normkit's, see ``normkit.manual_seed``), shared by every
    sample and position. Channels with s = 1 are normalized with the batch statistics and get the
    full batch-norm gradient; channels with s = 0 with the running statistics as they were before
    this call's update, in the forward and the backward (dx = weight * dy / sqrt(rv + eps)).
    The running statistics are updated once per call as in batch norm, whatever s is. Eval:
    running statistics. ``track_running_stats=False``: batch statistics always (plain batch norm).
    Weight is initialized U(0, 1) (from the generator), bias 0, as tllib's.

    With ``comm`` (a ``normkit.distributed`` communicator) the batch statistics are those of all
    ranks' batches, as ``SyncBatchNorm`` (one all-reduce forward, one backward; uneven and empty
    batches). Every rank must then pass a generator seeded alike so that all draw the same ``s``.

    Differences from tllib, all fixes: 3d training works, the CPU works, ``momentum=None`` and
    ``num_batches_tracked`` work as in batch norm, the backward matches the forward, float16 input
    gives float16 output.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, p=0.5, generator=None, comm=None, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias)
        self.p = check_p(p, type(self).__name__)
        nk_random.resolve(generator, type(self).__name__)
        self.generator = generator
        self.comm = check_communicator(comm, type(self).__name__)
        if affine:
            w = self.weight.data
            w[...] = array_module(w).asarray(self._rng().random(self.num_features), w.dtype)
        self._mask = None  # this call's s as a float 0/1 array, for the backward

    def _rng(self):
        return nk_random.resolve(self.generator, type(self).__name__)

    def reset_parameters(self):
        super().reset_parameters()
        if self.affine:
            w = self.weight.data
            w[...] = array_module(w).asarray(self._rng().random(self.num_features), w.dtype)

    def _stochastic(self):
        return self.training and self.track_running_stats

    def _synchronized(self):
        return self.training and self.comm is not None and self.comm.size > 1

    def forward(self, x):
        self._mask = None
        if not self._stochastic() and not self._synchronized():
            return super().forward(x)
        self._check_input(x)
        xp = array_module(x)
        C = self.num_features
        if self._synchronized():
            mean, var, invstd, total = global_batch_stats(self.comm, x, self.eps,
                                                          type(self).__name__)
        else:
            total = float(x.size // C)
            if total <= 1:
                raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                                 f"when training, got input of shape {tuple(x.shape)}")
            mean, var = F.batch_norm_stats(x)
            invstd = (1.0 / xp.sqrt(var.astype(xp.float64) + self.eps)).astype(mean.dtype)
        if self._stochastic():
            # one draw per call on every rank alike, before anything can raise on one rank only
            s = xp.asarray(self._rng().random(C) < self.p)
            run_invstd = (1.0 / xp.sqrt(self.running_var + self.eps)).astype(mean.dtype)
            sel_mean = xp.where(s, mean, self.running_mean)
            sel_invstd = xp.where(s, invstd, run_invstd)
            self.num_batches_tracked += 1
            m = self._momentum()
            self.running_mean *= 1.0 - m
            self.running_mean += m * mean
            self.running_var *= 1.0 - m
            self.running_var += m * var * (total / (total - 1))
            self._mask = s.astype(mean.dtype)
        else:  # synchronized plain batch norm (track_running_stats=False)
            sel_mean, sel_invstd = mean, invstd
            self._mask = xp.ones(C, mean.dtype)
        w, b = self._weight_bias()
        y = F.batch_norm_normalize(x, sel_mean, sel_invstd, w, b)
        self._saved = (x, sel_mean, sel_invstd, total)
        return y

    def backward(self, dy):
        if self._mask is None:  # eval, plain batch norm, or no forward
            return super().backward(dy)
        x, mean, invstd, total = self._saved
        self._check_dy(dy, x)
        if self._synchronized():
            local_dy, local_dy_xmu, sum_dy, sum_dy_xmu = global_backward_sums(
                self.comm, dy, x, mean, type(self).__name__)
        else:
            local_dy, local_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean)
            sum_dy, sum_dy_xmu = local_dy, local_dy_xmu
        w = self.weight.data if self.affine else None
        # s = 0 channels: zero sums leave dx = weight * invstd * dy (constant statistics)
        dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy * self._mask,
                                         sum_dy_xmu * self._mask, count=total)
        self._saved = self._mask = None
        self._accumulate_grads(local_dy_xmu * invstd, local_dy)
        return dx

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"


class StochNorm1d(_StochNorm):
    __doc__ = """StochNorm over (N, C) or (N, C, L) inputs.

    """ + _StochNorm.__doc__ + _PARAMETERS
    _expected_ndim = (2, 3)


class StochNorm2d(_StochNorm):
    __doc__ = """StochNorm over (N, C, H, W) inputs (NCHW or channels-last NHWC strides).

    """ + _StochNorm.__doc__ + _PARAMETERS
    _expected_ndim = (4,)


class StochNorm3d(_StochNorm):
    __doc__ = """StochNorm over (N, C, D, H, W) inputs (NCDHW or channels-last NDHWC strides).

    """ + _StochNorm.__doc__ + _PARAMETERS
    _expected_ndim = (5,)


_STOCH_OF = {BatchNorm1d: StochNorm1d, BatchNorm2d: StochNorm2d, BatchNorm3d: StochNorm3d}


def convert_stochnorm(module, p=0.5, generator=None, comm=None):
    """Replaces every BatchNorm1d/2d/3d of ``module``'s tree by a StochNorm1d/2d/3d with copies of
    its parameters and buffers, the same eps, momentum, affine, track_running_stats and train/eval
    mode, and the given ``p`` (and ``generator``, ``comm``). Returns the converted module (a new
    one when ``module`` itself is a batch norm).

    Parameters
    ----------
    module : normkit.nn.Module
        Converted in place (its children replaced).
    p : float
        The StochNorms' probability, in [0, 1].
    generator : numpy.random.Generator or None
        Shared by every StochNorm made; None: normkit's default.
    comm : communicator or None
        The StochNorms' communicator; None: local statistics.

    Returns
    -------
    normkit.nn.Module

    Raises
    ------
    ValueError
        p outside [0, 1].
    """
    check_p(p, "convert_stochnorm")
    kind = _STOCH_OF.get(type(module))
    if kind is not None:
        src = module.weight.data if module.affine else module.running_mean
        out = kind(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats, p=p, generator=generator, comm=comm,
                   dtype=None if src is None else src.dtype, bias=module.bias is not None)
        if src is not None and array_module(src) is not np:
            out.to("cuda")
        out.load_state_dict(module.state_dict())  # copies into the new layer's own arrays
        out.train(module.training)
        return out
    for name, child in list(module._modules.items()):
        module._modules[name] = convert_stochnorm(child, p, generator, comm)
    return module


__all__ = ["StochNorm1d", "StochNorm2d", "StochNorm3d", "convert_stochnorm"]
