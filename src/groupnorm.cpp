// Per-sample statistics (group norm, instance norm): the argument checks (shared by both devices),
// dispatch, and the CPU kernels. The CUDA kernels are in cuda/groupnorm.cu; they receive arguments
// checked here.
//
// Every op reduces to two kernel shapes over the tensor seen as (N, C, S), with coefficients per
// (sample, channel) plane, so that one pair serves group norm (a group's coefficients repeated over
// its channels) and instance norm (G = C):
//   pair sums   s1[n,c] = sum (a - ka[n,c]),  s2[n,c] = sum (a - ka[n,c]) * (b - kb[n,c])
//                 statistics: a = b = x, ka = kb = a shift per (n, g) (the mean of the group's
//                 first values), so the sums stay exact when |mean| >> std, and the plane sums of
//                 a group add up to the group's shifted sums; backward: a = dy, ka = 0, b = x,
//                 kb = mean[n,g].
//   affine      out = p[n,c] * u + q[n,c] * (v - m[n,c]) + r[n,c]
//                 normalize: u absent, v = x;  backward: u = dy, v = x.
// Inner loops accumulate in float32 lanes (float64 for float64 data) and flush into float64 every
// few thousand values. Work is split among threads as contiguous ranges of the tensor in memory
// order (whole planes, or parts of one when N*C is small and S large), each thread summing into
// its own float64 partials, merged in thread order: results depend only on the thread count.
//
// Layouts: "planar" (each (n, c) plane a contiguous run of S values: NCHW), "channels-last" (rows
// of C contiguous channels per (n, s): NHWC, and (N, C)), and a generic strided path. For a
// contiguous channels-first input the single-process forward and backward are fused per (n, g)
// block: a thread reduces the block and writes its output right after, while it is in cache (small
// blocks four at a time, see run_blocks).
#include "normkit/groupnorm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_stream.h"
#include "cpu_threads.h"
#include "normkit/dispatch.h"

#define NK_INLINE inline __attribute__((always_inline))

namespace normkit {
namespace {

// Arithmetic type of a storage type: float64 for float64, float32 for everything else. It is also
// the dtype of parameters and statistics (param_dtype).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kLanes = 16;
constexpr int64_t kFlushEvery = 2048;  // values per float32 lane block before flushing to float64
constexpr int64_t kFlushRows = 64;     // channels-last rows per float32 block
constexpr int64_t kGrain = 1 << 15;    // elements a thread should have before another one helps

// ------------------------------------------------------------------------------------------------
// Loads and stores of storage type T as its arithmetic type, scalar and kLanes at a time.

template <class T>
NK_INLINE acc_t<T> ld(T v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return bf16_to_float(v);
  } else {
    return acc_t<T>(v);
  }
}

template <class T>
NK_INLINE T st(acc_t<T> v) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return float_to_bf16(v);
  } else {
    return T(v);
  }
}

template <class T>
struct Lanes {
  using A = acc_t<T>;
  typedef A V __attribute__((vector_size(kLanes * sizeof(A))));
  typedef uint16_t U16 __attribute__((vector_size(kLanes * 2)));
  typedef uint32_t U32 __attribute__((vector_size(kLanes * 4)));

  NK_INLINE static V load(const T* p) {
    V v;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(&v, p, sizeof v);
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      U16 h;  // bfloat16 is the upper half of a float32
      std::memcpy(&h, p, sizeof h);
      const U32 w = __builtin_convertvector(h, U32) << 16;
      std::memcpy(&v, &w, sizeof v);
    } else {
      typedef T Stored __attribute__((vector_size(kLanes * sizeof(T))));
      Stored s;
      std::memcpy(&s, p, sizeof s);
      v = __builtin_convertvector(s, V);
    }
    return v;
  }

  NK_INLINE static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(p, &v, sizeof v);
    } else if constexpr (std::is_same_v<T, BFloat16>) {
      // float_to_bf16 on every lane: round to nearest even, NaN kept a (quiet) NaN
      U32 u;
      std::memcpy(&u, &v, sizeof u);
      const U32 nan = (U32)((u & 0x7fffffffu) > 0x7f800000u);
      const U32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      const U32 quiet = (u >> 16) | 0x40u;
      const U16 h = __builtin_convertvector((nan & quiet) | (~nan & rounded), U16);
      std::memcpy(p, &h, sizeof h);
    } else {
      typedef T Stored __attribute__((vector_size(kLanes * sizeof(T))));
      const Stored s = __builtin_convertvector(v, Stored);
      std::memcpy(p, &s, sizeof s);
    }
  }
};

// The sum of a vector's lanes in float64, pairwise: a sequential sum would be a chain of kLanes
// dependent adds, which would dominate the cost of small planes (7x7: 49 values).
template <class V>
NK_INLINE double hsum(const V& v) {
  static_assert(kLanes == 16, "hsum halves 16 lanes four times");
  typedef double D16 __attribute__((vector_size(16 * sizeof(double))));
  typedef double D8 __attribute__((vector_size(8 * sizeof(double))));
  typedef double D4 __attribute__((vector_size(4 * sizeof(double))));
  const D16 d = __builtin_convertvector(v, D16);
  D8 lo8, hi8;
  std::memcpy(&lo8, &d, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&d) + sizeof lo8, sizeof hi8);
  const D8 s8 = lo8 + hi8;
  D4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof lo4, sizeof hi4);
  const D4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// ------------------------------------------------------------------------------------------------
// Contiguous runs (planar layout): one (n, c) plane, or part of one.

// s1 += sum (a - ka), s2 += sum (a - ka) (b - kb) over len contiguous values. kSame: b is a.
// Inlined into its NK_HOT callers (the fused block loops, pair_sums through run_sums_hot), so
// that it is compiled for their ISA and small planes pay no call.
template <class T, bool kSame>
NK_INLINE void run_sums(const T* a, const T* b, int64_t len, acc_t<T> ka, acc_t<T> kb,
                        double* s1, double* s2) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  double d1 = 0, d2 = 0;
  for (int64_t i0 = 0; i0 < len; i0 += kFlushEvery) {
    const int64_t end = std::min(len, i0 + kFlushEvery);
    V u1 = {}, u2 = {}, w1 = {}, w2 = {};  // two chains hide the add latency
    A t1 = 0, t2 = 0;
    int64_t i = i0;
    for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
      const V da = L::load(a + i) - ka, ea = L::load(a + i + kLanes) - ka;
      u1 += da;
      w1 += ea;
      if constexpr (kSame) {
        u2 += da * da;
        w2 += ea * ea;
      } else {
        u2 += da * (L::load(b + i) - kb);
        w2 += ea * (L::load(b + i + kLanes) - kb);
      }
    }
    if (i + kLanes <= end) {  // short planes (small H*W) would otherwise leave up to 31 scalars
      const V da = L::load(a + i) - ka;
      u1 += da;
      u2 += da * (kSame ? da : L::load(b + i) - kb);
      i += kLanes;
    }
    for (; i < end; ++i) {
      const A d = ld(a[i]) - ka;
      t1 += d;
      t2 += d * (kSame ? d : ld(b[i]) - kb);
    }
    d1 += hsum(u1 + w1) + double(t1);
    d2 += hsum(u2 + w2) + double(t2);
  }
  *s1 += d1;
  *s2 += d2;
}

