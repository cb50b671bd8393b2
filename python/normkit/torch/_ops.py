"""normkit's core ops as ``torch.library`` custom ops (``torch.ops.normkit.*``), so that
``torch.compile`` (fullgraph, dynamic shapes), ``torch.export`` and AOTAutograd see each core call
as one opaque node instead of a DLPack capsule they cannot trace.

Every op has four parts, all in this module:

* a schema (``_lib.define``): functional (no input is written), every output a new tensor;
* the real kernel (``_impl``, for CPU and CUDA tensors): hands the tensors to ``normkit._C``
  through DLPack, as the autograd Functions of normkit.torch did before;
* a fake kernel (``_fake``): the outputs' shapes, dtypes, devices *and strides* computed from the
  inputs' alone (no data), exactly as the real kernel allocates them (torch.library.opcheck checks
  this);
* autograd (``torch.library.register_autograd``): the backward formula, written with other ops of
  this module (so that compiled backwards are traced too), or ``_once_differentiable`` for ops that
  are themselves backward halves. Setups call ``ctx.set_materialize_grads(False)``, so an
  undefined output gradient arrives as None and allocates nothing.

The registration is ``torch.library.Library`` with explicit schemas rather than
``torch.library.custom_op``: the same fake and autograd machinery, without custom_op's per-call
Python wrapper (the eager overhead that benchmarks/bench_torch.py reports).

Collectives stay outside the kernel ops: SyncBatchNorm calls ``batch_norm_stats``, all-reduces,
then ``batch_norm_normalize`` (and the two backward halves around a second all-reduce). Under
torch.compile the all-reduce of a normkit communicator (which dynamo cannot trace) is an op of
its own, ``allreduce_sum`` (at the end of this module).

Adding an op family (e.g. group_norm_* core ops)
------------------------------------------------
1. ``_lib.define("group_norm_forward(Tensor x, int groups, Tensor? weight, Tensor? bias, "
   "float eps) -> (Tensor y, Tensor mean, Tensor invstd)")`` -- functional schema; optional
   tensors are ``Tensor?``; a gradient that is not wanted is passed as a ``bool need_*`` flag and
   returned as ``_absent(x)`` (an empty tensor: schemas cannot return None).
2. ``@_impl("group_norm_forward")`` -- allocate outputs with torch (``_empty(x)`` keeps the
   input's layout), call ``_C.<op>(dl(...), ..., **launch(x, <family>_workspace))``, return them.
   Use ``kernel_input(x)`` for inputs the kernels cannot read in place and ``_as_input(x, y)`` to
   give the output x's layout back.
3. ``@_fake("group_norm_forward")`` -- the same allocations, no kernel call.
4. ``_autograd("group_norm_forward", backward, setup_context)`` with backward written in
   ``torch.ops.normkit.*`` calls, or ``_once_differentiable("group_norm_backward")`` for a
   backward op.
5. Call ``torch.ops.normkit.group_norm_forward`` from the functional module, and add an opcheck
   case to tests/test_torch_compile.py (OPCHECK_CASES).
"""
import importlib
import weakref

import torch

from .. import _C
from torch.utils.dlpack import to_dlpack

from ._dlpack import (_CHANNELS_LAST, batch_workspace, dl, dl_written, group_workspace,
                      kernel_input, launch, like, param_dtype)

_lib = torch.library.Library("normkit", "DEF")
# The forward ops' kernels read any layout and their outputs follow the input's (see _empty): with
# this tag inductor hands them its own choice (channels_last around convolutions) instead of a copy
# in the strides of the eager trace (its default for custom ops). The backward ops keep the
# default: given the layouts inductor picks for x and dy they can differ (a channels_last x, the
# contiguous gradient of a model's output), and the kernel's own copy of dy would cost more than
# inductor's fused one. (Measured again on the small CNN of benchmarks/bench_torch.py: with the tag
# on batch_norm_train_backward inductor no longer copies x and dx around it, but the op then runs
# the slower channels-last kernels and copies the last layer's dy itself; no faster, within the
# noise of a shared machine. Measured once more after the flat channels-last kernels, six runs
# each way alternated: a median 16.15 ms both ways; still no faster.)
_ANY_LAYOUT = (torch.Tag.flexible_layout,)
_ops = torch.ops.normkit


def _impl(name):
    """Registers the decorated function as the real kernel of ``normkit::name`` for CPU and CUDA
    tensors."""
    def register(fn):
        _lib.impl(name, fn, "CPU")
        _lib.impl(name, fn, "CUDA")
        return fn
    return register


def _fake(name):
    return torch.library.register_fake(f"normkit::{name}", lib=_lib)


def _autograd(name, backward, setup_context):
    torch.library.register_autograd(f"normkit::{name}", backward, setup_context=setup_context,
                                    lib=_lib)


def _once_differentiable(name):
    """A backward op: differentiating it (double backward) is a clear error, as for the
    once-differentiable autograd Functions of torch's own batch norm."""
    def backward(ctx, *grads):
        raise RuntimeError(f"normkit::{name} is a backward op and is not differentiable "
                           f"(double backward through normkit's layers is not supported)")
    _autograd(name, backward, lambda ctx, inputs, output: None)


def runs_directly(x):
    """Whether a call on ``x`` may run the real kernels below (``_batch_norm_train``, ...) itself,
    skipping the dispatch of ``torch.ops.normkit`` (~10 us of Python per op): for plain tensors
    in eager mode. Under torch.compile/export, functorch transforms, dispatch modes (fake tensors,
    op counters), on meta tensors and tensor subclasses calls go through the ops."""
    return (type(x) is torch.Tensor and not x.is_meta and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._len_torch_dispatch_stack())


