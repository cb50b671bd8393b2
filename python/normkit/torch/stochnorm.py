"""StochNorm1d/2d/3d: tllib's stochastic normalization (``tllib.normalization.stochnorm``) run by
normkit's batch-norm ops (the masked fused ones for one process, the split ones around the
collectives when synchronized), on CPU and CUDA tensors, optionally synchronized across ranks.

Drop-in for tllib's: same constructor (plus ``generator``, ``process_group``, ``comm``), the same
``p`` attribute, parameters and buffers, and tllib's state dicts (which lack
``num_batches_tracked``) load. ``convert_model`` is tllib's name for ``convert_stochnorm``.
"""
import copy

import torch
from torch.autograd.function import once_differentiable

from .. import _C
from ..distributed import check_communicator
from . import _ops as _registered
from ._dlpack import dl, kernel_input, launch, like, param_dtype
from ._ops import generator_key
from .batchnorm import _NormkitBatchNorm
from .distributed import TorchCommunicator
from .functional import _check_running
from .sync_batchnorm import (compiled_comm_size, device_count_batch_norm, global_backward_sums,
                             global_batch_stats)

_ops = torch.ops.normkit


def _check_p(p, who):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_generator(generator, who):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{who}: generator must be a torch.Generator, got "
                        f"{type(generator).__name__}")


class _Seeded:
    """A layer's ``generator`` (a torch.Generator, or None for torch's default one) with the key
    the draw ops of normkit.torch._ops find it by, taken whenever it is set: a compiled forward
    reads only the key (dynamo cannot trace the generator object)."""

    @property
    def generator(self):
        return self._generator

    @generator.setter
    def generator(self, generator):
        self._generator = generator
        self._generator_key = generator_key(generator)

    def __setstate__(self, state):
        # unpickled or deep-copied: the key of the generator this copy holds
        super().__setstate__(state)
        self._generator_key = generator_key(self._generator)


def draw_channels(C, p, generator, device):
    """s: C Bernoulli(p) draws as a bool tensor on ``device``, from ``generator`` (torch's default
    generator when None). Drawn where the generator lives, so a CPU generator serves CUDA layers.

    Parameters
    ----------
    C : int
        The number of channels.
    p : float
        The probability of True, in [0, 1].
    generator : torch.Generator or None
        Draws s; None: torch's default generator (on the CPU).
    device : torch.device or str
        Where s is returned.

    Returns
    -------
    torch.Tensor (C,) bool
    """
    where = generator.device if generator is not None else "cpu"
    return (torch.rand(C, generator=generator, device=where) < p).to(device)


