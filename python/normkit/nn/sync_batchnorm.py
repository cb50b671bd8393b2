"""SyncBatchNorm: batch norm over the union of all ranks' batches, one collective per pass."""
from .. import distributed as D
from .. import functional as F
from .._backend import array_module, check_eps, param_dtype
from ..distributed import check_communicator
from .batchnorm import _BatchNorm

_HEADER = 4  # the agreement header in front of every all-reduce (distributed.agreement_header)
# The sums are taken about a shift K common to all ranks (the layer's last global mean, which
# comes out of a collective, so it is the same everywhere); when K is further than this many
# standard deviations from the batch's global mean, float64 cancellation could cost more than
# 1e-14 relative, and the forward sums again about the global mean it just found.
_SHIFT_TOLERANCE = 10.0


def _forward_sums(comm, x, mean64, var64, n, shift, who):
    """The forward's all-reduce: (count, sum n (mean - shift), sum n (var + (mean - shift)^2))
    over all ranks, after the agreement header, which is checked."""
    xp = array_module(x)
    C = x.shape[1]
    buf = xp.empty(_HEADER + 1 + 2 * C, xp.float64)
    buf[:_HEADER] = xp.asarray(D.agreement_header(C, x.dtype, "forward"))
    buf[_HEADER] = n
    d = mean64 - shift
    buf[_HEADER + 1:_HEADER + 1 + C] = n * d
    buf[_HEADER + 1 + C:] = n * (var64 + d * d)
    D.collective(comm, buf, f"{who} forward")
    if D.ranks_disagree(buf[:_HEADER].tolist(), comm.size, C, x.dtype, "forward"):
        raise RuntimeError(D.disagreement_message(f"{who} forward", comm))
    return float(buf[_HEADER]), buf[_HEADER + 1:_HEADER + 1 + C], buf[_HEADER + 1 + C:]


