// Weight standardization: the argument checks (shared by both devices), dispatch, and the CPU
// kernels. The CUDA kernels are in cuda/wsconv.cu; they receive arguments checked here.
//
// Threads take whole rows (one output channel's filter, a few thousand values at most on real
// layers) in a static split, so each row's second pass reads it from cache and every sum has a
// fixed order. Each pass is vectorized over the row: the sums in float32 lanes (float64 for
// float64 data) flushed into float64, the writes as one affine map per row.
#include "normkit/wsconv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "cpu_stream.h"
#include "cpu_threads.h"
#include "normkit/dispatch.h"

// Small helpers are inlined into each clone, so they take that clone's vector width.
#define NK_INLINE inline __attribute__((always_inline))

namespace normkit {

WSConvention ws_convention(int64_t value) {
  NK_CHECK_VALUE(value >= 0 && value <= 2, "ws_standardize: unknown convention ", value,
                 " (0 elektronn3, 1 nfnet, 2 timm)");
  return static_cast<WSConvention>(value);
}

namespace {

constexpr int kLanes = 16;
constexpr int64_t kFlushEvery = 2048;  // values per float32 lane block before flushing to float64
constexpr int64_t kGrain = 1 << 14;    // values per thread before another one helps
constexpr int64_t kPilot = 16;         // values whose mean shifts the forward's sums
// dw is a parameter's gradient: nothing reads it before the optimizer step, after the rest of the
// backward has been through the cache, so a large one is written with streaming stores (no read
// of each line before it is overwritten, and w and dw_hat stay cached), unless it is dw_hat
// itself (see ws_standardize_backward). Measured on a 2-core
// Zen 4: no change at 2.4 MB, 20-30% off the backward at 9.4 MB (a 512x512x3x3 weight). w_hat
// is not streamed below the cache size: the convolution reads it right away.
constexpr int64_t kStreamGradBytes = int64_t(4) << 20;

// Arithmetic type of a storage type: float64 for float64, float32 for float32 and bfloat16.
template <class T>
using arith_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads and stores of the storage types (bfloat16 through dispatch.h's exact conversions), one
// value and kLanes values at a time.
NK_INLINE float load(float v) { return v; }
NK_INLINE double load(double v) { return v; }
NK_INLINE float load(BFloat16 v) { return bf16_to_float(v); }

template <class T>
NK_INLINE T store(arith_t<T> v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return float_to_bf16(v);
  } else {
    return v;
  }
}

template <class T>
struct Lanes {
  using A = arith_t<T>;
  typedef A V __attribute__((vector_size(kLanes * sizeof(A))));
  typedef uint16_t U16 __attribute__((vector_size(kLanes * 2)));
  typedef uint32_t U32 __attribute__((vector_size(kLanes * 4)));

  NK_INLINE static V load(const T* p) {
    V v;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(&v, p, sizeof v);
    } else {
      U16 h;  // bfloat16 is the upper half of a float32
      std::memcpy(&h, p, sizeof h);
      const U32 w = __builtin_convertvector(h, U32) << 16;
      std::memcpy(&v, &w, sizeof v);
    }
    return v;
  }

  NK_INLINE static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(p, &v, sizeof v);
    } else {
      // float_to_bf16 on every lane: round to nearest even, NaN kept a (quiet) NaN
      U32 u;
      std::memcpy(&u, &v, sizeof u);
      const U32 nan = (U32)((u & 0x7fffffffu) > 0x7f800000u);
      const U32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      const U32 quiet = (u >> 16) | 0x40u;
      const U16 h = __builtin_convertvector((nan & quiet) | (~nan & rounded), U16);
      std::memcpy(p, &h, sizeof h);
    }
  }
};

template <class V>
NK_INLINE double hsum(const V& v) {
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += double(v[l]);
  return sum;
}

// The sums of one row's statistics pass, with d = x - k: s[0] += sum d, s[1] += sum d^2 (the
// forward: g null), or s[0] += sum g, s[1] += sum g d, s[2] += sum d^2 (the backward). Two chains
// of float32 lanes (float64 for float64 data) hide the add latency; they are flushed into float64
// every kFlushEvery values, so long rows stay exact without float64 vectors.
template <class T, bool kBackward>
NK_INLINE void row_sums(const T* __restrict x, const T* __restrict g, int64_t K, arith_t<T> k,
                        double* s) {
  using A = arith_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int kSums = kBackward ? 3 : 2;
  for (int64_t i0 = 0; i0 < K; i0 += kFlushEvery) {
    const int64_t end = std::min(K, i0 + kFlushEvery);
    V u[kSums] = {}, w[kSums] = {};
    auto add = [&](V* acc, int64_t i) {
      const V d = L::load(x + i) - k;
      if constexpr (kBackward) {
        const V gv = L::load(g + i);
        acc[0] += gv;
        acc[1] += gv * d;
        acc[2] += d * d;
      } else {
        acc[0] += d;
        acc[1] += d * d;
      }
    };
    int64_t i = i0;
    for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
      add(u, i);
      add(w, i + kLanes);
    }
    if (i + kLanes <= end) {  // rows of 9 * C_in values would otherwise leave up to 31 scalars
      add(u, i);
      i += kLanes;
    }
    A t[kSums] = {};
    for (; i < end; ++i) {
      const A d = load(x[i]) - k;
      if constexpr (kBackward) {
        const A gv = load(g[i]);
        t[0] += gv;
        t[1] += gv * d;
        t[2] += d * d;
      } else {
        t[0] += d;
        t[1] += d * d;
      }
    }
    for (int j = 0; j < kSums; ++j) s[j] += hsum(u[j] + w[j]) + double(t[j]);
  }
}

