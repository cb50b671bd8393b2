// The Encoding layer family on the CPU: argument checks, dispatch, and the fused kernels that run
// between the caller's matrix products (see include/normkit/encoding.h for the split).
//
// The (B, N, K) arrays are processed in tiles of kTile rows i of one batch b. A tile is copied
// into a thread's scratch as [K][kTile] (k-major, rows contiguous), so that whatever the arrays'
// strides every inner loop runs over kTile contiguous rows and vectorizes, and the softmax over K
// is a sequence of vector operations rather than a horizontal reduction per row. Reductions over
// rows (sums over b and i) accumulate per tile in the arithmetic type and per thread in float64,
// and are merged in thread order, so results do not depend on the timing of threads.
#include "normkit/encoding.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_threads.h"
#include "normkit/dispatch.h"

namespace normkit {
namespace {

constexpr int64_t kTile = 64;        // rows of one batch per tile
constexpr int64_t kGrain = 1 << 14;  // (B, N, K) elements a thread should have before another helps

using cpu::parallel_ranges;

// Every thread's scratch, allocated before the threads start: an exception (std::bad_alloc) thrown
// inside an OpenMP region would terminate the process instead of reaching the caller.
template <class T>
struct Scratch {
  std::vector<T> memory;
  size_t per_thread;
  Scratch(int nthreads, int64_t values)
      : memory(static_cast<size_t>(nthreads) * static_cast<size_t>(values)),
        per_thread(static_cast<size_t>(values)) {}
  T* of(int tid) { return memory.data() + static_cast<size_t>(tid) * per_thread; }
};

int threads_for(int64_t elements) { return cpu::threads_between_gemms(elements, kGrain); }

// ------------------------------------------------------------------------------------------------
// Strided views.

// A (B, N, K) or (B, N, D) array: element (b, i, k) at b * sb + i * si + k * sk.
template <class T>
struct View3 {
  T* data = nullptr;
  int64_t sb = 0, si = 0, sk = 0;
  T* row(int64_t b, int64_t i) const { return data + b * sb + i * si; }
};

template <class T>
View3<T> view3(const TensorView& t) {
  return {t.ptr<T>(), t.strides[0], t.strides[1], t.strides[2]};
}

// A (R, M) array: element (r, m) at r * sr + m * sm.
template <class T>
struct View2 {
  T* data = nullptr;
  int64_t sr = 0, sm = 0;
  T& at(int64_t r, int64_t m) const { return data[r * sr + m * sm]; }
};

template <class T>
View2<T> view2(const TensorView& t) {
  return {t.ptr<T>(), t.strides[0], t.strides[1]};
}

template <class T>
std::vector<T> read_vector(const TensorView& t) {
  std::vector<T> out(t.shape[0]);
  for (int64_t k = 0; k < t.shape[0]; ++k) out[k] = t.ptr<const T>()[k * t.strides[0]];
  return out;
}

// Rows [i0, i0 + rows) of batch b of a (B, N, K) array into tile[k * kTile + l], and back.
template <class T>
void load_tile(View3<const T> v, int64_t b, int64_t i0, int64_t rows, int64_t K, T* tile) {
  const T* p = v.row(b, i0);
  if (v.si == 1) {
    for (int64_t k = 0; k < K; ++k) std::memcpy(tile + k * kTile, p + k * v.sk, rows * sizeof(T));
  } else {
    for (int64_t l = 0; l < rows; ++l)
      for (int64_t k = 0; k < K; ++k) tile[k * kTile + l] = p[l * v.si + k * v.sk];
  }
}

template <class T>
void store_tile(const T* tile, int64_t rows, int64_t K, View3<T> v, int64_t b, int64_t i0) {
  T* p = v.row(b, i0);
  if (v.si == 1) {
    for (int64_t k = 0; k < K; ++k) std::memcpy(p + k * v.sk, tile + k * kTile, rows * sizeof(T));
  } else {
    for (int64_t l = 0; l < rows; ++l)
      for (int64_t k = 0; k < K; ++k) p[l * v.si + k * v.sk] = tile[k * kTile + l];
  }
}

// ------------------------------------------------------------------------------------------------
// Distances.

// sum_d q[d * stride]^2 in 8 independent partial sums, so the loop vectorizes without reassociating
// (kUnit: stride 1, known to the compiler).
template <class T, int kUnit>
T sum_squares(const T* q, int64_t stride, int64_t D) {
  if (kUnit) stride = 1;
  T lanes[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += q[(d + j) * stride] * q[(d + j) * stride];
  T acc = 0;
  for (; d < D; ++d) acc += q[d * stride] * q[d * stride];
  for (int j = 0; j < 8; ++j) acc += lanes[j];
  return acc;
}

// ||x[b,i]||^2 for the tile's rows. With features along N contiguous ((B, D, N) storage) it sweeps
// one feature at a time across the rows, which is how the memory lies.
template <class T>
NK_HOT void row_norms(View3<const T> x, int64_t b, int64_t i0, int64_t rows, int64_t D, T* out) {
  const T* p = x.row(b, i0);
  if (x.si == 1) {
    std::fill(out, out + rows, T(0));
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict q = p + d * x.sk;
      for (int64_t l = 0; l < rows; ++l) out[l] += q[l] * q[l];
    }
    return;
  }
  for (int64_t l = 0; l < rows; ++l) out[l] = x.sk == 1 ? sum_squares<T, 1>(p + l * x.si, 1, D)
                                                     : sum_squares<T, 0>(p + l * x.si, x.sk, D);
}

// ||x[b,i] - c||^2 from the residuals, for all the tile's rows: the fallback where the GEMM form
// cancels. Like row_norms, it sweeps features across rows when the rows are contiguous along N.
template <class T>
NK_HOT void residual_norms(View3<const T> x, int64_t b, int64_t i0, int64_t rows, int64_t D,
                           const T* c, int64_t sc, T* out) {
  const T* p = x.row(b, i0);
  if (x.si == 1) {
    std::fill(out, out + rows, T(0));
    for (int64_t d = 0; d < D; ++d) {
      const T* __restrict q = p + d * x.sk;
      const T cd = c[d * sc];
      for (int64_t l = 0; l < rows; ++l) out[l] += (q[l] - cd) * (q[l] - cd);
    }
    return;
  }
  for (int64_t l = 0; l < rows; ++l) {
    const T* q = p + l * x.si;
    T lanes[8] = {};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int j = 0; j < 8; ++j) {
        const T r = q[(d + j) * x.sk] - c[(d + j) * sc];
        lanes[j] += r * r;
      }
    T acc = 0;
    for (; d < D; ++d) acc += (q[d * x.sk] - c[d * sc]) * (q[d * x.sk] - c[d * sc]);
    for (int j = 0; j < 8; ++j) acc += lanes[j];
    out[l] = acc;
  }
}

// What the forward kernels share: X, C and the per-codeword constants.
template <class T>
struct Codebook {
  View3<const T> x;
  View2<const T> c;
  std::vector<T> s, c2;  // scales and ||c[k]||^2
  int64_t B, N, D, K;
};

// The tile's D2 from the GEMM output XC (already in `d2` as loaded), with the cancelling ones
// recomputed from the residuals.
template <class T>
NK_HOT void distances_tile(const Codebook<T>& cb, int64_t b, int64_t i0, int64_t rows, T* x2,
                           T* d2) {
  const int64_t K = cb.K;
  row_norms(cb.x, b, i0, rows, cb.D, x2);
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict t = d2 + k * kTile;
    const T ck = cb.c2[k];
    for (int64_t l = 0; l < rows; ++l) t[l] = x2[l] - 2 * t[l] + ck;
  }
  // A codeword with a cancelling distance in the tile gets the whole column recomputed (one
  // vectorized sweep, as cheap as the norms), so the check is the only cost where nothing cancels.
  const T ratio = T(kCancellationRatio);
  for (int64_t k = 0; k < K; ++k) {
    T* t = d2 + k * kTile;
    bool cancels = false;
    for (int64_t l = 0; l < rows; ++l) {
      cancels |= !(ratio * t[l] >= x2[l] + cb.c2[k]);  // also catches t < 0 (and NaN)
    }
    if (cancels) residual_norms(cb.x, b, i0, rows, cb.D, &cb.c.at(k, 0), cb.c.sm, t);
  }
}