// out = p * u + q * (v - m) + r over len contiguous values; u may be null (p ignored).
// `stream`: streaming stores (float32/float64; see cpu_stream.h), for outputs beyond the LLC.
// Inlined as run_sums is.
template <class T>
NK_INLINE void run_affine(const T* u, const T* v, T* out, int64_t len, acc_t<T> p, acc_t<T> q,
                          acc_t<T> m, acc_t<T> r, bool stream) {
  using L = Lanes<T>;
  auto one = [&](int64_t i) {
    out[i] = u ? st<T>(p * ld(u[i]) + q * (ld(v[i]) - m) + r) : st<T>(q * (ld(v[i]) - m) + r);
  };
  int64_t i = 0;
  if constexpr (cpu::kCanStream<T>) {
    if (stream) {
      for (; i < len && reinterpret_cast<uintptr_t>(out + i) % cpu::kStreamAlign; ++i) one(i);
      if (u) {
        for (; i + kLanes <= len; i += kLanes) {
          cpu::stream_store(out + i, p * L::load(u + i) + q * (L::load(v + i) - m) + r);
        }
      } else {
        for (; i + kLanes <= len; i += kLanes) {
          cpu::stream_store(out + i, q * (L::load(v + i) - m) + r);
        }
      }
    }
  }
  if (u) {
    for (; i + kLanes <= len; i += kLanes) {
      L::store(out + i, p * L::load(u + i) + q * (L::load(v + i) - m) + r);
    }
  } else {
    for (; i + kLanes <= len; i += kLanes) L::store(out + i, q * (L::load(v + i) - m) + r);
  }
  for (; i < len; ++i) one(i);
}

// run_sums and run_affine compiled for each ISA level (NK_HOT), for the unfused passes.
template <class T, bool kSame>
NK_HOT void run_sums_hot(const T* a, const T* b, int64_t len, acc_t<T> ka, acc_t<T> kb,
                         double* s1, double* s2) {
  run_sums<T, kSame>(a, b, len, ka, kb, s1, s2);
}

template <class T>
NK_HOT void run_affine_hot(const T* u, const T* v, T* out, int64_t len, acc_t<T> p, acc_t<T> q,
                           acc_t<T> m, acc_t<T> r, bool stream) {
  run_affine<T>(u, v, out, len, p, q, m, r, stream);
}

// ------------------------------------------------------------------------------------------------
// Channels-last rows: `rows` consecutive positions s of one sample, C contiguous channels each.

// s[0, kLanes) += u, in float64 vectors (a scalar loop here would cost as much as the rows).
template <class V>
NK_INLINE void flush_lanes(double* __restrict s, const V& u) {
  typedef double D __attribute__((vector_size(kLanes * sizeof(double))));
  D d;
  std::memcpy(&d, s, sizeof d);
  d += __builtin_convertvector(u, D);
  std::memcpy(s, &d, sizeof d);
}

// Channels [c, c + NB * kLanes) of rows [0, rows) (rows <= kFlushRows): NB runs of kLanes
// channels side by side, so each row's part of them is one contiguous read and the NB
// accumulator chains hide each other's add latency.
template <int NB, class T, bool kSame>
NK_INLINE void rows_group_sums(const T* a, const T* b, int64_t sa, int64_t sb, int64_t rows,
                               int64_t c, const acc_t<T>* ka, const acc_t<T>* kb, double* s1,
                               double* s2) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  V k1[NB], k2[NB], u1[NB], u2[NB];
  for (int j = 0; j < NB; ++j) {
    k1[j] = Lanes<A>::load(ka + c + j * kLanes);
    k2[j] = Lanes<A>::load(kb + c + j * kLanes);
    u1[j] = u2[j] = V{};
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * sa + c;
    const T* br = b + r * sb + c;
    for (int j = 0; j < NB; ++j) {
      const V d = L::load(ar + j * kLanes) - k1[j];
      u1[j] += d;
      u2[j] += d * (kSame ? d : L::load(br + j * kLanes) - k2[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    flush_lanes(s1 + c + j * kLanes, u1[j]);
    flush_lanes(s2 + c + j * kLanes, u2[j]);
  }
}

// Channels [c0, c0 + width) of rows [0, rows) (rows <= kFlushRows), row after row: the float32
// partials live in L1 arrays instead of registers, so that the walk is sequential in memory
// (a walk down the rows for each run of channels would stride by C, which the hardware
// prefetchers follow poorly: 7x7 planes of 512 channels ran at a fifth of the speed).
constexpr int64_t kWideChannels = 1024;

template <class T, bool kSame>
NK_INLINE void rows_wide_sums(const T* a, const T* b, int64_t sa, int64_t sb, int64_t rows,
                              int64_t c0, int64_t width, const acc_t<T>* ka,
                              const acc_t<T>* kb, double* s1, double* s2) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  using V = typename L::V;
  alignas(64) A u1[kWideChannels], u2[kWideChannels];
  const int64_t vec = width / kLanes * kLanes;
  std::fill(u1, u1 + width, A(0));
  std::fill(u2, u2 + width, A(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * sa + c0;
    const T* br = b + r * sb + c0;
    for (int64_t j = 0; j < vec; j += kLanes) {
      const V d = L::load(ar + j) - LA::load(ka + c0 + j);
      const V e = kSame ? d : L::load(br + j) - LA::load(kb + c0 + j);
      LA::store(u1 + j, LA::load(u1 + j) + d);
      LA::store(u2 + j, LA::load(u2 + j) + d * e);
    }
    for (int64_t j = vec; j < width; ++j) {
      const A d = ld(ar[j]) - ka[c0 + j];
      u1[j] += d;
      u2[j] += d * (kSame ? d : ld(br[j]) - kb[c0 + j]);
    }
  }
  for (int64_t j = 0; j < vec; j += kLanes) {
    flush_lanes(s1 + c0 + j, LA::load(u1 + j));
    flush_lanes(s2 + c0 + j, LA::load(u2 + j));
  }
  for (int64_t j = vec; j < width; ++j) {
    s1[c0 + j] += double(u1[j]);
    s2[c0 + j] += double(u2[j]);
  }
}

// s1[c] += sum (a - ka[c]), s2[c] += sum (a - ka[c]) (b - kb[c]) over the rows; kSame: b is a.
// The rows are walked in chunks of kFlushRows (float32 partials, flushed to float64 per chunk).
// Rows of up to kGroupBlocks * kLanes channels keep their partials in registers, kGroupBlocks
// runs of kLanes channels at a time down the chunk (sequential in memory: the chunk is whole
// rows); longer rows are walked row after row by rows_wide_sums.
constexpr int kGroupBlocks = 4;

template <class T, bool kSame>
NK_HOT void rows_sums(const T* a, const T* b, int64_t sa, int64_t sb, int64_t rows, int64_t C,
                      const acc_t<T>* __restrict ka, const acc_t<T>* __restrict kb,
                      double* __restrict s1, double* __restrict s2) {
  using A = acc_t<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += kFlushRows) {
    const int64_t todo = std::min(rows - r0, kFlushRows);
    const T* ar = a + r0 * sa;
    const T* br = b + r0 * sb;
    if (C > kGroupBlocks * kLanes) {
      for (int64_t c = 0; c < C; c += kWideChannels) {
        rows_wide_sums<T, kSame>(ar, br, sa, sb, todo, c, std::min(kWideChannels, C - c), ka,
                                 kb, s1, s2);
      }
      continue;
    }
    int64_t c = 0;
    for (; c + kGroupBlocks * kLanes <= C; c += kGroupBlocks * kLanes) {
      rows_group_sums<kGroupBlocks, T, kSame>(ar, br, sa, sb, todo, c, ka, kb, s1, s2);
    }
    for (; c + kLanes <= C; c += kLanes) {
      rows_group_sums<1, T, kSame>(ar, br, sa, sb, todo, c, ka, kb, s1, s2);
    }
    for (; c < C; ++c) {
      A t1 = 0, t2 = 0;
      for (int64_t r = 0; r < todo; ++r) {
        const A d = ld(ar[r * sa + c]) - ka[c];
        t1 += d;
        t2 += d * (kSame ? d : ld(br[r * sb + c]) - kb[c]);
      }
      s1[c] += double(t1);
      s2[c] += double(t2);
    }
  }
}

// out = p[c] * u + q[c] * (v - m[c]) + r[c] over the rows; u may be null (p ignored). `stream`:
// streaming stores (float32/float64, rows of at least kLanes channels; see cpu_stream.h).
template <class T>
NK_HOT void rows_affine(const T* u, const T* v, T* out, int64_t su, int64_t sv, int64_t so,
                        int64_t rows, int64_t C, const acc_t<T>* __restrict p,
                        const acc_t<T>* __restrict q, const acc_t<T>* __restrict m,
                        const acc_t<T>* __restrict r, bool stream) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  for (int64_t k = 0; k < rows; ++k) {
    const T* __restrict vv = v + k * sv;
    const T* __restrict uu = u ? u + k * su : nullptr;
    T* __restrict o = out + k * so;
    int64_t c = 0;
    if constexpr (cpu::kCanStream<T>) {
      if (stream && C >= kLanes) {
        for (; c < C && reinterpret_cast<uintptr_t>(o + c) % cpu::kStreamAlign; ++c) {
          o[c] = st<T>(q[c] * (ld(vv[c]) - m[c]) + r[c] + (uu ? p[c] * ld(uu[c]) : A(0)));
        }
        for (; c + kLanes <= C; c += kLanes) {
          const auto t = LA::load(q + c) * (L::load(vv + c) - LA::load(m + c)) + LA::load(r + c);
          cpu::stream_store(o + c, uu ? LA::load(p + c) * L::load(uu + c) + t : t);
        }
      }
    }
    if (uu) {
      for (; c < C; ++c) o[c] = st<T>(p[c] * ld(uu[c]) + q[c] * (ld(vv[c]) - m[c]) + r[c]);
    } else {
      for (; c < C; ++c) o[c] = st<T>(q[c] * (ld(vv[c]) - m[c]) + r[c]);
    }
  }
}

