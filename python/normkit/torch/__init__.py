"""normkit for PyTorch: drop-in batch-norm modules and functions run by normkit's kernels.

    BatchNorm1d/2d/3d        torch.nn.BatchNorm*d (subclasses: same arguments, state_dicts, checks)
    SyncBatchNorm            torch.nn.SyncBatchNorm that also runs on CPU tensors, over a
                             torch.distributed group (gloo) or a normkit communicator (MPI)
    convert_sync_batchnorm   every BatchNorm*d / SyncBatchNorm of a model -> normkit's SyncBatchNorm
    batch_norm, batchnormtrain, batchnormeval, sync_batch_norm   the autograd functions
    TorchCommunicator        normkit's communicator protocol over a torch.distributed group
    Encoding, GramMatrix, Inspiration, UpsampleConv2d   PyTorch-Encoding's encoding.nn layers
                             (state_dicts shared with normkit.nn's)
    scaled_l2, aggregate, encoding                      their autograd functions
    WSConv1d/2d/3d, WSConvTranspose2d/3d, FWS           elektronn3's weight-standardized
                             convolutions (fixed; state_dicts interchange), ws_standardize
    to_torch                 a copy of a model with torch's own layers in place of normkit's

The batch-norm and Encoding families' core calls are torch custom ops (torch.ops.normkit.*, see
normkit.torch._ops), so those layers compile with torch.compile(fullgraph=True) and export with
torch.export.

Tensors reach the core through DLPack without copies; outputs are allocated by torch.
"""
try:
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError("normkit.torch needs PyTorch: pip install torch (or pip install "
                      f"'normkit[torch]'); importing it failed with: {e}") from e

from . import _ops, distributed, functional  # noqa: F401 (_ops defines torch.ops.normkit)
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import to_torch
from .distributed import TorchCommunicator
from .encoding import Encoding, GramMatrix, Inspiration, UpsampleConv2d
from .functional import aggregate, batch_norm, batchnormeval, batchnormtrain, encoding, scaled_l2
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from .wsconv import (FWS, WSConv1d, WSConv2d, WSConv3d, WSConvTranspose2d, WSConvTranspose3d,
                     ws_standardize)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Encoding", "FWS", "GramMatrix",
           "Inspiration", "SyncBatchNorm", "TorchCommunicator", "UpsampleConv2d", "WSConv1d",
           "WSConv2d", "WSConv3d", "WSConvTranspose2d", "WSConvTranspose3d", "aggregate",
           "batch_norm", "batchnormeval", "batchnormtrain", "convert_sync_batchnorm",
           "distributed", "encoding", "functional", "scaled_l2", "sync_batch_norm", "to_torch",
           "ws_standardize"]