// e^x for log(smallest normal) <= x <= 0, the arguments the softmax takes after subtracting the
// row's maximum, written so that the compiler vectorizes it (libm's exp is a call per value):
// x = n ln2 + r with |r| <= ln2 / 2 (n rounded by the 1.5 * 2^mantissa trick, ln2 split so that
// n * ln2_hi is exact), e^r from its Taylor series up to the degree whose remainder is below half
// an ulp (7 for float, 13 for double), and 2^n written into the exponent bits.
inline float exp_nonpositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040;
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = p * r + c;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_nonpositive(double x) {
  const double n = (x * 1.44269504088896338700 + 6755399441055744.0) - 6755399441055744.0;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  for (const double c : {1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880,
                         1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5,
                         1.0, 1.0})
    p = p * r + c;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// A = softmax over k of s[k] * d2 for the tile, written over `a`; adds sum_l A to colsum[k].
template <class T>
NK_HOT void softmax_tile(const std::vector<T>& s, int64_t K, int64_t rows, const T* d2, T* a,
                         double* colsum) {
  T mx[kTile], total[kTile];
  std::fill(mx, mx + rows, -std::numeric_limits<T>::infinity());
  std::fill(total, total + rows, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict t = d2 + k * kTile;
    T* __restrict o = a + k * kTile;
    for (int64_t l = 0; l < rows; ++l) {
      o[l] = s[k] * t[l];
      mx[l] = std::max(mx[l], o[l]);
    }
  }
  // Terms below the smallest normal number are flushed to zero: next to the row's largest term
  // (1) they change nothing. A NaN stays NaN.
  const T floor = std::log(std::numeric_limits<T>::min());
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict o = a + k * kTile;
    for (int64_t l = 0; l < rows; ++l) {
      const T arg = o[l] - mx[l];
      const T e = exp_nonpositive(arg >= floor ? arg : floor);
      o[l] = arg >= floor ? e : (arg < floor ? T(0) : arg);
      total[l] += o[l];
    }
  }
  for (int64_t l = 0; l < rows; ++l) total[l] = T(1) / total[l];
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict o = a + k * kTile;
    T sum = 0;
    for (int64_t l = 0; l < rows; ++l) {
      o[l] *= total[l];
      sum += o[l];
    }
    colsum[k] += sum;
  }
}

