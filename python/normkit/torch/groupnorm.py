"""Per-sample statistics on torch tensors: group norm, instance norm and IBN's InstanceBatchNorm2d,
run by normkit's group-norm kernels (``_C.group_norm_*``) through DLPack.

* ``group_norm`` / ``instance_norm`` are ``torch.nn.functional``'s (same arguments and semantics):
  statistics per (sample, group of channels) over every spatial dim, biased variance; instance
  norm is group norm with one channel per group, plus running statistics (the batch average of the
  per-instance mean and unbiased variance). Neither rides on a batch norm over a (1, N*C, ...) view.
* ``GroupNorm``, ``InstanceNorm1d/2d/3d`` are subclasses of torch's modules with ``forward``
  replaced; ``InstanceBatchNorm2d`` is tllib's IBN layer, for any planes and ratio. A documented
  difference from torch: with ``track_running_stats=True`` the instance norms count
  ``num_batches_tracked`` in training and ``momentum=None`` is the cumulative average (torch does
  neither), as normkit's batch norms do.

Outputs keep the input's memory format (channels_last stays channels_last; torch's own instance norm
returns it contiguous). Statistics and parameters are float32 for float16/bfloat16 inputs (float16
or bfloat16 weights are cast, differentiably); the backwards are once-differentiable.
"""
import math
import warnings

import torch
from torch.autograd.function import once_differentiable

