"""SyncBatchNorm: batch norm over the union of all ranks' batches of CPU tensors (CUDA ones where
normkit has CUDA kernels), over a ``torch.distributed`` group or any normkit communicator (MPI),
one collective per pass."""
import copy

import torch
from torch.autograd.function import once_differentiable

from ._dlpack import param_dtype
from .batchnorm import _NormkitBatchNorm
from .distributed import TorchCommunicator
from .functional import _check_running

_ops = torch.ops.normkit  # registered by normkit.torch._ops


def _allreduce(comm, buf):
    """Sums the float64 tensor ``buf`` over ``comm`` in place. torch communicators take it as it
    is; normkit's (MPI) take NumPy arrays: a CPU tensor lends its memory, a device one goes through
    host memory."""
    if isinstance(comm, TorchCommunicator):
        comm.allreduce_sum(buf)
    elif buf.device.type == "cpu":
        comm.allreduce_sum(buf.numpy())
    else:
        host = buf.cpu()
        comm.allreduce_sum(host.numpy())
        buf.copy_(host)


def _check_count(total, comm, x):
    """The one-value-per-channel error of training, on the global count. On CUDA tensors the count
    stays on the device (no host synchronization, so that a step can be captured in a CUDA graph):
    the check is an asynchronous device assertion there."""
    if total.is_cuda:
        torch._assert_async(total > 1, f"SyncBatchNorm: expected more than 1 value per channel "
                            f"when training over all {comm.size} ranks")
    elif float(total) <= 1:
        raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, "
                         f"got {int(total)} over all {comm.size} ranks (this rank's input has "
                         f"shape {tuple(x.shape)})")


