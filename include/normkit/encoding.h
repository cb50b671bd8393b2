// The Encoding layer family: scaled L2 distances to codewords, their softmax assignment, and the
// aggregation of residuals (Zhang et al., "Deep TEN", CVPR 2017).
//
// Notation: X (B, N, D) features, C (K, D) codewords, s (K) scales,
//   D2[b,i,k] = ||x[b,i] - c[k]||^2,   SL = s[k] * D2,   A = softmax over k of SL,
//   E[b,k]    = sum_i A[b,i,k] (x[b,i] - c[k])  =  (A^T X)[b,k] - (sum_i A[b,i,k]) c[k].
//
// Every product of the family is a matrix product (X C^T, A^T X, X G^T, A G, W C, W^T X), so the
// ops are split around them: the caller runs the GEMMs with its array library's BLAS (NumPy's,
// cuBLAS through CuPy, PyTorch's), and these ops do everything else in one fused pass over the
// (B, N, K) arrays, tile by tile. Nothing of size B*N*K*D is ever formed, and N has no limit.
//
//   forward:  XC = X C^T (caller) -> encoding_forward: D2, A, sumA -> E = A^T X - sumA c (caller)
//   backward: XG = X G^T (caller) -> encoding_backward: W, r, sums, ds
//             -> dX = A G - W C (caller) + add_scaled_features (dX += r x)
//             -> dC = sumW c - sum_b W^T X - sum_b sumA g (caller)
//
// Distances come from the GEMM form ||x||^2 - 2 x.c + ||c||^2, which cancels when |x| >> |x - c|.
// Where ||x||^2 + ||c||^2 exceeds a distance kCancellationRatio times, the distances to that
// codeword are recomputed from the residuals x - c (for the tile of rows at hand), so every D2
// carries at most a few bits more rounding than the residual form. The CPU kernels' threads:
// normkit/gemm_threads.h.
//
// On CUDA arrays the ops run on launch.stream without synchronizing the host, and all but
// add_scaled_features need launch.workspace of encoding_workspace_size(B, N, K) float64 values
// (cuda/encoding.cu keeps the codeword norms and its partial column sums there).
//
// Layouts: X and every (B, N, K) / (B, N) array may have any strides (a (B, D, N) tensor seen as
// (B, N, D) is the common case); unit strides along N or K take the fast paths. Outputs may alias
// the (B, N, K) input they replace (A over XC, W over XG). Dtypes: float32 and float64 on the CPU;
// C, s and every derived array have param_dtype(X.dtype). The CUDA kernels take float32 and
// float64 as well: callers compute float16 inputs in float32 (normkit.functional does).
#pragma once

#include <cstdint>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit {

// A distance is recomputed in the residual form when ||x||^2 + ||c||^2 exceeds it this many times.
constexpr double kCancellationRatio = 16.0;

// float64 values of workspace the CUDA ops need for B batches of N rows and K codewords:
// K + B*K + 3 * B * ceil(N / 32) * K (roughly 3/32 of a (B, N, K) array). Any device.
int64_t encoding_workspace_size(int64_t B, int64_t N, int64_t K);

// scaled_l2 after the caller's XC = X C^T (B, N, K): D2 = ||x - c||^2 and SL = s * D2.
// SL may be undefined (only D2 is wanted) and may alias XC.
void scaled_l2_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                       const TensorView& XC, const TensorView& D2, const TensorView& SL,
                       const Launch& launch = {});

// scaled_l2's backward up to the caller's GEMMs, from dSL (B, N, K) and the forward's D2:
//   W = 2 s dSL (may alias dSL),  r[b,i] = sum_k W,  sumW[k] = sum_{b,i} W,
//   ds[k] = sum_{b,i} dSL D2   (never SL / s: finite at s = 0).
// The caller finishes dX = r x - W C and dC = sumW c - sum_b W_b^T X_b.
void scaled_l2_backward(const TensorView& dSL, const TensorView& s, const TensorView& D2,
                        const TensorView& W, const TensorView& r, const TensorView& sumW,
                        const TensorView& ds, const Launch& launch = {});

// The Encoding forward after the caller's XC = X C^T: D2 as scaled_l2_forward, A = softmax over K
// of s * D2 (A may alias XC), and sumA[b,k] = sum_i A (B, K), so that E = A^T X - sumA c.
void encoding_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                      const TensorView& XC, const TensorView& D2, const TensorView& A,
                      const TensorView& sumA, const Launch& launch = {});

// The Encoding backward after the caller's XG = X G^T (B, N, K), from G = dE (B, K, D) and the
// forward's A and D2:
//   dA = XG - <g[b,k], c[k]>,   dSL = A (dA - sum_k A dA)   (through the softmax),
// then W, r, sumW and ds of dSL as in scaled_l2_backward (W may alias XG), and sumA as forward.
// The caller finishes dX = A G - W C + r x and dC = sumW c - sum_b W_b^T X_b - sum_b sumA g.
void encoding_backward(const TensorView& G, const TensorView& C, const TensorView& s,
                       const TensorView& A, const TensorView& D2, const TensorView& XG,
                       const TensorView& W, const TensorView& r, const TensorView& sumW,
                       const TensorView& sumA, const TensorView& ds,
                       const Launch& launch = {});

// dX[b,i,:] += r[b,i] * X[b,i,:]: the part of the distance gradient that is no matrix product.
void add_scaled_features(const TensorView& X, const TensorView& r, const TensorView& dX,
                         const Launch& launch = {});

// The CUDA kernels behind the ops above (cuda/encoding.cu), with the same arguments. The ops check
// every argument and call these for CUDA arrays; they are not meant to be called directly.
namespace cuda {
void scaled_l2_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                       const TensorView& XC, const TensorView& D2, const TensorView& SL,
                       const Launch& launch);
void scaled_l2_backward(const TensorView& dSL, const TensorView& s, const TensorView& D2,
                        const TensorView& W, const TensorView& r, const TensorView& sumW,
                        const TensorView& ds, const Launch& launch);
void encoding_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                      const TensorView& XC, const TensorView& D2, const TensorView& A,
                      const TensorView& sumA, const Launch& launch);
void encoding_backward(const TensorView& G, const TensorView& C, const TensorView& s,
                       const TensorView& A, const TensorView& D2, const TensorView& XG,
                       const TensorView& W, const TensorView& r, const TensorView& sumW,
                       const TensorView& sumA, const TensorView& ds, const Launch& launch);
void add_scaled_features(const TensorView& X, const TensorView& r, const TensorView& dX,
                         const Launch& launch);
}  // namespace cuda

}  // namespace normkit
