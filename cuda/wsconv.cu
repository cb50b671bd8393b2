// Weight standardization on CUDA: the kernels behind include/normkit/wsconv.h's ops for CUDA
// arrays (src/wsconv.cpp checks the arguments).
//
// One block per row (one channel's filter): the block sums the row in float64 (shifted by its
// first value in the forward, so the sums stay exact), reduces the sums in shared memory in a fixed
// order, and then writes the row. Every dtype; statistics and the pass arithmetic in acc_t (float32
// for float16/bfloat16/float32, float64 for float64). Rows are few and short on real layers, so a
// block per row fills the GPU without a second reduction stage and needs no workspace.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "normkit/wsconv.h"

namespace normkit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;  // rows per launch; blocks stride over the rest

// Sums three values of every thread over the block (tree in shared memory: a fixed order);
// every thread gets the totals.
__device__ void block_sum3(double& a, double& b, double& c) {
  __shared__ double sa[kThreads], sb[kThreads], sc[kThreads];
  const int t = threadIdx.x;
  sa[t] = a;
  sb[t] = b;
  sc[t] = c;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      sa[t] += sa[t + half];
      sb[t] += sb[t + half];
      sc[t] += sc[t + half];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
  c = sc[0];
  __syncthreads();  // the buffers are reused by the next row
}

template <class T>
__global__ void __launch_bounds__(kThreads)
ws_forward_kernel(const T* w, const acc_t<T>* __restrict__ gain,
                  WSConvention convention, double eps, T* w_hat, acc_t<T>* __restrict__ mean,
                  acc_t<T>* __restrict__ rstd, WSRows rows) {
  using A = acc_t<T>;
  const int64_t K = rows.K;
  for (int64_t r = blockIdx.x; r < rows.R; r += gridDim.x) {
    const T* x = w + r * rows.sw;
    const double shift = to_acc(x[0]);
    double s1 = 0, s2 = 0, unused = 0;
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {
      const double v = double(to_acc(x[i])) - shift;
      s1 += v;
      s2 += v * v;
    }
    block_sum3(s1, s2, unused);
    const double m = shift + s1 / double(K);
    const double m2 = fmax(0.0, s2 - s1 * s1 / double(K));
    bool clamped;
    const double rs = rsqrt(ws_denominator(convention, m2, K, rows.fan_all, eps, &clamped));
    if (threadIdx.x == 0) {
      mean[r] = A(m);
      rstd[r] = A(rs);
    }
    const A scale = A(rs * (gain ? double(gain[r]) : 1.0)), mf = A(m);
    // w_hat may alias w (so neither is __restrict__): each thread reads and writes only its own
    // elements, after the sums.
    T* y = w_hat + r * rows.sa;
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {
      y[i] = from_acc<T>((to_acc(x[i]) - mf) * scale);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
ws_backward_kernel(const T* g, const T* __restrict__ w, const acc_t<T>* __restrict__ gain,
                   const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                   WSConvention convention, double eps, T* dw, acc_t<T>* __restrict__ dgain,
                   WSRows rows) {
  using A = acc_t<T>;
  const int64_t K = rows.K;
  for (int64_t r = blockIdx.x; r < rows.R; r += gridDim.x) {
    const T* x = w + r * rows.sw;
    const T* gr = g + r * rows.sa;
    const double m = mean[r];
    double sg = 0, sgc = 0, scc = 0;
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {
      const double c = double(to_acc(x[i])) - m, gv = to_acc(gr[i]);
      sg += gv;
      sgc += gv * c;
      scc += c * c;
    }
    block_sum3(sg, sgc, scc);
    const double rs = rstd[r];
    if (dgain && threadIdx.x == 0) dgain[r] = A(rs * sgc);
    if (!dw) continue;
    bool clamped;
    ws_denominator(convention, scc, K, rows.fan_all, eps, &clamped);
    const double k = ws_var_coefficient(convention, K, rows.fan_all, clamped);
    const double gn = gain ? double(gain[r]) : 1.0;
    const A a = A(gn * rs), b = A(-gn * rs * rs * rs * k * sgc), mf = A(m);
    const A c0 = A(-gn * rs * sg / double(K));
    // dw may alias g (normkit.torch writes dw into the convolution's fresh weight gradient, so
    // neither is __restrict__): each thread reads and writes only its own elements, after the sums.
    T* out = dw + r * rows.sb;
    for (int64_t i = threadIdx.x; i < K; i += kThreads) {
      out[i] = from_acc<T>(a * to_acc(gr[i]) + b * (to_acc(x[i]) - mf) + c0);
    }
  }
}

unsigned grid_for(int64_t rows) { return unsigned(std::clamp<int64_t>(rows, 1, kMaxGrid)); }

template <class A>
const A* optional(const TensorView& t) {
  return t.defined() ? t.ptr<A>() : nullptr;
}

}  // namespace

void ws_standardize_forward(const TensorView& w, const TensorView& gain, WSConvention convention,
                            double eps, const TensorView& w_hat, const TensorView& mean,
                            const TensorView& rstd, const WSRows& rows, const Launch& launch) {
  DeviceGuard guard(w.device_id);
  const auto stream = static_cast<cudaStream_t>(launch.stream);
  dispatch_dtype(w.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    ws_forward_kernel<T><<<grid_for(rows.R), kThreads, 0, stream>>>(
        w.ptr<T>(), optional<A>(gain), convention, eps, w_hat.ptr<T>(), mean.ptr<A>(),
        rstd.ptr<A>(), rows);
    check_launch("ws_forward_kernel");
  });
}

void ws_standardize_backward(const TensorView& dw_hat, const TensorView& w,
                             const TensorView& gain, const TensorView& mean,
                             const TensorView& rstd, WSConvention convention, double eps,
                             const TensorView& dw, const TensorView& dgain, const WSRows& rows,
                             const Launch& launch) {
  DeviceGuard guard(w.device_id);
  const auto stream = static_cast<cudaStream_t>(launch.stream);
  dispatch_dtype(w.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    ws_backward_kernel<T><<<grid_for(rows.R), kThreads, 0, stream>>>(
        dw_hat.ptr<T>(), w.ptr<T>(), optional<A>(gain), mean.ptr<A>(), rstd.ptr<A>(), convention,
        eps, dw.defined() ? dw.ptr<T>() : nullptr, dgain.defined() ? dgain.ptr<A>() : nullptr,
        rows);
    check_launch("ws_backward_kernel");
  });
}

}  // namespace normkit::cuda
