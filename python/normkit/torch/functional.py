"""Batch norm on torch tensors: normkit's core ops as torch custom ops (``torch.ops.normkit.*``,
registered with fake kernels and backwards in normkit.torch._ops, so torch.compile and
torch.export see them), over DLPack.
(The Encoding family's ops, ``scaled_l2``, ``aggregate`` and ``encoding``, live in
``normkit.torch.encoding``, the per-sample family's ``group_norm`` and ``instance_norm`` in
``normkit.torch.groupnorm``; they are exported here too.)

* ``batch_norm`` is ``torch.nn.functional.batch_norm`` (same arguments, same semantics: biased
  variance to normalize, unbiased variance into ``running_var``).
* ``batchnormtrain`` / ``batchnormeval`` are PyTorch-Encoding's functional form
  ``(x - mean) / std * gamma + beta`` with a given mean and std; train differentiates through mean
  and std, eval treats them as constants.

Outputs are allocated by torch in the input's memory format (channels_last stays channels_last);
parameters and statistics have the input's dtype, float32 for float16 inputs. The backwards are
once-differentiable (double backward raises a RuntimeError).
"""
import torch

from . import _ops as _registered  # (also defines torch.ops.normkit)
from ._dlpack import param_dtype
from .encoding import aggregate, encoding, scaled_l2
from .groupnorm import group_norm, instance_norm

