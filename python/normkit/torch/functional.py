"""Batch norm on torch tensors: ``torch.autograd.Function``s over normkit's core, through DLPack.
(The Encoding family's ops, ``scaled_l2``, ``aggregate`` and ``encoding``, live in
``normkit.torch.encoding``, the per-sample family's ``group_norm`` and ``instance_norm`` in
``normkit.torch.groupnorm``; they are exported here too.)

* ``batch_norm`` is ``torch.nn.functional.batch_norm`` (same arguments, same semantics: biased
  variance to normalize, unbiased variance into ``running_var``).
* ``batchnormtrain`` / ``batchnormeval`` are PyTorch-Encoding's functional form
  ``(x - mean) / std * gamma + beta`` with a given mean and std; train differentiates through mean
  and std, eval treats them as constants.

Outputs are allocated by torch in the input's memory format (channels_last stays channels_last);
parameters and statistics have the input's dtype, float32 for float16 inputs. When no gradient is
wanted (``torch.no_grad``, or nothing requires grad) the ops run without autograd's bookkeeping.
The backwards are once-differentiable and honour undefined output gradients (their Functions set
``set_materialize_grads(False)``, so nothing is allocated for a gradient that is zero).
"""
import torch
from torch.autograd.function import once_differentiable

from .. import _C
from ._dlpack import batch_workspace, dl, kernel_input, launch, like, param_dtype
from .encoding import aggregate, encoding, scaled_l2
from .groupnorm import group_norm, instance_norm


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_running(name, t, x, dtype):
    """Running statistics are updated in place by torch arithmetic, which would broadcast a (1,)
    tensor silently: check them before anything is written."""
    if t is None:
        return
    if t.shape != (x.shape[1],):
        raise ValueError(f"batch_norm: {name} must have shape ({x.shape[1]},) to match the "
                         f"channels of the input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"batch_norm: {name} must be {dtype} for {x.dtype} input, got {t.dtype}")
    if t.device != x.device:
        raise TypeError(f"batch_norm: {name} is on {t.device} but the input is on {x.device}")


def _forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """y, batch mean and invstd; updates the running statistics (unbiased variance) in place.
    An empty batch gives an empty output and leaves them alone, as in torch."""
    C = x.shape[1]
    n = x.numel() // C if C else 0
    if n == 1:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(x.shape)}")
    pd = param_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(C, dtype=pd, device=x.device)
    var = torch.empty(C, dtype=pd, device=x.device)
    invstd = torch.empty(C, dtype=pd, device=x.device)
    _C.batch_norm_forward_train(dl(x), dl(weight), dl(bias), float(eps), dl(y), dl(mean), dl(var),
                                dl(invstd), **launch(x, batch_workspace))
    if running_mean is not None and n:
        running_mean.lerp_(mean, momentum)
    if running_var is not None and n:
        running_var.lerp_(var.mul_(n / (n - 1)), momentum)
    return y, mean, invstd


def _forward_eval(x, weight, bias, running_mean, running_var, eps):
    """y normalized with the running statistics, their mean and invstd."""
    invstd = (running_var + eps).rsqrt_()
    y = torch.empty_like(x)
    _C.batch_norm_normalize(dl(x), dl(running_mean), dl(invstd), dl(weight), dl(bias), dl(y),
                            **launch(x))
    return y, running_mean, invstd


def check_eps(eps, training):
    """eps as torch.nn.functional.batch_norm checks it (same messages): positive in training,
    non-negative in eval."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _forward(x, weight, bias, running_mean, running_var, training, momentum, eps):
    check_eps(eps, training)
    if x.dim() < 2:
        raise ValueError(f"batch_norm: expected input of shape (N, C, ...), got {x.dim()}D input")
    pd = param_dtype(x.dtype)
    _check_running("running_mean", running_mean, x, pd)
    _check_running("running_var", running_var, x, pd)
    x = kernel_input(x)
    if training:
        return (x, *_forward_train(x, weight, bias, running_mean, running_var, momentum, eps))
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and "
                         "running_var")
    return (x, *_forward_eval(x, weight, bias, running_mean, running_var, eps))


def _param_grads(sum_dy, sum_dy_xmu, invstd, need_weight, need_bias):
    return (sum_dy_xmu.mul_(invstd) if need_weight else None), (sum_dy if need_bias else None)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        ctx.set_materialize_grads(False)
        x, y, mean, invstd = _forward(x, weight, bias, running_mean, running_var, training,
                                      momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.training = training
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None or not (need_x or need_w or need_b):
            return (None,) * 8
        x, weight, mean, invstd = ctx.saved_tensors
        dy = like(x, dy)
        dx = torch.empty_like(x) if need_x else None
        sum_dy = torch.empty_like(mean)
        sum_dy_xmu = torch.empty_like(mean)
        if ctx.training:
            # One fused pass: the sums (which the parameter gradients are) and dx through the batch
            # statistics.
            _C.batch_norm_backward_train(dl(dy), dl(x), dl(mean), dl(invstd), dl(weight), dl(dx),
                                         dl(sum_dy), dl(sum_dy_xmu),
                                         **launch(x, batch_workspace))
        else:
            # Running statistics are constants: dx = weight * invstd * dy.
            if need_x:
                _C.batch_norm_backward_elemt(dl(dy), dl(x), dl(mean), dl(invstd), dl(weight), None,
                                             None, 0.0, dl(dx), **launch(x))
            if need_w or need_b:
                _C.batch_norm_backward_reduce(dl(dy), dl(x), dl(mean), dl(sum_dy), dl(sum_dy_xmu),
                                              **launch(x, batch_workspace))
        dw, db = _param_grads(sum_dy, sum_dy_xmu, invstd, need_w, need_b)
        return dx, dw, db, None, None, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` run by normkit: per-channel batch norm of an (N, C, *)
    tensor. In training the batch statistics normalize and ``running_mean``/``running_var`` (if
    given) are updated in place with ``momentum``; otherwise the running statistics normalize."""
    if _wants_grad(input, weight, bias):
        return _BatchNorm.apply(input, weight, bias, running_mean, running_var, training, momentum,
                                eps)
    return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)[1]