def records_graph(*tensors):
    """Whether autograd records a call on ``tensors`` (None entries are absent arguments)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop: any() over a generator costs twice as much per eager call)
        if t is not None and t.requires_grad:
            return True
    return False


def _absent(x):
    """The output of a gradient that was not asked for."""
    return x.new_empty(0)


def _empty(x):
    """An output shaped like ``x``: ``torch.empty_like(x)``, but with plain contiguous or
    channels-last strides whenever ``x`` is one of those (a size-1 dim of ``x`` may carry any
    stride, e.g. after ``unsqueeze``, which inductor then cannot order under dynamic shapes)."""
    # (empty_like with a memory format: a third of the cost of allocating from x.shape)
    if x.is_contiguous():
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x, memory_format=fmt)
    return torch.empty_like(x)


def _as_input(x, y):
    """``y`` (laid out like the kernels' copy of ``x``) in ``x``'s own layout: what the fake
    kernels promise, ``_empty(x)``. Only layouts the kernels cannot read are copied."""
    if y.stride() == x.stride():
        # y = _empty(x) (the kernels read x in place; a copy of x would have other strides)
        return y
    out = _empty(x)
    if y.stride() == out.stride():
        return y
    return out.copy_(y)


def _stats(x):
    """Per-channel statistics tensors of ``x`` (its parameter dtype)."""
    return x.new_empty(x.shape[1], dtype=param_dtype(x.dtype))


# --- batch norm -----------------------------------------------------------------------------------

# The training forward is functional (register_autograd takes no op that writes an input): under
# torch.compile the running statistics' update is the caller's torch ops, which inductor fuses
# into its next kernel. The eager path, which runs the kernels without the op, has the kernel
# update them (train_forward). The backward returns the parameter gradients themselves.
_lib.define("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps) "
            "-> (Tensor y, Tensor mean, Tensor var, Tensor invstd)", tags=_ANY_LAYOUT)
_lib.define("batch_norm_train_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, "
            "Tensor? weight, bool need_input) -> (Tensor dx, Tensor dweight, Tensor dbias)")
_lib.define("batch_norm_stats(Tensor x) -> (Tensor mean, Tensor var)", tags=_ANY_LAYOUT)
_lib.define("batch_norm_normalize(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
            "Tensor? bias) -> Tensor", tags=_ANY_LAYOUT)
_lib.define("batch_norm_backward_reduce(Tensor dy, Tensor x, Tensor mean) "
            "-> (Tensor sum_dy, Tensor sum_dy_xmu)")
_lib.define("batch_norm_backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor invstd, "
            "Tensor? weight, Tensor? sum_dy, Tensor? sum_dy_xmu, float count) -> Tensor")


def train_forward(x, weight, bias, eps, running=None):
    """y, the batch mean, biased variance and invstd: the fused training forward. With
    ``running`` = (running_mean, running_var, momentum) (either tensor may be None) the kernel
    updates those in place (unbiased variance, as torch) and var is None: not computed."""
    xk = kernel_input(x)
    C, pd = x.shape[1], param_dtype(x.dtype)
    y, mean, invstd = _empty(xk), x.new_empty(C, dtype=pd), x.new_empty(C, dtype=pd)
    if running is None:
        var = x.new_empty(C, dtype=pd)
        running_mean = running_var = None
        momentum = 0.0
    else:
        var = None
        running_mean, running_var, momentum = running
    # (outputs allocated here are plain tensors: to_dlpack without dl's checks)
    _C.batch_norm_forward_train(dl(xk), dl(weight), dl(bias), eps, to_dlpack(y), to_dlpack(mean),
                                None if var is None else to_dlpack(var), to_dlpack(invstd),
                                dl_written(running_mean), dl_written(running_var), momentum,
                                **launch(xk, batch_workspace))
    # (y = _empty(x) when the kernels read x itself: what the fake kernel promises)
    return (y if xk is x else _as_input(x, y)), mean, var, invstd


@_impl("batch_norm_train")
def _batch_norm_train(x, weight, bias, eps):
    """y, the batch mean, biased variance and invstd: the fused training forward."""
    return train_forward(x, weight, bias, eps)


@_fake("batch_norm_train")
def _(x, weight, bias, eps):
    return _empty(x), _stats(x), _stats(x), _stats(x)


def _batch_norm_train_setup(ctx, inputs, output):
    x, weight = inputs[:2]
    _, mean, var, invstd = output
    ctx.mark_non_differentiable(mean, var, invstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, invstd)


def _batch_norm_train_grad(ctx, dy, *_):
    x, weight, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None:
        return None, None, None, None
    dx, dweight, dbias = _ops.batch_norm_train_backward(dy, x, mean, invstd, weight, need_x)
    return dx if need_x else None, dweight if need_w else None, dbias if need_b else None, None


_autograd("batch_norm_train", _batch_norm_train_grad, _batch_norm_train_setup)


@_impl("batch_norm_train_backward")
def _batch_norm_train_backward(dy, x, mean, invstd, weight, need_input):
    """dx through the batch statistics (when ``need_input``), dweight and dbias, in one fused
    pass."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    dx = _empty(xk) if need_input else None
    dweight, dbias = torch.empty_like(mean), torch.empty_like(mean)
    _C.batch_norm_backward_train(dl(dy), dl(xk), dl(mean), dl(invstd), dl(weight), dl(dx),
                                 to_dlpack(dbias), None, to_dlpack(dweight),
                                 **launch(xk, batch_workspace))
    if not need_input:
        return _absent(x), dweight, dbias
    return (dx if xk is x else _as_input(x, dx)), dweight, dbias


@_fake("batch_norm_train_backward")
def _(dy, x, mean, invstd, weight, need_input):
    dx = _empty(x) if need_input else _absent(x)
    return dx, torch.empty_like(mean), torch.empty_like(mean)


_once_differentiable("batch_norm_train_backward")


# StochNorm for one process: batch_norm_train's passes with a per-channel choice (use_batch, 1/0 in
# the parameter dtype) between the batch statistics and the running ones, which are read here and
# updated by the caller afterwards.
_lib.define("batch_norm_train_masked(Tensor x, Tensor? weight, Tensor? bias, Tensor use_batch, "
            "Tensor running_mean, Tensor running_var, float eps) -> (Tensor y, Tensor mean, "
            "Tensor var, Tensor used_mean, Tensor used_invstd)")
_lib.define("batch_norm_train_masked_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, "
            "Tensor? weight, Tensor use_batch, bool need_input) "
            "-> (Tensor dx, Tensor sum_dy, Tensor sum_dy_xmu)")


@_impl("batch_norm_train_masked")
def _batch_norm_train_masked(x, weight, bias, use_batch, running_mean, running_var, eps):
    """y; the batch mean and biased variance of every channel (for the running update); the mean
    and invstd each channel was normalized with (for the backward)."""
    xk = kernel_input(x)
    y, mean, var, used_mean, used_invstd = _empty(xk), _stats(x), _stats(x), _stats(x), _stats(x)
    _C.batch_norm_forward_train_masked(dl(xk), dl(weight), dl(bias), dl(use_batch),
                                       dl(running_mean), dl(running_var), eps, dl(y), dl(mean),
                                       dl(var), dl(used_mean), dl(used_invstd),
                                       **launch(xk, batch_workspace))
    return _as_input(x, y), mean, var, used_mean, used_invstd


@_fake("batch_norm_train_masked")
def _(x, weight, bias, use_batch, running_mean, running_var, eps):
    return _empty(x), _stats(x), _stats(x), _stats(x), _stats(x)


def _batch_norm_train_masked_setup(ctx, inputs, output):
    x, weight, _, use_batch, _, _, _ = inputs
    _, mean, var, used_mean, used_invstd = output
    ctx.mark_non_differentiable(mean, var, used_mean, used_invstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, used_mean, used_invstd, use_batch)


def _batch_norm_train_masked_grad(ctx, dy, *_):
    x, weight, mean, invstd, use_batch = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None:
        return (None,) * 7
    dx, sum_dy, sum_dy_xmu = _ops.batch_norm_train_masked_backward(dy, x, mean, invstd, weight,
                                                                   use_batch, need_x)
    return (dx if need_x else None, sum_dy_xmu * invstd if need_w else None,
            sum_dy if need_b else None, None, None, None, None)


_autograd("batch_norm_train_masked", _batch_norm_train_masked_grad,
          _batch_norm_train_masked_setup)


@_impl("batch_norm_train_masked_backward")
def _batch_norm_train_masked_backward(dy, x, mean, invstd, weight, use_batch, need_input):
    """dx (when ``need_input``: through the batch statistics where use_batch is 1, through
    constants elsewhere) and the per-channel sums of every channel, in one fused pass."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    dx = _empty(xk) if need_input else None
    sum_dy, sum_dy_xmu = torch.empty_like(mean), torch.empty_like(mean)
    _C.batch_norm_backward_train_masked(dl(dy), dl(xk), dl(mean), dl(invstd), dl(weight),
                                        dl(use_batch), dl(dx), dl(sum_dy), dl(sum_dy_xmu),
                                        **launch(xk, batch_workspace))
    return (_as_input(x, dx) if need_input else _absent(x)), sum_dy, sum_dy_xmu


@_fake("batch_norm_train_masked_backward")
def _(dy, x, mean, invstd, weight, use_batch, need_input):
    dx = _empty(x) if need_input else _absent(x)
    return dx, torch.empty_like(mean), torch.empty_like(mean)


_once_differentiable("batch_norm_train_masked_backward")


@_impl("batch_norm_stats")
def _batch_norm_stats(x):
    """Per-channel mean and biased variance of one process's batch."""
    xk = kernel_input(x)
    mean, var = _stats(x), _stats(x)
    _C.batch_norm_stats(dl(xk), dl(mean), dl(var), **launch(xk, batch_workspace))
    return mean, var


@_fake("batch_norm_stats")
def _(x):
    return _stats(x), _stats(x)


_once_differentiable("batch_norm_stats")


@_impl("batch_norm_normalize")
def _batch_norm_normalize(x, mean, invstd, weight, bias):
    """``(x - mean) * invstd * weight + bias`` per channel, with given statistics."""
    xk = kernel_input(x)
    y = _empty(xk)
    _C.batch_norm_normalize(dl(xk), dl(mean), dl(invstd), dl(weight), dl(bias), dl(y),
                            **launch(xk))
    return _as_input(x, y)


@_fake("batch_norm_normalize")
def _(x, mean, invstd, weight, bias):
    return _empty(x)


def _batch_norm_normalize_setup(ctx, inputs, output):
    x, mean, invstd, weight, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, invstd, weight)