// rows_affine over a block of exactly NB * kLanes channels, the coefficients held in registers
// for all the rows: rows_affine reloads them for every row, and on 64-channel rows those reloads
// were two of every three loads (the map ran at 0.8x its planar speed).
template <int NB, class T>
NK_INLINE void rows_affine_regs(const T* u, const T* v, T* out, int64_t su, int64_t sv, int64_t so,
                                int64_t rows, const acc_t<T>* p, const acc_t<T>* q,
                                const acc_t<T>* m, const acc_t<T>* r) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using LA = Lanes<A>;
  using V = typename L::V;
  V pv[NB], qv[NB], mv[NB], rv[NB];
  for (int j = 0; j < NB; ++j) {
    pv[j] = LA::load(p + j * kLanes);
    qv[j] = LA::load(q + j * kLanes);
    mv[j] = LA::load(m + j * kLanes);
    rv[j] = LA::load(r + j * kLanes);
  }
  for (int64_t k = 0; k < rows; ++k) {
    const T* vv = v + k * sv;
    T* o = out + k * so;
    for (int j = 0; j < NB; ++j) {
      V t = qv[j] * (L::load(vv + j * kLanes) - mv[j]) + rv[j];
      if (u) t += pv[j] * L::load(u + k * su + j * kLanes);
      L::store(o + j * kLanes, t);
    }
  }
}

// The affine map of channels-last rows of one sample (one set of coefficients): rows_affine_regs
// where the rows are 1-4 vectors wide and nothing streams, else rows_affine.
template <class T>
NK_HOT void sample_affine(const T* u, const T* v, T* out, int64_t su, int64_t sv, int64_t so,
                         int64_t rows, int64_t C, const acc_t<T>* p, const acc_t<T>* q,
                         const acc_t<T>* m, const acc_t<T>* r, bool stream) {
  if (!stream && C % kLanes == 0 && C <= 4 * kLanes) {
    switch (C / kLanes) {
      case 1: return rows_affine_regs<1, T>(u, v, out, su, sv, so, rows, p, q, m, r);
      case 2: return rows_affine_regs<2, T>(u, v, out, su, sv, so, rows, p, q, m, r);
      case 3: return rows_affine_regs<3, T>(u, v, out, su, sv, so, rows, p, q, m, r);
      case 4: return rows_affine_regs<4, T>(u, v, out, su, sv, so, rows, p, q, m, r);
    }
  }
  rows_affine<T>(u, v, out, su, sv, so, rows, C, p, q, m, r, stream);
}

// ------------------------------------------------------------------------------------------------
// Geometry and the two shapes over a whole tensor.

enum class Layout { Planar, ChannelsLast, Generic };

// A typed tensor seen as (N, C, S).
template <class T>
struct Strided {
  T* data;
  int64_t sN, sC, sS;
  T* plane(int64_t n, int64_t c) const { return data + n * sN + c * sC; }
};

template <class T>
Strided<T> strided(const TensorView& t, const NCSView& v) {
  return {t.ptr<T>(), v.sN, v.sC, v.sS};
}

// Each tensor of a call may have its own strides; a layout is a fast path when all share it.
Layout choose_layout(std::initializer_list<const NCSView*> views) {
  const NCSView& a = **views.begin();
  bool planar = a.S > 1, channels_last = true;
  for (const NCSView* v : views) {
    planar = planar && v->sS == 1;
    channels_last = channels_last && (v->C <= 1 || v->sC == 1);
  }
  if (planar) return Layout::Planar;
  if (channels_last) return Layout::ChannelsLast;
  return a.S <= 1 ? Layout::Planar : Layout::Generic;  // S <= 1: every plane is one value
}

struct Geometry {
  Layout layout;
  int64_t N, C, S, G;
  int64_t Cg() const { return C / G; }
};

// Calls f(n, c, s0, s1) for the parts [s0, s1) of the (n, c) planes that values [e0, e1) of the
// N*C*S plane space (plane i = n*C + c, in planar memory order) cover.
template <class F>
void for_plane_pieces(const Geometry& g, int64_t e0, int64_t e1, F&& f) {
  if (g.S == 0) return;
  int64_t i = e0 / g.S, s0 = e0 % g.S;
  for (int64_t e = e0; e < e1; ++i, s0 = 0) {
    const int64_t s1 = std::min(g.S, s0 + (e1 - e));
    f(i / g.C, i % g.C, s0, s1);
    e += s1 - s0;
  }
}