from .. import _C
from ._dlpack import dl, group_workspace, kernel_input, launch, like, param_dtype
from .batchnorm import BatchNorm2d, _CountsBatches


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_input(op, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: input must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{op}: expected input of shape (N, C, ...), got {x.dim()}D input")


def _check_param(op, name, t, x):
    """weight/bias (C,); one of the input's own low precision is cast to float32 (autograd carries
    the gradient back through the cast), as torch's kernels accept it."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"{op}: {name} must have shape ({x.shape[1]},) to match the channels of "
                         f"the input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    pd = param_dtype(x.dtype)
    return t.to(pd) if t.dtype == x.dtype and t.dtype != pd else t


def _check_running(name, t, x):
    """Running statistics are updated in place by torch arithmetic, which would broadcast a (1,)
    tensor silently: check them before anything is written."""
    if t is None:
        return
    if t.shape != (x.shape[1],):
        raise ValueError(f"instance_norm: {name} must have shape ({x.shape[1]},) to match the "
                         f"channels of the input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != param_dtype(x.dtype):
        raise TypeError(f"instance_norm: {name} must be {param_dtype(x.dtype)} for {x.dtype} "
                        f"input, got {t.dtype}")
    if t.device != x.device:
        raise TypeError(f"instance_norm: {name} is on {t.device} but the input is on {x.device}")


def _spatial_size(x):
    return math.prod(x.shape[2:])


def _per_sample(x, groups):
    return torch.empty(x.shape[0], groups, dtype=param_dtype(x.dtype), device=x.device)


def _forward_batch(x, weight, bias, groups, eps):
    """y and the (N, G) mean, biased var and rstd of x's own statistics."""
    y = torch.empty_like(x)
    mean, var, rstd = _per_sample(x, groups), _per_sample(x, groups), _per_sample(x, groups)
    _C.group_norm_forward(dl(x), dl(weight), dl(bias), float(eps), dl(y), dl(mean), dl(var),
                          dl(rstd), **launch(x, group_workspace(groups)))
    return y, mean, var, rstd


def _forward_running(x, weight, bias, running_mean, running_var, eps):
    """y normalized per channel with running statistics: the (N, C) mean it used, the (C,) rstd
    and the (N, C) scale ``weight * rstd`` (the backward's dx coefficient)."""
    N, C = x.shape[:2]
    rstd = (running_var + eps).rsqrt_()
    scale = (rstd if weight is None else weight * rstd).expand(N, C).contiguous()
    shift = (torch.zeros_like(rstd) if bias is None else bias).expand(N, C).contiguous()
    mean = running_mean.expand(N, C).contiguous()
    y = torch.empty_like(x)
    _C.group_norm_affine(dl(x), dl(mean), dl(scale), dl(shift), dl(y), **launch(x))
    return y, mean, rstd, scale


class _Stats:
    """What a forward normalized with: x's own (N, G) statistics, or running ones (per channel)."""

    def __init__(self, groups, mean, rstd, scale=None):
        self.groups, self.mean, self.rstd, self.scale = groups, mean, rstd, scale
        self.running = scale is not None


def _forward(x, weight, bias, groups, eps, running_mean=None, running_var=None,
             use_input_stats=True, momentum=0.1):
    """(kernel input, y, stats); updates the running statistics (when given and training)."""
    x = kernel_input(x)
    if not use_input_stats:
        y, mean, rstd, scale = _forward_running(x, weight, bias, running_mean, running_var, eps)
        return x, y, _Stats(groups, mean, rstd, scale)
    y, mean, var, rstd = _forward_batch(x, weight, bias, groups, eps)
    if x.numel():
        S = x.numel() // (x.shape[0] * x.shape[1])
        if running_mean is not None:
            running_mean.lerp_(mean.mean(0), momentum)
        if running_var is not None:
            running_var.lerp_(var.mean(0).mul_(S / (S - 1)), momentum)
    return x, y, _Stats(groups, mean, rstd)


def _per_channel(t, channels):
    """An (N, G) statistic repeated over the C/G channels of each group: (N, C)."""
    return t.repeat_interleave(channels // t.shape[1], dim=1) if t.shape[1] != channels else t


def _backward(dy, x, weight, st, need_x, need_w, need_b):
    """dx (through the statistics when they are x's own), dweight, dbias."""
    N, C = x.shape[:2]
    dy = like(x, dy)
    dx = torch.empty_like(x) if need_x else None
    sum_dy = torch.empty(N, C, dtype=st.mean.dtype, device=x.device)
    sum_dy_xmu = torch.empty_like(sum_dy)
    if not st.running:
        # One fused pass: the sums (the parameter gradients' ingredients) and dx.
        _C.group_norm_backward(dl(dy), dl(x), dl(st.mean), dl(st.rstd), dl(weight), dl(dx),
                               dl(sum_dy), dl(sum_dy_xmu), **launch(x, group_workspace(st.groups)))
        rstd = _per_channel(st.rstd, C)
    else:
        # Running statistics are constants: dx = weight * rstd * dy.
        if need_x:
            _C.group_norm_backward_elemt(dl(dy), dl(x), dl(st.mean), dl(st.scale), None, None,
                                         dl(dx), **launch(x))
        if need_w or need_b:
            _C.group_norm_backward_reduce(dl(dy), dl(x), dl(st.mean), dl(sum_dy), dl(sum_dy_xmu),
                                          **launch(x, group_workspace(C)))
        rstd = st.rstd
    dw = (sum_dy_xmu * rstd).sum(0) if need_w else None
    db = sum_dy.sum(0) if need_b else None
    return dx, dw, db


class _PerSampleNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, running_mean, running_var, use_input_stats,
                momentum):
        ctx.set_materialize_grads(False)
        x, y, st = _forward(x, weight, bias, groups, eps, running_mean, running_var,
                            use_input_stats, momentum)
        ctx.save_for_backward(x, weight)
        ctx.stats = st
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None or not (need_x or need_w or need_b):
            return (None,) * 9
        x, weight = ctx.saved_tensors
        return (*_backward(dy, x, weight, ctx.stats, need_x, need_w, need_b),) + (None,) * 6


def _run(x, weight, bias, groups, eps, running_mean=None, running_var=None, use_input_stats=True,
         momentum=0.0):
    args = (x, weight, bias, groups, eps, running_mean, running_var, use_input_stats, momentum)
    if _wants_grad(x, weight, bias):
        return _PerSampleNorm.apply(*args)
    return _forward(*args)[1]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` run by normkit: each sample of an (N, C, *) tensor
    normalized over groups of C / num_groups channels and every spatial dim, then a per-channel
    ``weight`` and ``bias`` (either may be None)."""
    _check_input("group_norm", input)
    C = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive integer, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"group_norm: the {C} channels of the input of shape "
                         f"{tuple(input.shape)} are not divisible into {num_groups} groups")
    if input.numel() and input.numel() // num_groups == 1:
        # torch's own check (one value to normalize when the batch is one sample).
        raise ValueError(f"group_norm: expected more than 1 value per group when training, got "
                         f"input of shape {tuple(input.shape)} with {num_groups} groups")
    weight = _check_param("group_norm", "weight", weight, input)
    bias = _check_param("group_norm", "bias", bias, input)
    return _run(input, weight, bias, num_groups, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` run by normkit: each (sample, channel) of an
    (N, C, *) tensor normalized over its spatial dims. With ``use_input_stats`` the input's own
    statistics normalize and ``running_mean``/``running_var`` (if given) are updated in place with
    the batch average of the per-instance mean and unbiased variance; otherwise the running
    statistics normalize."""
    _check_input("instance_norm", input)
    _check_running("running_mean", running_mean, input)
    _check_running("running_var", running_var, input)
    if use_input_stats:
        if input.numel() and _spatial_size(input) == 1:
            raise ValueError(f"instance_norm: expected more than 1 spatial element when "
                             f"training, got input of shape {tuple(input.shape)}")
    elif running_mean is None or running_var is None:
        raise ValueError("instance_norm: use_input_stats=False needs running_mean and "
                         "running_var")
    weight = _check_param("instance_norm", "weight", weight, input)
    bias = _check_param("instance_norm", "bias", bias, input)
    return _run(input, weight, bias, input.shape[1], eps, running_mean, running_var,
                bool(use_input_stats), momentum)


# --- modules ------------------------------------------------------------------------------------

class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` over (N, C, *) inputs, run by normkit (a subclass: same constructor,
    ``bias=False`` included, parameters and state_dict)."""

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _NormkitInstanceNorm(_CountsBatches):
    """The forward of torch's ``_InstanceNorm`` (its checks, unbatched input) with normkit's
    ``instance_norm`` in place of torch's.

    With ``track_running_stats=True`` it differs from torch on purpose: training counts
    ``num_batches_tracked`` (torch leaves it at 0) and ``momentum=None`` is the cumulative average
    (torch then never moves the running statistics), as in the batch-norm layers.
    """

    def forward(self, input):
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"{type(self).__name__}({self.num_features}): expected input's "
                                 f"size at dim={feature_dim} to match num_features, got input "
                                 f"of shape {tuple(input.shape)}")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You "
                          "can silence this warning by not passing in num_features, which is "
                          "not used because affine=False", stacklevel=2)
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = self.training or not self.track_running_stats
        y = instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                          use_input_stats, self._momentum_factor(), self.eps)
        self._count_batch()
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_NormkitInstanceNorm, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` over (N, C, L) or unbatched (C, L) inputs, run by normkit
    (running statistics as in ``_NormkitInstanceNorm``)."""


class InstanceNorm2d(_NormkitInstanceNorm, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` over (N, C, H, W) (NCHW or channels_last) or unbatched
    (C, H, W) inputs, run by normkit (running statistics as in ``_NormkitInstanceNorm``)."""


class InstanceNorm3d(_NormkitInstanceNorm, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` over (N, C, D, H, W) (NCDHW or channels_last_3d) or unbatched
    (C, D, H, W) inputs, run by normkit (running statistics as in ``_NormkitInstanceNorm``)."""


