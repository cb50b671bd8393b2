"""``to_torch(model)``: a copy of a model with every normkit.torch module replaced by the stock
torch module computing the same thing, for exporters that know only torch's ops (ONNX, TensorRT).

``TORCH_EQUIVALENTS`` maps each normkit class to a function building its torch twin from it; a new
layer with a torch equivalent adds one entry (e.g. ``GroupNorm: _group_norm``). Modules built from
torch ops alone (``TORCH_OPS_ONLY``) are kept, their children converted. Any other normkit module
has no torch equivalent: ``to_torch`` raises a ValueError naming it.
"""
import copy

import torch

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .encoding import GramMatrix, Inspiration, UpsampleConv2d
from .groupnorm import (GroupNorm, InstanceBatchNorm2d, InstanceNorm1d, InstanceNorm2d,
                        InstanceNorm3d)
from .sync_batchnorm import SyncBatchNorm


def _carry(src, dst):
    """``dst`` with ``src``'s parameters, buffers (values, dtypes, devices) and train/eval mode."""
    dst.load_state_dict(src.state_dict())
    ref = next(iter(src.state_dict().values()), None)
    if ref is not None:
        dst.to(device=ref.device)
    return dst.train(src.training)


def _factory(m):
    """device and dtype of ``m``'s parameters (or running statistics), for torch's constructor."""
    own = m.weight if m.weight is not None else getattr(m, "running_mean", None)
    return {} if own is None else {"device": own.device, "dtype": own.dtype}


def _batch_norm(cls):
    """BatchNorm*d, and InstanceNorm*d (the same constructor); in training normkit's instance
    norms also count num_batches_tracked and take momentum=None as the cumulative average, which
    torch's do not (eval, what exporters run, is the same)."""
    def build(m):
        return _carry(m, cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                             bias=m.bias is not None, **_factory(m)))
    return build


def _group_norm(m):
    return _carry(m, torch.nn.GroupNorm(m.num_groups, m.num_channels, m.eps, m.affine,
                                        bias=m.bias is not None, **_factory(m)))


def _sync_batch_norm(m):
    return _carry(m, torch.nn.SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                            m.track_running_stats, m.process_group,
                                            bias=m.bias is not None, **_factory(m)))


TORCH_EQUIVALENTS = {
    BatchNorm1d: _batch_norm(torch.nn.BatchNorm1d),
    BatchNorm2d: _batch_norm(torch.nn.BatchNorm2d),
    BatchNorm3d: _batch_norm(torch.nn.BatchNorm3d),
    # torch's synchronizes over a torch.distributed group; a normkit communicator (MPI) has no
    # torch counterpart, and in eval (what exporters run) both are a plain batch norm.
    SyncBatchNorm: _sync_batch_norm,
    InstanceNorm1d: _batch_norm(torch.nn.InstanceNorm1d),
    InstanceNorm2d: _batch_norm(torch.nn.InstanceNorm2d),
    InstanceNorm3d: _batch_norm(torch.nn.InstanceNorm3d),
    GroupNorm: _group_norm,
}

# Kept as they are, their children converted: InstanceBatchNorm2d (no torch class) only slices
# and concatenates around its IN and BN children.
TORCH_OPS_ONLY = (GramMatrix, Inspiration, UpsampleConv2d, InstanceBatchNorm2d)


def _convert(module, path):
    build = TORCH_EQUIVALENTS.get(type(module))
    if build is not None:
        return build(module)
    if type(module).__module__.startswith("normkit.") and not isinstance(module, TORCH_OPS_ONLY):
        raise ValueError(f"to_torch: {path or 'the model'} is a normkit "
                         f"{type(module).__name__}, which has no torch equivalent")
    for name, child in module.named_children():
        setattr(module, name, _convert(child, f"{path}.{name}" if path else name))
    return module


def to_torch(model):
    """A copy of ``model`` (a deep copy: ``model`` is untouched) with every normkit.torch layer
    replaced by torch's equivalent (BatchNorm*d -> torch.nn.BatchNorm*d, SyncBatchNorm ->
    torch.nn.SyncBatchNorm, InstanceNorm*d -> torch.nn.InstanceNorm*d, GroupNorm ->
    torch.nn.GroupNorm; InstanceBatchNorm2d stays, with its children converted), parameters,
    buffers and train/eval mode carried. Raises ValueError naming the first layer without a torch
    equivalent (e.g. Encoding, WSConv2d).

    Parameters
    ----------
    model : torch.nn.Module
        Any model; normkit's layers in it are replaced in the copy.

    Returns
    -------
    torch.nn.Module
        The converted copy.

    Raises
    ------
    TypeError
        ``model`` is not a torch.nn.Module.
    ValueError
        A normkit layer without a torch equivalent, named by its path in the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_torch: expected a torch.nn.Module, got {type(model).__name__}")
    return _convert(copy.deepcopy(model), "")


__all__ = ["TORCH_EQUIVALENTS", "to_torch"]