// Per-plane pair sums (see the top of the file) of a against b; ka, kb, s1, s2 are N*C, n-major.
template <class T>
void pair_sums(const Geometry& g, Strided<const T> a, Strided<const T> b, bool same,
               const std::vector<acc_t<T>>& ka, const std::vector<acc_t<T>>& kb,
               std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t NC = g.N * g.C;
  s1.assign(NC, 0.0);
  s2.assign(NC, 0.0);
  if (NC * g.S == 0) return;
  const int nthreads = cpu::threads_for(NC * g.S, kGrain);
  // Thread t's partial sums cover planes [first[t], first[t] + size): the planes it touches.
  std::vector<int64_t> first(nthreads, 0);
  std::vector<std::vector<double>> part(nthreads);
  cpu::parallel_ranges(nthreads, g.layout == Layout::ChannelsLast ? g.N * g.S : NC * g.S,
                       [&](int tid, int64_t e0, int64_t e1) {
    if (e0 >= e1) return;
    if (g.layout == Layout::ChannelsLast) {
      const int64_t n0 = e0 / g.S, n1 = (e1 - 1) / g.S;
      first[tid] = n0 * g.C;
      std::vector<double>& p = part[tid];
      p.assign(2 * (n1 - n0 + 1) * g.C, 0.0);
      for (int64_t n = n0; n <= n1; ++n) {
        const int64_t r0 = std::max(e0, n * g.S) - n * g.S;
        const int64_t r1 = std::min(e1, (n + 1) * g.S) - n * g.S;
        double* p1 = p.data() + 2 * (n - n0) * g.C;
        const T* ar = a.data + n * a.sN + r0 * a.sS;
        const T* br = b.data + n * b.sN + r0 * b.sS;
        if (same) {
          rows_sums<T, true>(ar, ar, a.sS, a.sS, r1 - r0, g.C, ka.data() + n * g.C,
                             ka.data() + n * g.C, p1, p1 + g.C);
        } else {
          rows_sums<T, false>(ar, br, a.sS, b.sS, r1 - r0, g.C, ka.data() + n * g.C,
                              kb.data() + n * g.C, p1, p1 + g.C);
        }
      }
      return;
    }
    const int64_t i0 = e0 / g.S, i1 = (e1 - 1) / g.S;
    first[tid] = i0;
    std::vector<double>& p = part[tid];
    p.assign(2 * (i1 - i0 + 1), 0.0);
    for_plane_pieces(g, e0, e1, [&](int64_t n, int64_t c, int64_t s0, int64_t s1) {
      const int64_t i = n * g.C + c;
      double* out1 = p.data() + 2 * (i - i0);
      const T* ar = a.plane(n, c);
      const T* br = b.plane(n, c);
      if (g.layout == Layout::Planar) {
        if (same) {
          run_sums_hot<T, true>(ar + s0, ar + s0, s1 - s0, ka[i], ka[i], out1, out1 + 1);
        } else {
          run_sums_hot<T, false>(ar + s0, br + s0, s1 - s0, ka[i], kb[i], out1, out1 + 1);
        }
        return;
      }
      double t1 = 0, t2 = 0;  // generic strides: scalar, in float64
      for (int64_t s = s0; s < s1; ++s) {
        const double d = double(ld(ar[s * a.sS])) - double(ka[i]);
        t1 += d;
        t2 += d * (double(ld(br[s * b.sS])) - double(kb[i]));
      }
      out1[0] += t1;
      out1[1] += t2;
    });
  });
  for (int t = 0; t < nthreads; ++t) {
    const std::vector<double>& p = part[t];
    if (p.empty()) continue;
    if (g.layout == Layout::ChannelsLast) {
      for (size_t j = 0; j < p.size() / (2 * g.C); ++j) {
        for (int64_t c = 0; c < g.C; ++c) {
          s1[first[t] + j * g.C + c] += p[2 * j * g.C + c];
          s2[first[t] + j * g.C + c] += p[(2 * j + 1) * g.C + c];
        }
      }
    } else {
      for (size_t j = 0; j < p.size() / 2; ++j) {
        s1[first[t] + j] += p[2 * j];
        s2[first[t] + j] += p[2 * j + 1];
      }
    }
  }
}

// out = p * u + q * (v - m) + r with per-plane coefficients (N*C, n-major); u may be absent.
template <class T>
void affine(const Geometry& g, const Strided<const T>* u, Strided<const T> v, Strided<T> out,
            const std::vector<acc_t<T>>& p, const std::vector<acc_t<T>>& q,
            const std::vector<acc_t<T>>& m, const std::vector<acc_t<T>>& r) {
  using A = acc_t<T>;
  const int64_t NC = g.N * g.C;
  if (NC * g.S == 0) return;
  const int nthreads = cpu::threads_for(NC * g.S, kGrain);
  const bool stream = cpu::should_stream((u ? 3 : 2) * NC * g.S * int64_t(sizeof(T)), out.data);
  cpu::parallel_ranges(nthreads, g.layout == Layout::ChannelsLast ? g.N * g.S : NC * g.S,
                       [&](int, int64_t e0, int64_t e1) {
    if (g.layout == Layout::ChannelsLast) {
      while (e0 < e1) {
        const int64_t n = e0 / g.S, s0 = e0 % g.S, s1 = std::min(g.S, s0 + (e1 - e0));
        const int64_t k = n * g.C;
        sample_affine<T>(u ? u->data + n * u->sN + s0 * u->sS : nullptr,
                         v.data + n * v.sN + s0 * v.sS, out.data + n * out.sN + s0 * out.sS,
                         u ? u->sS : 0, v.sS, out.sS, s1 - s0, g.C, p.data() + k, q.data() + k,
                         m.data() + k, r.data() + k, stream);
        e0 += s1 - s0;
      }
      if (stream) cpu::stream_fence();
      return;
    }
    for_plane_pieces(g, e0, e1, [&](int64_t n, int64_t c, int64_t s0, int64_t s1) {
      const int64_t i = n * g.C + c;
      const T* ur = u ? u->plane(n, c) : nullptr;
      const T* vr = v.plane(n, c);
      T* o = out.plane(n, c);
      if (g.layout == Layout::Planar) {
        run_affine_hot<T>(ur ? ur + s0 : nullptr, vr + s0, o + s0, s1 - s0, p[i], q[i], m[i],
                          r[i], stream);
        return;
      }
      for (int64_t s = s0; s < s1; ++s) {
        A value = q[i] * (ld(vr[s * v.sS]) - m[i]) + r[i];
        if (ur) value += p[i] * ld(ur[s * u->sS]);
        o[s * out.sS] = st<T>(value);
      }
    });
    if (stream) cpu::stream_fence();
  });
}

// The shift of a group's statistics: the mean of the first (up to) kPilot values of the group's
// first channel. Sums of (x - shift) then lose nothing to cancellation when |mean| >> std (the
// shift need only be within a few std of the mean). Few values: for small planes (7x7) a longer
// pilot would cost as much as the statistics themselves.
constexpr int64_t kPilot = kLanes;  // one vector when the plane is contiguous

template <class T>
NK_INLINE double pilot_mean(const Geometry& g, Strided<const T> x, int64_t n, int64_t group) {
  const int64_t count = std::min(kPilot, g.S);
  if (count == 0) return 0.0;
  const T* plane = x.plane(n, group * g.Cg());
  if (count == kLanes && x.sS == 1) return hsum(Lanes<T>::load(plane)) / double(count);
  double sum = 0;
  for (int64_t s = 0; s < count; ++s) sum += double(ld(plane[s * x.sS]));
  return sum / double(count);
}

// The shifts of every group of sample n, rounded to the arithmetic type A, into shift[0, G).
// Channels-last instance norm takes them row after row, vectorized over the channels (the same
// sums, in the same order, as pilot_mean): a walk down each channel would read the first rows
// once per channel.
template <class T>
NK_HOT void pilot_means(const Geometry& g, Strided<const T> x, int64_t n, double* shift) {
  using A = acc_t<T>;
  const int64_t count = std::min(kPilot, g.S);
  if (g.layout == Layout::ChannelsLast && g.G == g.C && x.sC == 1 && count > 0) {
    std::fill(shift, shift + g.C, 0.0);
    for (int64_t s = 0; s < count; ++s) {
      const T* __restrict row = x.data + n * x.sN + s * x.sS;
      for (int64_t c = 0; c < g.C; ++c) shift[c] += double(ld(row[c]));
    }
    for (int64_t c = 0; c < g.C; ++c) shift[c] = double(A(shift[c] / double(count)));
    return;
  }
  for (int64_t j = 0; j < g.G; ++j) shift[j] = double(A(pilot_mean(g, x, n, j)));
}

