"""SyncBatchNorm: batch norm over the union of all ranks' batches of CPU tensors (CUDA ones where
normkit has CUDA kernels), over a ``torch.distributed`` group or any normkit communicator (MPI),
one collective per pass."""
import copy

import torch
from torch.autograd.function import once_differentiable

from .. import _C
from .. import distributed as D
from ._dlpack import batch_workspace, dl, kernel_input, launch, like, param_dtype
from .batchnorm import _NormkitBatchNorm
from ..distributed import check_communicator
from .distributed import TorchCommunicator
from . import _ops as _registered
from .functional import _check_running, check_eps

if torch.distributed.is_available():  # what a compiled forward all-reduces with
    import torch.distributed._functional_collectives as funcol

_ops = torch.ops.normkit
_HEADER = 4  # the agreement header in front of every all-reduce (distributed.agreement_header)
_SHIFT_TOLERANCE = 10.0  # as normkit.nn.SyncBatchNorm's: a shift further off sums again


def _allreduce(comm, buf, who):
    """Sums the float64 tensor ``buf`` over ``comm`` in place, for the call ``who``, then checks
    its agreement header (the first values). torch communicators take the tensor as it is;
    normkit's (MPI) take NumPy arrays: a CPU tensor lends its memory, a device one goes through
    host memory."""
    if isinstance(comm, TorchCommunicator):
        D.collective(comm, buf, who)
    elif buf.device.type == "cpu":
        D.collective(comm, buf.numpy(), who)
    else:
        host = buf.cpu()
        D.collective(comm, host.numpy(), who)
        buf.copy_(host)


def _header(buf, C, dtype, phase):
    buf[:_HEADER] = torch.tensor(D.agreement_header(C, dtype, phase), dtype=torch.float64)


def _check_header(buf, comm, C, dtype, phase, who):
    if D.ranks_disagree(buf[:_HEADER].tolist(), comm.size, C, dtype, phase):
        raise RuntimeError(D.disagreement_message(who, comm))


def _forward_sums(comm, x, mean64, var64, n, shift, who):
    """The forward's all-reduce: (count, sum n (mean - shift), sum n (var + (mean - shift)^2))
    over all ranks, after the agreement header, which is checked."""
    C = mean64.shape[0]
    buf = torch.empty(_HEADER + 1 + 2 * C, dtype=torch.float64, device=x.device)
    _header(buf, C, x.dtype, "forward")
    buf[_HEADER] = n
    d = mean64 - shift
    torch.mul(d, n, out=buf[_HEADER + 1:_HEADER + 1 + C])
    torch.mul(var64 + d * d, n, out=buf[_HEADER + 1 + C:])
    _allreduce(comm, buf, f"{who} forward")
    _check_header(buf, comm, C, x.dtype, "forward", f"{who} forward")
    return float(buf[_HEADER]), buf[_HEADER + 1:_HEADER + 1 + C], buf[_HEADER + 1 + C:]


