// Per-sample statistics over (N, C, *) tensors: group norm, instance norm (G = C), MixStyle's
// instance moments and IBN's instance half. Statistics are per (sample n, group g) over the C/G
// channels of the group and every spatial dim; coefficients of the elementwise passes are per
// (sample, channel), so one pair of kernel shapes serves every layer of the family:
//
//   forward:  group_norm_stats (local moments) -> [caller: coefficients, a combine where needed]
//             -> group_norm_affine            y = (x - mean[n,g]) * scale[n,c] + shift[n,c]
//   backward: group_norm_backward_reduce      per-(n, c) sums of dy and dy * (x - mean[n,g])
//             -> [caller: coefficients]
//             -> group_norm_backward_elemt    dx = a[n,c] * dy + b[n,g] * (x - mean[n,g]) + c[n,g]
//
// For one process, group_norm_forward and group_norm_backward do the same work fused per
// (n, g) block, reading it from memory once while it stays in cache. The group is inferred from
// the shape of `mean` ((N, G); G divides C). Never a batch norm over a (1, N*C, ...) view.
//
// Dtypes: x, y, dy, dx share one dtype; mean/var/rstd/scale/shift/a/b/c/weight/bias and the sums
// have param_dtype(x.dtype) (float32 for float16/bfloat16 inputs). Every (N, G) / (N, C) argument
// is a 2-D array of that dtype with any strides. Any layout of x works; contiguous channels-first
// and channels-last have fast paths, and y / dx take the layout the caller gives them.
//
// On CUDA tensors the ops run on launch.stream without synchronizing the host; those that reduce
// (stats, forward, backward_reduce, backward) need launch.workspace of
// group_norm_workspace_size(x, groups) float64 values. CPU tensors ignore `launch`.
#pragma once

#include <cstdint>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit {

// float64 values of scratch the reducing ops need for x with `groups` groups (and for any dy of
// x's shape), so that the reductions split across blocks stay deterministic. 0 on the CPU. A
// function of x's shape, dtype, device and groups alone (never of strides or data): callers may
// remember it (normkit.functional does for CuPy arrays).
int64_t group_norm_workspace_size(const TensorView& x, int64_t groups);

// mean[n,g] and biased var[n,g] of x over the channels of group g and every spatial dim, exact
// when |mean| >> std. mean and var are (N, G). An empty group (S = 0) gives mean 0, var 0.
void group_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch = {});

// y = (x - mean[n, g(c)]) * scale[n,c] + shift[n,c], with mean (N, G) and scale, shift (N, C).
// y may be x (in place).
void group_norm_affine(const TensorView& x, const TensorView& mean, const TensorView& scale,
                       const TensorView& shift, const TensorView& y, const Launch& launch = {});

// Training forward of one process: statistics, then y = (x - mean) * rstd * weight[c] + bias[c].
// Writes mean, biased var and rstd = 1 / sqrt(var + eps), each (N, G). weight and bias (C,) may
// be undefined (no affine, or a weight without a bias).
void group_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias,
                        double eps, const TensorView& y, const TensorView& mean,
                        const TensorView& var, const TensorView& rstd, const Launch& launch = {});

// sum_dy[n,c] = sum over the spatial dims of dy, sum_dy_xmu[n,c] = sum of dy * (x - mean[n,g(c)]),
// both (N, C). The weight and bias gradients and the coefficients of backward_elemt follow from
// them in O(N * C).
void group_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch = {});

// dx = a[n,c] * dy + b[n,g(c)] * (x - mean[n,g(c)]) + c[n,g(c)], with a (N, C) and mean, b, c
// (N, G). b and c undefined mean 0 (statistics held constant: eval, MixStyle). dx may be dy.
void group_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& a, const TensorView& b, const TensorView& c,
                               const TensorView& dx, const Launch& launch = {});

// Training backward of one process through the batch statistics of group_norm_forward: writes
// sum_dy and sum_dy_xmu (N, C) as backward_reduce does (the caller reduces them over n into the
// weight and bias gradients) and, where dx is defined, dx. weight (C,) may be undefined (1).
void group_norm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                         const TensorView& rstd, const TensorView& weight, const TensorView& dx,
                         const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                         const Launch& launch = {});

// The CUDA kernels behind the ops above (cuda/groupnorm.cu), with the same arguments, already
// checked by the ops; they are not meant to be called directly.
namespace cuda {
int64_t group_norm_workspace_size(const TensorView& x, int64_t groups);
void group_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch);
void group_norm_affine(const TensorView& x, const TensorView& mean, const TensorView& scale,
                       const TensorView& shift, const TensorView& y, const Launch& launch);
void group_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias,
                        double eps, const TensorView& y, const TensorView& mean,
                        const TensorView& var, const TensorView& rstd, const Launch& launch);
void group_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch);
void group_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& a, const TensorView& b, const TensorView& c,
                               const TensorView& dx, const Launch& launch);
void group_norm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                         const TensorView& rstd, const TensorView& weight, const TensorView& dx,
                         const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                         const Launch& launch);
}  // namespace cuda

}  // namespace normkit
