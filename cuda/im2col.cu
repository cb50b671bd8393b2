// im2col / col2im on CUDA, for any number of spatial dims and every dtype: the kernels behind
// include/normkit/im2col.h's ops for CUDA arrays (src/im2col.cpp checks the arguments).
//
// im2col gives each thread one element of cols (output position fastest, so a warp writes a
// contiguous run of a row of cols). col2im is written as a gather, not a scatter: each thread owns
// one element of x and adds up the column entries that read it, so there are no atomics and every
// sum has a fixed order; float16/bfloat16 sums accumulate in float32. 64-bit indexing and
// grid-stride loops: no size is limited by a grid dimension.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "normkit/im2col.h"

namespace normkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t(1) << 30;

// Everything a kernel needs, by value: sizes, geometry and both arrays' strides (in elements).
struct ConvShape {
  int dims;
  int64_t B, C, PK, L, S;  // batch, channels, kernel positions, output positions, input positions
  int64_t in[kMaxSpatialDims], out[kMaxSpatialDims];
  int64_t kernel[kMaxSpatialDims], stride[kMaxSpatialDims], padding[kMaxSpatialDims],
      dilation[kMaxSpatialDims];
  int64_t xs[kMaxSpatialDims + 2];  // x's strides
  int64_t cs[3];                    // cols' strides
};

ConvShape conv_shape(const TensorView& x, const ConvGeometry& g, const TensorView& cols) {
  ConvShape p{};
  p.dims = g.dims;
  p.B = x.shape[0];
  p.C = x.shape[1];
  p.PK = p.L = p.S = 1;
  for (int d = 0; d < g.dims; ++d) {
    p.in[d] = x.shape[2 + d];
    p.out[d] = conv_output_size(p.in[d], g.kernel[d], g.stride[d], g.padding[d], g.dilation[d]);
    p.kernel[d] = g.kernel[d];
    p.stride[d] = g.stride[d];
    p.padding[d] = g.padding[d];
    p.dilation[d] = g.dilation[d];
    p.PK *= p.kernel[d];
    p.L *= p.out[d];
    p.S *= p.in[d];
  }
  for (int d = 0; d < g.dims + 2; ++d) p.xs[d] = x.strides[d];
  for (int d = 0; d < 3; ++d) p.cs[d] = cols.strides[d];
  return p;
}

unsigned grid_for(int64_t elements) {
  return unsigned(std::clamp<int64_t>((elements + kThreads - 1) / kThreads, 1, kMaxGrid));
}

template <class T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ cols, ConvShape p) {
  const int64_t total = p.B * p.C * p.PK * p.L;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t col = idx % p.L, kk = (idx / p.L) % p.PK, bc = idx / (p.L * p.PK);
    const int64_t b = bc / p.C, c = bc % p.C;
    int64_t offset = b * p.xs[0] + c * p.xs[1];
    bool inside = true;
    for (int64_t d = p.dims - 1, kr = kk, orr = col; d >= 0; --d) {
      const int64_t kd = kr % p.kernel[d], od = orr % p.out[d];
      kr /= p.kernel[d];
      orr /= p.out[d];
      const int64_t id = od * p.stride[d] - p.padding[d] + kd * p.dilation[d];
      inside = inside && id >= 0 && id < p.in[d];
      offset += id * p.xs[2 + d];
    }
    cols[b * p.cs[0] + (c * p.PK + kk) * p.cs[1] + col * p.cs[2]] = inside ? x[offset] : T(0);
  }
}

template <class T>
__global__ void col2im_kernel(const T* __restrict__ cols, T* __restrict__ x, ConvShape p) {
  using A = acc_t<T>;
  const int64_t total = p.B * p.C * p.S;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t pos = idx % p.S, bc = idx / p.S;
    const int64_t b = bc / p.C, c = bc % p.C;
    int64_t at[kMaxSpatialDims];
    int64_t x_offset = b * p.xs[0] + c * p.xs[1];
    for (int64_t d = p.dims - 1, r = pos; d >= 0; --d) {
      at[d] = r % p.in[d];
      r /= p.in[d];
      x_offset += at[d] * p.xs[2 + d];
    }
    const T* rows = cols + b * p.cs[0] + c * p.PK * p.cs[1];
    A sum = 0;
    for (int64_t kk = 0; kk < p.PK; ++kk) {
      // Output position o of kernel offset k reads at[d] where o * stride + k * dilation -
      // padding == at[d]; it exists when that o is a whole number inside the output.
      int64_t col = 0;
      bool hit = true;
      for (int64_t d = p.dims - 1, kr = kk, scale = 1; d >= 0 && hit; --d) {
        const int64_t kd = kr % p.kernel[d];
        kr /= p.kernel[d];
        const int64_t t = at[d] + p.padding[d] - kd * p.dilation[d];
        hit = t >= 0 && t % p.stride[d] == 0 && t / p.stride[d] < p.out[d];
        col += (t / p.stride[d]) * scale;
        scale *= p.out[d];
      }
      if (hit) sum += to_acc(rows[kk * p.cs[1] + col * p.cs[2]]);
    }
    x[x_offset] = from_acc<T>(sum);
  }
}

}  // namespace

void im2col(const TensorView& x, const ConvGeometry& g, const TensorView& cols,
            const Launch& launch) {
  const ConvShape p = conv_shape(x, g, cols);
  if (p.B * p.C * p.PK * p.L == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    im2col_kernel<T><<<grid_for(p.B * p.C * p.PK * p.L), kThreads, 0,
                       static_cast<cudaStream_t>(launch.stream)>>>(x.ptr<const T>(),
                                                                   cols.ptr<T>(), p);
    check_launch("im2col");
  });
}

void col2im(const TensorView& cols, const ConvGeometry& g, const TensorView& x,
            const Launch& launch) {
  const ConvShape p = conv_shape(x, g, cols);
  if (p.B * p.C * p.S == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    col2im_kernel<T><<<grid_for(p.B * p.C * p.S), kThreads, 0,
                       static_cast<cudaStream_t>(launch.stream)>>>(cols.ptr<const T>(),
                                                                   x.ptr<T>(), p);
    check_launch("col2im");
  });
}

}  // namespace normkit::cuda