def _batch_norm_normalize_grad(ctx, dy):
    """Gradients to all five inputs: the statistics are inputs (eval batch norm differentiates
    nothing through them; batchnormtrain chains their gradients onwards)."""
    x, mean, invstd, weight = ctx.saved_tensors
    need_x, need_m, need_i, need_w, need_b = ctx.needs_input_grad
    dx = dm = di = dw = db = None
    if dy is None:
        return dx, dm, di, dw, db
    if need_x:
        # The direct path only: dx = weight * invstd * dy.
        dx = _ops.batch_norm_backward_elemt(dy, x, mean, invstd, weight, None, None, 0.0)
    if need_m or need_i or need_w or need_b:
        sum_dy, sum_dy_xmu = _ops.batch_norm_backward_reduce(dy, x, mean)
        scale = invstd if weight is None else weight * invstd
        dm = -scale * sum_dy if need_m else None
        di = (sum_dy_xmu if weight is None else weight * sum_dy_xmu) if need_i else None
        dw = sum_dy_xmu * invstd if need_w else None
        db = sum_dy if need_b else None
    return dx, dm, di, dw, db


_autograd("batch_norm_normalize", _batch_norm_normalize_grad, _batch_norm_normalize_setup)


@_impl("batch_norm_backward_reduce")
def _batch_norm_backward_reduce(dy, x, mean):
    """Per-channel ``sum dy`` and ``sum dy * (x - mean)``."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    sum_dy, sum_dy_xmu = torch.empty_like(mean), torch.empty_like(mean)
    _C.batch_norm_backward_reduce(dl(dy), dl(xk), dl(mean), dl(sum_dy), dl(sum_dy_xmu),
                                  **launch(xk, batch_workspace))
    return sum_dy, sum_dy_xmu


@_fake("batch_norm_backward_reduce")
def _(dy, x, mean):
    return torch.empty_like(mean), torch.empty_like(mean)


_once_differentiable("batch_norm_backward_reduce")


@_impl("batch_norm_backward_elemt")
def _batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """``weight * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count)``;
    without the sums, ``weight * invstd * dy``."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    dx = _empty(xk)
    _C.batch_norm_backward_elemt(dl(dy), dl(xk), dl(mean), dl(invstd), dl(weight), dl(sum_dy),
                                 dl(sum_dy_xmu), count, dl(dx), **launch(xk))
    return _as_input(x, dx)


