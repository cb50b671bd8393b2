"""Stateful layers over NumPy / CuPy arrays, in PyTorch's vocabulary."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .module import Module, Parameter, Sequential
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Module", "Parameter", "Sequential",
           "SyncBatchNorm", "convert_sync_batchnorm"]