// Whether the single-process forward/backward fuse their passes per (n, g) block: planar blocks,
// enough of them to give every thread whole blocks.
bool fuse(const Geometry& g, int nthreads) {
  return g.layout == Layout::Planar && g.N * g.G >= nthreads && g.S > 0;
}

// The same for channels-last tensors, by whole samples.
bool fuse_rows(const Geometry& g, int nthreads) {
  return g.layout == Layout::ChannelsLast && g.N >= nthreads && g.S > 0;
}

// ------------------------------------------------------------------------------------------------
// Small (N, K) arrays of the param dtype, read into / written from n-major float64 vectors.

template <class P>
std::vector<double> read_nk(const TensorView& t, int64_t N, int64_t K, double absent) {
  std::vector<double> out(N * K, absent);
  if (!t.defined()) return out;
  const P* data = t.ptr<const P>();
  for (int64_t n = 0; n < N; ++n) {
    const P* row = data + n * t.strides[0];
    for (int64_t k = 0; k < K; ++k) out[n * K + k] = double(row[k * t.strides[1]]);
  }
  return out;
}

template <class P>
void write_nk(const TensorView& t, int64_t N, int64_t K, const std::vector<double>& values) {
  P* data = t.ptr<P>();
  for (int64_t n = 0; n < N; ++n) {
    P* row = data + n * t.strides[0];
    for (int64_t k = 0; k < K; ++k) row[k * t.strides[1]] = P(values[n * K + k]);
  }
}

template <class P>
std::vector<double> read_channels(const TensorView& t, int64_t C, double absent) {
  std::vector<double> out(C, absent);
  if (!t.defined()) return out;
  const P* data = t.ptr<const P>();
  for (int64_t c = 0; c < C; ++c) out[c] = double(data[c * t.strides[0]]);
  return out;
}

// A per-group (N, G) vector spread over the channels of each group: (N, C).
template <class A>
std::vector<A> per_channel(const std::vector<double>& v, const Geometry& g) {
  std::vector<A> out(g.N * g.C);
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = 0; c < g.C; ++c) out[n * g.C + c] = A(v[n * g.G + c / g.Cg()]);
  }
  return out;
}

template <class A>
std::vector<A> narrow(const std::vector<double>& v) {
  return std::vector<A>(v.begin(), v.end());
}

// Group moments from shifted plane sums: mean and biased var per (n, g).
void group_moments(const Geometry& g, const std::vector<double>& shift,
                   const std::vector<double>& s1, const std::vector<double>& s2,
                   std::vector<double>& mean, std::vector<double>& var) {
  const double M = double(g.Cg() * g.S);
  mean.assign(g.N * g.G, 0.0);
  var.assign(g.N * g.G, 0.0);
  if (M <= 0) return;
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t k = 0; k < g.G; ++k) {
      double t1 = 0, t2 = 0;
      for (int64_t c = k * g.Cg(); c < (k + 1) * g.Cg(); ++c) {
        t1 += s1[n * g.C + c];
        t2 += s2[n * g.C + c];
      }
      const double d = t1 / M;
      mean[n * g.G + k] = shift[n * g.G + k] + d;
      var[n * g.G + k] = std::max(0.0, t2 / M - d * d);
    }
  }
}

// Coefficients of dx = a * dy + b * (x - mean) + c through the statistics of one (n, g) block:
// with xhat = (x - mean) * rstd and M values per group,
//   dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))
// so a = rstd * w[c], b = -rstd^3 * sum_c w sum_dy_xmu / M, c = -rstd * sum_c w sum_dy / M.
struct BlockGrad {
  double b, c;
};

NK_INLINE BlockGrad block_grad(const Geometry& g, int64_t n, int64_t k, double rstd,
                               const std::vector<double>& w, const double* s1, const double* s2) {
  const double M = double(g.Cg() * g.S);
  if (M <= 0) return {0.0, 0.0};
  double a1 = 0, a2 = 0;
  for (int64_t j = 0; j < g.Cg(); ++j) {
    const int64_t c = k * g.Cg() + j;
    a1 += w[c] * s1[n * g.C + c];
    a2 += w[c] * s2[n * g.C + c];
  }
  return {-rstd * rstd * rstd * a2 / M, -rstd * a1 / M};
}

// ------------------------------------------------------------------------------------------------
// The fused planar passes (see fuse): a thread's range of (n, g) blocks, each reduced and then
// normalized (or back-propagated) while it is in cache.
//
// A small block is one latency chain: for a 7x7 plane (49 values) the pilot's sum, the sums, the
// float64 moments (two divides and a square root) and the affine each wait for the one before,
// and one block at a time left most of the core idle. So kBatch consecutive blocks of at most
// kBatchValues values go through each phase together, and their chains overlap. A block's
// arithmetic, in its order, is the same in a batch and alone (a range's last blocks, fewer than
// kBatch, go one at a time): results depend neither on the batching nor, through it, on where
// the threads' ranges start.
constexpr int kBatch = 4;
constexpr int64_t kBatchValues = 1024;  // kBatch such blocks (16 KiB in float32) stay in L1

// The (n, g) of the K blocks from (n0, j0) on, into n[K], j[K]; advances (n0, j0) past them.
template <int K>
NK_INLINE void next_blocks(const Geometry& g, int64_t& n0, int64_t& j0, int64_t* n, int64_t* j) {
  for (int k = 0; k < K; ++k) {
    n[k] = n0;
    j[k] = j0;
    if (++j0 == g.G) j0 = 0, ++n0;
  }
}

template <class T>
struct ForwardBlocks {
  Geometry g;
  Strided<const T> x;
  Strided<T> y;
  const double *w, *b;             // (C,)
  double eps;
  double *mean, *var, *rstd;       // (N * G,)
  bool stream;
};

// Blocks [blk, blk + K) of the forward, the K blocks from (n0, j0) on (advanced past them). The
// loops over the K blocks are unrolled (4 = kBatch), so that their chains are interleaved in the
// instruction stream rather than each whole plane's work after the last.
template <int K, class T>
NK_INLINE void block_step(const ForwardBlocks<T>& f, int64_t blk, int64_t& n0, int64_t& j0) {
  using A = acc_t<T>;
  const Geometry& g = f.g;
  const int64_t Cg = g.Cg();
  const double M = double(Cg * g.S);
  int64_t n[K], j[K];
  next_blocks<K>(g, n0, j0, n, j);
  A ks[K];
  double s1[K], s2[K], d[K], rs[K];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    ks[k] = A(pilot_mean(g, f.x, n[k], j[k]));
    s1[k] = s2[k] = 0;
  }
  for (int64_t c = 0; c < Cg; ++c) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const T* plane = f.x.plane(n[k], j[k] * Cg + c);
      run_sums<T, true>(plane, plane, g.S, ks[k], ks[k], &s1[k], &s2[k]);
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    d[k] = s1[k] / M;
    const double var = std::max(0.0, s2[k] / M - d[k] * d[k]);
    rs[k] = 1.0 / std::sqrt(var + f.eps);
    f.mean[blk + k] = double(ks[k]) + d[k];
    f.var[blk + k] = var;
    f.rstd[blk + k] = rs[k];
  }
  for (int64_t c = 0; c < Cg; ++c) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {  // see shifted_affine in group_norm_forward
      const int64_t ch = j[k] * Cg + c;
      const double q = rs[k] * f.w[ch];
      run_affine<T>(nullptr, f.x.plane(n[k], ch), f.y.plane(n[k], ch), g.S, A(0), A(q), ks[k],
                    A(f.b[ch] - q * d[k]), f.stream);
    }
  }
}


