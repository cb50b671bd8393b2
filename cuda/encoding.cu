// The Encoding family on CUDA: the kernels behind the ops of include/normkit/encoding.h for CUDA
// arrays, run between the caller's cuBLAS products. src/encoding.cpp checks every argument and
// calls these.
//
// One thread per row (b, i) of the (B, N, K) arrays walks that row's K values: distances, the
// softmax over K and their gradients are per-row computations that need no communication. A block
// holds kThreads consecutive rows of one batch, so with N-major storage (a (B, D, N) layer input
// seen as (B, N, D), with the (B, N, K) arrays allocated (B, K, N) alike, the layers' case)
// neighbouring threads read neighbouring addresses for every k and every feature d.
//
// Column sums over rows (sumA[b,k] = sum_i A, sumW[k], ds[k]) have two deterministic stages, as in
// batchnorm.cu: each warp reduces its 32 rows by shuffles into one float64 partial per k in the
// caller's workspace, then one block per output adds that output's partials in a fixed order.
// The workspace also holds ||c_k||^2 and the backward's <g[b,k], c[k]>. So nothing is allocated,
// no atomics are used, the host never waits (a step can be captured in a CUDA graph), and results
// do not depend on scheduling. Indexing is 64-bit and every grid loops, so no size is limited by
// a grid dimension; N in particular is unbounded.
//
// Dtypes: float32 and float64. The callers compute float16 inputs in float32, which their GEMMs
// need anyway.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "normkit/encoding.h"

namespace normkit::cuda {
namespace {

constexpr int kThreads = 256;  // threads (rows) per block
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = int64_t(1) << 30;

__host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t blocks) { return unsigned(std::clamp<int64_t>(blocks, 1, kMaxGrid)); }

// ------------------------------------------------------------------------------------------------
// Strided views, passed to kernels by value.

// A (B, N, K) or (B, N, D) array: element (b, i, k) at b * sb + i * si + k * sk.
template <class T>
struct Rows {
  T* p;
  int64_t sb, si, sk;
  __device__ T& at(int64_t b, int64_t i, int64_t k) const { return p[b * sb + i * si + k * sk]; }
};

// A (R, M) array (a 1-D one has sr = 0): element (r, m) at r * sr + m * sm.
template <class T>
struct Mat {
  T* p;
  int64_t sr, sm;
  __device__ T& at(int64_t r, int64_t m) const { return p[r * sr + m * sm]; }
};

template <class T>
Rows<T> rows(const TensorView& t) {
  if (!t.defined()) return {nullptr, 0, 0, 0};
  return {t.ptr<T>(), t.strides[0], t.strides[1], t.strides[2]};
}

template <class T>
Mat<T> mat(const TensorView& t) {
  if (t.ndim == 1) return {t.ptr<T>(), 0, t.strides[0]};
  return {t.ptr<T>(), t.strides[0], t.strides[1]};
}

// ------------------------------------------------------------------------------------------------
// Workspace: [ ||c_k||^2 (K) | <g[b,k], c[k]> (B*K) | partials (3 quantities x B x warps x K) ].

enum Quantity { kSumW = 0, kDs = 1, kSumA = 2 };

struct Workspace {
  double* c2;
  double* gc;
  double* partials;
  int64_t slots;  // B * warps * K: the size of one quantity's partials

