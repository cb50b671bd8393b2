"""normkit for PyTorch: drop-in batch-norm modules and functions run by normkit's kernels.

    BatchNorm1d/2d/3d        torch.nn.BatchNorm*d (subclasses: same arguments, state_dicts, checks)
    SyncBatchNorm            torch.nn.SyncBatchNorm that also runs on CPU tensors, over a
                             torch.distributed group (gloo) or a normkit communicator (MPI)
    convert_sync_batchnorm   every BatchNorm*d / SyncBatchNorm of a model -> normkit's SyncBatchNorm
    batch_norm, batchnormtrain, batchnormeval, sync_batch_norm   the autograd functions
    InstanceNorm1d/2d/3d, GroupNorm   torch.nn.InstanceNorm*d / GroupNorm (subclasses)
    InstanceBatchNorm2d      tllib's IBN layer (IN.* / BN.* keys) for any planes and ratio
    instance_norm, group_norm         their autograd functions (torch.nn.functional's signatures)
    TorchCommunicator        normkit's communicator protocol over a torch.distributed group
    Encoding, GramMatrix, Inspiration, UpsampleConv2d   PyTorch-Encoding's encoding.nn layers
                             (state_dicts shared with normkit.nn's)
    scaled_l2, aggregate, encoding                      their autograd functions
    WSConv1d/2d/3d, WSConvTranspose2d/3d, FWS           elektronn3's weight-standardized
                             convolutions (fixed; state_dicts interchange), ws_standardize
    StochNorm1d/2d/3d, convert_stochnorm, stoch_norm    tllib's StochNorm (``stochnorm.
                             convert_model`` is tllib's name for convert_stochnorm)
    AdaptiveFeatureNorm, Block, ImageClassifier         tllib's AFN
    MixStyle, mixstyle, run_with_mixstyle, ...          Dassl's / tllib's MixStyle and helpers
    models                   IBN-Net (resnet{18,34,50,101}_ibn_{a,b}) and tllib's MixStyle
                             ResNets (mixstyle_resnet{18,34,50}), released checkpoints from files
    to_torch                 a copy of a model with torch's own layers in place of normkit's

The batch-norm and Encoding families' core calls are torch custom ops (torch.ops.normkit.*, see
normkit.torch._ops), so those layers compile with torch.compile(fullgraph=True) and export with
torch.export.

Tensors reach the core through DLPack without copies; outputs are allocated by torch.
"""
try:
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError("normkit.torch needs PyTorch: pip install torch (the 'torch' extra; "
                      f"'.[torch]' in a source checkout); importing it failed with: {e}") from e

from . import _ops, distributed, functional, mixstyle, models, stochnorm  # noqa: F401 (_ops)
from .afn import AdaptiveFeatureNorm, Block, ImageClassifier
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import to_torch
from .distributed import TorchCommunicator
from .encoding import Encoding, GramMatrix, Inspiration, UpsampleConv2d
from .mixstyle import (MixStyle, activate_mixstyle, crossdomain_mixstyle, deactivate_mixstyle,
                       random_mixstyle, run_with_mixstyle, run_without_mixstyle)
from .functional import aggregate, batch_norm, batchnormeval, batchnormtrain, encoding, scaled_l2
from .groupnorm import (GroupNorm, InstanceBatchNorm2d, InstanceNorm1d, InstanceNorm2d,
                        InstanceNorm3d, group_norm, instance_norm)
from .stochnorm import StochNorm1d, StochNorm2d, StochNorm3d, convert_stochnorm, stoch_norm
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from .wsconv import (FWS, WSConv1d, WSConv2d, WSConv3d, WSConvTranspose2d, WSConvTranspose3d,
                     ws_standardize)

__all__ = ["AdaptiveFeatureNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Block",
           "Encoding", "FWS", "GramMatrix", "GroupNorm", "ImageClassifier", "Inspiration",
           "InstanceBatchNorm2d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "MixStyle", "StochNorm1d", "StochNorm2d", "StochNorm3d", "SyncBatchNorm",
           "TorchCommunicator", "UpsampleConv2d", "WSConv1d", "WSConv2d", "WSConv3d",
           "WSConvTranspose2d", "WSConvTranspose3d", "activate_mixstyle", "aggregate",
           "batch_norm", "batchnormeval", "batchnormtrain", "convert_stochnorm",
           "convert_sync_batchnorm", "crossdomain_mixstyle", "deactivate_mixstyle", "distributed",
           "encoding", "functional", "group_norm", "instance_norm", "mixstyle", "models",
           "random_mixstyle", "run_with_mixstyle", "run_without_mixstyle", "scaled_l2",
           "stoch_norm", "stochnorm", "sync_batch_norm", "to_torch", "ws_standardize"]