template <class T>
struct BackwardBlocks {
  Geometry g;
  Strided<const T> dy, x;
  Strided<T> dx;                   // data null: the sums only
  const std::vector<double>& mean;  // (N * G,)
  const std::vector<double>& rstd;  // (N * G,)
  const std::vector<double>& w;     // (C,)
  double *s1, *s2;                 // (N * C,), zero on entry
  bool stream;
};

// Blocks [blk, blk + K) of the backward, as the forward's block_step (unrolled likewise).
template <int K, class T>
NK_INLINE void block_step(const BackwardBlocks<T>& f, int64_t blk, int64_t& n0,
                             int64_t& j0) {
  using A = acc_t<T>;
  const Geometry& g = f.g;
  const int64_t Cg = g.Cg();
  int64_t n[K], j[K];
  next_blocks<K>(g, n0, j0, n, j);
  for (int64_t c = 0; c < Cg; ++c) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const int64_t ch = j[k] * Cg + c;
      run_sums<T, false>(f.dy.plane(n[k], ch), f.x.plane(n[k], ch), g.S, A(0),
                         A(f.mean[blk + k]), &f.s1[n[k] * g.C + ch], &f.s2[n[k] * g.C + ch]);
    }
  }
  if (!f.dx.data) return;
  BlockGrad bg[K];
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) bg[k] = block_grad(g, n[k], j[k], f.rstd[blk + k], f.w, f.s1, f.s2);
  for (int64_t c = 0; c < Cg; ++c) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const int64_t ch = j[k] * Cg + c;
      run_affine<T>(f.dy.plane(n[k], ch), f.x.plane(n[k], ch), f.dx.plane(n[k], ch), g.S,
                    A(f.rstd[blk + k] * f.w[ch]), A(bg[k].b), A(f.mean[blk + k]), A(bg[k].c),
                    f.stream);
    }
  }
}

// A thread's blocks [b0, b1) of the fused forward or backward (F: ForwardBlocks or BackwardBlocks;
// their step functions are overloads of block_step): small blocks kBatch at a time, the rest (and
// the last few) one by one.
template <class F>
NK_HOT void run_blocks(const F& f, int64_t b0, int64_t b1) {
  int64_t n = b0 / f.g.G, j = b0 % f.g.G, blk = b0;
  if (f.g.Cg() * f.g.S <= kBatchValues) {
    for (; blk + kBatch <= b1; blk += kBatch) block_step<kBatch>(f, blk, n, j);
  }
  for (; blk < b1; ++blk) block_step<1>(f, blk, n, j);
}

// ------------------------------------------------------------------------------------------------
// Checks shared by the ops.

std::string shape_string(const TensorView& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

struct Checked {
  NCSView x;
  DType param;
};

Checked check_input(const char* op, const TensorView& x) {
  NK_CHECK_VALUE(x.defined(), op, ": x is required");
  NK_CHECK_VALUE(x.ndim >= 2, op, ": x must have shape (N, C, ...), got ", x.ndim, " dim(s)");
  return {as_ncs(x, "x"), param_dtype(x.dtype)};
}

void check_same_device(const char* op, const TensorView& t, const char* name, const TensorView& x) {
  NK_CHECK_TYPE(t.device == x.device && t.device_id == x.device_id, op, ": ", name, " is on ",
                device_name(t.device), ":", t.device_id, " but x is on ", device_name(x.device),
                ":", x.device_id);
}

// An output must not write one element through two indices (a broadcast view would race).
void check_output(const char* op, const TensorView& t, const char* name) {
  if (!t.defined() || t.numel() == 0) return;
  for (int d = 0; d < t.ndim; ++d) {
    NK_CHECK_VALUE(t.shape[d] <= 1 || t.strides[d] != 0, op, ": output ", name,
                   " is a broadcast view (stride 0 in dim ", d, "); pass an array that owns ",
                   "every element");
  }
}

// A tensor shaped like x, of its dtype, on its device.
NCSView check_like_x(const char* op, const TensorView& t, const char* name, const TensorView& x) {
  NK_CHECK_VALUE(t.defined(), op, ": ", name, " is required");
  check_same_device(op, t, name, x);
  NK_CHECK_TYPE(t.dtype == x.dtype, op, ": ", name, " has dtype ", dtype_name(t.dtype),
                " but x has ", dtype_name(x.dtype));
  bool same = t.ndim == x.ndim;
  for (int d = 0; same && d < x.ndim; ++d) same = t.shape[d] == x.shape[d];
  NK_CHECK_VALUE(same, op, ": ", name, " has shape ", shape_string(t), " but x has shape ",
                 shape_string(x));
  return as_ncs(t, name);
}

void check_param_array(const char* op, const TensorView& t, const char* name, const TensorView& x,
                       DType param) {
  check_same_device(op, t, name, x);
  NK_CHECK_TYPE(t.dtype == param, op, ": ", name, " must be ", dtype_name(param), " for ",
                dtype_name(x.dtype), " input, got ", dtype_name(t.dtype));
}

// The number of groups G, checked: a positive divisor of C.
int64_t check_groups(const char* op, int64_t groups, int64_t C) {
  NK_CHECK_VALUE(groups >= 1, op, ": the number of groups must be >= 1, got ", groups);
  NK_CHECK_VALUE(C % groups == 0, op, ": the ", C, " channels of x are not divisible into ",
                 groups, " groups");
  return groups;
}

// `mean` (N, G) fixes G; returns the geometry of the call.
Geometry check_mean(const char* op, const TensorView& mean, const char* name, const TensorView& x,
                    const Checked& k) {
  NK_CHECK_VALUE(mean.defined(), op, ": ", name, " is required");
  check_param_array(op, mean, name, x, k.param);
  NK_CHECK_VALUE(mean.ndim == 2 && mean.shape[0] == k.x.N, op, ": ", name,
                 " must have shape (N, G) = (", k.x.N, ", G), got ", shape_string(mean));
  const int64_t G = check_groups(op, mean.shape[1], k.x.C);
  return {Layout::Planar, k.x.N, k.x.C, k.x.S, G};
}

// An (N, K) array of the param dtype (K = G or C); absent allowed when `optional`.
void check_nk(const char* op, const TensorView& t, const char* name, const TensorView& x,
              const Checked& k, int64_t K, const char* what, bool optional) {
  if (!t.defined()) {
    NK_CHECK_VALUE(optional, op, ": ", name, " is required");
    return;
  }
  check_param_array(op, t, name, x, k.param);
  NK_CHECK_VALUE(t.ndim == 2 && t.shape[0] == k.x.N && t.shape[1] == K, op, ": ", name,
                 " must have shape ", what, " = (", k.x.N, ", ", K, "), got ", shape_string(t));
}

void check_channels(const char* op, const TensorView& t, const char* name, const TensorView& x,
                    const Checked& k) {
  if (!t.defined()) return;
  check_param_array(op, t, name, x, k.param);
  NK_CHECK_VALUE(t.ndim == 1 && t.shape[0] == k.x.C, op, ": ", name, " must have shape (",
                 k.x.C, ",) to match the channels of x, got ", shape_string(t));
}

template <class T>
Strided<const T> in(const TensorView& t, const NCSView& v) {
  return {t.ptr<const T>(), v.sN, v.sC, v.sS};
}

}  // namespace

