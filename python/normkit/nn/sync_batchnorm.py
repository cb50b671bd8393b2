"""SyncBatchNorm: batch norm over the union of all ranks' batches, one collective per pass."""
import itertools

import numpy as np

from .. import functional as F
from .._backend import array_module, check_eps, param_dtype
from ..distributed import check_communicator
from .batchnorm import _BatchNorm

_layer_ids = itertools.count()  # same sequence on every rank that builds the same model
_DTYPE_CODES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3}


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of all ranks' batches together.

    Any (N, C, +) input. In training, each forward issues exactly one all-reduce of 2C+1 float64
    values (count, sum, and sum of squares built from exact per-rank variances) and each backward one
    of 2C (sum dy, sum dy * (x - mean)), so:

    * uneven batch sizes are weighted by count, and a rank with zero samples still takes part in
      every collective (and gets an empty output and gradient);
    * the one-value-per-channel error and running_var's n - 1 use the global count, and the error
      is raised on every rank alike;
    * ``dx`` on each rank is the gradient of the sum of all ranks' losses.

    ``weight.grad`` and ``bias.grad`` are this rank's contribution, as in PyTorch (a data-parallel
    optimizer step all-reduces them with the other gradients); ``sync_param_grads=True`` makes them
    the sum over all ranks instead, at no extra collective.

    Eval mode, and a communicator of one rank, issue no collective. ``comm`` follows the protocol of
    ``normkit.distributed`` (default: ``MPICommunicator()`` over COMM_WORLD, made on first use).
    On CuPy arrays the collectives reduce device arrays (``NCCLCommunicator``, or
    ``MPICommunicator`` directly or through host memory), and a training forward reads the global
    count back to the host, one 8-byte copy that waits for the stream.
    With ``comm.debug`` set, each pass first checks across ranks that all call the same layer with
    the same channel count and dtype (one extra small all-reduce), raising on every rank otherwise.

    Numerics: within a rank the variance is exact (shifted sums); across ranks the between-rank part
    is combined in float64, whose rounding is 1e-16 * (mean / std)^2 relative: below float32's
    resolution even for |mean| = 1e4 * std.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, sync_param_grads=False, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias)
        self._comm = check_communicator(type(self).__name__, comm)
        self.sync_param_grads = sync_param_grads
        self._layer_id = next(_layer_ids)
        self._calls = 0
        self._global_count = None  # set by a synchronized forward, for its backward

    @property
    def comm(self):
        if self._comm is None:
            from ..distributed import MPICommunicator

            self._comm = MPICommunicator()
        return self._comm

    @comm.setter
    def comm(self, value):
        self._comm = value

    def _synchronized(self):
        return self.training and self.comm.size > 1

    def _check_ranks_agree(self, x, phase):
        """One all-reduce of a small signature: every rank has the same values iff for each field
        size * sum(v^2) == sum(v)^2."""
        fields = ("layer", "channels", "dtype", "phase", "call")
        signature = np.array([self._layer_id, x.shape[1], _DTYPE_CODES.get(np.dtype(x.dtype), 0),
                              phase, self._calls], dtype=np.float64)
        buf = np.concatenate([signature, signature ** 2])
        self.comm.allreduce_sum(buf)
        k = len(fields)
        disagree = [f for i, f in enumerate(fields) if self.comm.size * buf[k + i] != buf[i] ** 2]
        if disagree:
            raise RuntimeError(
                f"SyncBatchNorm: ranks disagree on {', '.join(disagree)} (rank {self.comm.rank}: "
                f"layer {self._layer_id}, {x.shape[1]} channels, dtype {np.dtype(x.dtype)}, "
                f"{'backward' if phase else 'forward'} call {self._calls}); every rank must run "
                f"the same layers in the same order on inputs with the same channels and dtype")

    def forward(self, x):
        self._global_count = None
        if not self._synchronized():
            return super().forward(x)
        self._check_input(x)
        check_eps("SyncBatchNorm", self.eps, True)
        comm = self.comm
        if comm.debug:
            self._check_ranks_agree(x, 0)
        C = self.num_features
        xp = array_module(x)
        mean, var = F.batch_norm_stats(x)
        n = float(x.size // C)
        mean64 = mean.astype(xp.float64)
        buf = xp.empty(2 * C + 1, xp.float64)
        buf[0] = n
        buf[1:C + 1] = n * mean64
        buf[C + 1:] = n * var.astype(xp.float64) + n * mean64 ** 2
        comm.allreduce_sum(buf)
        total = float(buf[0])  # the count check and the backward need it on the host
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when "
                             f"training, got {int(total)} over all {comm.size} ranks (this rank's "
                             f"input has shape {tuple(x.shape)})")
        g_mean = buf[1:C + 1] / total
        g_var = xp.maximum(buf[C + 1:] / total - g_mean ** 2, 0.0)
        pd = param_dtype(x.dtype)
        invstd = (1.0 / xp.sqrt(g_var + self.eps)).astype(pd)
        g_mean = g_mean.astype(pd)
        if self.track_running_stats:
            m = self._momentum(1)
            self.num_batches_tracked += 1
            self.running_mean *= 1.0 - m
            self.running_mean += m * g_mean
            self.running_var *= 1.0 - m
            self.running_var += m * g_var * (total / (total - 1))
        w, b = self._weight_bias()
        y = F.batch_norm_normalize(x, g_mean, invstd, w, b)
        self._saved = (x, g_mean, invstd, True)
        self._global_count = total
        self._calls += 1
        return y

    def backward(self, dy):
        if self._saved is None or self._global_count is None:  # no forward, or a local one
            return super().backward(dy)
        x, mean, invstd, _ = self._saved
        total = self._global_count
        self._check_dy(dy, x)
        comm = self.comm
        if comm.debug:
            self._check_ranks_agree(x, 1)
        C = self.num_features
        local_dy, local_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean)
        xp = array_module(x)
        buf = xp.concatenate([local_dy, local_dy_xmu]).astype(xp.float64)
        comm.allreduce_sum(buf)
        pd = mean.dtype
        sum_dy, sum_dy_xmu = buf[:C].astype(pd), buf[C:].astype(pd)
        w = self.weight.data if self.affine else None
        dx = F.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count=total)
        self._saved = self._global_count = None
        g_dy, g_dy_xmu = (sum_dy, sum_dy_xmu) if self.sync_param_grads else (local_dy, local_dy_xmu)
        self._accumulate_grads(g_dy_xmu * invstd, g_dy)
        return dx

    def extra_repr(self):
        return super().extra_repr() + f", sync_param_grads={self.sync_param_grads}"


def convert_sync_batchnorm(module, comm=None, sync_param_grads=False):
    """Replaces every BatchNorm1d/2d/3d in `module`'s tree by a SyncBatchNorm over `comm`, keeping
    its parameters, buffers (the same arrays) and train/eval mode. Returns the converted module
    (a new one when `module` itself is a batch norm)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, comm=comm,
                             sync_param_grads=sync_param_grads, bias=module.bias is not None)
        for name, p in module._parameters.items():
            sync._parameters[name] = p
        for name, b in module._buffers.items():
            sync._buffers[name] = b
        sync.train(module.training)
        return sync
    for name, child in list(module._modules.items()):
        module._modules[name] = convert_sync_batchnorm(child, comm, sync_param_grads)
    return module


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
