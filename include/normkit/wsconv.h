// Weight standardization of convolution weights (weight-standardized convolutions, FWS).
//
// The standardized channel is always dim 0 of the weight as torch stores it: the output channel
// of a Conv*d weight (C_out, C_in / groups, *k) and the input channel of a ConvTranspose*d weight
// (C_in, C_out / groups, *k). A caller picks the axis by passing the weight in that layout; there
// is no axis argument. Each row r of K = prod(shape[1:]) values is standardized on its own:
//
//   w_hat = (w - mean[r]) * gain[r] * rstd[r],   rstd = 1 / sqrt(d[r]) with, per convention,
//     Elektronn3: d = max(var_unbiased * fan_all, eps), fan_all = prod(shape) (C_out included)
//     NFNet:      d = max(var_biased * K, eps)
//     Timm:       d = var_biased + eps
//
// The forward is one statistics pass over each row (sums shifted by an estimate of its mean from
// its first values, so they stay exact when |mean| >> std; in float64, on the CPU in float32
// lanes flushed into float64 every few thousand values) and one pass writing w_hat while the row
// is in cache. The backward is one pass of sums (of dw_hat, dw_hat * (w - mean) and
// (w - mean)^2) and one pass writing dw, through mean, var (zero where eps clamps it) and gain.
//
// Dtypes: w, w_hat, dw_hat, dw share one dtype (bfloat16/float32/float64 on the CPU, also float16
// on CUDA); gain, mean, rstd, dgain have param_dtype of it (float32 for 16-bit weights). gain may be undefined (gain 1).
// Layout: within a row any dense order of dims 1.. (contiguous and channels-last weights), the
// same for every weight-shaped argument; rows at any stride. w_hat may be w, and dw may be dw_hat
// (in place: each row's sums are taken before it is written, each value read before it is
// overwritten); any other overlap of an output with an argument is a ValueError.
// On CUDA tensors the ops run on launch.stream, without a workspace.
#pragma once

#include <cstdint>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit {

enum class WSConvention : int { Elektronn3 = 0, NFNet = 1, Timm = 2 };

// The convention numbered `value` (as the bindings pass it); a ValueError for any other number.
WSConvention ws_convention(int64_t value);

// w_hat, and the mean and rstd of every row (what the backward needs). eps must be > 0.
void ws_standardize_forward(const TensorView& w, const TensorView& gain, WSConvention convention,
                            double eps, const TensorView& w_hat, const TensorView& mean,
                            const TensorView& rstd, const Launch& launch = {});

// dw and dgain from dw_hat; either may be undefined when it is not wanted.
void ws_standardize_backward(const TensorView& dw_hat, const TensorView& w,
                             const TensorView& gain, const TensorView& mean,
                             const TensorView& rstd, WSConvention convention, double eps,
                             const TensorView& dw, const TensorView& dgain,
                             const Launch& launch = {});

#ifdef __CUDACC__
#define NK_HOST_DEVICE __host__ __device__
#else
#define NK_HOST_DEVICE
#endif

// d of a row (rstd = 1 / sqrt(d)) from m2 = sum (w - mean)^2 over its K values; *clamped says
// whether eps won the max (then var has no gradient). Shared by the CPU and CUDA kernels.
NK_HOST_DEVICE inline double ws_denominator(WSConvention convention, double m2, int64_t K,
                                            int64_t fan_all, double eps, bool* clamped) {
  double d = m2 / double(K) + eps;  // Timm
  if (convention == WSConvention::Elektronn3) d = m2 / double(K - 1) * double(fan_all);
  if (convention == WSConvention::NFNet) d = m2;  // var_biased * K
  *clamped = convention != WSConvention::Timm && d < eps;
  return *clamped ? eps : d;
}

// k of the backward dw = gain rstd (g - sum g / K) - gain rstd^3 k (sum g c) c, with g = dw_hat
// and c = w - mean: d(d)/d(var) times d(var)/d(w) / (2 c), zero when eps clamps.
NK_HOST_DEVICE inline double ws_var_coefficient(WSConvention convention, int64_t K,
                                                int64_t fan_all, bool clamped) {
  if (clamped) return 0.0;
  if (convention == WSConvention::Elektronn3) return double(fan_all) / double(K - 1);
  if (convention == WSConvention::NFNet) return 1.0;
  return 1.0 / double(K);
}

// Per-row shape of a checked call, shared with the CUDA kernels.
struct WSRows {
  int64_t R = 0, K = 0;  // rows, values per row
  int64_t fan_all = 0;   // prod(shape)
  // Strides of dim 0 of w, w_hat / dw_hat, dw (values of a row are contiguous from there).
  int64_t sw = 0, sa = 0, sb = 0;
};

// The CUDA kernels behind the ops above (cuda/wsconv.cu), called after the ops' checks.
namespace cuda {
void ws_standardize_forward(const TensorView& w, const TensorView& gain, WSConvention convention,
                            double eps, const TensorView& w_hat, const TensorView& mean,
                            const TensorView& rstd, const WSRows& rows, const Launch& launch);
void ws_standardize_backward(const TensorView& dw_hat, const TensorView& w,
                             const TensorView& gain, const TensorView& mean,
                             const TensorView& rstd, WSConvention convention, double eps,
                             const TensorView& dw, const TensorView& dgain, const WSRows& rows,
                             const Launch& launch);
}  // namespace cuda

}  // namespace normkit