// out = a * g + b * (x - m) + c over a row of K values (without the g term: kHasG false, g
// unused); out may be x or g (nothing here is __restrict__: each value is read before it is
// overwritten). The row is in cache by now (and the next one on its way: rows follow
// each other in memory, so the hardware prefetchers' streams carry on from row to row).
// `stream`: streaming stores (float32/float64; see cpu_stream.h).
template <class T, bool kHasG, class A = arith_t<T>>
NK_INLINE void row_affine(const T* g, const T* x, T* out, int64_t K, A a, A b, A m, A c,
                          bool stream) {
  using L = Lanes<T>;
  auto one = [&](int64_t i) {
    if constexpr (kHasG) {
      out[i] = store<T>(a * load(g[i]) + b * (load(x[i]) - m) + c);
    } else {
      out[i] = store<T>(b * (load(x[i]) - m) + c);
    }
  };
  auto lanes = [&](int64_t i) {
    if constexpr (kHasG) {
      return a * L::load(g + i) + b * (L::load(x + i) - m) + c;
    } else {
      return b * (L::load(x + i) - m) + c;
    }
  };
  int64_t i = 0;
  if constexpr (cpu::kCanStream<T>) {
    if (stream) {
      for (; i < K && reinterpret_cast<uintptr_t>(out + i) % cpu::kStreamAlign; ++i) one(i);
      for (; i + kLanes <= K; i += kLanes) cpu::stream_store(out + i, lanes(i));
    }
  }
  for (; i + kLanes <= K; i += kLanes) L::store(out + i, lanes(i));
  for (; i < K; ++i) one(i);
}

// Whether dims 1.. of t are dense in some order (a row is one contiguous block of K values).
bool rows_dense(const TensorView& t) {
  int64_t expected = 1;
  int seen = 0;
  bool used[kMaxDims] = {};
  for (int d = 1; d < t.ndim; ++d) {
    if (t.shape[d] == 1) used[d] = true, ++seen;
  }
  while (seen < t.ndim - 1) {
    int pick = -1;
    for (int d = 1; d < t.ndim; ++d) {
      if (!used[d] && t.strides[d] == expected) pick = d;
    }
    if (pick < 0) return false;
    used[pick] = true;
    ++seen;
    expected *= t.shape[pick];
  }
  return true;
}

// Checks a weight-shaped argument against w: same shape, dtype, device and strides of dims 1..
void check_like_w(const char* op, const TensorView& t, const char* name, const TensorView& w) {
  NK_CHECK_TYPE(t.dtype == w.dtype, op, ": ", name, " is ", dtype_name(t.dtype), " but w is ",
                dtype_name(w.dtype));
  NK_CHECK_TYPE(t.device == w.device && t.device_id == w.device_id, op, ": ", name,
                " is on another device than w");
  bool same = t.ndim == w.ndim;
  for (int d = 0; same && d < w.ndim; ++d) {
    same = t.shape[d] == w.shape[d] && (d == 0 || w.shape[d] == 1 ||
                                        t.strides[d] == w.strides[d]);
  }
  NK_CHECK_VALUE(same, op, ": ", name, " must have w's shape and the layout of w's dims 1.. "
                 "(torch.empty_like(w))");
}

// Checks a per-row argument: (R,), param dtype, on w's device, any stride.
void check_row(const char* op, const TensorView& t, const char* name, const TensorView& w) {
  if (!t.defined()) return;
  NK_CHECK_TYPE(t.dtype == param_dtype(w.dtype), op, ": ", name, " must be ",
                dtype_name(param_dtype(w.dtype)), " for ", dtype_name(w.dtype), " w, got ",
                dtype_name(t.dtype));
  NK_CHECK_TYPE(t.device == w.device && t.device_id == w.device_id, op, ": ", name,
                " is on another device than w");
  NK_CHECK_VALUE(t.ndim == 1 && t.shape[0] == w.shape[0], op, ": ", name, " must have shape (",
                 w.shape[0], ",) (one value per channel of dim 0 of w)");
}