class InstanceBatchNorm2d(torch.nn.Module):
    """IBN-Net's layer, a drop-in for tllib's ``tllib.normalization.ibn.InstanceBatchNorm2d``: the
    first ``half = int(planes * ratio)`` channels through ``InstanceNorm2d(half, affine=True)``
    (submodule ``IN``), the other ``planes - half`` through ``BatchNorm2d`` (``BN``), concatenated.

    Same state_dict keys (``IN.weight``, ``IN.bias``, ``BN.*``). Unlike upstream, which splits with
    ``torch.split(x, half)`` and fails when ``planes - half > half``, any planes and ratio in
    [0, 1] work; ``half = 0`` (or ``half = planes``) leaves ``IN`` (or ``BN``) None. As upstream,
    the attribute ``half`` hides ``Module.half()`` on this module (a parent's ``.half()`` works).
    ``convert_sync_batchnorm`` converts the BN half."""

    def __init__(self, planes, ratio=0.5):
        super().__init__()
        if isinstance(planes, bool) or not isinstance(planes, int) or planes < 1:
            raise ValueError(f"InstanceBatchNorm2d: planes must be a positive integer, got "
                             f"{planes!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"InstanceBatchNorm2d: ratio must be in [0, 1], got {ratio!r}")
        self.planes = planes
        self.half = int(planes * ratio)
        self.IN = InstanceNorm2d(self.half, affine=True) if self.half else None
        self.BN = BatchNorm2d(planes - self.half) if planes > self.half else None

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.planes:
            raise ValueError(f"InstanceBatchNorm2d({self.planes}): expected input of shape "
                             f"(N, {self.planes}, H, W), got {tuple(x.shape)}")
        if self.IN is None:
            return self.BN(x)
        if self.BN is None:
            return self.IN(x)
        return torch.cat((self.IN(x[:, :self.half]), self.BN(x[:, self.half:])), 1)

    def extra_repr(self):
        return f"planes={self.planes}, half={self.half}"


__all__ = ["GroupNorm", "InstanceBatchNorm2d", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "group_norm", "instance_norm"]