// ================================================================================================
// The ops.

int64_t group_norm_workspace_size(const TensorView& x, int64_t groups) {
  const char* op = "group_norm_workspace_size";
  const Checked k = check_input(op, x);
  check_groups(op, groups, k.x.C);
  if (x.device != Device::CUDA) return 0;
  int64_t size = 0;
  dispatch<true>(op, x, [](auto) {}, [&] { size = cuda::group_norm_workspace_size(x, groups); });
  return size;
}

void group_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch) {
  const char* op = "group_norm_stats";
  const Checked k = check_input(op, x);
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, var, "var", x, k, g.G, "(N, G)", false);
  check_output(op, mean, "mean");
  check_output(op, var, "var");
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x});
    const auto xs = in<T>(x, k.x);
    std::vector<double> shift(g.N * g.G), s1, s2, m, v;
    for (int64_t n = 0; n < g.N; ++n) {
      pilot_means(g, xs, n, shift.data() + n * g.G);
    }
    const auto ks = per_channel<A>(shift, g);
    pair_sums<T>(g, xs, xs, true, ks, ks, s1, s2);
    group_moments(g, shift, s1, s2, m, v);
    write_nk<A>(mean, g.N, g.G, m);
    write_nk<A>(var, g.N, g.G, v);
  }, [&] { cuda::group_norm_stats(x, mean, var, launch); });
}

void group_norm_affine(const TensorView& x, const TensorView& mean, const TensorView& scale,
                       const TensorView& shift, const TensorView& y, const Launch& launch) {
  const char* op = "group_norm_affine";
  const Checked k = check_input(op, x);
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, scale, "scale", x, k, g.C, "(N, C)", false);
  check_nk(op, shift, "shift", x, k, g.C, "(N, C)", false);
  const NCSView yv = check_like_x(op, y, "y", x);
  check_output(op, y, "y");
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x, &yv});
    const auto m = per_channel<A>(read_nk<A>(mean, g.N, g.G, 0), g);
    affine<T>(g, nullptr, in<T>(x, k.x), strided<T>(y, yv), std::vector<A>(g.N * g.C, 0),
              narrow<A>(read_nk<A>(scale, g.N, g.C, 0)), m,
              narrow<A>(read_nk<A>(shift, g.N, g.C, 0)));
  }, [&] { cuda::group_norm_affine(x, mean, scale, shift, y, launch); });
}

void group_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias,
                        double eps, const TensorView& y, const TensorView& mean,
                        const TensorView& var, const TensorView& rstd, const Launch& launch) {
  const char* op = "group_norm_forward";
  const Checked k = check_input(op, x);
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, var, "var", x, k, g.G, "(N, G)", false);
  check_nk(op, rstd, "rstd", x, k, g.G, "(N, G)", false);
  check_channels(op, weight, "weight", x, k);
  check_channels(op, bias, "bias", x, k);
  check_output(op, mean, "mean");
  check_output(op, var, "var");
  check_output(op, rstd, "rstd");
  NK_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const NCSView yv = check_like_x(op, y, "y", x);
  check_output(op, y, "y");
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x, &yv});
    const auto xs = in<T>(x, k.x);
    const auto ys = strided<T>(y, yv);
    const auto w = read_channels<A>(weight, g.C, 1), b = read_channels<A>(bias, g.C, 0);
    const int64_t NG = g.N * g.G, Cg = g.Cg();
    const double M = double(Cg * g.S);
    std::vector<double> m(NG, 0.0), v(NG, 0.0), rs(NG, 0.0);
    // shifted_affine: y = q (x - shift) + (b - q (mean - shift)) with the shift (a value of the
    // arithmetic type near the mean) in place of the mean, whose rounding to float32 would move
    // every y by |mean| * 2^-24 * rstd: x - shift is exact, mean - shift is taken in float64.
    const int nthreads = cpu::threads_for(g.N * g.C * g.S, kGrain);
    if (fuse(g, nthreads)) {
      // A thread owns whole (n, g) blocks and normalizes each right after reducing it, while the
      // block is still in cache: x crosses the memory bus once.
      const bool stream = cpu::should_stream(2 * g.N * g.C * g.S * int64_t(sizeof(T)), ys.data);
      const ForwardBlocks<T> f{g, xs, ys, w.data(), b.data(), eps, m.data(), v.data(),
                               rs.data(), stream};
      cpu::parallel_ranges(nthreads, NG, [&](int, int64_t b0, int64_t b1) {
        run_blocks(f, b0, b1);
        if (stream) cpu::stream_fence();
      });
    } else if (fuse_rows(g, nthreads)) {
      // Channels-last: a thread owns whole samples (contiguous runs of S rows of C) and
      // normalizes each right after reducing it, while it is still in cache.
      const bool stream = cpu::should_stream(2 * g.N * g.C * g.S * int64_t(sizeof(T)), ys.data);
      cpu::parallel_ranges(nthreads, g.N, [&](int, int64_t n0, int64_t n1) {
        std::vector<A> ks(g.C), q(g.C), r(g.C), zero(g.C, A(0));
        std::vector<double> kg(g.G), s1(g.C), s2(g.C);
        for (int64_t n = n0; n < n1; ++n) {
          pilot_means(g, xs, n, kg.data());
          for (int64_t c = 0; c < g.C; ++c) ks[c] = A(kg[c / Cg]);
          std::fill(s1.begin(), s1.end(), 0.0);
          std::fill(s2.begin(), s2.end(), 0.0);
          const T* xn = xs.data + n * xs.sN;
          rows_sums<T, true>(xn, xn, xs.sS, xs.sS, g.S, g.C, ks.data(), ks.data(), s1.data(),
                             s2.data());
          for (int64_t j = 0; j < g.G; ++j) {
            double t1 = 0, t2 = 0;
            for (int64_t c = j * Cg; c < (j + 1) * Cg; ++c) t1 += s1[c], t2 += s2[c];
            const double d = t1 / M;
            const int64_t blk = n * g.G + j;
            m[blk] = kg[j] + d;
            v[blk] = std::max(0.0, t2 / M - d * d);
            rs[blk] = 1.0 / std::sqrt(v[blk] + eps);
          }
          for (int64_t c = 0; c < g.C; ++c) {  // see shifted_affine
            const int64_t blk = n * g.G + c / Cg;
            const double qc = rs[blk] * w[c];
            q[c] = A(qc);
            r[c] = A(b[c] - qc * (m[blk] - kg[c / Cg]));
          }
          sample_affine<T>(nullptr, xn, ys.data + n * ys.sN, 0, xs.sS, ys.sS, g.S, g.C,
                           zero.data(), q.data(), ks.data(), r.data(), stream);
        }
        if (stream) cpu::stream_fence();
      });
    } else {
      std::vector<double> shift(NG), s1, s2;
      for (int64_t n = 0; n < g.N; ++n) {
        pilot_means(g, xs, n, shift.data() + n * g.G);
      }
      const auto ks = per_channel<A>(shift, g);
      pair_sums<T>(g, xs, xs, true, ks, ks, s1, s2);
      group_moments(g, shift, s1, s2, m, v);
      for (int64_t i = 0; i < NG; ++i) rs[i] = 1.0 / std::sqrt(v[i] + eps);
      std::vector<A> q(g.N * g.C), r(g.N * g.C);
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t c = 0; c < g.C; ++c) {  // see shifted_affine
          const int64_t blk = n * g.G + c / Cg;
          const double qc = rs[blk] * w[c];
          q[n * g.C + c] = A(qc);
          r[n * g.C + c] = A(b[c] - qc * (m[blk] - shift[blk]));
        }
      }
      affine<T>(g, nullptr, xs, ys, std::vector<A>(g.N * g.C, 0), q, ks, r);
    }
    write_nk<A>(mean, g.N, g.G, m);
    write_nk<A>(var, g.N, g.G, v);
    write_nk<A>(rstd, g.N, g.G, rs);
  }, [&] { cuda::group_norm_forward(x, weight, bias, eps, y, mean, var, rstd, launch); });
}