  __device__ double* part(int q) const { return partials + q * slots; }
};

Workspace workspace(const char* op, const Launch& launch, const TensorView& ref, int64_t B,
                    int64_t N, int64_t K) {
  const int64_t need = normkit::encoding_workspace_size(B, N, K);
  double* base = checked_workspace(op, launch.workspace, ref, need,
                                   "encoding_workspace_size(B, N, K)");
  return {base, base + K, base + K + B * K, B * ceil_div(N, kWarp) * K};
}

cudaStream_t stream_of(const Launch& launch) { return static_cast<cudaStream_t>(launch.stream); }

// Calls fn(T{}) for float32 and float64; other dtypes are a TypeError.
template <class Fn>
void dispatch_float(const char* op, DType dtype, Fn&& fn) {
  if (dtype == DType::Float32) return fn(float{});
  if (dtype == DType::Float64) return fn(double{});
  fail(ErrorKind::Type, op, ": the CUDA kernels take float32 or float64 arrays, got ",
       dtype_name(dtype), " (compute float16 inputs in float32, as normkit.functional does)");
}

// ------------------------------------------------------------------------------------------------
// Device helpers.

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

// The rows of block-tile t: batch b and this thread's row i (kThreads rows per tile).
struct TileRow {
  int64_t b, i;
  bool active;         // i < N
  bool warp_active;    // some row of this thread's warp is < N (the warp's partial exists)
  int64_t warp_slot;   // b * warps + i / 32: the warp's partial
};

__device__ TileRow tile_row(int64_t t, int64_t N, int64_t tiles_per_batch, int64_t warps) {
  TileRow r;
  r.b = t / tiles_per_batch;
  r.i = (t % tiles_per_batch) * kThreads + threadIdx.x;
  r.active = r.i < N;
  r.warp_active = r.i - (threadIdx.x % kWarp) < N;
  r.warp_slot = r.b * warps + r.i / kWarp;
  return r;
}

// The warp's sum of `v` (0 from rows past N) into its partial slot for codeword k.
template <class T>
__device__ __forceinline__ void warp_partial(T v, double* part, int64_t slot, int64_t K,
                                             int64_t k) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) part[slot * K + k] = double(v);
}

// ------------------------------------------------------------------------------------------------
// Kernels.

// c2[k] = ||c_k||^2 (one warp per codeword, float64).
template <class T>
__global__ void codeword_norms(Mat<const T> c, int64_t K, int64_t D, double* c2) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  for (int64_t k = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp; k < K; k += warps) {
    double acc = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const double v = c.at(k, d);
      acc += v * v;
    }
    acc = warp_sum(acc);
    if (lane == 0) c2[k] = acc;
  }
}

// gc[b*K + k] = <g[b,k], c[k]> (one warp per pair, float64).
template <class T>
__global__ void gradient_codeword_dots(Rows<const T> g, Mat<const T> c, int64_t B, int64_t K,
                                       int64_t D, double* gc) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  for (int64_t bk = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp; bk < B * K;
       bk += warps) {
    const int64_t b = bk / K, k = bk % K;
    double acc = 0;
    for (int64_t d = lane; d < D; d += kWarp) acc += double(g.at(b, k, d)) * double(c.at(k, d));
    acc = warp_sum(acc);
    if (lane == 0) gc[bk] = acc;
  }
}

template <class T>
struct ForwardArgs {
  Rows<const T> x;      // (B, N, D)
  Mat<const T> c;       // (K, D)
  Mat<const T> s;       // (K,)
  Rows<const T> xc;     // X C^T
  Rows<T> d2;           // distances
  Rows<T> out;          // SL (optional) or A; may alias xc
  int64_t B, N, D, K, warps;
};

// D2 from the GEMM form, recomputed from the residuals where it cancels (see encoding.h), then
// SL = s D2 (kSoftmax false) or A = softmax_k(s D2) with the warps' partial sums of A.
template <class T, bool kSoftmax>
__global__ void forward_rows(ForwardArgs<T> a, Workspace ws) {
  const int64_t tiles_per_batch = ceil_div(a.N, kThreads);
  const T ratio = T(kCancellationRatio);
  for (int64_t t = blockIdx.x; t < a.B * tiles_per_batch; t += gridDim.x) {
    const TileRow r = tile_row(t, a.N, tiles_per_batch, a.warps);
    if (!r.warp_active) continue;  // whole warps leave together
    const int64_t b = r.b, i = r.i;
    T x2 = 0, mx = -INFINITY;
    if (r.active) {
      for (int64_t d = 0; d < a.D; ++d) {
        const T v = a.x.at(b, i, d);
        x2 += v * v;
      }
      for (int64_t k = 0; k < a.K; ++k) {
        const T ck = T(ws.c2[k]);
        T dist = x2 - 2 * a.xc.at(b, i, k) + ck;
        if (!(ratio * dist >= x2 + ck)) {  // cancels (also dist < 0 and NaN): the residual form
          dist = 0;
          for (int64_t d = 0; d < a.D; ++d) {
            const T e = a.x.at(b, i, d) - a.c.at(k, d);
            dist += e * e;
          }
        }
        a.d2.at(b, i, k) = dist;
        const T sl = a.s.at(0, k) * dist;
        if (kSoftmax) {
          mx = sl > mx ? sl : mx;  // a NaN stays out of the maximum and poisons its own term
        } else if (a.out.p) {
          a.out.at(b, i, k) = sl;
        }
      }
    }
    if (!kSoftmax) continue;
    T total = 0;
    if (r.active) {
      for (int64_t k = 0; k < a.K; ++k) {
        const T e = exp_of(a.s.at(0, k) * a.d2.at(b, i, k) - mx);
        a.out.at(b, i, k) = e;
        total += e;
      }
    }
    const T inv = T(1) / total;
    for (int64_t k = 0; k < a.K; ++k) {
      T p = 0;
      if (r.active) {
        p = a.out.at(b, i, k) * inv;
        a.out.at(b, i, k) = p;
      }
      warp_partial(p, ws.part(kSumA), r.warp_slot, a.K, k);
    }
  }
}