// ------------------------------------------------------------------------------------------------
// Gradient weights: from dSL, the W = 2 s dSL of the caller's GEMMs and the reductions.

struct WeightSums {  // one thread's float64 partial sums
  std::vector<double> ds, sumW;
};

// Writes W = 2 s dsl over `dsl`, r[l] = sum_k W; adds sum_l dsl d2 to ds and sum_l W to sumW.
template <class T>
NK_HOT void weights_tile(const std::vector<T>& s, int64_t K, int64_t rows, const T* d2, T* dsl,
                         T* r, WeightSums& sums) {
  std::fill(r, r + rows, T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict t = d2 + k * kTile;
    T* __restrict w = dsl + k * kTile;
    const T two_s = 2 * s[k];
    T ds = 0, sw = 0;
    for (int64_t l = 0; l < rows; ++l) {
      ds += w[l] * t[l];
      w[l] *= two_s;
      sw += w[l];
      r[l] += w[l];
    }
    sums.ds[k] += ds;
    sums.sumW[k] += sw;
  }
}

// ------------------------------------------------------------------------------------------------
// Checks.

std::string shape_string(const TensorView& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

// `t` must exist (unless optional), live on ref's device, have `dtype` and the shape `dims`,
// whose letters (e.g. "B, N, K") name the sizes in the message.
void check_array(const char* op, const TensorView& t, const char* name, const char* letters,
                 std::initializer_list<int64_t> dims, DType dtype, const TensorView& ref,
                 const char* ref_name, bool optional = false) {
  if (!t.defined()) {
    NK_CHECK_VALUE(optional, op, ": ", name, " is required");
    return;
  }
  NK_CHECK_TYPE(t.device == ref.device && t.device_id == ref.device_id, op, ": ", name, " is on ",
                device_name(t.device), ":", t.device_id, " but ", ref_name, " is on ",
                device_name(ref.device), ":", ref.device_id);
  NK_CHECK_TYPE(t.dtype == dtype, op, ": ", name, " must be ", dtype_name(dtype), " (like ",
                ref_name, "), got ", dtype_name(t.dtype));
  bool same = t.ndim == static_cast<int>(dims.size());
  int d = 0;
  for (int64_t size : dims) same = same && t.shape[d++] == size;
  if (!same) {
    std::string expected = "(";
    d = 0;
    for (int64_t size : dims) expected += (d++ ? ", " : "") + std::to_string(size);
    expected += dims.size() == 1 ? ",)" : ")";
    fail(ErrorKind::Value, op, ": ", name, " must have shape (", letters, ") = ", expected,
         ", got ", shape_string(t));
  }
}

// A required 3-d array; `letters` name its dims in the message.
void check_3d(const char* op, const TensorView& t, const char* name, const char* letters) {
  NK_CHECK_VALUE(t.defined(), op, ": ", name, " is required");
  NK_CHECK_VALUE(t.ndim == 3, op, ": ", name, " must have shape (", letters, "), got ", t.ndim,
                 " dim(s) ", shape_string(t));
}

// X (B, N, D) with C (K, D) and s (K): the sizes of a call.
struct Sizes {
  int64_t B, N, D, K;
  DType param;
};

Sizes check_codebook(const char* op, const TensorView& X, const TensorView& C,
                     const TensorView& s) {
  check_3d(op, X, "X", "B, N, D");
  NK_CHECK_VALUE(C.defined() && C.ndim == 2, op, ": C (codewords) must have shape (K, D)",
                 C.defined() ? ", got " + shape_string(C) : std::string());
  NK_CHECK_VALUE(C.shape[1] == X.shape[2], op, ": C has ", C.shape[1],
                 " features per codeword but X has ", X.shape[2], " (X ", shape_string(X), ", C ",
                 shape_string(C), ")");
  const Sizes z{X.shape[0], X.shape[1], X.shape[2], C.shape[0], param_dtype(X.dtype)};
  check_array(op, C, "C", "K, D", {z.K, z.D}, z.param, X, "X");
  check_array(op, s, "s", "K", {z.K}, z.param, X, "X");
  return z;
}

// The kernels take float32 and float64 (float16 would need float32 GEMMs on the caller's side, so
// callers compute it in float32): dispatch_float.

// ------------------------------------------------------------------------------------------------
// The forward pass shared by scaled_l2 (SL = s D2) and the Encoding (A = softmax, sumA).

template <class T>
Codebook<T> codebook(const TensorView& X, const TensorView& C, const TensorView& s,
                     const Sizes& z) {
  Codebook<T> cb{view3<const T>(X), view2<const T>(C), read_vector<T>(s), std::vector<T>(z.K),
                 z.B, z.N, z.D, z.K};
  for (int64_t k = 0; k < z.K; ++k) {
    double acc = 0;
    for (int64_t d = 0; d < z.D; ++d) acc += double(cb.c.at(k, d)) * double(cb.c.at(k, d));
    cb.c2[k] = T(acc);
  }
  return cb;
}

template <class T>
void forward_pass(const Codebook<T>& cb, const TensorView& XC, const TensorView& D2,
                  const TensorView& out, bool softmax, const TensorView& sumA) {
  const int64_t K = cb.K, per_batch = (cb.N + kTile - 1) / kTile, tiles = cb.B * per_batch;
  const View3<const T> xc = view3<const T>(XC);
  const View3<T> d2v = view3<T>(D2);
  const View3<T> outv = out.defined() ? view3<T>(out) : View3<T>{};
  const int nthreads = threads_for(cb.B * cb.N * std::max<int64_t>(K, 1) * 4);
  std::vector<double> colsums(static_cast<size_t>(nthreads) * cb.B * K, 0.0);
  Scratch<T> scratch(nthreads, 2 * K * kTile + kTile);
  parallel_ranges(nthreads, tiles, [&](int tid, int64_t first, int64_t last) {
    T *d2 = scratch.of(tid), *o = d2 + K * kTile, *x2 = o + K * kTile;
    double* colsum = colsums.data() + static_cast<size_t>(tid) * cb.B * K;
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / per_batch, i0 = (t % per_batch) * kTile;
      const int64_t rows = std::min(kTile, cb.N - i0);
      load_tile(xc, b, i0, rows, K, d2);
      distances_tile(cb, b, i0, rows, x2, d2);
      store_tile<T>(d2, rows, K, d2v, b, i0);
      if (!outv.data) continue;
      if (softmax) {
        softmax_tile(cb.s, K, rows, d2, o, colsum + b * K);
      } else {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t l = 0; l < rows; ++l) o[k * kTile + l] = cb.s[k] * d2[k * kTile + l];
      }
      store_tile<T>(o, rows, K, outv, b, i0);
    }
  });
  if (!sumA.defined()) return;
  const View2<T> sa = view2<T>(sumA);
  for (int64_t b = 0; b < cb.B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0;
      for (int th = 0; th < nthreads; ++th) acc += colsums[(size_t(th) * cb.B + b) * K + k];
      sa.at(b, k) = T(acc);
    }
  }
}

