"""Per-sample statistics on torch tensors: group norm, instance norm and IBN's InstanceBatchNorm2d,
run by normkit's group-norm kernels as torch custom ops (``torch.ops.normkit.group_norm_*``, see
normkit.torch._ops), which torch.compile and torch.export see.

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

from . import _ops as _registered  # (also defines torch.ops.normkit)
from ._dlpack import param_dtype
from .batchnorm import BatchNorm2d, _CountsBatches

_ops = torch.ops.normkit


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


class _EagerGroupNormTrain(torch.autograd.Function):
    """The eager path of ``normkit::group_norm_train`` when autograd records it: the op's kernels
    in a Function with one output, y (mean and var are appended to the list ``stats``), as
    normkit.torch.functional's ``_EagerBatchNormTrain``: autograd's bookkeeping of the op's
    three non-differentiable outputs costs more than the kernels on small inputs."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, stats):
        ctx.set_materialize_grads(False)
        y, mean, var, rstd = _registered._group_norm_train(x, groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        stats.append((mean, var))
        return y

    @staticmethod
    def backward(ctx, dy):
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        if dy is None or not (need_x or need_w or need_b):
            return (None,) * 6
        x, weight, mean, rstd = ctx.saved_tensors
        # The backward op's kernel, without the op's dispatch; with create_graph (grad mode on)
        # through the op, so that differentiating it (double backward) is its clear error.
        backward = (_ops.group_norm_train_backward if torch.is_grad_enabled()
                    else _registered._group_norm_train_backward)
        dx, sum_dy, sum_dy_xmu = backward(dy, x, mean, rstd, weight, need_x)
        dw, db = _registered.group_norm_param_grads(sum_dy, sum_dy_xmu, rstd, need_w, need_b)
        return (dx if need_x else None), None, dw, db, None, None


def _group_norm_train(x, groups, weight, bias, eps):
    """y, mean, var of ``normkit::group_norm_train``; in eager mode without the op's dispatch."""
    if not _registered.runs_directly(x):
        return _ops.group_norm_train(x, groups, weight, bias, eps)[:3]
    if _registered.records_graph(x, weight, bias):
        stats = []
        y = _EagerGroupNormTrain.apply(x, groups, weight, bias, eps, stats)
        return (y, *stats[0])
    return _registered._group_norm_train(x, groups, weight, bias, eps)[:3]


def _run_batch(x, weight, bias, groups, eps, running_mean=None, running_var=None, momentum=0.0):
    """y normalized with x's own (N, G) statistics; updates the running statistics (when given)
    with the batch average of the per-instance mean and unbiased variance."""
    y, mean, var = _group_norm_train(x, groups, weight, bias, float(eps))
    if x.numel():
        S = _spatial_size(x) * (x.shape[1] // groups)
        if running_mean is not None:
            running_mean.lerp_(mean.mean(0), momentum)
        if running_var is not None:
            running_var.lerp_(var.mean(0).mul_(S / (S - 1)), momentum)
    return y


def _run_running(x, weight, bias, running_mean, running_var, eps):
    """y normalized per channel with the running statistics (constants: no gradient reaches
    them). weight and bias reach the op's (N, C) scale and shift through torch ops, which carry
    their gradients."""
    N, C = x.shape[:2]
    rstd = (running_var + eps).rsqrt()
    scale = (rstd if weight is None else weight * rstd).expand(N, C).contiguous()
    shift = (torch.zeros_like(rstd) if bias is None else bias).expand(N, C).contiguous()
    mean = running_mean.expand(N, C).contiguous()
    if _registered.runs_directly(x) and not _registered.records_graph(x, mean, scale, shift):
        return _registered._group_norm_affine(x, mean, scale, shift)
    return _ops.group_norm_affine(x, mean, scale, shift)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm`` run by normkit: each sample of an (N, C, *) tensor
    normalized over groups of C / num_groups channels and every spatial dim, then a per-channel
    ``weight`` and ``bias`` (either may be None).

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64; contiguous or channels_last.
    num_groups : int
        G, dividing C.
    weight, bias : torch.Tensor (C,) or None
        The affine parameters (float32 for half-precision input).
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    ValueError
        G not a positive int dividing C; one value per group; parameters of another shape.
    TypeError
        Parameters of another dtype or device.
    """
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
    return _run_batch(input, weight, bias, num_groups, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm`` run by normkit: each (sample, channel) of an
    (N, C, *) tensor normalized over its spatial dims. With ``use_input_stats`` the input's own
    statistics normalize and ``running_mean``/``running_var`` (if given) are updated in place with
    the batch average of the per-instance mean and unbiased variance; otherwise the running
    statistics normalize.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64.
    running_mean, running_var : torch.Tensor (C,) or None
        Updated in place with ``use_input_stats``; required without it.
    weight, bias : torch.Tensor (C,) or None
        The affine parameters.
    use_input_stats : bool
        Per-instance statistics (True) or the running ones.
    momentum : float
        Factor of the batch's statistics in the running ones.
    eps : float
        Added to the variance.

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    ValueError
        One spatial value with ``use_input_stats``; ``use_input_stats=False`` without running
        statistics; statistics or parameters of another shape.
    TypeError
        Statistics or parameters of another dtype or device.
    """
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
    if not use_input_stats:
        return _run_running(input, weight, bias, running_mean, running_var, eps)
    return _run_batch(input, weight, bias, input.shape[1], eps, running_mean, running_var,
                      momentum)


# --- modules ------------------------------------------------------------------------------------

class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` over (N, C, *) inputs, run by normkit (a subclass: same constructor,
    ``bias=False`` included, parameters and state_dict).

    Parameters
    ----------
    num_groups : int
        G, dividing num_channels.
    num_channels : int
        C, the channels of the input.
    eps : float
        Added to the variance (default 1e-5).
    affine : bool
        Whether the layer has a per-channel weight (ones) and bias (zeros) (default True).
    device, dtype
        torch's factory arguments of the parameters (float32 by default).
    bias : bool
        Keyword-only: False with affine=True keeps the weight only.

    Shape
    -----
    (N, C, *) -> (N, C, *), in the input's memory format.
    """

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


_INSTANCE_NORM_PARAMETERS = """
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
        Whether the layer has a per-channel weight and bias (default False).
    track_running_stats : bool
        Whether the layer keeps running statistics, used in eval (default False).
    device, dtype
        torch's factory arguments of the parameters and buffers.
    bias : bool
        Keyword-only: False with affine=True keeps the weight only.
"""


class InstanceNorm1d(_NormkitInstanceNorm, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` over (N, C, L) or unbatched (C, L) inputs, run by normkit
    (running statistics as in ``_NormkitInstanceNorm``).
    """
    __doc__ += _INSTANCE_NORM_PARAMETERS


class InstanceNorm2d(_NormkitInstanceNorm, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` over (N, C, H, W) (NCHW or channels_last) or unbatched
    (C, H, W) inputs, run by normkit (running statistics as in ``_NormkitInstanceNorm``).
    """
    __doc__ += _INSTANCE_NORM_PARAMETERS


class InstanceNorm3d(_NormkitInstanceNorm, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` over (N, C, D, H, W) (NCDHW or channels_last_3d) or unbatched
    (C, D, H, W) inputs, run by normkit (running statistics as in ``_NormkitInstanceNorm``).
    """
    __doc__ += _INSTANCE_NORM_PARAMETERS


class InstanceBatchNorm2d(torch.nn.Module):
    """IBN-Net's layer, a drop-in for tllib's ``tllib.normalization.ibn.InstanceBatchNorm2d``: the
    first ``half = int(planes * ratio)`` channels through ``InstanceNorm2d(half, affine=True)``
    (submodule ``IN``), the other ``planes - half`` through ``BatchNorm2d`` (``BN``), concatenated.

    Same state_dict keys (``IN.weight``, ``IN.bias``, ``BN.*``). Unlike upstream, which splits with
    ``torch.split(x, half)`` and fails when ``planes - half > half``, any planes and ratio in
    [0, 1] work; ``half = 0`` (or ``half = planes``) leaves ``IN`` (or ``BN``) None. As upstream,
    the attribute ``half`` hides ``Module.half()`` on this module (a parent's ``.half()`` works).
    ``convert_sync_batchnorm`` converts the BN half.

    Parameters
    ----------
    planes : int
        C, the channels of the input.
    ratio : float
        The share of channels instance-normalized, in [0, 1].

    Shape
    -----
    (N, planes, H, W) -> (N, planes, H, W).

    Raises
    ------
    ValueError
        planes not a positive int, or ratio outside [0, 1].
    """

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