template <class T>
struct BackwardArgs {
  Rows<const T> g;   // dSL (scaled_l2) or A (encoding)
  Rows<const T> d2;
  Rows<const T> xg;  // X G^T (encoding only)
  Rows<T> w;         // W = 2 s dSL; may alias g (scaled_l2) or xg (encoding)
  Mat<T> r;          // (B, N): sum_k W
  Mat<const T> s;
  int64_t B, N, K, warps;
};

// The gradient weights of each row and the warps' partial sums of W, dSL D2 (and A). For the
// Encoding, dSL comes through the softmax first: dA = XG - <g, c>, dSL = A (dA - sum_k A dA).
template <class T, bool kEncoding>
__global__ void backward_rows(BackwardArgs<T> a, Workspace ws) {
  const int64_t tiles_per_batch = ceil_div(a.N, kThreads);
  for (int64_t t = blockIdx.x; t < a.B * tiles_per_batch; t += gridDim.x) {
    const TileRow r = tile_row(t, a.N, tiles_per_batch, a.warps);
    if (!r.warp_active) continue;
    const int64_t b = r.b, i = r.i;
    T dot = 0;
    if (kEncoding) {
      for (int64_t k = 0; k < a.K; ++k) {
        T p = 0;
        if (r.active) {
          p = a.g.at(b, i, k);
          dot += p * (a.xg.at(b, i, k) - T(ws.gc[b * a.K + k]));
        }
        warp_partial(p, ws.part(kSumA), r.warp_slot, a.K, k);
      }
    }
    T rsum = 0;
    for (int64_t k = 0; k < a.K; ++k) {
      T dsl_d2 = 0, w = 0;
      if (r.active) {
        T dsl = a.g.at(b, i, k);
        if (kEncoding) dsl *= a.xg.at(b, i, k) - T(ws.gc[b * a.K + k]) - dot;
        dsl_d2 = dsl * a.d2.at(b, i, k);
        w = 2 * a.s.at(0, k) * dsl;
        a.w.at(b, i, k) = w;  // after this thread's last read of the element it may alias
        rsum += w;
      }
      warp_partial(w, ws.part(kSumW), r.warp_slot, a.K, k);
      warp_partial(dsl_d2, ws.part(kDs), r.warp_slot, a.K, k);
    }
    if (r.active) a.r.at(b, i) = rsum;
  }
}

// out(o / K, o % K) = the sum of output o's `count` partials part[(o / K) * count * K + j * K +
// o % K], j = 0..count-1: one block per output, in a fixed order.
template <class T>
__global__ void sum_partials(const double* part, int64_t K, int64_t count, int64_t outputs,
                             Mat<T> out) {
  __shared__ double buf[kThreads];
  for (int64_t o = blockIdx.x; o < outputs; o += gridDim.x) {
    const double* base = part + (o / K) * count * K + o % K;
    double acc = 0;
    for (int64_t j = threadIdx.x; j < count; j += kThreads) acc += base[j * K];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half >>= 1) {
      if (threadIdx.x < half) buf[threadIdx.x] += buf[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) out.at(o / K, o % K) = T(buf[0]);
    __syncthreads();  // buf is reused by the block's next output
  }
}