def global_batch_stats(comm, x, eps, who, shift=None):
    """Per-channel statistics of all ranks' batches of ``comm`` together, with one all-reduce of
    2C+5 float64 values (the agreement header, the count, and about a shift K common to all
    ranks count * (mean - K) and count * (var + (mean - K)^2), exact within a rank; uneven and
    empty batches are weighted by count): ``(mean, var, invstd, count)``, mean and invstd in the
    parameter dtype, var (biased) float64. ``shift`` (float64, C values, the same on every rank;
    default zeros) is K, overwritten with this batch's global mean; a K further than 10 std from
    it takes a second all-reduce about the mean just found (as ``normkit.nn``'s). Raises on every
    rank alike when the global count is at most 1; ``who`` names the layer."""
    C = x.shape[1]
    pd = param_dtype(x.dtype)
    mean = torch.empty(C, dtype=pd, device=x.device)
    var = torch.empty(C, dtype=pd, device=x.device)
    _C.batch_norm_stats(dl(x), dl(mean), dl(var), **launch(x, batch_workspace))
    n = float(x.numel() // C) if C else 0.0
    mean64, var64 = mean.double(), var.double()
    K = torch.zeros(C, dtype=torch.float64, device=x.device) if shift is None else shift
    total, s1, s2 = _forward_sums(comm, x, mean64, var64, n, K, who)
    if total <= 1:
        raise ValueError(f"{who}: expected more than 1 value per channel when training, got "
                         f"{int(total)} over all {comm.size} ranks (this rank's input has shape "
                         f"{tuple(x.shape)})")
    d_mean = s1 / total
    d_var = s2 / total - d_mean * d_mean
    if bool((d_mean * d_mean > _SHIFT_TOLERANCE ** 2 * d_var.clamp(min=0.0)).any()):
        K = K + d_mean  # the same on every rank: it came out of the collective
        total, s1, s2 = _forward_sums(comm, x, mean64, var64, n, K, who)
        d_mean = s1 / total
        d_var = s2 / total - d_mean * d_mean
    g_mean = K + d_mean
    g_var = d_var.clamp_(min=0.0)
    if shift is not None:
        shift.copy_(g_mean)
    invstd = (g_var + eps).rsqrt().to(pd)
    return g_mean.to(pd), g_var, invstd, total


def global_backward_sums(comm, dy, x, mean, who):
    """This rank's and all ranks' per-channel (sum dy, sum dy * (x - mean)), with one all-reduce
    of 2C+5 float64 values (the agreement header, a slot where the forward has its count, the
    sums): ``(local_dy, local_dy_xmu, sum_dy, sum_dy_xmu)`` in mean's dtype."""
    C = x.shape[1]
    sums = torch.empty(2, C, dtype=mean.dtype, device=x.device)
    _C.batch_norm_backward_reduce(dl(dy), dl(x), dl(mean), dl(sums[0]), dl(sums[1]),
                                  **launch(x, batch_workspace))
    buf = torch.empty(_HEADER + 1 + 2 * C, dtype=torch.float64, device=x.device)
    _header(buf, C, x.dtype, "backward")
    buf[_HEADER] = 0.0  # where the forward's count goes: both calls have one length
    buf[_HEADER + 1:].copy_(sums.reshape(-1))
    _allreduce(comm, buf, f"{who} backward")
    _check_header(buf, comm, C, x.dtype, "backward", f"{who} backward")
    global_sums = buf[_HEADER + 1:].to(mean.dtype)
    return sums[0], sums[1], global_sums[:C], global_sums[C:]


class _SyncBatchNorm(torch.autograd.Function):
    """Training batch norm with statistics over all ranks of ``comm``.

    Forward: local (mean, var) -> one all-reduce of 2C+5 float64 values (an agreement header,
    the count, and n * (mean - K) and n * (var + (mean - K)^2) per channel about a shift K common
    to all ranks; exact within a rank; uneven and empty batches are weighted by count) ->
    normalize. Backward: local (sum dy, sum dy * (x - mean)) -> one all-reduce of 2C+5 -> dx
    through the global statistics. The same scheme as ``normkit.nn.SyncBatchNorm``.

    Grads are materialized (no ``set_materialize_grads(False)``): a rank whose output gradient is
    undefined still has a nonzero dx, from the other ranks' losses, and must join the collective.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, comm, shift, who):
        x = kernel_input(x)
        g_mean, g_var, invstd, total = global_batch_stats(comm, x, eps, who, shift)
        if running_mean is not None:
            running_mean.lerp_(g_mean, momentum)
        if running_var is not None:
            running_var.lerp_(g_var.mul_(total / (total - 1)).to(g_mean.dtype), momentum)
        y = torch.empty_like(x)
        _C.batch_norm_normalize(dl(x), dl(g_mean), dl(invstd), dl(weight), dl(bias), dl(y),
                                **launch(x))
        ctx.save_for_backward(x, weight, g_mean, invstd)
        ctx.total, ctx.comm, ctx.who = total, comm, who
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = like(x, dy)
        local_dy, local_dy_xmu, sum_dy, sum_dy_xmu = global_backward_sums(ctx.comm, dy, x, mean,
                                                                          ctx.who)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        if need_x:
            dx = torch.empty_like(x)
            _C.batch_norm_backward_elemt(dl(dy), dl(x), dl(mean), dl(invstd), dl(weight),
                                         dl(sum_dy), dl(sum_dy_xmu), ctx.total, dl(dx),
                                         **launch(x))
        # weight and bias gradients are this rank's, as in PyTorch (DDP all-reduces them).
        dw = local_dy_xmu * invstd if need_w else None
        db = local_dy.clone() if need_b else None
        return dx, dw, db, None, None, None, None, None, None, None


class _SyncBatchNormOps(torch.autograd.Function):
    """_SyncBatchNorm with the global count kept a tensor (no host synchronization): normkit's
    split ops, and between them an all-reduce of 2C+1 float64 values forward (the count, and
    n * (mean - K) and n * (var + (mean - K)^2) about the layer's shift K, as eager's) and one of
    2C backward. Over a torch.distributed ``group`` (``comm`` None) with its functional
    collectives, which dynamo traces; over a normkit communicator ``comm`` (group None) with its
    own all-reduce: eager for CUDA tensors over a TorchCommunicator, under torch.compile through
    the opaque op ``normkit::allreduce_sum`` for any communicator (dynamo cannot trace theirs).
    The backward's global sums are scaled by n / count, for the elementwise op given this rank's
    n as its count (the op takes a float).

    StochNorm's synchronized forward passes ``keep`` (1 where a channel uses the batch
    statistics, 0 where it uses ``running_mean``/``running_var`` as they were before this call,
    which are then constants: their channels' global sums are zeroed in the backward).

    Returns y, the global mean and biased var (float64) and count, for the running-statistics
    update."""

    @staticmethod
    def _sum(ctx, t, phase):
        if ctx.comm is None:
            return funcol.all_reduce(t, "sum", ctx.group)
        who = f"{ctx.who} {phase}"
        if torch.compiler.is_compiling():  # the communicator's all-reduce as an opaque op
            return _ops.allreduce_sum(t, id(ctx.comm), who)
        _allreduce(ctx.comm, t, who)
        return t

    @staticmethod
    def forward(ctx, x, weight, bias, shift, eps, group, comm, who, keep=None, running_mean=None,
                running_var=None):
        C = x.shape[1]
        ctx.group, ctx.comm, ctx.who = group, comm, who
        mean, var = _ops.batch_norm_stats(x)
        n = x.numel() // C
        d = mean.double() - shift
        sums = _SyncBatchNormOps._sum(ctx, torch.cat([shift.new_ones(1), d, var.double() + d * d])
                                      * n, "forward")
        total = sums[0]
        d_mean = sums[1:C + 1] / total
        g_var = (sums[C + 1:] / total - d_mean * d_mean).clamp(min=0.0)
        g_mean = shift + d_mean
        g_mean_p, invstd = g_mean.to(mean.dtype), (g_var + eps).rsqrt().to(mean.dtype)
        if keep is not None:
            use = keep.bool()
            g_mean_p = torch.where(use, g_mean_p, running_mean)
            invstd = torch.where(use, invstd,
                                 (running_var.double() + eps).rsqrt().to(mean.dtype))
        y = _ops.batch_norm_normalize(x, g_mean_p, invstd, weight, bias)
        ctx.mark_non_differentiable(g_mean, g_var, total)
        ctx.save_for_backward(x, weight, g_mean_p, invstd, total, keep)
        ctx.n = n
        return y, g_mean, g_var, total

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, mean, invstd, total, keep = ctx.saved_tensors
        C = x.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu = _ops.batch_norm_backward_reduce(dy, x, mean)
        sums = _SyncBatchNormOps._sum(ctx, torch.cat([sum_dy, sum_dy_xmu]).double(), "backward")
        sums = (sums * (ctx.n / total)).to(mean.dtype)
        g_dy, g_dy_xmu = sums[:C], sums[C:]
        if keep is not None:
            g_dy, g_dy_xmu = g_dy * keep, g_dy_xmu * keep
        dx = None
        if need_x:
            dx = _ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, g_dy, g_dy_xmu,
                                                float(ctx.n))
        # weight and bias gradients are this rank's, as in PyTorch (DDP all-reduces them).
        return (dx, sum_dy_xmu * invstd if need_w else None, sum_dy if need_b else None) + \
            (None,) * 8


def sync_batch_norm(input, weight, bias, running_mean, running_var, eps, momentum, comm,
                    shift=None):
    """Training batch norm of ``input`` (N, C, *) with the statistics of all ranks of ``comm``
    together; ``running_mean``/``running_var`` (if given) are updated with the global mean and
    unbiased variance. Every rank must call it, also with an empty batch.

    ``shift`` (optional): a float64 tensor of C values, equal on every rank, that the sums are
    taken about; it is overwritten with this batch's global mean, the next call's shift (the
    module keeps one). Without it, data with |mean| >> std takes a second all-reduce to stay
    exact.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        This rank's batch (N may be 0).
    weight, bias : torch.Tensor (C,) or None
        The affine parameters.
    running_mean, running_var : torch.Tensor (C,) or None
        Updated in place with the global statistics.
    eps : float
        Added to the variance, positive.
    momentum : float
        Factor of the batch's statistics in the running ones.
    comm : communicator
        A normkit communicator (``normkit.distributed``, or a ``TorchCommunicator``).
    shift : torch.Tensor (C,) float64, or None
        See above.

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    ValueError
        Input of fewer than 2 dims, a bad eps or shift, one value per channel over all ranks.
    RuntimeError
        A collective that timed out or failed (``normkit.distributed.SyncTimeoutError`` and
        ``CollectiveError``), or ranks whose calls differ.
    """
    if input.dim() < 2:
        raise ValueError(f"sync_batch_norm: expected input of shape (N, C, ...), got "
                         f"{input.dim()}D input")
    _check_running("running_mean", running_mean, input, param_dtype(input.dtype))
    _check_running("running_var", running_var, input, param_dtype(input.dtype))
    check_eps(eps, True)
    if shift is not None and (shift.dtype != torch.float64 or shift.shape != (input.shape[1],)
                              or shift.device != input.device):
        raise ValueError(f"sync_batch_norm: shift must be a float64 tensor of {input.shape[1]} "
                         f"values on {input.device}, got {shift.dtype} {tuple(shift.shape)} on "
                         f"{shift.device}")
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, eps, momentum,
                                comm, shift, f"SyncBatchNorm({input.shape[1]})")


def compiled_comm_size(comm):
    """Registers ``comm`` (None: nothing) where a compiled forward's ``normkit::allreduce_sum``
    finds it, and returns its size, read here once: dynamo cannot trace an MPI communicator's
    size query."""
    if comm is None:
        return None
    _registered.communicator_key(comm)
    return comm.size


def sync_shift(layer, input):
    """The common shift of a synchronized layer's cross-rank sums: the last synchronized forward's
    global mean (the same on every rank, being a collective's result; kept as ``layer._shift``),
    zeros at first."""
    shift = getattr(layer, "_shift", None)
    C = layer.num_features
    if shift is None or shift.device != input.device or shift.shape != (C,):
        shift = layer._shift = torch.zeros(C, dtype=torch.float64, device=input.device)
    return shift


def device_count_batch_norm(layer, input, group, comm, keep=None):
    """A synchronized batch-norm layer's training forward with the global count kept a tensor
    (_SyncBatchNormOps, about ``sync_shift``): over ``comm`` where given, else over ``group``
    with the functional collectives; ``keep`` as _SyncBatchNormOps's. Updates the running
    statistics (if tracked) with the global mean and unbiased variance, and the shift."""
    shift = sync_shift(layer, input)
    y, g_mean, g_var, total = _SyncBatchNormOps.apply(
        input, layer.weight, layer.bias, shift, layer.eps, group, comm,
        f"{type(layer).__name__}({layer.num_features})", keep,
        layer.running_mean if keep is not None else None,
        layer.running_var if keep is not None else None)
    if layer.track_running_stats:
        momentum = layer._momentum_factor()
        layer.running_mean.lerp_(g_mean.to(layer.running_mean.dtype), momentum)
        layer.running_var.lerp_((g_var * (total / (total - 1))).to(layer.running_var.dtype),
                                momentum)
    shift.copy_(g_mean)
    layer._count_batch()
    return y


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

    Divergent ranks, the agreement header and the debug mode (``comm.debug``, or the
    environment variable NORMKIT_SYNC_DEBUG for the process-group communicators) as in
    ``normkit.nn.SyncBatchNorm``: a collective that not every rank joins times out (the
    communicator's ``timeout``) with a RuntimeError naming this layer and the call, and the debug
    check runs before each forward and (by a hook on the output) before each backward, in eval
    too. The cross-rank sums are taken about the last global mean, exact for |mean| >> std.

    Under torch.compile (fullgraph, no graph break) the layer synchronizes over its group with
    torch.distributed's functional collectives, or over its ``comm`` (MPI too) through the opaque
    op ``normkit::allreduce_sum``, with the global count on the device. CUDA tensors over
    torch.distributed (no ``comm``, or a TorchCommunicator) keep the global count on the device
    in eager mode too: no host synchronization (with a TorchCommunicator, one of
    ``timeout=math.inf``: a finite timeout waits on the host), so a synchronized training step
    can be captured in a CUDA graph. That path has no agreement header in the all-reduce (the
    debug check still runs where asked for), no error for a global batch of one value per
    channel, and no second all-reduce for a shift far from the mean (the shift is the last
    global mean).

    ``copy.deepcopy`` shares the communicator (it is a connection, not state); pickling
    (``torch.save`` of the module) leaves it out, and a loaded layer uses the default group.

    Parameters
    ----------
    num_features : int
        C, the channels of the (N, C, *) input.
    eps : float
        Added to the variance, positive (default 1e-5).
    momentum : float or None
        Factor of each batch's statistics in the running ones (default 0.1); None: their
        cumulative average.
    affine : bool
        Whether the layer has a per-channel weight and bias (default True).
    track_running_stats : bool
        Whether the layer keeps running statistics (default True).
    process_group : torch.distributed.ProcessGroup or None
        The group to synchronize over (as torch's); not together with ``comm``.
    comm : communicator or None
        A normkit communicator to synchronize over instead.
    device, dtype
        torch's factory arguments of the parameters and buffers.
    bias : bool
        Keyword-only: False with affine=True gives a weight and no bias.

    Raises
    ------
    ValueError
        Both process_group and comm; a bad num_features.
    TypeError
        A comm that is not a communicator.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, comm=None, device=None, dtype=None,
                 *, bias=True):
        if process_group is not None and comm is not None:
            raise ValueError("SyncBatchNorm: pass a process_group or a comm, not both")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.process_group = process_group
        self.comm = check_communicator(comm, type(self).__name__)
        self._comm_size = compiled_comm_size(self.comm)

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

    def _debug_comm(self):
        """The communicator of the debug checks, or None without them (eval mode makes one
        only where the debug flag asks for it)."""
        if self.comm is not None:
            comm = self.comm if self.comm.debug else None
        elif self.training or D.debug_from_env():
            comm = self._communicator()
        else:
            comm = None
        return comm if comm is not None and comm.debug and comm.size > 1 else None

    def _check_ranks_agree(self, comm, input, training, phase):
        order = getattr(self, "_layer_order", None)
        if order is None:
            order = self._layer_order = D.next_layer_order()
        calls = self.__dict__.setdefault("_debug_calls", [0, 0])
        i = ("forward", "backward").index(phase)
        fields = D.debug_fields(order, self.num_features, input, training, phase, calls[i])
        calls[i] += 1
        D.check_ranks_agree(comm, f"SyncBatchNorm({self.num_features}) {phase}", fields)

    @staticmethod
    def _counts_on_device(input):
        """Whether an eager forward keeps the global count on the device: CUDA tensors (no host
        synchronization, so a training step can be captured in a CUDA graph)."""
        return input.is_cuda

    def _device_count_forward(self, input, group, comm):
        """The forward with the global count kept a tensor (_SyncBatchNormOps): under
        torch.compile, and for eager CUDA tensors over torch.distributed. Over the layer's
        ``comm`` where it has one, else over ``group`` (``process_group``) or the default group
        with torch.distributed's functional collectives (which dynamo traces, and which do not
        block the host). Batch norm where there is no rank to synchronize with or in eval.
        Without a value on the host there is no agreement header in the all-reduce, no
        empty-batch error and no second all-reduce for a shift further than 10 std off; the
        debug checks (eager only) still compare the ranks' calls first."""
        if comm is not None:
            size = self._comm_size
        else:
            if group is None and torch.distributed.is_available() and \
                    torch.distributed.is_initialized():
                group = torch.distributed.group.WORLD
            size = 1 if group is None else torch.distributed.get_world_size(group)
        if not self.training or size == 1:
            return super().forward(input)
        self._check_input(input)
        return device_count_batch_norm(self, input, group, comm)

    def forward(self, input):
        compiling = torch.compiler.is_compiling()
        debug = None if compiling else self._debug_comm()
        if debug is not None:
            self._check_ranks_agree(debug, input, self.training, "forward")
        if compiling or (self._counts_on_device(input) and (
                self.comm is None or isinstance(self.comm, TorchCommunicator))):
            y = self._device_count_forward(input, self.process_group, self.comm)
        else:
            comm = self._communicator() if self.training else None
            if comm is None or comm.size == 1:
                y = super().forward(input)
            else:
                self._check_input(input)
                track = self.track_running_stats
                y = sync_batch_norm(input, self.weight, self.bias,
                                    self.running_mean if track else None,
                                    self.running_var if track else None, self.eps,
                                    self._momentum_factor(), comm, sync_shift(self, input))
                self._count_batch()
        if debug is not None and y.requires_grad:
            # Runs before this layer's backward (and its all-reduce), on every rank that has one.
            meta = torch.empty((0,) + tuple(input.shape[1:2]), dtype=input.dtype, device="meta")
            training = self.training
            y.register_hook(lambda grad: self._check_ranks_agree(debug, meta, training,
                                                                 "backward"))
        return y

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
    converted module (a new one when ``module`` itself is a batch norm).

    Parameters
    ----------
    module : torch.nn.Module
        Converted in place (its children replaced).
    process_group : torch.distributed.ProcessGroup or None
        The SyncBatchNorms' group.
    comm : communicator or None
        The SyncBatchNorms' normkit communicator instead.

    Returns
    -------
    torch.nn.Module
    """
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