# --- PyTorch-Encoding's functional form (seed 001): given mean and std ----------------------------

def _check_given(op, gamma, beta, mean, std):
    for name, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("std", std)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def _normalize_given(x, gamma, beta, mean, std):
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {x.dim()}D input")
    x = kernel_input(x)
    invstd = torch.reciprocal(std)
    y = torch.empty_like(x)
    _C.batch_norm_normalize(dl(x), dl(mean), dl(invstd), dl(gamma), dl(beta), dl(y), **launch(x))
    return x, y, invstd


class _BatchNormGiven(torch.autograd.Function):
    """y = (x - mean) / std * gamma + beta; ``through_stats`` says whether mean and std get
    gradients (batchnormtrain) or are constants (batchnormeval)."""

    @staticmethod
    def forward(ctx, x, gamma, beta, mean, std, through_stats):
        ctx.set_materialize_grads(False)
        x, y, invstd = _normalize_given(x, gamma, beta, mean, std)
        ctx.save_for_backward(x, gamma, mean, invstd)
        ctx.through_stats = through_stats
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_x, need_g, need_b, need_m, need_s = ctx.needs_input_grad[:5]
        through = ctx.through_stats
        need_m, need_s = need_m and through, need_s and through
        if dy is None:
            return (None,) * 6
        x, gamma, mean, invstd = ctx.saved_tensors
        dy = like(x, dy)
        dx = None
        if need_x:
            # The direct path only: mean and std are inputs, their own gradients chain onwards.
            dx = torch.empty_like(x)
            _C.batch_norm_backward_elemt(dl(dy), dl(x), dl(mean), dl(invstd), dl(gamma), None, None,
                                         0.0, dl(dx), **launch(x))
        dg = db = dm = ds = None
        if need_g or need_b or need_m or need_s:
            sum_dy, sum_dy_xmu = torch.empty_like(mean), torch.empty_like(mean)
            _C.batch_norm_backward_reduce(dl(dy), dl(x), dl(mean), dl(sum_dy), dl(sum_dy_xmu),
                                          **launch(x, batch_workspace))
            scale = gamma * invstd
            if need_m:
                dm = -scale * sum_dy
            if need_s:
                ds = -scale * invstd * sum_dy_xmu
            dg, db = _param_grads(sum_dy, sum_dy_xmu, invstd, need_g, need_b)
        return dx, dg, db, dm, ds, None


def batchnormtrain(input, gamma, beta, mean, std):
    """``(input - mean) / std * gamma + beta`` per channel of an (N, C, *) tensor (PyTorch-Encoding
    documents (N, C) and (N, C, L)); gradients reach input, gamma, beta, mean and std."""
    _check_given("batchnormtrain", gamma, beta, mean, std)
    if _wants_grad(input, gamma, beta, mean, std):
        return _BatchNormGiven.apply(input, gamma, beta, mean, std, True)
    return _normalize_given(input, gamma, beta, mean, std)[1]


def batchnormeval(input, gamma, beta, mean, std):
    """As ``batchnormtrain``, but ``mean`` and ``std`` are constants: no gradient reaches them."""
    _check_given("batchnormeval", gamma, beta, mean, std)
    if _wants_grad(input, gamma, beta):
        return _BatchNormGiven.apply(input, gamma, beta, mean, std, False)
    return _normalize_given(input, gamma, beta, mean, std)[1]


__all__ = ["aggregate", "batch_norm", "batchnormeval", "batchnormtrain", "encoding", "group_norm",
           "instance_norm", "scaled_l2"]
