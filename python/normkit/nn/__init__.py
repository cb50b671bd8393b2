"""Stateful layers over NumPy / CuPy arrays, in PyTorch's vocabulary."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .conv import Conv1d, Conv2d, Conv3d
from .encoding import Encoding, GramMatrix, Inspiration, UpsampleConv2d
from .module import Module, Parameter, Sequential
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .wsconv import FWS, WSConv1d, WSConv2d, WSConv3d, WSConvTranspose2d, WSConvTranspose3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv1d", "Conv2d", "Conv3d", "Encoding",
           "FWS", "GramMatrix", "Inspiration", "Module", "Parameter", "Sequential",
           "SyncBatchNorm", "UpsampleConv2d", "WSConv1d", "WSConv2d", "WSConv3d",
           "WSConvTranspose2d", "WSConvTranspose3d", "convert_sync_batchnorm"]