// dX[b,i,d] += r[b,i] X[b,i,d], walking whichever of i and d is X's unit stride fastest.
template <class T>
__global__ void add_scaled(Rows<const T> x, Mat<const T> r, Rows<T> dx, int64_t B, int64_t N,
                           int64_t D, bool n_fastest) {
  const int64_t total = B * N * D;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    int64_t b, i, d;
    if (n_fastest) {
      i = idx % N;
      d = (idx / N) % D;
      b = idx / (N * D);
    } else {
      d = idx % D;
      i = (idx / D) % N;
      b = idx / (N * D);
    }
    dx.at(b, i, d) += r.at(b, i) * x.at(b, i, d);
  }
}

// ------------------------------------------------------------------------------------------------
// Launch helpers.

template <class T>
void launch_codeword_norms(const TensorView& C, double* c2, cudaStream_t stream) {
  const int64_t K = C.shape[0], D = C.shape[1];
  if (K == 0) return;
  codeword_norms<T><<<grid_for(ceil_div(K * kWarp, kThreads)), kThreads, 0, stream>>>(
      mat<const T>(C), K, D, c2);
  check_launch("codeword_norms");
}

// sumW and ds (per k, over b and warps) and, when given, sumA (per (b, k), over warps).
template <class T>
void launch_sums(const Workspace& ws, int64_t B, int64_t warps, int64_t K, const TensorView& sumW,
                 const TensorView& ds, const TensorView& sumA, cudaStream_t stream) {
  if (K == 0) return;
  if (sumW.defined()) {
    sum_partials<T><<<grid_for(K), kThreads, 0, stream>>>(ws.partials + kSumW * ws.slots, K,
                                                          B * warps, K, mat<T>(sumW));
    check_launch("sum_partials(sumW)");
    sum_partials<T><<<grid_for(K), kThreads, 0, stream>>>(ws.partials + kDs * ws.slots, K,
                                                          B * warps, K, mat<T>(ds));
    check_launch("sum_partials(ds)");
  }
  if (sumA.defined() && B > 0) {
    sum_partials<T><<<grid_for(B * K), kThreads, 0, stream>>>(ws.partials + kSumA * ws.slots, K,
                                                              warps, B * K, mat<T>(sumA));
    check_launch("sum_partials(sumA)");
  }
}

template <class T, bool kSoftmax>
void launch_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                    const TensorView& XC, const TensorView& D2, const TensorView& out,
                    const TensorView& sumA, const Workspace& ws, cudaStream_t stream) {
  const int64_t B = X.shape[0], N = X.shape[1], D = X.shape[2], K = C.shape[0];
  const int64_t warps = ceil_div(N, kWarp);
  launch_codeword_norms<T>(C, ws.c2, stream);
  if (B * N * K > 0) {
    const ForwardArgs<T> args{rows<const T>(X), mat<const T>(C), mat<const T>(s),
                              rows<const T>(XC), rows<T>(D2), rows<T>(out), B, N, D, K, warps};
    forward_rows<T, kSoftmax><<<grid_for(B * ceil_div(N, kThreads)), kThreads, 0, stream>>>(
        args, ws);
    check_launch("encoding forward_rows");
  }
  if (kSoftmax) launch_sums<T>(ws, B, warps, K, TensorView{}, TensorView{}, sumA, stream);
}

}  // namespace

// ================================================================================================
// The ops (arguments checked by src/encoding.cpp).

void scaled_l2_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                       const TensorView& XC, const TensorView& D2, const TensorView& SL,
                       const Launch& launch) {
  const char* op = "scaled_l2_forward";
  DeviceGuard guard(X.device_id);
  const Workspace ws = workspace(op, launch, X, X.shape[0], X.shape[1], C.shape[0]);
  dispatch_float(op, X.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_forward<T, false>(X, C, s, XC, D2, SL, TensorView{}, ws, stream_of(launch));
  });
}

