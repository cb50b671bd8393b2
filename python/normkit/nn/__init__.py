"""Stateful layers over NumPy / CuPy arrays, in PyTorch's vocabulary."""
from .afn import AdaptiveFeatureNorm, Block, Dropout, Linear, ReLU
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .conv import Conv1d, Conv2d, Conv3d
from .encoding import Encoding, GramMatrix, Inspiration, UpsampleConv2d
from .groupnorm import GroupNorm
from .instancenorm import (
    InstanceBatchNorm2d,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
)
from .mixstyle import (MixStyle, activate_mixstyle, crossdomain_mixstyle, deactivate_mixstyle,
                       random_mixstyle, run_with_mixstyle, run_without_mixstyle)
from .module import Module, Parameter, Sequential
from .stochnorm import StochNorm1d, StochNorm2d, StochNorm3d, convert_stochnorm
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .wsconv import FWS, WSConv1d, WSConv2d, WSConv3d, WSConvTranspose2d, WSConvTranspose3d

__all__ = ["AdaptiveFeatureNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Block", "Conv1d",
           "Conv2d", "Conv3d", "Dropout", "Encoding", "FWS", "GramMatrix", "GroupNorm",
           "Inspiration", "InstanceBatchNorm2d", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "Linear", "MixStyle", "Module", "Parameter", "ReLU", "Sequential",
           "StochNorm1d", "StochNorm2d", "StochNorm3d", "SyncBatchNorm", "UpsampleConv2d",
           "WSConv1d", "WSConv2d", "WSConv3d", "WSConvTranspose2d", "WSConvTranspose3d",
           "activate_mixstyle", "convert_stochnorm", "convert_sync_batchnorm",
           "crossdomain_mixstyle", "deactivate_mixstyle", "random_mixstyle", "run_with_mixstyle",
           "run_without_mixstyle"]
