"""normkit: exact, fast, synchronized normalization layers over NumPy (and CuPy) arrays.

    normkit.functional   stateless forward/backward ops over arrays
    normkit.nn           stateful layers in PyTorch's vocabulary (Module, BatchNorm2d, ...)
    normkit.manual_seed  reseeds the default generator of normkit.nn's stochastic layers
"""
from . import _C
from ._backend import cuda_available
from . import distributed, functional, nn, random
from .random import manual_seed

__version__ = "0.1.0"

__all__ = ["cuda_available", "distributed", "functional", "manual_seed", "nn", "random",
           "__version__"]