_ops = torch.ops.normkit


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


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_params(op, x, pd, **tensors):
    """Input dtype and the parameters' shapes, dtypes and devices, named by the public function
    (the core's own checks would name an internal kernel)."""
    if x.layout != torch.strided:
        raise TypeError(f"{op}: normkit takes strided CPU and CUDA tensors, got a {x.layout} "
                        f"tensor on {x.device}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: input has dtype {x.dtype}; normkit takes float16, bfloat16, "
                        f"float32 and float64 tensors")
    shape, device = (x.shape[1],), x.device  # (each x.device is a new object)
    for name, t in tensors.items():
        if t is None:
            continue
        if t.shape != shape:
            raise ValueError(f"{op}: {name} must have shape ({x.shape[1]},) to match the channels "
                             f"of the input of shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != pd:
            raise TypeError(f"{op}: {name} must be {str(pd)[6:]} for {str(x.dtype)[6:]} input, "
                            f"got {str(t.dtype)[6:]}")
        if t.device != device:
            raise TypeError(f"{op}: {name} is on {t.device} but the input is on {x.device}")


def _blend(running, batch, momentum):
    """running <- (1 - momentum) * running + momentum * batch, in float64 and in the order of the
    eager kernel's update (src/batchnorm.cpp, update_running), so that both give the same bits."""
    running.copy_(running.double() * (1 - momentum) + batch.double() * momentum)


def _update_running(running_mean, running_var, mean, var, n, momentum):
    """The running statistics' update of the op path (torch.compile, where inductor fuses it into
    one kernel, and dispatch modes); the eager path has the kernel do it."""
    if not n:
        return
    if running_mean is not None:
        _blend(running_mean, mean, momentum)
    if running_var is not None:
        _blend(running_var, var.double() * (n / (n - 1)), momentum)


class _EagerBatchNormTrain(torch.autograd.Function):
    """The eager path of training batch norm: the same kernels as the custom ops
    ``normkit::batch_norm_train`` / ``batch_norm_train_backward``, in a Function with one output.
    Autograd's bookkeeping of the op's four outputs (three marked non-differentiable) cost
    ~200 us per forward+backward on small layers; torch.compile and torch.export still see the
    custom ops (``_forward_train`` picks them while compiling). The arguments that are not
    differentiated come as one tuple ``running`` (running_mean, running_var, momentum): each
    argument of ``apply`` costs autograd bookkeeping."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running):
        ctx.set_materialize_grads(False)
        y, mean, _, invstd = _registered.train_forward(x, weight, bias, eps, running)
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None or not (need_x or need_w or need_b):
            return None, None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        # The backward op's kernel, without the op's dispatch; with create_graph (grad mode on)
        # through the op, so that differentiating it (double backward) is its clear error.
        backward = (_ops.batch_norm_train_backward if torch.is_grad_enabled()
                    else _registered._batch_norm_train_backward)
        dx, dweight, dbias = backward(dy, x, mean, invstd, weight, need_x)
        return (dx if need_x else None, dweight if need_w else None, dbias if need_b else None,
                None, None)


def _forward_train(x, weight, bias, running_mean, running_var, momentum, eps):
    """y; updates the running statistics (unbiased variance) in place. An empty batch gives an
    empty output and leaves them alone, as in torch."""
    C = x.shape[1]
    n = x.numel() // C if C else 0
    if n == 1:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got "
                         f"input of shape {tuple(x.shape)}")
    eps = float(eps)
    if not _registered.runs_directly(x):
        y, mean, var, _ = _ops.batch_norm_train(x, weight, bias, eps)
        _update_running(running_mean, running_var, mean, var, n, momentum)
        return y
    running = (running_mean, running_var, float(momentum))
    if _registered.records_graph(x, weight, bias):
        return _EagerBatchNormTrain.apply(x, weight, bias, eps, running)
    return _registered.train_forward(x, weight, bias, eps, running)[0]


def check_eps(eps, training):
    """eps as torch.nn.functional.batch_norm checks it (same messages): positive in training,
    non-negative in eval."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` run by normkit: per-channel batch norm of an (N, C, *)
    tensor. In training the batch statistics normalize and ``running_mean``/``running_var`` (if
    given) are updated in place with ``momentum``; otherwise the running statistics normalize.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64; contiguous or channels_last.
    running_mean, running_var : torch.Tensor (C,) or None
        Updated in place in training; required in eval.
    weight, bias : torch.Tensor (C,) or None
        The affine parameters (float32 for half-precision input).
    training : bool
        Batch statistics (True) or the running ones.
    momentum : float
        Factor of the batch's statistics in the running ones.
    eps : float
        Added to the variance: positive in training, non-negative in eval (as torch).

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    ValueError
        A bad eps; input of fewer than 2 dims; eval without running statistics; one value per
        channel in training.
    TypeError
        Parameters or statistics of another dtype or device.
    """
    check_eps(eps, training)
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected input of shape (N, C, ...), got {input.dim()}D "
                         f"input")
    pd = param_dtype(input.dtype)
    _check_params("batch_norm", input, pd, weight=weight, bias=bias)
    _check_running("running_mean", running_mean, input, pd)
    _check_running("running_var", running_var, input, pd)
    if training:
        return _forward_train(input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and "
                         "running_var")
    # Running statistics are constants here (buffers): nothing differentiates through them.
    invstd = (running_var + eps).rsqrt()
    if _registered.runs_directly(input) and not _registered.records_graph(
            input, running_mean, invstd, weight, bias):
        return _registered._batch_norm_normalize(input, running_mean, invstd, weight, bias)
    return _ops.batch_norm_normalize(input, running_mean, invstd, weight, bias)


# --- PyTorch-Encoding's functional form (seed 001): given mean and std ----------------------------

def _check_given(op, input, gamma, beta, mean, std):
    for name, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("std", std)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if input.dim() < 2:
        raise ValueError(f"{op}: expected input of shape (N, C, ...), got {input.dim()}D input")
    _check_params(op, input, param_dtype(input.dtype), gamma=gamma, beta=beta, mean=mean, std=std)


def batchnormtrain(input, gamma, beta, mean, std):
    """``(input - mean) / std * gamma + beta`` per channel of an (N, C, *) tensor (PyTorch-Encoding
    documents (N, C) and (N, C, L)); gradients reach input, gamma, beta, mean and std.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64.
    gamma, beta : torch.Tensor (C,)
        The affine parameters (float32 for half-precision input).
    mean, std : torch.Tensor (C,)
        The statistics (std > 0).

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    TypeError
        An argument that is not a tensor, or of another dtype or device.
    ValueError
        Input of fewer than 2 dims, or shapes that do not fit.
    """
    _check_given("batchnormtrain", input, gamma, beta, mean, std)
    return _ops.batch_norm_normalize(input, mean, torch.reciprocal(std), gamma, beta)


def batchnormeval(input, gamma, beta, mean, std):
    """As ``batchnormtrain``, but ``mean`` and ``std`` are constants: no gradient reaches them.

    Parameters
    ----------
    input : torch.Tensor (N, C, *)
        float16, bfloat16, float32 or float64.
    gamma, beta : torch.Tensor (C,)
        The affine parameters (float32 for half-precision input).
    mean, std : torch.Tensor (C,)
        The statistics (std > 0).

    Returns
    -------
    torch.Tensor like input

    Raises
    ------
    TypeError
        An argument that is not a tensor, or of another dtype or device.
    ValueError
        Input of fewer than 2 dims, or shapes that do not fit.
    """
    _check_given("batchnormeval", input, gamma, beta, mean, std)
    return _ops.batch_norm_normalize(input, mean.detach(), torch.reciprocal(std.detach()), gamma,
                                     beta)


__all__ = ["aggregate", "batch_norm", "batchnormeval", "batchnormtrain", "encoding", "group_norm",
           "instance_norm", "scaled_l2"]
