"""Handing torch tensors to normkit's core: DLPack capsules (no copies) and the layouts the kernels
read.

``torch.utils.dlpack.to_dlpack`` makes a capsule in ~0.2 us; ``Tensor.__dlpack__`` takes ~1.7 us and
refuses tensors that require grad, which are exactly what an autograd.Function's forward receives.
The core reads the capsule in place; the tensor stays alive until the capsule is dropped, after the
op.
"""
import torch
from torch.utils.dlpack import to_dlpack

from .. import _C

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def dl(t):
    """``t`` as a DLPack capsule for the core; None (an absent optional argument) stays None.

    DLPack has no negative or conjugate bit: a lazily negated tensor (``torch._neg_view``, the
    imaginary part of a conjugate view) is resolved into a copy first, else its values would be
    read with the wrong sign. Tensors without plain strided storage (meta, sparse) get a
    TypeError naming what they are."""
    if t is None:
        return None
    if t.is_neg() or t.is_conj():
        t = t.resolve_neg().resolve_conj()
    try:
        return to_dlpack(t)
    except (BufferError, RuntimeError) as e:
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"normkit takes strided CPU and CUDA tensors, got a {t.layout} "
                            f"tensor on {t.device}") from e
        raise


def dl_written(t):
    """``dl`` for a tensor the core writes in place (running statistics): a lazily negated or
    conjugated tensor has no storage of its values to write, so it is a TypeError rather than a
    copy that would take the update."""
    if t is not None and (t.is_neg() or t.is_conj()):
        raise TypeError("normkit writes this tensor in place; a negated or conjugate view cannot "
                        "be written (resolve it first: t.resolve_neg())")
    return dl(t)


def launch(x, workspace_size=None):
    """Keyword arguments that run a core op on ``x``'s device: none for CPU tensors; for CUDA
    tensors torch's current stream on that device and, for ops that reduce over ``x``, a float64
    workspace from torch's caching allocator (so the op neither allocates nor synchronizes).

    ``workspace_size`` is the reducing op family's size query, a function of ``x``'s capsule:
    ``batch_workspace``, or ``group_workspace(groups)``."""
    if not x.is_cuda:
        return {}
    args = {"stream": torch.cuda.current_stream(x.device).cuda_stream}
    if workspace_size is not None:
        size = workspace_size(to_dlpack(x))
        args["workspace"] = to_dlpack(torch.empty(size, dtype=torch.float64, device=x.device))
    return args


def batch_workspace(capsule):
    """The workspace size query of the batch-norm ops, for ``launch``."""
    return _C.batch_norm_workspace_size(capsule)


def group_workspace(groups):
    """The workspace size query of the group-norm ops for ``groups`` groups, for ``launch``."""
    return lambda capsule: _C.group_norm_workspace_size(capsule, groups)


def param_dtype(dtype):
    """Dtype of parameters and statistics for inputs of ``dtype``: float16 inputs run with float32
    parameters (mixed precision), as in torch.nn.BatchNorm*d."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_input(x):
    """``x`` itself when the kernels can read its strides, else one contiguous copy of it.

    The common layouts are recognised by torch's own flags before asking the core."""
    nd = x.dim()
    if nd < 3 or x.is_contiguous():
        return x
    fmt = _CHANNELS_LAST.get(nd)
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x
    return x if _C.ncs_collapsible(to_dlpack(x)) else x.contiguous()


def like(x, t):
    """``t`` laid out like ``x`` so that both take the same fast path (a gradient often arrives in
    another layout, or expanded from a sum with stride 0); ``t`` itself when it already is, or when
    its shape or dtype differ (the core then names the mismatch)."""
    if t.stride() == x.stride() or t.shape != x.shape or t.dtype != x.dtype:
        return t
    return torch.empty_like(x).copy_(t)