void group_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch) {
  const char* op = "group_norm_backward_reduce";
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, sum_dy, "sum_dy", x, k, g.C, "(N, C)", false);
  check_nk(op, sum_dy_xmu, "sum_dy_xmu", x, k, g.C, "(N, C)", false);
  check_output(op, sum_dy, "sum_dy");
  check_output(op, sum_dy_xmu, "sum_dy_xmu");
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x, &dyv});
    std::vector<double> s1, s2;
    pair_sums<T>(g, in<T>(dy, dyv), in<T>(x, k.x), false, std::vector<A>(g.N * g.C, 0),
                 per_channel<A>(read_nk<A>(mean, g.N, g.G, 0), g), s1, s2);
    write_nk<A>(sum_dy, g.N, g.C, s1);
    write_nk<A>(sum_dy_xmu, g.N, g.C, s2);
  }, [&] { cuda::group_norm_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, launch); });
}

void group_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& a, const TensorView& b, const TensorView& c,
                               const TensorView& dx, const Launch& launch) {
  const char* op = "group_norm_backward_elemt";
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  const NCSView dxv = check_like_x(op, dx, "dx", x);
  check_output(op, dx, "dx");
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, a, "a", x, k, g.C, "(N, C)", false);
  check_nk(op, b, "b", x, k, g.G, "(N, G)", true);
  check_nk(op, c, "c", x, k, g.G, "(N, G)", true);
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x, &dyv, &dxv});
    const auto dys = in<T>(dy, dyv);
    affine<T>(g, &dys, in<T>(x, k.x), strided<T>(dx, dxv), narrow<A>(read_nk<A>(a, g.N, g.C, 0)),
              per_channel<A>(read_nk<A>(b, g.N, g.G, 0), g),
              per_channel<A>(read_nk<A>(mean, g.N, g.G, 0), g),
              per_channel<A>(read_nk<A>(c, g.N, g.G, 0), g));
  }, [&] { cuda::group_norm_backward_elemt(dy, x, mean, a, b, c, dx, launch); });
}

void group_norm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                         const TensorView& rstd, const TensorView& weight, const TensorView& dx,
                         const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                         const Launch& launch) {
  const char* op = "group_norm_backward";
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  const NCSView dxv = dx.defined() ? check_like_x(op, dx, "dx", x) : dyv;
  check_output(op, dx, "dx");
  Geometry g = check_mean(op, mean, "mean", x, k);
  check_nk(op, rstd, "rstd", x, k, g.G, "(N, G)", false);
  check_channels(op, weight, "weight", x, k);
  check_nk(op, sum_dy, "sum_dy", x, k, g.C, "(N, C)", false);
  check_nk(op, sum_dy_xmu, "sum_dy_xmu", x, k, g.C, "(N, C)", false);
  check_output(op, sum_dy, "sum_dy");
  check_output(op, sum_dy_xmu, "sum_dy_xmu");
  dispatch<true>(op, x, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    g.layout = choose_layout({&k.x, &dyv, &dxv});
    const int64_t Cg = g.Cg();
    const auto m = read_nk<A>(mean, g.N, g.G, 0), rs = read_nk<A>(rstd, g.N, g.G, 0);
    const auto w = read_channels<A>(weight, g.C, 1);
    const auto xs = in<T>(x, k.x), dys = in<T>(dy, dyv);
    const auto dxs = dx.defined() ? strided<T>(dx, dxv) : Strided<T>{nullptr, 0, 0, 0};
    std::vector<double> s1(g.N * g.C, 0.0), s2(g.N * g.C, 0.0);
    const int nthreads = cpu::threads_for(g.N * g.C * g.S, kGrain);
    if (fuse(g, nthreads)) {
      // As in the forward: each block's dx is written while its dy and x are in cache.
      const bool stream = cpu::should_stream(3 * g.N * g.C * g.S * int64_t(sizeof(T)), dxs.data);
      const BackwardBlocks<T> f{g, dys, xs, dxs, m, rs, w, s1.data(), s2.data(), stream};
      cpu::parallel_ranges(nthreads, g.N * g.G, [&](int, int64_t b0, int64_t b1) {
        run_blocks(f, b0, b1);
        if (stream) cpu::stream_fence();
      });
    } else if (fuse_rows(g, nthreads)) {
      // Channels-last, as in the forward: a thread owns whole samples.
      const auto mc = per_channel<A>(m, g);
      const bool stream = cpu::should_stream(3 * g.N * g.C * g.S * int64_t(sizeof(T)), dxs.data);
      cpu::parallel_ranges(nthreads, g.N, [&](int, int64_t n0, int64_t n1) {
        std::vector<A> zero(g.C, A(0)), p(g.C), q(g.C), r(g.C);
        for (int64_t n = n0; n < n1; ++n) {
          const T* dyn = dys.data + n * dys.sN;
          const T* xn = xs.data + n * xs.sN;
          rows_sums<T, false>(dyn, xn, dys.sS, xs.sS, g.S, g.C, zero.data(),
                              mc.data() + n * g.C, s1.data() + n * g.C, s2.data() + n * g.C);
          if (!dxs.data) continue;
          for (int64_t j = 0; j < g.G; ++j) {
            const int64_t blk = n * g.G + j;
            const BlockGrad bg = block_grad(g, n, j, rs[blk], w, s1.data(), s2.data());
            for (int64_t c = j * Cg; c < (j + 1) * Cg; ++c) {
              p[c] = A(rs[blk] * w[c]);
              q[c] = A(bg.b);
              r[c] = A(bg.c);
            }
          }
          sample_affine<T>(dyn, xn, dxs.data + n * dxs.sN, dys.sS, xs.sS, dxs.sS, g.S, g.C,
                           p.data(), q.data(), mc.data() + n * g.C, r.data(), stream);
        }
        if (stream) cpu::stream_fence();
      });
    } else {
      pair_sums<T>(g, dys, xs, false, std::vector<A>(g.N * g.C, 0), per_channel<A>(m, g), s1,
                   s2);
      if (dxs.data) {
        std::vector<A> p(g.N * g.C), q(g.N * g.C), r(g.N * g.C);
        for (int64_t n = 0; n < g.N; ++n) {
          for (int64_t j = 0; j < g.G; ++j) {
            const int64_t blk = n * g.G + j;
            const BlockGrad bg = block_grad(g, n, j, rs[blk], w, s1.data(), s2.data());
            for (int64_t c = j * Cg; c < (j + 1) * Cg; ++c) {
              p[n * g.C + c] = A(rs[blk] * w[c]);
              q[n * g.C + c] = A(bg.b);
              r[n * g.C + c] = A(bg.c);
            }
          }
        }
        affine<T>(g, &dys, xs, dxs, p, q, per_channel<A>(m, g), r);
      }
    }
    write_nk<A>(sum_dy, g.N, g.C, s1);
    write_nk<A>(sum_dy_xmu, g.N, g.C, s2);
  }, [&] {
    cuda::group_norm_backward(dy, x, mean, rstd, weight, dx, sum_dy, sum_dy_xmu, launch);
  });
}

}  // namespace normkit