def _local_count(x, who):
    """Values per channel of a training batch of one process (more than 1, as in batch norm)."""
    C = x.shape[1]
    total = float(x.numel() // C) if C else 0.0
    if total <= 1:
        raise ValueError(f"{who}: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(x.shape)}")
    return total


class _StochNorm(torch.autograd.Function):
    """Training StochNorm with the channel draw ``s`` given: s = 1 channels use the batch (global
    with ``comm``) statistics, s = 0 channels the running ones from before this call's update.

    One process: the masked fused kernels of ``normkit::batch_norm_train_masked`` and its backward
    (batch norm's passes, the s = 0 channels' statistics constants in the backward). With
    ``comm``: one statistics pass plus one all-reduce, running-stat update, one normalize pass
    with the selected per-channel mean/invstd; backward one reduction pass plus one all-reduce,
    then one elementwise pass with the sums zeroed on s = 0 channels. Grads are materialized: a
    synchronized rank must join the backward collective even when its own output gradient is
    undefined."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, s, eps, momentum, comm, who):
        x = kernel_input(x)
        keep = s.to(param_dtype(x.dtype))
        if comm is None:
            total = _local_count(x, who)
            y, mean, var, sel_mean, sel_invstd = _registered._batch_norm_train_masked(
                x, weight, bias, keep, running_mean, running_var, eps)
        else:
            mean, var, invstd, total = global_batch_stats(comm, x, eps, who)
            sel_mean = torch.where(s, mean, running_mean)
            sel_invstd = torch.where(s, invstd,
                                     (running_var.double() + eps).rsqrt().to(mean.dtype))
            y = torch.empty_like(x)
            _C.batch_norm_normalize(dl(x), dl(sel_mean), dl(sel_invstd), dl(weight), dl(bias),
                                    dl(y), **launch(x))
        running_mean.lerp_(mean, momentum)
        running_var.lerp_((var * (total / (total - 1))).to(mean.dtype), momentum)
        ctx.save_for_backward(x, weight, sel_mean, sel_invstd, keep)
        ctx.total, ctx.comm, ctx.who = total, comm, who
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, keep = ctx.saved_tensors
        dy = like(x, dy)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.comm is None:
            dx, local_dy, local_dy_xmu = _registered._batch_norm_train_masked_backward(
                dy, x, mean, invstd, weight, keep, need_x)
            dx = dx if need_x else None
        else:
            local_dy, local_dy_xmu, sum_dy, sum_dy_xmu = global_backward_sums(
                ctx.comm, dy, x, mean, ctx.who)
            dx = None
            if need_x:
                dx = torch.empty_like(x)
                _C.batch_norm_backward_elemt(dl(dy), dl(x), dl(mean), dl(invstd), dl(weight),
                                             dl(sum_dy * keep), dl(sum_dy_xmu * keep), ctx.total,
                                             dl(dx), **launch(x))
        dw = local_dy_xmu * invstd if need_w else None
        db = local_dy.clone() if need_b else None
        return dx, dw, db, None, None, None, None, None, None, None


def _compiled_stoch_norm(layer, x):
    """A local StochNorm layer's training forward under torch.compile, which cannot trace
    _StochNorm's DLPack calls: the channel draw by the ``draw_uniform`` op (eager's numbers from the
    layer's generator), the same masked fused kernels as the custom op ``batch_norm_train_masked``
    (its registered autograd is the backward), then the running-statistics update in torch ops."""
    who = type(layer).__name__
    C = x.shape[1]
    total = x.numel() // C
    if total <= 1:
        raise ValueError(f"{who}: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(x.shape)}")
    s = _ops.draw_uniform(x, layer._generator_key, torch.device("cpu"), [C]) < layer.p
    rm, rv = layer.running_mean, layer.running_var
    y, mean, var, _, _ = _ops.batch_norm_train_masked(x, layer.weight, layer.bias,
                                                      s.to(param_dtype(x.dtype)), rm, rv,
                                                      layer.eps)
    momentum = layer._momentum_factor()
    rm.lerp_(mean, momentum)
    rv.lerp_((var * (total / (total - 1))).to(mean.dtype), momentum)
    return y


def stoch_norm(input, running_mean, running_var, weight, bias, s, momentum=0.1, eps=1e-5,
               comm=None):
    """Training StochNorm of ``input`` (N, C, *) for a given channel draw ``s`` (a bool tensor of
    shape (C,)): channels with s True are normalized with the batch statistics (of all ranks of
    ``comm`` when given), the others with ``running_mean``/``running_var`` as they are on entry;
    then the running statistics are updated in place with the batch ones and ``momentum``.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64.
    running_mean, running_var : torch.Tensor (C,)
        Required (the s = 0 channels normalize with them); updated in place.
    weight, bias : torch.Tensor (C,) or None
        The affine parameters.
    s : torch.Tensor (C,) bool
        The channel draw (see ``draw_channels``).
    momentum : float
        Factor of the batch's statistics in the running ones.
    eps : float
        Added to the variance.
    comm : communicator or None
        Batch statistics over all ranks of this normkit communicator; None: local.

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    ValueError
        Input of fewer than 2 dims; missing running statistics; an s of the wrong dtype or shape;
        one value per channel.
    TypeError
        Statistics of another dtype or device.
    """
    if input.dim() < 2:
        raise ValueError(f"stoch_norm: expected input of shape (N, C, ...), got {input.dim()}D "
                         f"input")
    pd = param_dtype(input.dtype)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            raise ValueError(f"stoch_norm: {name} is required (the s = 0 channels use it)")
        _check_running(name, t, input, pd)
    if not isinstance(s, torch.Tensor) or s.dtype != torch.bool or s.shape != (input.shape[1],):
        got = f"{s.dtype} of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s)
        raise ValueError(f"stoch_norm: s must be a bool tensor of shape ({input.shape[1]},), got "
                         f"{got}")
    s = s.to(input.device)
    return _StochNorm.apply(input, weight, bias, running_mean, running_var, s, eps, momentum,
                            comm, "stoch_norm")


_PARAMETERS = """
    Parameters
    ----------
    num_features : int
        C, the channels of the input.
    eps : float
        Added to the variance (default 1e-5).
    momentum : float or None
        Factor of each batch's statistics in the running ones (default 0.1); None: their
        cumulative average.
    affine : bool
        Whether the layer has a per-channel weight (U(0, 1)) and bias (0) (default True).
    track_running_stats : bool
        Whether the layer keeps running statistics (default True; False: plain batch norm).
    p : float
        The probability that a channel uses the batch statistics, in [0, 1] (default 0.5).
    generator : torch.Generator or None
        Draws s and the initial weight; None: torch's default generator.
    process_group : torch.distributed.ProcessGroup or None
        Synchronizes the batch statistics over this group; not together with ``comm``.
    comm : communicator or None
        Synchronizes over this normkit communicator instead.
    device, dtype
        torch's factory arguments of the parameters and buffers.
    bias : bool
        Keyword-only: False with affine=True gives a weight and no bias.

    Raises
    ------
    ValueError
        p outside [0, 1]; both process_group and comm; a bad num_features.
    TypeError
        A generator that is not a torch.Generator; a comm that is not a communicator.
"""


class _StochNormBase(_Seeded, _NormkitBatchNorm, torch.nn.modules.batchnorm._NormBase):
    """Batch norm whose channels each pick, per training call, the batch statistics (probability
    ``p``) or the running statistics, as tllib's ``StochNorm*d``.

    Training: s = one Bernoulli(p) draw per channel per call from ``generator`` (a
    ``torch.Generator``; torch's default generator when None, so ``torch.manual_seed`` reproduces a
    run), shared by every sample and position. s = 1 channels are normalized with the batch
    statistics and get batch norm's full gradient; s = 0 channels use the running statistics as
    they were before this call's update, forward and backward (dx = weight * dy / sqrt(rv + eps)).
    Running statistics are updated once per call as in batch norm. Eval: running statistics.
    ``track_running_stats=False``: batch statistics always. Init: weight U(0, 1), bias 0.

    Synchronized with ``comm`` (a normkit communicator) or ``process_group`` (torch.distributed):
    the batch statistics are those of all ranks' batches, as ``SyncBatchNorm`` (one all-reduce
    forward, one backward, uneven and empty batches), and every rank must pass a generator seeded
    alike (or seed torch's default one alike) so that all draw the same s; no collective is spent
    on the draw. Without either, a local layer (also under torch.distributed).

    The layer compiles (``torch.compile(fullgraph=True)``, dynamic shapes) and exports (eval): a
    compiled call draws s from the same generator, so it draws eager's s. A synchronized compiled
    layer sums as a compiled ``SyncBatchNorm`` does (the global count on the device, about the
    last global mean): no empty-batch error, no second all-reduce for data far from that mean.

    Differences from tllib, all fixes: 3d training works, CPU works, ``momentum=None`` (cumulative
    average) and ``num_batches_tracked`` work, tllib's backward reads the already-updated running
    statistics (this one matches its forward), float16 input gives float16 output.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, p=0.5, generator=None, process_group=None, comm=None,
                 device=None, dtype=None, *, bias=True):
        who = type(self).__name__
        _check_generator(generator, who)
        if process_group is not None and comm is not None:
            raise ValueError(f"{who}: pass a process_group or a comm, not both")
        self.generator = generator  # before the base's __init__, whose reset_parameters draws
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.p = _check_p(p, who)
        self.process_group = process_group
        self.comm = check_communicator(comm, who)
        self._comm_size = compiled_comm_size(self.comm)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            where = self.generator.device if self.generator is not None else self.weight.device
            u = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=where)
            with torch.no_grad():  # drawn where the generator lives (a CPU one for CUDA layers)
                self.weight.copy_(u.uniform_(generator=self.generator))
                if self.bias is not None:
                    self.bias.zero_()

    def _check_input_dim(self, input):
        if input.dim() not in self._expected_ndim:
            expected = " or ".join(f"{d}D" for d in self._expected_ndim)
            raise ValueError(f"{type(self).__name__}: expected {expected} input (got "
                             f"{input.dim()}D input)")

    def _communicator(self):
        if self.comm is not None:
            return self.comm
        if self.process_group is not None:
            return TorchCommunicator(self.process_group)
        return None

    def _compiled_forward(self, input):
        """The forward under torch.compile, which cannot trace _StochNorm's DLPack calls and
        collectives: a local training layer as _compiled_stoch_norm; a synchronized one draws s
        as that does and runs the synchronized batch norm of SyncBatchNorm's compiled forward
        (device_count_batch_norm: the global count on the device, about the last global mean,
        over the comm's all-reduce op or the process group's functional collectives), s = 0
        channels with the running statistics."""
        if not self.training:
            return super().forward(input)
        if self.comm is not None:
            size = self._comm_size
        elif self.process_group is not None:
            size = torch.distributed.get_world_size(self.process_group)
        else:
            size = 1
        if size == 1:
            if not self.track_running_stats:
                return super().forward(input)
            y = _compiled_stoch_norm(self, input)
            self._count_batch()
            return y
        keep = None
        if self.track_running_stats:
            C = input.shape[1]
            s = _ops.draw_uniform(input, self._generator_key, torch.device("cpu"), [C]) < self.p
            keep = s.to(param_dtype(input.dtype))
        return device_count_batch_norm(self, input, self.process_group, self.comm, keep)

    def forward(self, input):
        self._check_input(input)
        if torch.compiler.is_compiling():
            return self._compiled_forward(input)
        comm = self._communicator() if self.training else None
        if comm is not None and comm.size == 1:
            comm = None
        if not (self.training and self.track_running_stats):
            if comm is None:  # eval, or plain batch norm without running statistics
                return super().forward(input)
            s = torch.ones(self.num_features, dtype=torch.bool, device=input.device)
            # no running stats to select or update: scratch ones, never read (s is all ones)
            rm = torch.zeros(self.num_features, dtype=param_dtype(input.dtype),
                             device=input.device)
            return _StochNorm.apply(input, self.weight, self.bias, rm, torch.ones_like(rm), s,
                                    self.eps, 0.0, comm, type(self).__name__)
        s = draw_channels(self.num_features, self.p, self.generator, input.device)
        y = _StochNorm.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                             s, self.eps, self._momentum_factor(), comm, type(self).__name__)
        self._count_batch()
        return y

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"

    def __deepcopy__(self, memo):
        for handle in (self.comm, self.process_group, self.generator):
            if handle is not None:
                memo[id(handle)] = handle
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def __getstate__(self):
        return dict(self.__dict__, comm=None, process_group=None, _generator=None)


