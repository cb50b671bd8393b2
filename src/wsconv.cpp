// Weight standardization: the argument checks (shared by both devices), dispatch, and the CPU
// kernels. The CUDA kernels are in cuda/wsconv.cu; they receive arguments checked here.
//
// Threads take whole rows (one output channel's filter, a few thousand values at most on real
// layers), so each row's second pass reads it from cache and every sum has a fixed order. Sums run
// in kLanes independent float64 lanes (vectorizable without reassociating), merged in order.
#include "normkit/wsconv.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <type_traits>

#include "cpu_threads.h"
#include "normkit/dispatch.h"

namespace normkit {

WSConvention ws_convention(int64_t value) {
  NK_CHECK_VALUE(value >= 0 && value <= 2, "ws_standardize: unknown convention ", value,
                 " (0 elektronn3, 1 nfnet, 2 timm)");
  return static_cast<WSConvention>(value);
}

namespace {

constexpr int kLanes = 8;

// Arithmetic type of a storage type: float64 for float64, float32 for float32 and bfloat16.
template <class T>
using arith_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads and stores of the storage types (bfloat16 through dispatch.h's exact conversions).
inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(BFloat16 v) { return bf16_to_float(v); }

template <class T>
inline T store(arith_t<T> v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return float_to_bf16(v);
  } else {
    return v;
  }
}
constexpr int64_t kGrain = 1 << 14;  // values per thread before another one helps

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
                         A* mean, A* rstd, WSRows rows, int64_t r0, int64_t r1) {
  const int64_t K = rows.K;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = w + r * rows.sw;
    const double shift = load(x[0]);
    double s1[kLanes] = {}, s2[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= K; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const double v = double(load(x[i + l])) - shift;
        s1[l] += v;
        s2[l] += v * v;
      }
    }
    for (; i < K; ++i) {
      const double v = double(load(x[i])) - shift;
      s1[0] += v;
      s2[0] += v * v;
    }
    double t1 = 0, t2 = 0;
    for (int l = 0; l < kLanes; ++l) t1 += s1[l], t2 += s2[l];
    const double m = shift + t1 / double(K);
    const double m2 = std::max(0.0, t2 - t1 * t1 / double(K));
    bool clamped;
    const double r_std = 1.0 / std::sqrt(ws_denominator(convention, m2, K, rows.fan_all, eps,
                                                        &clamped));
    mean[r] = A(m);
    rstd[r] = A(r_std);
    const A scale = A(r_std * (gain ? double(gain[r]) : 1.0));
    const A mf = A(m);
    T* y = w_hat + r * rows.sa;
    for (int64_t j = 0; j < K; ++j) y[j] = store<T>((load(x[j]) - mf) * scale);
  }
}

template <class T, class A = arith_t<T>>
NK_HOT void backward_rows(const T* g, const T* w, const A* gain, const A* mean, const A* rstd,
                          WSConvention convention, double eps, T* dw, A* dgain, WSRows rows,
                          int64_t r0, int64_t r1) {
  const int64_t K = rows.K;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = w + r * rows.sw;
    const T* gr = g + r * rows.sa;
    const double m = mean[r];
    double sg[kLanes] = {}, sgc[kLanes] = {}, scc[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= K; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const double c = double(load(x[i + l])) - m, gv = load(gr[i + l]);
        sg[l] += gv;
        sgc[l] += gv * c;
        scc[l] += c * c;
      }
    }
    for (; i < K; ++i) {
      const double c = double(load(x[i])) - m, gv = load(gr[i]);
      sg[0] += gv;
      sgc[0] += gv * c;
      scc[0] += c * c;
    }
    double tg = 0, tgc = 0, tcc = 0;
    for (int l = 0; l < kLanes; ++l) tg += sg[l], tgc += sgc[l], tcc += scc[l];
    const double rs = rstd[r];
    if (dgain) dgain[r] = A(rs * tgc);
    if (!dw) continue;
    bool clamped;
    ws_denominator(convention, tcc, K, rows.fan_all, eps, &clamped);
    const double k = ws_var_coefficient(convention, K, rows.fan_all, clamped);
    const double gn = gain ? double(gain[r]) : 1.0;
    // dw = a * g + b * (w - mean) + c0, coefficients in the arithmetic type for the pass.
    const A a = A(gn * rs), b = A(-gn * rs * rs * rs * k * tgc), mf = A(m);
    const A c0 = A(-gn * rs * tg / double(K));
    T* out = dw + r * rows.sb;
    for (int64_t j = 0; j < K; ++j) {
      out[j] = store<T>(a * load(gr[j]) + b * (load(x[j]) - mf) + c0);
    }
  }
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
  rows.sa = w_hat.strides[0];
  if (rows.R == 0) return;
  dispatch<true>(op, w, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, Half>) {
      fail_half(op);
    } else {
      using A = arith_t<T>;
      const int nt = cpu::threads_for(rows.R * rows.K, kGrain);
      cpu::parallel_ranges(nt, rows.R, [&](int, int64_t r0, int64_t r1) {
        forward_rows<T>(w.ptr<T>(), gain.defined() ? gain.ptr<A>() : nullptr, convention, eps,
                        w_hat.ptr<T>(), mean.ptr<A>(), rstd.ptr<A>(), rows, r0, r1);
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
      cpu::parallel_ranges(nt, rows.R, [&](int, int64_t r0, int64_t r1) {
        backward_rows<T>(dw_hat.ptr<T>(), w.ptr<T>(), gain.defined() ? gain.ptr<A>() : nullptr,
                         mean.ptr<A>(), rstd.ptr<A>(), convention, eps,
                         dw.defined() ? dw.ptr<T>() : nullptr,
                         dgain.defined() ? dgain.ptr<A>() : nullptr, rows, r0, r1);
      });
    }
  }, [&] { cuda::ws_standardize_backward(dw_hat, w, gain, mean, rstd, convention, eps, dw, dgain,
                                         rows, launch); });
}

}  // namespace normkit
