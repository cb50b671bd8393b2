// Convolution as a matrix product: im2col lays out every receptive field of an N-d input as a
// column, so that a convolution is weight (O, C*prod(kernel)) times cols, a GEMM the caller runs
// with its array library; col2im is its adjoint (the input gradient from the columns' gradient).
//
// x is (B, C, *spatial) with any strides; cols is (B, C * prod(kernel), prod(out_spatial)) with
// any strides, row c * prod(kernel) + (kernel offset, row-major) and column the output position
// (row-major), which is the order of weight.reshape(O, C/groups * prod(kernel)): groups are
// contiguous blocks of rows. Padding is zeros. Dtypes: float32 and float64 on the CPU, every
// dtype on CUDA, where the ops run on launch.stream (no workspace).
#pragma once

#include <cstdint>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit {

constexpr int kMaxSpatialDims = kMaxDims - 2;

struct ConvGeometry {
  int dims = 0;  // spatial dims
  int64_t kernel[kMaxSpatialDims] = {};
  int64_t stride[kMaxSpatialDims] = {};
  int64_t padding[kMaxSpatialDims] = {};
  int64_t dilation[kMaxSpatialDims] = {};
};

// floor((n + 2 padding - dilation (kernel - 1) - 1) / stride) + 1: the output size of one spatial
// dim, as in torch.nn.Conv*d (<= 0 when the dilated kernel does not fit the padded input).
int64_t conv_output_size(int64_t n, int64_t kernel, int64_t stride, int64_t padding,
                         int64_t dilation);

// cols = the receptive fields of x.
void im2col(const TensorView& x, const ConvGeometry& geometry, const TensorView& cols,
            const Launch& launch = {});

// x = the sum of the columns over the receptive fields they came from (overwrites x): the adjoint
// of im2col.
void col2im(const TensorView& cols, const ConvGeometry& geometry, const TensorView& x,
            const Launch& launch = {});

// The CUDA kernels behind the ops above (cuda/im2col.cu), called after the ops' checks.
namespace cuda {
void im2col(const TensorView& x, const ConvGeometry& geometry, const TensorView& cols,
            const Launch& launch);
void col2im(const TensorView& cols, const ConvGeometry& geometry, const TensorView& x,
            const Launch& launch);
}  // namespace cuda

}  // namespace normkit