class StochNorm1d(_StochNormBase):
    __doc__ = """tllib's ``StochNorm1d`` over (N, C) or (N, C, L) inputs, run by normkit.

    """ + _StochNormBase.__doc__ + _PARAMETERS
    _expected_ndim = (2, 3)


class StochNorm2d(_StochNormBase):
    __doc__ = """tllib's ``StochNorm2d`` over (N, C, H, W) inputs (NCHW or channels_last), run by
    normkit.

    """ + _StochNormBase.__doc__ + _PARAMETERS
    _expected_ndim = (4,)


class StochNorm3d(_StochNormBase):
    __doc__ = """tllib's ``StochNorm3d`` over (N, C, D, H, W) inputs, run by normkit (tllib's cannot
    train).

    """ + _StochNormBase.__doc__ + _PARAMETERS
    _expected_ndim = (5,)


def _stoch_kind(module):
    for bn, kind in ((torch.nn.BatchNorm1d, StochNorm1d), (torch.nn.BatchNorm2d, StochNorm2d),
                     (torch.nn.BatchNorm3d, StochNorm3d)):
        if isinstance(module, bn):
            return kind
    return None


def convert_stochnorm(module, p=0.5, generator=None, process_group=None, comm=None):
    """Replaces every ``torch.nn.BatchNorm1d/2d/3d`` (normkit's included) of ``module``'s tree by
    a StochNorm1d/2d/3d holding COPIES of its weight, bias, running statistics and
    num_batches_tracked, with the same eps, momentum, affine, track_running_stats, device, dtype
    and train/eval mode, and the given ``p`` (0 and 1 included). Returns the converted module (a
    new one when ``module`` itself is a batch norm).

    Parameters
    ----------
    module : torch.nn.Module
        Converted in place (its children replaced).
    p : float
        The StochNorms' probability, in [0, 1].
    generator : torch.Generator or None
        Shared by every StochNorm made; None: torch's default generator.
    process_group : torch.distributed.ProcessGroup or None
        The StochNorms' group.
    comm : communicator or None
        The StochNorms' normkit communicator instead.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        p outside [0, 1].
    """
    _check_p(p, "convert_stochnorm")
    kind = _stoch_kind(module)
    if kind is not None:
        src = module.weight if module.affine else module.running_mean
        out = kind(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats, p=p, generator=generator,
                   process_group=process_group, comm=comm,
                   device=None if src is None else src.device,
                   dtype=None if src is None else src.dtype, bias=module.bias is not None)
        with torch.no_grad():
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                getattr(out, name).copy_(t)
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_stochnorm(child, p, generator, process_group, comm))
    return module


convert_model = convert_stochnorm  # tllib's name

__all__ = ["StochNorm1d", "StochNorm2d", "StochNorm3d", "convert_model", "convert_stochnorm",
           "draw_channels", "stoch_norm"]
