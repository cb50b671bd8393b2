"""BatchNorm1d/2d/3d: torch.nn.BatchNorm*d run by normkit's kernels.

Each layer *is* a ``torch.nn.BatchNorm*d`` (a subclass) with only ``forward`` replaced, so that it
swaps in anywhere torch's is used: same constructor, parameters and buffers (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), state_dict keys and loading (old
checkpoints without ``num_batches_tracked`` included), ``isinstance`` checks of model code, ``.to``,
``.double()``, ``torch.save`` and ``copy.deepcopy``.
"""
import torch

from . import functional as F
from .._backend import check_num_features
from ._dlpack import param_dtype


class _CountsBatches:
    """Running statistics of torch's ``_NormBase`` layers as normkit updates them. The counter
    moves only after a forward has passed its checks: callers take ``_momentum_factor()`` before
    the op and call ``_count_batch()`` after it."""

    def _counts(self):
        """Whether this forward counts a training batch in num_batches_tracked."""
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _momentum_factor(self):
        """The factor of this batch's statistics in the running ones (see _momentum_with)."""
        return self._momentum_with(self.num_batches_tracked if self._counts() else None)

    def _momentum_with(self, counter):
        """momentum, or for momentum=None 1 / (the count including this batch): the cumulative
        average; ``counter`` is num_batches_tracked where this forward counts a batch, else
        None."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(counter) + 1) if counter is not None else 0.0

    def _count_batch(self):
        if self._counts():
            self.num_batches_tracked.add_(1)


class _NormkitBatchNorm(_CountsBatches):
    """The forward of torch's ``_BatchNorm`` with normkit's ``batch_norm`` in place of torch's."""

    def __init__(self, num_features, *args, **kwargs):
        # torch's own message for a bad num_features is torch.empty's ("argument 'size' must be
        # tuple of ints"): name the argument instead.
        super().__init__(check_num_features(type(self).__name__, num_features), *args, **kwargs)

    def _check_input(self, input):
        own = self.weight
        self._check_input_with(input, own if own is not None else self.running_mean)

    def _check_input_with(self, input, own):
        """The input's dims and channels, and ``own`` (the weight, else running_mean, else None)
        of the input's parameter dtype."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}): input has "
                             f"{input.shape[1]} channels (shape {tuple(input.shape)})")
        if own is not None and own.dtype != param_dtype(input.dtype):
            raise TypeError(f"{type(self).__name__}: {input.dtype} input needs "
                            f"{param_dtype(input.dtype)} parameters, this layer's are {own.dtype} "
                            f"(convert it with .to(dtype))")

    def forward(self, input):
        # The layer's state straight from its tables: each Module.__getattr__ costs ~0.5 us (five
        # per call otherwise). Reparametrized state (a parametrization's property, old-style
        # weight_norm's attribute) is not in the tables: read as attributes then.
        params, buffers = self._parameters, self._buffers
        own = ("weight" in params and "bias" in params and "running_mean" in buffers
               and "running_var" in buffers and "num_batches_tracked" in buffers)
        if own:
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        else:
            weight, bias = self.weight, self.bias
            running_mean, running_var = self.running_mean, self.running_var
        self._check_input_with(input, weight if weight is not None else running_mean)
        training = self.training
        # Batch statistics in training, and in eval when there are no running ones.
        batch_stats = training or (running_mean is None and running_var is None)
        # Running statistics are updated only when tracked, and read only in eval; the counter
        # (_CountsBatches: None where this forward counts no batch) moves only after the op has
        # passed its checks.
        counter = None
        if training:
            if self.track_running_stats:
                counter = buffers["num_batches_tracked"] if own else self.num_batches_tracked
            else:
                running_mean = running_var = None
        y = F.batch_norm(input, running_mean, running_var, weight, bias, batch_stats,
                         self._momentum_with(counter), self.eps)
        if counter is not None:
            counter.add_(1)
        return y


class BatchNorm1d(_NormkitBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) inputs, run by normkit.

    Parameters
    ----------
    num_features : int
        C, the channels of the input (a positive int; else a ValueError or TypeError naming it).
    *args, **kwargs
        Forwarded to ``torch.nn.BatchNorm1d``: eps=1e-5, momentum=0.1 (None: cumulative
        average), affine=True, track_running_stats=True, device=None, dtype=None (float32, or
        float64; float16/bfloat16 inputs take float32 parameters), keyword-only bias=True.
    """


class BatchNorm2d(_NormkitBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` over (N, C, H, W) inputs (NCHW or channels_last), run by normkit.

    Parameters
    ----------
    num_features : int
        C, the channels of the input (a positive int; else a ValueError or TypeError naming it).
    *args, **kwargs
        Forwarded to ``torch.nn.BatchNorm2d``: eps=1e-5, momentum=0.1 (None: cumulative
        average), affine=True, track_running_stats=True, device=None, dtype=None (float32, or
        float64; float16/bfloat16 inputs take float32 parameters), keyword-only bias=True.
    """


class BatchNorm3d(_NormkitBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` over (N, C, D, H, W) inputs (NCDHW or channels_last_3d), run by
    normkit.

    Parameters
    ----------
    num_features : int
        C, the channels of the input (a positive int; else a ValueError or TypeError naming it).
    *args, **kwargs
        Forwarded to ``torch.nn.BatchNorm3d``: eps=1e-5, momentum=0.1 (None: cumulative
        average), affine=True, track_running_stats=True, device=None, dtype=None (float32, or
        float64; float16/bfloat16 inputs take float32 parameters), keyword-only bias=True.
    """


# help() shows the constructor's parameters: torch's own documentation of them, which holds here.
for _layer in (BatchNorm1d, BatchNorm2d, BatchNorm3d):
    _upstream = getattr(torch.nn, _layer.__name__)
    _layer.__doc__ = (f"{_layer.__doc__}\n    Notes\n    -----\n    torch's documentation, which "
                      f"holds here:\n\n    {_upstream.__doc__ or ''}")
del _layer, _upstream

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
