"""Stateless forward/backward ops over NumPy or CuPy arrays.

Each forward returns its outputs plus what its backward needs; each backward returns gradients.
"""
from .batchnorm import (
    batch_norm_backward,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_forward,
    batch_norm_normalize,
    batch_norm_stats,
    batchnormeval,
    batchnormeval_backward,
    batchnormtrain,
    batchnormtrain_backward,
)

__all__ = [
    "batch_norm_backward",
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_forward",
    "batch_norm_normalize",
    "batch_norm_stats",
    "batchnormeval",
    "batchnormeval_backward",
    "batchnormtrain",
    "batchnormtrain_backward",
]