void encoding_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                      const TensorView& XC, const TensorView& D2, const TensorView& A,
                      const TensorView& sumA, const Launch& launch) {
  const char* op = "encoding_forward";
  DeviceGuard guard(X.device_id);
  const Workspace ws = workspace(op, launch, X, X.shape[0], X.shape[1], C.shape[0]);
  dispatch_float(op, X.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_forward<T, true>(X, C, s, XC, D2, A, sumA, ws, stream_of(launch));
  });
}

void scaled_l2_backward(const TensorView& dSL, const TensorView& s, const TensorView& D2,
                        const TensorView& W, const TensorView& r, const TensorView& sumW,
                        const TensorView& ds, const Launch& launch) {
  const char* op = "scaled_l2_backward";
  const int64_t B = dSL.shape[0], N = dSL.shape[1], K = dSL.shape[2];
  const int64_t warps = ceil_div(N, kWarp);
  DeviceGuard guard(dSL.device_id);
  const Workspace ws = workspace(op, launch, dSL, B, N, K);
  dispatch_float(op, dSL.dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaStream_t stream = stream_of(launch);
    if (B * N * K > 0) {
      const BackwardArgs<T> args{rows<const T>(dSL), rows<const T>(D2), {nullptr, 0, 0, 0},
                                 rows<T>(W),         mat<T>(r),          mat<const T>(s),
                                 B,                  N,                  K,
                                 warps};
      backward_rows<T, false><<<grid_for(B * ceil_div(N, kThreads)), kThreads, 0, stream>>>(
          args, ws);
      check_launch("scaled_l2 backward_rows");
    }
    launch_sums<T>(ws, B, warps, K, sumW, ds, TensorView{}, stream);
  });
}

void encoding_backward(const TensorView& G, const TensorView& C, const TensorView& s,
                       const TensorView& A, const TensorView& D2, const TensorView& XG,
                       const TensorView& W, const TensorView& r, const TensorView& sumW,
                       const TensorView& sumA, const TensorView& ds, const Launch& launch) {
  const char* op = "encoding_backward";
  const int64_t B = A.shape[0], N = A.shape[1], K = A.shape[2], D = C.shape[1];
  const int64_t warps = ceil_div(N, kWarp);
  DeviceGuard guard(A.device_id);
  const Workspace ws = workspace(op, launch, A, B, N, K);
  dispatch_float(op, A.dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaStream_t stream = stream_of(launch);
    if (B * K > 0) {
      gradient_codeword_dots<T><<<grid_for(ceil_div(B * K * kWarp, kThreads)), kThreads, 0,
                                  stream>>>(rows<const T>(G), mat<const T>(C), B, K, D, ws.gc);
      check_launch("gradient_codeword_dots");
    }
    if (B * N * K > 0) {
      const BackwardArgs<T> args{rows<const T>(A), rows<const T>(D2), rows<const T>(XG),
                                 rows<T>(W),       mat<T>(r),         mat<const T>(s),
                                 B,                N,                 K,
                                 warps};
      backward_rows<T, true><<<grid_for(B * ceil_div(N, kThreads)), kThreads, 0, stream>>>(
          args, ws);
      check_launch("encoding backward_rows");
    }
    launch_sums<T>(ws, B, warps, K, sumW, ds, sumA, stream);
  });
}

void add_scaled_features(const TensorView& X, const TensorView& r, const TensorView& dX,
                         const Launch& launch) {
  const char* op = "add_scaled_features";
  const int64_t B = X.shape[0], N = X.shape[1], D = X.shape[2];
  if (B * N * D == 0) return;
  DeviceGuard guard(X.device_id);
  dispatch_float(op, X.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool n_fastest = X.strides[1] == 1 && dX.strides[1] == 1;
    add_scaled<T><<<grid_for(ceil_div(B * N * D, kThreads)), kThreads, 0, stream_of(launch)>>>(
        rows<const T>(X), mat<const T>(r), rows<T>(dX), B, N, D, n_fastest);
    check_launch("add_scaled_features");
  });
}

}  // namespace normkit::cuda