// Merges the threads' partial sums into the (K,) outputs.
template <class T>
void write_sums(const std::vector<WeightSums>& parts, const TensorView& sumW,
                const TensorView& ds) {
  const int64_t K = sumW.shape[0];
  for (int64_t k = 0; k < K; ++k) {
    double w = 0, d = 0;
    for (const auto& p : parts) {
      w += p.sumW[k];
      d += p.ds[k];
    }
    sumW.ptr<T>()[k * sumW.strides[0]] = T(w);
    ds.ptr<T>()[k * ds.strides[0]] = T(d);
  }
}

template <class T>
void store_rows(const T* r, int64_t rows, View2<T> rv, int64_t b, int64_t i0) {
  for (int64_t l = 0; l < rows; ++l) rv.at(b, i0 + l) = r[l];
}

}  // namespace

// ================================================================================================
// The ops.

// The layout of cuda/encoding.cu: ||c_k||^2, <g[b,k], c[k]>, then three per-k column sums (sumW,
// ds, sumA) with one partial per warp of 32 rows of each batch.
int64_t encoding_workspace_size(int64_t B, int64_t N, int64_t K) {
  NK_CHECK_VALUE(B >= 0 && N >= 0 && K >= 0, "encoding_workspace_size: B, N and K must be >= 0, ",
                 "got ", B, ", ", N, " and ", K);
  return K + B * K + 3 * B * ((N + 31) / 32) * K;
}