@_fake("batch_norm_backward_elemt")
def _(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    return _empty(x)


_once_differentiable("batch_norm_backward_elemt")


# --- the Encoding family: the core's fused kernels between torch's matrix products -------------
# (the layout helpers are normkit.torch.encoding's; imported late, as that module imports this)

_lib.define("scaled_l2(Tensor X, Tensor C, Tensor s) -> (Tensor SL, Tensor D2)")
_lib.define("scaled_l2_backward(Tensor dSL, Tensor X, Tensor C, Tensor s, Tensor D2, "
            "bool need_X, bool need_C) -> (Tensor dX, Tensor dC, Tensor ds)")
_lib.define("encoding(Tensor X, Tensor C, Tensor s) -> (Tensor E, Tensor A, Tensor D2)")
_lib.define("encoding_backward(Tensor dE, Tensor X, Tensor C, Tensor s, Tensor A, Tensor D2, "
            "bool need_X, bool need_C) -> (Tensor dX, Tensor dC, Tensor ds)")


def _enc():
    # (normkit.torch.encoding as a module: the package's attribute `encoding` is the function)
    return importlib.import_module(".encoding", __package__)


def _features_like(X):
    """A new (B, N, D) tensor stored as the products write X's gradient."""
    B, N, D = X.shape
    if _enc()._n_major(X):
        return X.new_empty((B, D, N)).transpose(1, 2)
    return X.new_empty((B, N, D))


@_impl("scaled_l2")
def _scaled_l2(X, C, s):
    return _enc()._scaled_l2_forward(X, C, s)[:2]


@_fake("scaled_l2")
def _(X, C, s):
    bnk = _enc()._bnk(X, C.shape[0], _enc()._n_major(X))
    return bnk, torch.empty_like(bnk)


def _scaled_l2_setup(ctx, inputs, output):
    X, C, s = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(X, C, s, output[1])


def _scaled_l2_grad(ctx, dSL, _):
    if dSL is None:
        return None, None, None
    X, C, s, D2 = ctx.saved_tensors
    need_x, need_c, need_s = ctx.needs_input_grad
    dX, dC, ds = _ops.scaled_l2_backward(dSL, X, C, s, D2, need_x, need_c)
    return (dX if need_x else None), (dC if need_c else None), (ds if need_s else None)


_autograd("scaled_l2", _scaled_l2_grad, _scaled_l2_setup)


@_impl("scaled_l2_backward")
def _scaled_l2_backward(dSL, X, C, s, D2, need_X, need_C):
    dX, dC, ds = _enc()._scaled_l2_backward(dSL, X, C, s, D2, need_X, need_C)
    return (_absent(X) if dX is None else dX), (_absent(C) if dC is None else dC), ds


@_fake("scaled_l2_backward")
def _(dSL, X, C, s, D2, need_X, need_C):
    return (_features_like(X) if need_X else _absent(X),
            C.new_empty(C.shape) if need_C else _absent(C), C.new_empty(C.shape[0]))


_once_differentiable("scaled_l2_backward")


@_impl("encoding")
def _encoding(X, C, s):
    return _enc()._encoding_forward(X, C, s)[:3]


@_fake("encoding")
def _(X, C, s):
    B, K, D = X.shape[0], C.shape[0], C.shape[1]
    bnk = _enc()._bnk(X, K, _enc()._n_major(X))
    return X.new_empty((B, K, D)), bnk, torch.empty_like(bnk)


def _encoding_setup(ctx, inputs, output):
    X, C, s = inputs
    _, A, D2 = output
    ctx.mark_non_differentiable(A, D2)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(X, C, s, A, D2)


def _encoding_grad(ctx, dE, *_):
    if dE is None:
        return None, None, None
    X, C, s, A, D2 = ctx.saved_tensors
    need_x, need_c, need_s = ctx.needs_input_grad
    dX, dC, ds = _ops.encoding_backward(dE, X, C, s, A, D2, need_x, need_c)
    return (dX if need_x else None), (dC if need_c else None), (ds if need_s else None)


_autograd("encoding", _encoding_grad, _encoding_setup)


@_impl("encoding_backward")
def _encoding_backward(dE, X, C, s, A, D2, need_X, need_C):
    dX, dC, ds = _enc()._encoding_backward(dE, X, C, s, A, D2, need_X, need_C)
    return (_absent(X) if dX is None else dX), (_absent(C) if dC is None else dC), ds


@_fake("encoding_backward")
def _(dE, X, C, s, A, D2, need_X, need_C):
    return (_features_like(X) if need_X else _absent(X),
            C.new_empty(C.shape) if need_C else _absent(C), C.new_empty(C.shape[0]))


_once_differentiable("encoding_backward")


# --- group norm: per-sample statistics (group_norm, instance_norm, IBN's instance half) ----------
# Statistics are (N, G); the sums of the backwards and the coefficients of the affine are (N, C).
# The core infers the groups from the shape of `mean`.

_lib.define("group_norm_train(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps) "
            "-> (Tensor y, Tensor mean, Tensor var, Tensor rstd)", tags=_ANY_LAYOUT)
_lib.define("group_norm_train_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, "
            "Tensor? weight, bool need_input) -> (Tensor dx, Tensor sum_dy, Tensor sum_dy_xmu)")
_lib.define("group_norm_affine(Tensor x, Tensor mean, Tensor scale, Tensor shift) -> Tensor",
            tags=_ANY_LAYOUT)
_lib.define("group_norm_backward_reduce(Tensor dy, Tensor x, Tensor mean) "
            "-> (Tensor sum_dy, Tensor sum_dy_xmu)")
_lib.define("group_norm_backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor a) -> Tensor")


def _per_sample(x, groups):
    """(N, groups) statistics or sums of ``x`` (its parameter dtype)."""
    return torch.empty(x.shape[0], groups, dtype=param_dtype(x.dtype), device=x.device)


@_impl("group_norm_train")
def _group_norm_train(x, groups, weight, bias, eps):
    """y and the (N, G) mean, biased var and rstd of x's own statistics, in one fused pass."""
    xk = kernel_input(x)
    y = _empty(xk)
    mean, var, rstd = _per_sample(x, groups), _per_sample(x, groups), _per_sample(x, groups)
    _C.group_norm_forward(dl(xk), dl(weight), dl(bias), eps, dl(y), dl(mean), dl(var), dl(rstd),
                          **launch(xk, group_workspace(groups)))
    return _as_input(x, y), mean, var, rstd


@_fake("group_norm_train")
def _(x, groups, weight, bias, eps):
    return _empty(x), _per_sample(x, groups), _per_sample(x, groups), _per_sample(x, groups)


def _group_norm_train_setup(ctx, inputs, output):
    x, _, weight, _, _ = inputs
    _, mean, var, rstd = output
    ctx.mark_non_differentiable(mean, var, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, rstd)


def _group_norm_train_grad(ctx, dy, *_):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    if dy is None:
        return None, None, None, None, None
    dx, sum_dy, sum_dy_xmu = _ops.group_norm_train_backward(dy, x, mean, rstd, weight, need_x)
    dw, db = group_norm_param_grads(sum_dy, sum_dy_xmu, rstd, need_w, need_b)
    return (dx if need_x else None), None, dw, db, None


def group_norm_param_grads(sum_dy, sum_dy_xmu, rstd, need_w, need_b):
    """dweight and dbias (None where not needed) from the (N, C) sums of the backward."""
    dw = db = None
    if need_w:
        # sum over n of sum_dy_xmu[n, c] * rstd[n, g(c)]: the channels of a group are adjacent.
        N, C = sum_dy_xmu.shape
        G = rstd.shape[1]
        dw = (sum_dy_xmu.view(N, G, C // G) * rstd.unsqueeze(2)).sum(0).view(C)
    if need_b:
        db = sum_dy.sum(0)
    return dw, db


_autograd("group_norm_train", _group_norm_train_grad, _group_norm_train_setup)


@_impl("group_norm_train_backward")
def _group_norm_train_backward(dy, x, mean, rstd, weight, need_input):
    """dx through the (N, G) statistics (when ``need_input``) and the (N, C) sums the parameter
    gradients are made of, in one fused pass."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    dx = _empty(xk) if need_input else None
    sum_dy, sum_dy_xmu = _per_sample(x, x.shape[1]), _per_sample(x, x.shape[1])
    _C.group_norm_backward(dl(dy), dl(xk), dl(mean), dl(rstd), dl(weight), dl(dx), dl(sum_dy),
                           dl(sum_dy_xmu), **launch(xk, group_workspace(mean.shape[1])))
    return (_as_input(x, dx) if need_input else _absent(x)), sum_dy, sum_dy_xmu


@_fake("group_norm_train_backward")
def _(dy, x, mean, rstd, weight, need_input):
    dx = _empty(x) if need_input else _absent(x)
    return dx, _per_sample(x, x.shape[1]), _per_sample(x, x.shape[1])


_once_differentiable("group_norm_train_backward")


@_impl("group_norm_affine")
def _group_norm_affine(x, mean, scale, shift):
    """``(x - mean[n, g]) * scale[n, c] + shift[n, c]``: instance norm with given (running)
    statistics."""
    xk = kernel_input(x)
    y = _empty(xk)
    _C.group_norm_affine(dl(xk), dl(mean), dl(scale), dl(shift), dl(y), **launch(xk))
    return _as_input(x, y)


@_fake("group_norm_affine")
def _(x, mean, scale, shift):
    return _empty(x)


def _group_norm_affine_setup(ctx, inputs, output):
    x, mean, scale, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mean, scale)


def _group_norm_affine_grad(ctx, dy):
    """Gradients to all four inputs (a weight and bias reach scale and shift through the torch
    ops that built them)."""
    x, mean, scale = ctx.saved_tensors
    need_x, need_m, need_sc, need_sh = ctx.needs_input_grad
    dx = dm = dsc = dsh = None
    if dy is None:
        return dx, dm, dsc, dsh
    if need_x:
        # The statistics are inputs, not functions of x: dx = scale * dy.
        dx = _ops.group_norm_backward_elemt(dy, x, mean, scale)
    if need_m or need_sc or need_sh:
        sum_dy, sum_dy_xmu = _ops.group_norm_backward_reduce(dy, x, mean)
        if need_m:
            N, C = scale.shape
            G = mean.shape[1]
            dm = -(scale * sum_dy).view(N, G, C // G).sum(2)
        dsc = sum_dy_xmu if need_sc else None
        dsh = sum_dy if need_sh else None
    return dx, dm, dsc, dsh


_autograd("group_norm_affine", _group_norm_affine_grad, _group_norm_affine_setup)


@_impl("group_norm_backward_reduce")
def _group_norm_backward_reduce(dy, x, mean):
    """Per-(n, c) ``sum dy`` and ``sum dy * (x - mean[n, g(c)])``."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    sum_dy, sum_dy_xmu = _per_sample(x, x.shape[1]), _per_sample(x, x.shape[1])
    _C.group_norm_backward_reduce(dl(dy), dl(xk), dl(mean), dl(sum_dy), dl(sum_dy_xmu),
                                  **launch(xk, group_workspace(mean.shape[1])))
    return sum_dy, sum_dy_xmu


@_fake("group_norm_backward_reduce")
def _(dy, x, mean):
    return _per_sample(x, x.shape[1]), _per_sample(x, x.shape[1])


_once_differentiable("group_norm_backward_reduce")


@_impl("group_norm_backward_elemt")
def _group_norm_backward_elemt(dy, x, mean, a):
    """``a[n, c] * dy``: dx with the statistics held constant (the core's b and c terms absent)."""
    xk = kernel_input(x)
    dy = like(xk, dy)
    dx = _empty(xk)
    _C.group_norm_backward_elemt(dl(dy), dl(xk), dl(mean), dl(a), None, None, dl(dx),
                                 **launch(xk))
    return _as_input(x, dx)


@_fake("group_norm_backward_elemt")
def _(dy, x, mean, a):
    return _empty(x)


_once_differentiable("group_norm_backward_elemt")


# --- weight standardization: per channel of dim 0 of a convolution's weight ---------------------

_lib.define("ws_standardize(Tensor w, Tensor? gain, int convention, float eps) "
            "-> (Tensor w_hat, Tensor mean, Tensor rstd)")
_lib.define("ws_standardize_backward(Tensor dw_hat, Tensor w, Tensor? gain, Tensor mean, "
            "Tensor rstd, int convention, float eps, bool need_w, bool need_gain) "
            "-> (Tensor dw, Tensor dgain)")


def _ws_weight(w):
    """``w`` when the core reads its layout (contiguous or channels-last), else a contiguous copy
    (the weight kernels take no other strides)."""
    if w.is_contiguous():
        return w
    fmt = _CHANNELS_LAST.get(w.dim())
    return w if fmt is not None and w.is_contiguous(memory_format=fmt) else w.contiguous()


def _per_filter(w):
    """(C,) statistics of a weight (C, ...) (its parameter dtype)."""
    return w.new_empty(w.shape[0], dtype=param_dtype(w.dtype))


@_impl("ws_standardize")
def _ws_standardize(w, gain, convention, eps):
    """``(w - mean) * gain * rstd`` per channel of dim 0, and that mean and rstd."""
    wk = _ws_weight(w)
    w_hat, mean, rstd = _empty(wk), _per_filter(w), _per_filter(w)
    _C.ws_standardize_forward(dl(wk), dl(gain), convention, eps, dl(w_hat), dl(mean), dl(rstd),
                              **launch(wk))
    return _as_input(w, w_hat), mean, rstd


@_fake("ws_standardize")
def _(w, gain, convention, eps):
    return _empty(w), _per_filter(w), _per_filter(w)


def _ws_standardize_setup(ctx, inputs, output):
    w, gain, convention, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(w, gain, mean, rstd)
    ctx.convention, ctx.eps = convention, eps


def _ws_standardize_grad(ctx, dw_hat, *_, backward=None):
    """The gradients of ws_standardize's inputs, through the backward op, or through
    ``backward`` (its kernel, for an eager caller that records no graph) when given."""
    need_w, need_g = ctx.needs_input_grad[:2]
    if dw_hat is None or not (need_w or need_g):
        return None, None, None, None
    w, gain, mean, rstd = ctx.saved_tensors
    dw, dgain = (backward or _ops.ws_standardize_backward)(
        dw_hat, w, gain, mean, rstd, ctx.convention, ctx.eps, need_w, need_g)
    return (dw if need_w else None), (dgain if need_g else None), None, None


_autograd("ws_standardize", _ws_standardize_grad, _ws_standardize_setup)


@_impl("ws_standardize_backward")
def _ws_standardize_backward(dw_hat, w, gain, mean, rstd, convention, eps, need_w, need_gain):
    """dw through mean, var and gain (when ``need_w``) and dgain (when ``need_gain``), fused."""
    wk = _ws_weight(w)
    dw_hat = like(wk, dw_hat)
    dw = _empty(wk) if need_w else None
    dgain = torch.empty_like(mean) if need_gain else None
    _C.ws_standardize_backward(dl(dw_hat), dl(wk), dl(gain), dl(mean), dl(rstd), convention, eps,
                               dl(dw), dl(dgain), **launch(wk))
    return ((_as_input(w, dw) if need_w else _absent(w)),
            (dgain if need_gain else _absent(mean)))


@_fake("ws_standardize_backward")
def _(dw_hat, w, gain, mean, rstd, convention, eps, need_w, need_gain):
    return (_empty(w) if need_w else _absent(w),
            torch.empty_like(mean) if need_gain else _absent(mean))


_once_differentiable("ws_standardize_backward")


# --- stochastic layers: seeded draws (StochNorm, MixStyle, AFN's dropout), instance moments ------
# dynamo cannot trace a torch.Generator object (a graph break: "Failed to convert args/kwargs to
# proxy"), and inductor replaces draws from torch's default generator by its own RNG (other numbers
# than eager's). These ops draw inside their kernel, from the generator a layer registered under
# an integer key (``generator_key``), so a compiled layer draws eager's numbers from the same
# generator state. They are tagged nondeterministic_seeded: AOTAutograd's partitioner then never
# recomputes a draw in the backward, and no pass merges two draws.

_SEEDED = (torch.Tag.nondeterministic_seeded,)
_generators = {}  # key -> weakref.ref of a torch.Generator; key 0 is torch's default generator


def _registry_key(registry, obj):
    """``obj``'s key in ``registry`` (its id), which holds a weak reference to it and forgets it
    when it is collected: the ops find a layer's generator or communicator by an integer."""
    key = id(obj)

    def forget(ref):
        if registry.get(key) is ref:
            del registry[key]

    registry[key] = weakref.ref(obj, forget)
    return key


def generator_key(generator):
    """The key under which the draw ops find ``generator`` (0 for None: torch's default one). The
    layers take it when their generator is set, outside any compiled region."""
    return 0 if generator is None else _registry_key(_generators, generator)


def _registered_object(registry, key, gone):
    """The object registered under ``key`` (``_registry_key``); RuntimeError(gone) where it was
    collected or never registered."""
    ref = registry.get(key)
    obj = ref() if ref is not None else None
    if obj is None:
        raise RuntimeError(gone)
    return obj


def _generator(key):
    if key == 0:
        return None
    return _registered_object(_generators, key,
                              "normkit: the torch.Generator a layer was given no longer exists")


def _draw(name, n_inputs):
    """A draw op's autograd: nothing to differentiate (its tensor input only places the draw), and
    its outputs never require grad."""
    def setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))

    _autograd(name, lambda ctx, *grads: (None,) * n_inputs, setup)


_lib.define("draw_uniform(Tensor like, int generator, Device where, SymInt[] size) -> Tensor",
            tags=_SEEDED)
_lib.define("mixstyle_draw(Tensor like, int generator, float p, float alpha, SymInt batch, "
            "bool crossdomain) -> (Tensor active, Tensor perm, Tensor lam)", tags=_SEEDED)
_lib.define("group_norm_stats(Tensor x, int groups) -> (Tensor mean, Tensor var)")


@_impl("draw_uniform")
def _draw_uniform(like, generator, where, size):
    """``torch.rand(size)`` (default dtype) from the generator of ``generator``, drawn where that
    generator lives (on ``where`` for torch's default one), on ``like``'s device."""
    g = _generator(generator)
    return torch.rand(size, generator=g, device=where if g is None else g.device).to(like.device)


@_fake("draw_uniform")
def _(like, generator, where, size):
    return like.new_empty(size, dtype=torch.get_default_dtype())


def mix_draws(generator, alpha, batch, crossdomain):
    """MixStyle's (perm, lam) for a batch of ``batch`` > 1 instances, on the generator's device
    (the CPU for torch's default one): lam ~ Beta(alpha, alpha) per instance (float64), then a
    permutation ("random") or Dassl's cross-domain pairing (the reversed batch's halves, each
    shuffled)."""
    where = generator.device if generator is not None else "cpu"
    conc = torch.full((batch, 2), alpha, dtype=torch.float64, device=where)
    # Beta(a, a) as the first component of a Dirichlet(a, a) (what torch.distributions.Beta
    # samples), which takes a generator and stays exact for small alpha
    lam = torch._sample_dirichlet(conc, generator=generator)[:, 0]
    if not crossdomain:
        return torch.randperm(batch, generator=generator, device=where), lam
    order = torch.arange(batch - 1, -1, -1, device=where)
    first, second = order.chunk(2)
    perm = torch.cat([first[torch.randperm(len(first), generator=generator, device=where)],
                      second[torch.randperm(len(second), generator=generator, device=where)]])
    return perm, lam


_draw("draw_uniform", 4)


@_impl("mixstyle_draw")
def _mixstyle_draw(like, generator, p, alpha, batch, crossdomain):
    """One MixStyle call's draws, in the eager layer's order: the gate U(0, 1) < p, then (when it
    mixes a batch of more than one) ``mix_draws``. ``active`` is a bool scalar; an inactive call
    returns the identity permutation and lam = 1. On ``like``'s device."""
    g = _generator(generator)
    where = g.device if g is not None else "cpu"
    active = torch.rand((), generator=g, device=where).item() < p and batch > 1
    if active:
        perm, lam = mix_draws(g, alpha, batch, crossdomain)
    else:
        perm = torch.arange(batch)
        lam = torch.ones(batch, dtype=torch.float64)
    device = like.device
    return torch.tensor(active, device=device), perm.to(device), lam.to(device).contiguous()


@_fake("mixstyle_draw")
def _(like, generator, p, alpha, batch, crossdomain):
    return (like.new_empty((), dtype=torch.bool), like.new_empty(batch, dtype=torch.int64),
            like.new_empty(batch, dtype=torch.float64))


_draw("mixstyle_draw", 6)


@_impl("group_norm_stats")
def _group_norm_stats(x, groups):
    """The (N, groups) mean and biased variance of x's groups of channels."""
    xk = kernel_input(x)
    mean, var = _per_sample(x, groups), _per_sample(x, groups)
    _C.group_norm_stats(dl(xk), dl(mean), dl(var), **launch(xk, group_workspace(groups)))
    return mean, var


@_fake("group_norm_stats")
def _(x, groups):
    return _per_sample(x, groups), _per_sample(x, groups)


_once_differentiable("group_norm_stats")

# --- communicators ------------------------------------------------------------------------------
# A synchronized layer over a normkit communicator (MPI, NCCL, a TorchCommunicator) sums through
# the communicator's own all-reduce, which dynamo cannot trace (mpi4py calls, host buffers). Under
# torch.compile that all-reduce is this op, opaque to the compiler, which finds the communicator
# a layer registered under an integer key (``communicator_key``) as the draw ops find their
# generator. It is tagged nondeterministic_seeded for the same reason as they are: AOTAutograd's
# partitioner then never recomputes it in the backward (a recomputation would be one more
# collective) and no pass merges two of them.

_communicators = {}  # key -> weakref.ref of a communicator


def communicator_key(comm):
    """The key under which ``allreduce_sum`` finds ``comm`` (registered for as long as it lives)."""
    return _registry_key(_communicators, comm)


_lib.define("allreduce_sum(Tensor x, int comm, str who) -> Tensor", tags=_SEEDED)


def _communicator(key, who):
    return _registered_object(_communicators, key,
                              f"{who}: the communicator of this layer no longer exists (or was "
                              "never registered with communicator_key)")


@_impl("allreduce_sum")
def _allreduce_sum(x, comm, who):
    communicator = _communicator(comm, who)
    # (imported here: normkit.torch.sync_batchnorm imports this module)
    from .sync_batchnorm import _allreduce
    out = x.clone(memory_format=torch.contiguous_format)
    _allreduce(communicator, out, who)
    return out


@_fake("allreduce_sum")
def _(x, comm, who):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# A cross-rank MixStyle's mixing call, compiled: the gate, then (when it mixes) the all-gather of
# every instance's (mu, sig) over the registered communicator, the draws for the global batch and
# this rank's rows' coefficients, all in one op, in the eager layer's order (an inactive call
# issues no collective, on every rank alike). Its outputs have this rank's shapes: the global
# batch size, known only after the all-gather, never reaches the compiler.
_lib.define("mixstyle_cross_rank(Tensor mu, Tensor sig, int comm, int generator, float p, "
            "float alpha, bool crossdomain) -> (Tensor active, Tensor scale, Tensor shift)",
            tags=_SEEDED)


@_impl("mixstyle_cross_rank")
def _mixstyle_cross_rank(mu, sig, comm, generator, p, alpha, crossdomain):
    from .mixstyle import mix_coefficients  # (normkit.torch.mixstyle imports this module)
    g = _generator(generator)
    where = g.device if g is not None else "cpu"
    mixed = None
    if torch.rand((), generator=g, device=where).item() < p:
        mixed = mix_coefficients(mu, sig, _communicator(comm, "MixStyle"), g, alpha, crossdomain)
    if mixed is None:
        return torch.tensor(False, device=mu.device), torch.ones_like(mu), mu.clone()
    scale, shift = mixed[2:]
    return torch.tensor(True, device=mu.device), scale.contiguous(), shift.contiguous()


@_fake("mixstyle_cross_rank")
def _(mu, sig, comm, generator, p, alpha, crossdomain):
    return mu.new_empty((), dtype=torch.bool), torch.empty_like(mu), torch.empty_like(mu)


_draw("mixstyle_cross_rank", 7)