// float16 has no CPU kernel here (bfloat16, float32 and float64 do).
[[noreturn]] void fail_half(const char* op) {
  fail(ErrorKind::Type, op, ": float16 is not supported on the CPU (bfloat16, float32 and "
       "float64 are; float16 runs on CUDA)");
}

// The kernels index per-channel arrays densely.
void check_contiguous_rows(const char* op, const WSRows& rows,
                           std::initializer_list<const TensorView*> arrays) {
  for (const TensorView* t : arrays) {
    NK_CHECK_VALUE(!t->defined() || t->strides[0] == 1 || rows.R <= 1, op,
                   ": per-channel arrays (gain, mean, rstd, dgain) must be contiguous");
  }
}

WSRows check_w(const char* op, const TensorView& w, WSConvention convention, double eps) {
  NK_CHECK_VALUE(w.defined() && w.ndim >= 2, op, ": w must be a weight of 2 or more dims "
                 "(C, ...), got ", w.defined() ? w.ndim : 0, " dims");
  NK_CHECK_VALUE(eps > 0 && std::isfinite(eps), op, ": eps must be a finite number > 0, got ",
                 eps);
  NK_CHECK_VALUE(rows_dense(w), op, ": w's dims 1.. must be dense (a contiguous or "
                 "channels-last weight); pass a contiguous copy");
  WSRows rows;
  rows.R = w.shape[0];
  rows.K = w.numel() / std::max<int64_t>(rows.R, 1);
  rows.fan_all = w.numel();
  rows.sw = w.strides[0];
  NK_CHECK_VALUE(rows.R == 0 || rows.K >= 1, op, ": w has no values per channel");
  NK_CHECK_VALUE(convention != WSConvention::Elektronn3 || rows.R == 0 || rows.K >= 2, op,
                 ": the elektronn3 convention (unbiased variance) needs at least 2 values per "
                 "channel, w has ", rows.K);
  return rows;
}

template <class T, class A = arith_t<T>>
NK_HOT void forward_rows(const T* w, const A* gain, WSConvention convention, double eps, T* w_hat,
                         A* mean, A* rstd, WSRows rows, int64_t r0, int64_t r1, bool stream) {
  const int64_t K = rows.K;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = w + r * rows.sw;
    // Sums shifted by the mean of the row's first values stay exact when |mean| >> std.
    const int64_t pilot = std::min(K, kPilot);
    A shift = 0;
    for (int64_t i = 0; i < pilot; ++i) shift += load(x[i]);
    shift /= A(pilot);
    double s[2] = {};
    row_sums<T, false>(x, nullptr, K, shift, s);
    const double m = double(shift) + s[0] / double(K);
    const double m2 = std::max(0.0, s[1] - s[0] * s[0] / double(K));
    bool clamped;
    const double r_std = 1.0 / std::sqrt(ws_denominator(convention, m2, K, rows.fan_all, eps,
                                                        &clamped));
    mean[r] = A(m);
    rstd[r] = A(r_std);
    row_affine<T, false>(nullptr, x, w_hat + r * rows.sa, K, A(0),
                         A(r_std * (gain ? gain[r] : 1.0)), A(m), A(0), stream);
  }
  if (stream) cpu::stream_fence();
}

template <class T, class A = arith_t<T>>
NK_HOT void backward_rows(const T* g, const T* w, const A* gain, const A* mean, const A* rstd,
                          WSConvention convention, double eps, T* dw, A* dgain, WSRows rows,
                          int64_t r0, int64_t r1, bool stream) {
  const int64_t K = rows.K;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = w + r * rows.sw;
    const T* gr = g + r * rows.sa;
    const A mf = mean[r];
    double s[3] = {};  // sum g, sum g (w - mean), sum (w - mean)^2
    row_sums<T, true>(x, gr, K, mf, s);
    const double rs = rstd[r];
    if (dgain) dgain[r] = A(rs * s[1]);
    if (!dw) continue;
    bool clamped;
    ws_denominator(convention, s[2], K, rows.fan_all, eps, &clamped);
    const double k = ws_var_coefficient(convention, K, rows.fan_all, clamped);
    const double gn = gain ? double(gain[r]) : 1.0;
    // dw = a * g + b * (w - mean) + c, coefficients in the arithmetic type for the pass.
    row_affine<T, true>(gr, x, dw + r * rows.sb, K, A(gn * rs),
                        A(-gn * rs * rs * rs * k * s[1]), mf, A(-gn * rs * s[0] / double(K)),
                        stream);
  }
  if (stream) cpu::stream_fence();
}

}  // namespace