void scaled_l2_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                       const TensorView& XC, const TensorView& D2, const TensorView& SL,
                       const Launch& launch) {
  const char* op = "scaled_l2_forward";
  const Sizes z = check_codebook(op, X, C, s);
  check_array(op, XC, "XC", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X");
  check_array(op, D2, "D2", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X");
  check_array(op, SL, "SL", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X", true);
  check_output_memory(op, {{D2, "D2", false}, {SL, "SL", true}},
                      {{X, "X", false}, {C, "C", false}, {s, "s", false}, {XC, "XC", true}});
  dispatch_float(op, X, [&](auto tag) {
    using T = decltype(tag);
    forward_pass<T>(codebook<T>(X, C, s, z), XC, D2, SL, false, TensorView{});
  }, [&] { cuda::scaled_l2_forward(X, C, s, XC, D2, SL, launch); });
}

void encoding_forward(const TensorView& X, const TensorView& C, const TensorView& s,
                      const TensorView& XC, const TensorView& D2, const TensorView& A,
                      const TensorView& sumA, const Launch& launch) {
  const char* op = "encoding_forward";
  const Sizes z = check_codebook(op, X, C, s);
  check_array(op, XC, "XC", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X");
  check_array(op, D2, "D2", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X");
  check_array(op, A, "A", "B, N, K", {z.B, z.N, z.K}, z.param, X, "X");
  check_array(op, sumA, "sumA", "B, K", {z.B, z.K}, z.param, X, "X", true);
  check_output_memory(op, {{D2, "D2", false}, {A, "A", true}, {sumA, "sumA", false}},
                      {{X, "X", false}, {C, "C", false}, {s, "s", false}, {XC, "XC", true}});
  dispatch_float(op, X, [&](auto tag) {
    using T = decltype(tag);
    forward_pass<T>(codebook<T>(X, C, s, z), XC, D2, A, true, sumA);
  }, [&] { cuda::encoding_forward(X, C, s, XC, D2, A, sumA, launch); });
}

void scaled_l2_backward(const TensorView& dSL, const TensorView& s, const TensorView& D2,
                        const TensorView& W, const TensorView& r, const TensorView& sumW,
                        const TensorView& ds, const Launch& launch) {
  const char* op = "scaled_l2_backward";
  check_3d(op, dSL, "dSL", "B, N, K");
  const int64_t B = dSL.shape[0], N = dSL.shape[1], K = dSL.shape[2];
  const DType dt = dSL.dtype;
  check_array(op, s, "s", "K", {K}, dt, dSL, "dSL");
  check_array(op, D2, "D2", "B, N, K", {B, N, K}, dt, dSL, "dSL");
  check_array(op, W, "W", "B, N, K", {B, N, K}, dt, dSL, "dSL");
  check_array(op, r, "r", "B, N", {B, N}, dt, dSL, "dSL");
  check_array(op, sumW, "sumW", "K", {K}, dt, dSL, "dSL");
  check_array(op, ds, "ds", "K", {K}, dt, dSL, "dSL");
  check_output_memory(op, {{W, "W", true}, {r, "r", false}, {sumW, "sumW", false},
                           {ds, "ds", false}},
                      {{dSL, "dSL", true}, {s, "s", false}, {D2, "D2", false}});
  dispatch_float(op, dSL, [&](auto tag) {
    using T = decltype(tag);
    const auto sv = read_vector<T>(s);
    const auto gv = view3<const T>(dSL), d2v = view3<const T>(D2);
    const auto wv = view3<T>(W);
    const auto rv = view2<T>(r);
    const int64_t per_batch = (N + kTile - 1) / kTile;
    const int nthreads = threads_for(B * N * std::max<int64_t>(K, 1));
    std::vector<WeightSums> parts(nthreads, {std::vector<double>(K), std::vector<double>(K)});
    Scratch<T> scratch(nthreads, 2 * K * kTile + kTile);
    parallel_ranges(nthreads, B * per_batch, [&](int tid, int64_t first, int64_t last) {
      T *g = scratch.of(tid), *d2 = g + K * kTile, *rr = d2 + K * kTile;
      for (int64_t t = first; t < last; ++t) {
        const int64_t b = t / per_batch, i0 = (t % per_batch) * kTile;
        const int64_t rows = std::min(kTile, N - i0);
        load_tile(gv, b, i0, rows, K, g);
        load_tile(d2v, b, i0, rows, K, d2);
        weights_tile(sv, K, rows, d2, g, rr, parts[tid]);
        store_tile<T>(g, rows, K, wv, b, i0);
        store_rows(rr, rows, rv, b, i0);
      }
    });
    write_sums<T>(parts, sumW, ds);
  }, [&] { cuda::scaled_l2_backward(dSL, s, D2, W, r, sumW, ds, launch); });
}

void encoding_backward(const TensorView& G, const TensorView& C, const TensorView& s,
                       const TensorView& A, const TensorView& D2, const TensorView& XG,
                       const TensorView& W, const TensorView& r, const TensorView& sumW,
                       const TensorView& sumA, const TensorView& ds,
                       const Launch& launch) {
  const char* op = "encoding_backward";
  check_3d(op, A, "A", "B, N, K");
  const int64_t B = A.shape[0], N = A.shape[1], K = A.shape[2];
  NK_CHECK_VALUE(C.defined() && C.ndim == 2 && C.shape[0] == K, op,
                 ": C (codewords) must have shape (K, D) with K = ", K, " (from A)",
                 C.defined() ? ", got " + shape_string(C) : std::string());
  const int64_t D = C.shape[1];
  const DType dt = A.dtype;
  check_array(op, G, "G", "B, K, D", {B, K, D}, dt, A, "A");
  check_array(op, C, "C", "K, D", {K, D}, dt, A, "A");
  check_array(op, s, "s", "K", {K}, dt, A, "A");
  check_array(op, D2, "D2", "B, N, K", {B, N, K}, dt, A, "A");
  check_array(op, XG, "XG", "B, N, K", {B, N, K}, dt, A, "A");
  check_array(op, W, "W", "B, N, K", {B, N, K}, dt, A, "A");
  check_array(op, r, "r", "B, N", {B, N}, dt, A, "A");
  check_array(op, sumW, "sumW", "K", {K}, dt, A, "A");
  check_array(op, sumA, "sumA", "B, K", {B, K}, dt, A, "A");
  check_array(op, ds, "ds", "K", {K}, dt, A, "A");
  check_output_memory(op, {{W, "W", true}, {r, "r", false}, {sumW, "sumW", false},
                           {sumA, "sumA", false}, {ds, "ds", false}},
                      {{G, "G", false}, {C, "C", false}, {s, "s", false}, {A, "A", false},
                       {D2, "D2", false}, {XG, "XG", true}});
  dispatch_float(op, A, [&](auto tag) {
    using T = decltype(tag);
    const auto sv = read_vector<T>(s);
    const auto av = view3<const T>(A), d2v = view3<const T>(D2), xgv = view3<const T>(XG);
    const auto gv = view3<const T>(G);
    const auto cv = view2<const T>(C);
    const auto wv = view3<T>(W);
    const auto rv = view2<T>(r);
    // <g[b,k], c[k]>: the codeword's share of dA = <g, x - c>.
    std::vector<T> gc(B * K);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0;
        const T* g = gv.row(b, k);
        for (int64_t d = 0; d < D; ++d) acc += double(g[d * gv.sk]) * double(cv.at(k, d));
        gc[b * K + k] = T(acc);
      }
    }
    const int64_t per_batch = (N + kTile - 1) / kTile;
    const int nthreads = threads_for(B * N * std::max<int64_t>(K, 1) * 2);
    std::vector<WeightSums> parts(nthreads, {std::vector<double>(K), std::vector<double>(K)});
    std::vector<double> colsums(static_cast<size_t>(nthreads) * B * K, 0.0);
    Scratch<T> scratch(nthreads, 3 * K * kTile + 2 * kTile);
    parallel_ranges(nthreads, B * per_batch, [&](int tid, int64_t first, int64_t last) {
      T *a = scratch.of(tid), *d2 = a + K * kTile, *g = d2 + K * kTile;
      T *rr = g + K * kTile, *dot = rr + kTile;
      double* colsum = colsums.data() + static_cast<size_t>(tid) * B * K;
      for (int64_t t = first; t < last; ++t) {
        const int64_t b = t / per_batch, i0 = (t % per_batch) * kTile;
        const int64_t rows = std::min(kTile, N - i0);
        load_tile(av, b, i0, rows, K, a);
        load_tile(d2v, b, i0, rows, K, d2);
        load_tile(xgv, b, i0, rows, K, g);
        // dA = XG - <g, c>, and per row sum_k A dA (the softmax's Jacobian-vector product).
        std::fill(dot, dot + rows, T(0));
        for (int64_t k = 0; k < K; ++k) {
          const T* __restrict ak = a + k * kTile;
          T* __restrict gk = g + k * kTile;
          const T shift = gc[b * K + k];
          T sum_a = 0;
          for (int64_t l = 0; l < rows; ++l) {
            gk[l] -= shift;
            dot[l] += ak[l] * gk[l];
            sum_a += ak[l];
          }
          colsum[b * K + k] += sum_a;
        }
        // dSL = A (dA - sum_k A dA), written over g.
        for (int64_t k = 0; k < K; ++k) {
          const T* __restrict ak = a + k * kTile;
          T* __restrict gk = g + k * kTile;
          for (int64_t l = 0; l < rows; ++l) gk[l] = ak[l] * (gk[l] - dot[l]);
        }
        weights_tile(sv, K, rows, d2, g, rr, parts[tid]);
        store_tile<T>(g, rows, K, wv, b, i0);
        store_rows(rr, rows, rv, b, i0);
      }
    });
    write_sums<T>(parts, sumW, ds);
    const View2<T> sa = view2<T>(sumA);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0;
        for (int th = 0; th < nthreads; ++th) acc += colsums[(size_t(th) * B + b) * K + k];
        sa.at(b, k) = T(acc);
      }
    }
  }, [&] { cuda::encoding_backward(G, C, s, A, D2, XG, W, r, sumW, sumA, ds, launch); });
}

namespace {
// out[j] += r * x[j] over one contiguous or strided line.
template <class T>
NK_HOT void axpy_line(int64_t n, const T* __restrict x, int64_t sx, const T* __restrict r,
                      int64_t sr, T* __restrict out, int64_t so) {
  if (sx == 1 && sr == 1 && so == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] += r[j] * x[j];
  } else {
    for (int64_t j = 0; j < n; ++j) out[j * so] += r[j * sr] * x[j * sx];
  }
}
}  // namespace