class _SyncBatchNorm(torch.autograd.Function):
    """Training batch norm with statistics over all ranks of ``comm``.

    Forward: local (mean, var) -> one all-reduce of 2C+1 float64 values (count, count * mean and
    count * (var + mean^2) per channel, exact within a rank; uneven and empty batches are weighted
    by count) -> normalize. Backward: local (sum dy, sum dy * (x - mean)) -> one all-reduce of 2C
    -> dx through the global statistics. The same scheme as ``normkit.nn.SyncBatchNorm``; the
    kernels are the custom ops of normkit.torch._ops, the all-reduces run between them.

    The global count stays a (device) tensor: the elementwise backward, which takes a host count
    (at least this rank's), gets this rank's count n and the global sums scaled by n / total on
    the device.

    Grads are materialized (no ``set_materialize_grads(False)``): a rank whose output gradient is
    undefined still has a nonzero dx, from the other ranks' losses, and must join the collective.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm):
        C = x.shape[1]
        pd = param_dtype(x.dtype)
        mean, var = _ops.batch_norm_stats(x)
        n = float(x.numel() // C) if C else 0.0
        mean64 = mean.double()
        buf = torch.empty(2 * C + 1, dtype=torch.float64, device=x.device)
        buf[0] = n
        torch.mul(mean64, n, out=buf[1:C + 1])
        torch.mul(var.double().addcmul_(mean64, mean64), n, out=buf[C + 1:])
        _allreduce(comm, buf)
        total = buf[0]
        _check_count(total, comm, x)
        g_mean = buf[1:C + 1] / total
        g_var = (buf[C + 1:] / total).sub_(g_mean * g_mean).clamp_(min=0.0)
        invstd = (g_var + eps).rsqrt_().to(pd)
        g_mean = g_mean.to(pd)
        if running_mean is not None:
            running_mean.lerp_(g_mean, momentum)
        if running_var is not None:
            running_var.lerp_(g_var.mul_(total / (total - 1)).to(pd), momentum)
        y = _ops.batch_norm_normalize(x, g_mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, g_mean, invstd, total)
        ctx.comm = comm
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        C = x.shape[1]
        local_dy, local_dy_xmu = _ops.batch_norm_backward_reduce(dy, x, mean)
        buf = torch.cat([local_dy, local_dy_xmu]).to(torch.float64)  # a copy for float64 too
        _allreduce(ctx.comm, buf)
        n = max(x.numel() // C, 1) if C else 1
        scaled = (buf * (n / total)).to(mean.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        if need_x:
            dx = _ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, scaled[:C],
                                                scaled[C:], float(n))
        # weight and bias gradients are this rank's, as in PyTorch (DDP all-reduces them).
        dw = local_dy_xmu * invstd if need_w else None
        db = local_dy if need_b else None
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm(input, weight, bias, running_mean, running_var, eps, momentum, comm):
    """Training batch norm of ``input`` (N, C, *) with the statistics of all ranks of ``comm``
    together; ``running_mean``/``running_var`` (if given) are updated with the global mean and
    unbiased variance. Every rank must call it, also with an empty batch."""
    if input.dim() < 2:
        raise ValueError(f"sync_batch_norm: expected input of shape (N, C, ...), got "
                         f"{input.dim()}D input")
    _check_running("running_mean", running_mean, input, param_dtype(input.dtype))
    _check_running("running_var", running_var, input, param_dtype(input.dtype))
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum,
                                comm)


class SyncBatchNorm(_NormkitBatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` run by normkit, on CPU tensors too.

    Same constructor (plus ``comm``), parameters, buffers and state_dict as torch's, but not a
    subclass of it: DistributedDataParallel refuses CPU models holding a ``torch.nn.SyncBatchNorm``,
    and CPU data parallelism is what this layer is for.

    Synchronizes over ``comm`` (a normkit communicator, e.g. ``normkit.distributed.
    MPICommunicator()``, or a ``TorchCommunicator``), else over ``process_group``, else over
    torch.distributed's default group when it is initialized; without any of these it is a plain
    batch norm, as torch's is. In training each forward issues one all-reduce and each backward
    one; eval issues none. Uneven batches are weighted by count, a rank with an empty batch takes
    part, and the one-value-per-channel error and running_var's n - 1 use the global count.
    ``dx`` is the gradient of the sum of all ranks' losses; ``weight.grad``/``bias.grad`` are this
    rank's, as in PyTorch.

    ``copy.deepcopy`` shares the communicator (it is a connection, not state); pickling
    (``torch.save`` of the module) leaves it out, and a loaded layer uses the default group.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, comm=None, device=None, dtype=None,
                 *, bias=True):
        if process_group is not None and comm is not None:
            raise ValueError("SyncBatchNorm: pass a process_group or a comm, not both")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.process_group = process_group
        self.comm = comm

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _communicator(self):
        """The communicator of this forward; None when there is nothing to synchronize with."""
        if self.comm is not None:
            return self.comm
        if self.process_group is not None:
            return TorchCommunicator(self.process_group)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return TorchCommunicator()
        return None

    def forward(self, input):
        comm = self._communicator() if self.training else None
        if comm is None or comm.size == 1:
            return super().forward(input)
        self._check_input(input)
        factor = self._momentum_step()
        track = self.track_running_stats
        return sync_batch_norm(input, self.weight, self.bias, self.running_mean if track else None,
                               self.running_var if track else None, self.eps, factor, comm)

    def __deepcopy__(self, memo):
        for handle in (self.comm, self.process_group):
            if handle is not None:
                memo[id(handle)] = handle
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def __getstate__(self):
        return dict(self.__dict__, comm=None, process_group=None)


def convert_sync_batchnorm(module, process_group=None, comm=None):
    """Replaces every ``torch.nn.BatchNorm*d`` / ``torch.nn.SyncBatchNorm`` (and normkit's
    BatchNorm*d) in ``module``'s tree by a normkit ``SyncBatchNorm`` over ``process_group`` or
    ``comm``, keeping its parameters and buffers (the same tensors) and train/eval mode. Returns the
    converted module (a new one when ``module`` itself is a batch norm)."""
    out = module
    if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, SyncBatchNorm)):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, comm,
                            bias=module.bias is not None)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, comm))
    return out


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]