def global_batch_stats(comm, x, eps, who, shift=None):
    """Per-channel statistics of all ranks' batches of ``comm`` together, with one all-reduce of
    2C+5 float64 values (the agreement header, the count, and about a shift K common to all
    ranks the sums of count * (mean - K) and count * (var + (mean - K)^2), from exact per-rank
    variances): ``(mean, var, invstd, count)``, mean and invstd in the parameter dtype, var
    (biased) float64. ``shift`` (a float64 array of C values, the same on every rank, e.g. the
    last global mean; default zeros) is K, overwritten with this batch's global mean. When K is
    far from it (|mean - K| > 10 std: float64 cancellation could cost more than ~1e-14), the sums
    are taken again about the mean just found, a second all-reduce. Raises on every rank alike
    when the global count is at most 1; ``who`` names the layer in errors."""
    C = x.shape[1]
    xp = array_module(x)
    mean, var = F.batch_norm_stats(x)
    n = float(x.size // C)
    mean64, var64 = mean.astype(xp.float64), var.astype(xp.float64)
    K = xp.zeros(C, xp.float64) if shift is None else shift
    total, s1, s2 = _forward_sums(comm, x, mean64, var64, n, K, who)
    if total <= 1:
        raise ValueError(f"{who}: expected more than 1 value per channel when training, got "
                         f"{int(total)} over all {comm.size} ranks (this rank's input has shape "
                         f"{tuple(x.shape)})")
    d_mean = s1 / total
    d_var = s2 / total - d_mean ** 2
    if bool((d_mean ** 2 > _SHIFT_TOLERANCE ** 2 * xp.maximum(d_var, 0.0)).any()):
        K = K + d_mean  # the same on every rank: it came out of the collective
        total, s1, s2 = _forward_sums(comm, x, mean64, var64, n, K, who)
        d_mean = s1 / total
        d_var = s2 / total - d_mean ** 2
    g_mean = K + d_mean
    g_var = xp.maximum(d_var, 0.0)
    if shift is not None:
        shift[...] = g_mean
    pd = param_dtype(x.dtype)
    invstd = (1.0 / xp.sqrt(g_var + eps)).astype(pd)
    return g_mean.astype(pd), g_var, invstd, total


def global_backward_sums(comm, dy, x, mean, who):
    """This rank's and all ranks' per-channel (sum dy, sum dy * (x - mean)), with one all-reduce
    of 2C+5 float64 values (the agreement header, a slot where the forward has its count, the
    sums): ``(local_dy, local_dy_xmu, sum_dy, sum_dy_xmu)`` in mean's dtype."""
    C = x.shape[1]
    local_dy, local_dy_xmu = F.batch_norm_backward_reduce(dy, x, mean)
    xp = array_module(x)
    buf = xp.empty(_HEADER + 1 + 2 * C, xp.float64)
    buf[:_HEADER] = xp.asarray(D.agreement_header(C, x.dtype, "backward"))
    buf[_HEADER] = 0.0  # where the forward's count goes: both calls have one length
    buf[_HEADER + 1:_HEADER + 1 + C] = local_dy
    buf[_HEADER + 1 + C:] = local_dy_xmu
    D.collective(comm, buf, f"{who} backward")
    if D.ranks_disagree(buf[:_HEADER].tolist(), comm.size, C, x.dtype, "backward"):
        raise RuntimeError(D.disagreement_message(f"{who} backward", comm))
    pd = mean.dtype
    return (local_dy, local_dy_xmu, buf[_HEADER + 1:_HEADER + 1 + C].astype(pd),
            buf[_HEADER + 1 + C:].astype(pd))


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of all ranks' batches together.

    Any (N, C, +) input. In training, each forward issues exactly one all-reduce of 2C+5 float64
    values (an agreement header, the count, and per channel the sums of count * (mean - K) and of
    count * (var + (mean - K)^2) about a shift K common to all ranks) and each backward one of
    2C+5 (the header, sum dy, sum dy * (x - mean)), so:

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

    Divergent ranks: a collective not joined by every rank within the communicator's timeout
    raises a RuntimeError naming this layer and the call on the waiting rank. The agreement header
    makes ranks whose calls meet at one all-reduce but differ in channels, dtype or
    forward/backward raise on every rank. Calls whose all-reduces differ in length (other channel
    counts) are undefined in MPI: Open MPI reports MPI_ERR_TRUNCATE on the ranks whose buffer is
    shorter (re-raised naming the layer) and the header, which comes first, shows the mismatch on
    the others; NCCL and gloo give no such guarantee. With ``comm.debug`` set, each forward and
    backward, in eval too, first runs one extra small all-reduce comparing the layer (by the order
    of its first call, so ranks may construct different numbers of layers), num_features, the
    input's channels and dtype, train/eval and forward/backward, and raises on every rank saying
    which ranks differ in what.

    Numerics: within a rank the variance is exact (shifted sums); across ranks the sums are taken
    about a common shift near the global mean, so the float64 combine is exact to ~1e-15 relative
    whatever |mean| / std (a forward whose shift was far off, the first one say, sums once more).

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
    comm : communicator or None
        A ``normkit.distributed`` communicator; None: ``MPICommunicator()``, made on first use.
    sync_param_grads : bool
        Whether weight.grad and bias.grad are summed over all ranks (default: this rank's).
    device : str or None
        'cpu' (NumPy arrays, the default) or 'cuda[:N]' (CuPy arrays).
    dtype : numpy dtype or None
        Of the parameters and buffers: float32 (the default) or float64; float16 inputs run with
        float32 ones.
    bias : bool
        Keyword-only: False with ``affine=True`` gives a weight and no bias.

    Raises
    ------
    TypeError
        A comm that is not a communicator (e.g. a string), a bad dtype.
    ValueError
        A bad num_features or eps.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, sync_param_grads=False, device=None,
                 dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, bias=bias)
        self._comm = check_communicator(comm, type(self).__name__)
        self.sync_param_grads = sync_param_grads
        self._layer_order = None  # set by the first debug check: the order of first calls
        self._debug_calls = [0, 0]  # debug checks made so far: forward, backward
        self._shift = None  # the last global mean (float64), the next forward's common shift
        self._global_count = None  # set by a synchronized forward, for its backward

    @property
    def comm(self):
        if self._comm is None:
            self._comm = D.MPICommunicator()
        return self._comm

    @comm.setter
    def comm(self, value):
        self._comm = value

    def _who(self, phase=None):
        name = f"SyncBatchNorm({self.num_features})"
        return name if phase is None else f"{name} {phase}"

    def _debug_comm(self):
        """The communicator of the debug checks, or None without them. Eval mode makes the default
        communicator only where NORMKIT_SYNC_DEBUG asks, as it needs none otherwise."""
        comm = self._comm
        if comm is None and (self.training or D.debug_from_env()):
            comm = self.comm
        if comm is None or not comm.debug or comm.size == 1:
            return None
        return comm

    def _check_ranks_agree(self, comm, x, phase):
        if self._layer_order is None:
            self._layer_order = D.next_layer_order()
        i = ("forward", "backward").index(phase)
        fields = D.debug_fields(self._layer_order, self.num_features, x, self.training, phase,
                                self._debug_calls[i])
        self._debug_calls[i] += 1
        D.check_ranks_agree(comm, self._who(phase), fields)

    def forward(self, x):
        self._global_count = None
        debug = self._debug_comm()
        if debug is not None:
            self._check_ranks_agree(debug, x, "forward")
        if not (self.training and self.comm.size > 1):
            return super().forward(x)
        self._check_input(x)
        check_eps("SyncBatchNorm", self.eps, True)
        comm = self.comm
        xp = array_module(x)
        shift = self._shift  # None at first, or after the layer moved to another array type
        if shift is None or array_module(shift) is not xp:
            shift = self._shift = xp.zeros(self.num_features, xp.float64)
        g_mean, g_var, invstd, total = global_batch_stats(comm, x, self.eps, self._who(), shift)
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
        return y

    def backward(self, dy):
        debug = self._debug_comm()
        if debug is not None and self._saved is not None:
            self._check_ranks_agree(debug, self._saved[0], "backward")
        if self._saved is None or self._global_count is None:  # no forward, or a local one
            return super().backward(dy)
        x, mean, invstd, _ = self._saved
        total = self._global_count
        self._check_dy(dy, x)
        comm = self.comm
        local_dy, local_dy_xmu, sum_dy, sum_dy_xmu = global_backward_sums(comm, dy, x, mean,
                                                                          self._who())
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
    (a new one when `module` itself is a batch norm).

    Parameters
    ----------
    module : normkit.nn.Module
        Converted in place (its children replaced).
    comm : communicator or None
        The SyncBatchNorms' communicator; None: ``MPICommunicator()`` on first use.
    sync_param_grads : bool
        As ``SyncBatchNorm``'s.

    Returns
    -------
    normkit.nn.Module
    """
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