void add_scaled_features(const TensorView& X, const TensorView& r, const TensorView& dX,
                         const Launch& launch) {
  const char* op = "add_scaled_features";
  check_3d(op, X, "X", "B, N, D");
  const int64_t B = X.shape[0], N = X.shape[1], D = X.shape[2];
  check_array(op, r, "r", "B, N", {B, N}, param_dtype(X.dtype), X, "X");
  check_array(op, dX, "dX", "B, N, D", {B, N, D}, X.dtype, X, "X");
  check_output_memory(op, {{dX, "dX", true}}, {{X, "X", true}, {r, "r", false}});
  dispatch_float(op, X, [&](auto tag) {
    using T = decltype(tag);
    const auto xv = view3<const T>(X);
    const auto ov = view3<T>(dX);
    const auto rv = view2<const T>(r);
    const int nthreads = threads_for(B * N * D / 4);
    if (xv.si == 1 && ov.si == 1) {
      // Features along N contiguous: one line of N rows per (b, d), scaled row by row.
      parallel_ranges(nthreads, B * D, [&](int, int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const int64_t b = t / D, d = t % D;
          axpy_line<T>(N, xv.row(b, 0) + d * xv.sk, 1, &rv.at(b, 0), rv.sm,
                       ov.row(b, 0) + d * ov.sk, 1);
        }
      });
    } else {
      // Rows of D features: each row scaled by its one r.
      parallel_ranges(nthreads, B * N, [&](int, int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const int64_t b = t / N, i = t % N;
          const T* x = xv.row(b, i);
          T* o = ov.row(b, i);
          const T ri = rv.at(b, i);
          if (xv.sk == 1 && ov.sk == 1) {
            for (int64_t d = 0; d < D; ++d) o[d] += ri * x[d];
          } else {
            for (int64_t d = 0; d < D; ++d) o[d * ov.sk] += ri * x[d * xv.sk];
          }
        }
      });
    }
  }, [&] { cuda::add_scaled_features(X, r, dX, launch); });
}

}  // namespace normkit
