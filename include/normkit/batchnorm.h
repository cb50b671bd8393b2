// Batch normalization over (N, C, *) tensors, statistics per channel C.
//
// The ops are split at the reduction so that synchronized batch norm can all-reduce between them:
//   forward:  batch_norm_stats (local) -> [caller combines across ranks] -> batch_norm_normalize
//   backward: batch_norm_backward_reduce (local) -> [caller all-reduces] -> batch_norm_backward_elemt
// For one process, batch_norm_forward_train and batch_norm_backward_train do the same work fused,
// touching each channel's data while it is still in cache; their _masked variants are StochNorm's
// (a per-channel choice between the batch statistics and given running ones) in the same passes.
//
// Dtypes: x, y, dy, dx share one dtype; mean/var/invstd/weight/bias and the reduced sums have
// param_dtype(x.dtype) (float32 for float16/bfloat16 inputs). weight and bias may be undefined (affine=False).
// Any layout works; contiguous channels-first and channels-last have fast paths.
//
// On CUDA tensors the ops run on launch.stream without synchronizing the host; those that reduce
// (stats, forward_train, backward_reduce, backward_train and their _masked variants) need
// launch.workspace of batch_norm_workspace_size(x) float64 values. CPU tensors ignore `launch`.
#pragma once

#include <cstdint>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit {

// float64 values of scratch the reducing ops need for x (and for any dy, dx of x's shape): a few
// per channel and per block of the reduction, so that its two stages are deterministic. 0 on the
// CPU. A function of x's shape, dtype and device alone (never of strides or data): callers may
// remember it per shape (normkit.functional does for CuPy arrays).
int64_t batch_norm_workspace_size(const TensorView& x);

// mean[c] and biased var[c] of x over every dim but 1. An empty batch gives mean 0, var 0.
void batch_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch = {});

// y = (x - mean[c]) * invstd[c] * weight[c] + bias[c].
void batch_norm_normalize(const TensorView& x, const TensorView& mean, const TensorView& invstd,
                          const TensorView& weight, const TensorView& bias, const TensorView& y,
                          const Launch& launch = {});

// Training forward of one process: statistics, then normalization with them. Writes the batch
// mean, biased var (when var is defined) and invstd = 1 / sqrt(var + eps). running_mean and
// running_var (each optional) are updated in place as torch's: running = (1 - momentum) * running
// + momentum * batch, the variance unbiased (count / (count - 1), count = N * S: updating
// running_var needs count > 1); an empty batch leaves them alone. Doing it here saves the caller
// its own elementwise ops (each a dispatch in eager torch, a kernel launch on the GPU).
void batch_norm_forward_train(const TensorView& x, const TensorView& weight, const TensorView& bias,
                              double eps, const TensorView& y, const TensorView& mean,
                              const TensorView& var, const TensorView& invstd,
                              const TensorView& running_mean = {},
                              const TensorView& running_var = {}, double momentum = 0.0,
                              const Launch& launch = {});

// sum_dy[c] = sum dy, sum_dy_xmu[c] = sum dy * (x - mean[c]).
void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch = {});

// dx = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count),
// the gradient through batch statistics computed over `count` values per channel. With sum_dy and
// sum_dy_xmu undefined, the statistics are constants: dx = weight * invstd * dy (eval mode).
void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                               double count, const TensorView& dx, const Launch& launch = {});

// Training backward of one process: backward_reduce and backward_elemt fused (count = N * S).
// dx may be undefined when only the parameter gradients are wanted. dweight, when defined, gets
// the weight's gradient sum_dy_xmu * invstd (sum_dy is the bias's); sum_dy_xmu may then be
// undefined.
void batch_norm_backward_train(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& dx, const TensorView& sum_dy,
                               const TensorView& sum_dy_xmu, const TensorView& dweight = {},
                               const Launch& launch = {});

// StochNorm's training forward of one process: batch_norm_forward_train's passes, with a choice
// of statistics per channel. mean and var get the batch statistics of every channel (the running
// update needs them all). Channels with use_batch[c] != 0 are normalized with them; the others
// with running_mean[c] and 1 / sqrt(running_var[c] + eps), their statistics as given (from before
// the caller's running update). used_mean and used_invstd get the statistics each channel was
// normalized with: what batch_norm_backward_train_masked takes. use_batch has the param dtype.
void batch_norm_forward_train_masked(const TensorView& x, const TensorView& weight,
                                     const TensorView& bias, const TensorView& use_batch,
                                     const TensorView& running_mean,
                                     const TensorView& running_var, double eps,
                                     const TensorView& y, const TensorView& mean,
                                     const TensorView& var, const TensorView& used_mean,
                                     const TensorView& used_invstd, const Launch& launch = {});

// StochNorm's training backward of one process, given the forward's used_mean and used_invstd as
// mean and invstd: batch_norm_backward_train where use_batch[c] != 0; elsewhere the statistics
// are constants, so dx = weight * invstd * dy. sum_dy and sum_dy_xmu are the sums of every channel
// (the parameter gradients are made of them). dx may be undefined.
void batch_norm_backward_train_masked(const TensorView& dy, const TensorView& x,
                                      const TensorView& mean, const TensorView& invstd,
                                      const TensorView& weight, const TensorView& use_batch,
                                      const TensorView& dx, const TensorView& sum_dy,
                                      const TensorView& sum_dy_xmu, const Launch& launch = {});

// The CUDA kernels behind the ops above (cuda/batchnorm.cu), with the same arguments. The ops
// check every argument and call these for CUDA tensors; they are not meant to be called directly.
namespace cuda {
int64_t batch_norm_workspace_size(const TensorView& x);
void batch_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch);
void batch_norm_normalize(const TensorView& x, const TensorView& mean, const TensorView& invstd,
                          const TensorView& weight, const TensorView& bias, const TensorView& y,
                          const Launch& launch);
void batch_norm_forward_train(const TensorView& x, const TensorView& weight, const TensorView& bias,
                              double eps, const TensorView& y, const TensorView& mean,
                              const TensorView& var, const TensorView& invstd,
                              const TensorView& running_mean, const TensorView& running_var,
                              double momentum, const Launch& launch);
void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch);
void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                               double count, const TensorView& dx, const Launch& launch);
void batch_norm_backward_train(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& dx, const TensorView& sum_dy,
                               const TensorView& sum_dy_xmu, const TensorView& dweight,
                               const Launch& launch);
void batch_norm_forward_train_masked(const TensorView& x, const TensorView& weight,
                                     const TensorView& bias, const TensorView& use_batch,
                                     const TensorView& running_mean,
                                     const TensorView& running_var, double eps,
                                     const TensorView& y, const TensorView& mean,
                                     const TensorView& var, const TensorView& used_mean,
                                     const TensorView& used_invstd, const Launch& launch);
void batch_norm_backward_train_masked(const TensorView& dy, const TensorView& x,
                                      const TensorView& mean, const TensorView& invstd,
                                      const TensorView& weight, const TensorView& use_batch,
                                      const TensorView& dx, const TensorView& sum_dy,
                                      const TensorView& sum_dy_xmu, const Launch& launch);
}  // namespace cuda

}  // namespace normkit
