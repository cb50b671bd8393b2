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
from .conv import (
    conv_transpose,
    conv_transpose_backward,
    conv_transpose_output_padding,
    convolution,
    convolution_backward,
    pad,
    pad_backward,
    pixel_shuffle,
    pixel_unshuffle,
)
from .encoding import (
    aggregate,
    aggregate_backward,
    encoding,
    encoding_backward,
    encoding_forward,
    get_between_gemm_threads,
    gram_matrix,
    gram_matrix_backward,
    inspiration,
    inspiration_backward,
    inspiration_forward,
    scaled_l2,
    scaled_l2_backward,
    scaled_l2_forward,
    set_between_gemm_threads,
)
from .wsconv import ws_standardize, ws_standardize_backward

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
    # convolution
    "conv_transpose",
    "conv_transpose_backward",
    "conv_transpose_output_padding",
    "convolution",
    "convolution_backward",
    "pad",
    "pad_backward",
    "pixel_shuffle",
    "pixel_unshuffle",
    # the Encoding layer family
    "aggregate",
    "aggregate_backward",
    "encoding",
    "encoding_backward",
    "encoding_forward",
    "get_between_gemm_threads",
    "gram_matrix",
    "gram_matrix_backward",
    "inspiration",
    "inspiration_backward",
    "inspiration_forward",
    "scaled_l2",
    "scaled_l2_backward",
    "scaled_l2_forward",
    "set_between_gemm_threads",
    # weight standardization
    "ws_standardize",
    "ws_standardize_backward",
]