void ws_standardize_forward(const TensorView& w, const TensorView& gain, WSConvention convention,
                            double eps, const TensorView& w_hat, const TensorView& mean,
                            const TensorView& rstd, const Launch& launch) {
  const char* op = "ws_standardize_forward";
  WSRows rows = check_w(op, w, convention, eps);
  check_like_w(op, w_hat, "w_hat", w);
  check_row(op, gain, "gain", w);
  NK_CHECK_VALUE(mean.defined() && rstd.defined(), op, ": mean and rstd are required outputs");
  check_row(op, mean, "mean", w);
  check_row(op, rstd, "rstd", w);
  check_contiguous_rows(op, rows, {&gain, &mean, &rstd});
  // w_hat may be w itself (in place), nothing else may overlap.
  check_output_memory(op, {{w_hat, "w_hat", true}, {mean, "mean", false}, {rstd, "rstd", false}},
                      {{w, "w", true}, {gain, "gain", false}});
  rows.sa = w_hat.strides[0];
  if (rows.R == 0) return;
  dispatch<true>(op, w, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, Half>) {
      fail_half(op);
    } else {
      using A = arith_t<T>;
      const int nt = cpu::threads_for(rows.R * rows.K, kGrain);
      const bool stream = cpu::should_stream(2 * rows.R * rows.K * int64_t(sizeof(T)),
                                                w_hat.data);
      cpu::parallel_ranges(nt, rows.R, [&](int, int64_t r0, int64_t r1) {
        forward_rows<T>(w.ptr<T>(), gain.defined() ? gain.ptr<A>() : nullptr, convention, eps,
                        w_hat.ptr<T>(), mean.ptr<A>(), rstd.ptr<A>(), rows, r0, r1, stream);
      });
    }
  }, [&] { cuda::ws_standardize_forward(w, gain, convention, eps, w_hat, mean, rstd, rows,
                                        launch); });
}

void ws_standardize_backward(const TensorView& dw_hat, const TensorView& w,
                             const TensorView& gain, const TensorView& mean,
                             const TensorView& rstd, WSConvention convention, double eps,
                             const TensorView& dw, const TensorView& dgain,
                             const Launch& launch) {
  const char* op = "ws_standardize_backward";
  WSRows rows = check_w(op, w, convention, eps);
  check_like_w(op, dw_hat, "dw_hat", w);
  if (dw.defined()) check_like_w(op, dw, "dw", w);
  NK_CHECK_VALUE(mean.defined() && rstd.defined(), op, ": mean and rstd (of the forward) are "
                 "required");
  check_row(op, gain, "gain", w);
  check_row(op, mean, "mean", w);
  check_row(op, rstd, "rstd", w);
  check_row(op, dgain, "dgain", w);
  check_contiguous_rows(op, rows, {&gain, &mean, &rstd, &dgain});
  // dw may be dw_hat itself (normkit.torch's WS layers write it into the convolution's weight
  // gradient), nothing else may overlap.
  check_output_memory(op, {{dw, "dw", true}, {dgain, "dgain", false}},
                      {{dw_hat, "dw_hat", true}, {w, "w", false}, {gain, "gain", false},
                       {mean, "mean", false}, {rstd, "rstd", false}});
  rows.sa = dw_hat.strides[0];
  rows.sb = dw.defined() ? dw.strides[0] : 0;
  if (rows.R == 0 || (!dw.defined() && !dgain.defined())) return;
  dispatch<true>(op, w, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, Half>) {
      fail_half(op);
    } else {
      using A = arith_t<T>;
      const int nt = cpu::threads_for(rows.R * rows.K, kGrain);
      const int64_t dw_bytes = rows.R * rows.K * int64_t(sizeof(T));
      // Written in place (dw = dw_hat), each line of dw was just read and is in cache: plain
      // stores cost no extra read there, and streaming ones would evict it (measured on this
      // 512x512x3x3 weight, one thread: 1.15 ms in place with plain stores, 1.6-1.8 streamed).
      const bool in_place = dw.defined() && dw.data == dw_hat.data;
      const bool stream = !in_place && (dw_bytes >= kStreamGradBytes ||
                                        cpu::should_stream(3 * dw_bytes, dw.data));
      cpu::parallel_ranges(nt, rows.R, [&](int, int64_t r0, int64_t r1) {
        backward_rows<T>(dw_hat.ptr<T>(), w.ptr<T>(), gain.defined() ? gain.ptr<A>() : nullptr,
                         mean.ptr<A>(), rstd.ptr<A>(), convention, eps,
                         dw.defined() ? dw.ptr<T>() : nullptr,
                         dgain.defined() ? dgain.ptr<A>() : nullptr, rows, r0, r1, stream);
      });
    }
  }, [&] { cuda::ws_standardize_backward(dw_hat, w, gain, mean, rstd, convention, eps, dw, dgain,
                                         rows, launch); });
}

}  // namespace normkit
