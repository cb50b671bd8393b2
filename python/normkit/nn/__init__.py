"""Stateful layers over NumPy / CuPy arrays, in PyTorch's vocabulary."""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .module import Module, Parameter, Sequential

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Module", "Parameter", "Sequential"]
