"""Helpers of the normkit.torch tests: the devices to run on, tensors in every memory layout torch
can have, random layer state. Nothing here computes with normkit (it only asks whether normkit has
CUDA kernels)."""
import numpy as np
import pytest
import torch

from helpers import make_layout, params, running


def _gpu_ready():
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    import normkit

    if not normkit.cuda_available():
        return "normkit was built without CUDA kernels, or sees no GPU"
    return None


_GPU_MISSING = _gpu_ready()
# Every test that takes `device` runs on the CPU and, where a GPU and normkit's CUDA kernels exist,
# on CUDA tensors too.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    _GPU_MISSING is not None, reason=_GPU_MISSING or "")])]


def tensor(a, device="cpu", layout="contiguous", requires_grad=False):
    """The NumPy array `a` as a torch tensor on `device` stored in `layout` (the layouts of
    helpers.LAYOUT_MAKERS but "reversed": torch has no negative strides)."""
    if layout == "reversed":
        raise ValueError("torch tensors cannot have negative strides")
    src = torch.from_numpy(make_layout(np.array(a), layout))
    if device != "cpu":
        # The same strides on the device: copy into an allocation of the same storage shape.
        base = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=device)
        src = base.copy_(src)
    return src.requires_grad_(requires_grad)


def torch_layouts(ndim):
    """The layouts of `ndim`-D inputs that torch tensors can have."""
    if ndim == 2:
        return ["contiguous", "fortran", "strided"]
    if ndim == 3:
        return ["contiguous", "channels_last", "strided", "channel_slice"]
    return ["contiguous", "channels_last", "strided", "channel_slice", "non_collapsible"]


def random_state(C, seed, dtype=np.float32):
    """A state_dict of random weight, bias and running statistics for C channels."""
    w, b = params(C, seed, dtype)
    rm, rv = running(C, seed + 1, dtype)
    return {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b),
            "running_mean": torch.from_numpy(rm), "running_var": torch.from_numpy(rv),
            "num_batches_tracked": torch.tensor(0, dtype=torch.long)}


def to_numpy(t):
    return None if t is None else t.detach().cpu().double().numpy()


__all__ = ["DEVICES", "random_state", "tensor", "to_numpy", "torch_layouts"]
