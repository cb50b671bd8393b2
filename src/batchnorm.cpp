// Batch normalization: the argument checks (shared by both devices), dispatch, and the CPU kernels.
// The CUDA kernels are in cuda/batchnorm.cu; they receive arguments checked here.
//
// Every op reduces to two kernel shapes over the tensor seen as (N, C, S):
//   pair sums     s1[c] = sum (a - ka[c]),  s2[c] = sum (a - ka[c]) * (b - kb[c])
//                   statistics: a = b = x, ka = kb = a shift (the mean of the channel's first
//                   values), so the sums stay exact when |mean| >> std (no E[x^2] - E[x]^2);
//                   backward:   a = dy, ka = 0, b = x, kb = mean.
//   affine        out = p[c] * u + q[c] * (v - m[c]) + r[c]
//                   normalize:  u absent, v = x;  backward: u = dy, v = x.
// Inner loops accumulate in float32 lanes (float64 for float64 data) and flush into float64 every
// few thousand values, so long reductions stay exact without paying for float64 vectors.
//
// Layouts: "planar" (contiguous rows of S per (n, c): NCHW, NCL), "channels-last" (contiguous rows
// of C per (n, s): NHWC, NDHWC, and (N, C)), and a generic strided path for anything else.
// Channels-last rows that follow each other (contiguous NHWC) are swept as flat runs, the channel
// pattern held in registers where it repeats within 64 values (C = 2^k <= 64, 3 * 2^k <= 48).
// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time
// (target_clones), so the default build stays portable without giving up vector width.
#include "normkit/batchnorm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_stream.h"
#include "cpu_threads.h"
#include "normkit/dispatch.h"

// Small helpers are inlined into each clone, so they take that clone's vector width.
#define NK_INLINE inline __attribute__((always_inline))

namespace normkit {
namespace {

using cpu::kCanStream;
using cpu::should_stream;
using cpu::stream_fence;
using cpu::stream_store;

// Arithmetic type of a storage type: float32 for float16/float32, float64 for float64. It is also
// the dtype of parameters and statistics (param_dtype).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------------------------------------
// Vector lanes (GCC/Clang vector extensions: the compiler splits them to the target's width).

constexpr int kLanes = 16;
constexpr int64_t kFlushEvery = 2048;  // values per float32 lane block before flushing to float64
constexpr int64_t kFlushRows = 64;     // channels-last rows per float32 block
constexpr int64_t kTileValues = 1024;  // at least this many coefficients per channels-last tile

// bfloat16 storage in the kernels: BFloat16's two bytes with the conversions the scalar paths use
// (widening to float32 is exact; narrowing rounds to nearest even, NaN stays a quiet NaN).
struct Bf16 {
  uint16_t bits;
  Bf16() = default;
  NK_INLINE Bf16(float f) : bits(float_to_bf16(f).bits) {}
  NK_INLINE operator float() const { return bf16_to_float(BFloat16{bits}); }
};

// The storage type of dispatch's tag: the tag itself, Bf16 for BFloat16.
template <class Tag>
struct Storage {
  using type = Tag;
};
template <>
struct Storage<BFloat16> {
  using type = Bf16;
};
template <class Tag>
using storage_t = typename Storage<Tag>::type;

// kLanes values of storage type T, loaded as arithmetic type A.
template <class T, class A = acc_t<T>>
struct Lanes {
  typedef A V __attribute__((vector_size(kLanes * sizeof(A))));
  typedef uint16_t Bits __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t Wide __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  NK_INLINE static V load(const T* p) {
    if constexpr (std::is_same_v<T, A>) {
      V v;
      std::memcpy(&v, p, sizeof v);
      return v;
    } else if constexpr (std::is_same_v<T, Bf16>) {
      // bfloat16 is the upper half of a float32.
      Bits bits;
      std::memcpy(&bits, p, sizeof bits);
      const Wide wide = __builtin_convertvector(bits, Wide) << 16;
      typedef float F __attribute__((vector_size(kLanes * sizeof(float))));
      F f;
      std::memcpy(&f, &wide, sizeof f);
      if constexpr (std::is_same_v<A, float>) {
        return f;
      } else {  // the float64 re-sum of the statistics reads bfloat16 as float64 lanes
        return __builtin_convertvector(f, V);
      }
    } else {
      typedef T Stored __attribute__((vector_size(kLanes * sizeof(T))));
      Stored stored;
      std::memcpy(&stored, p, sizeof stored);
      return __builtin_convertvector(stored, V);
    }
  }
  NK_INLINE static void store(T* p, const V& v) {
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(p, &v, sizeof v);
    } else if constexpr (std::is_same_v<T, Bf16>) {
      static_assert(std::is_same_v<A, float>, "bfloat16 is stored from float32 lanes");
      // float_to_bf16 lane by lane: round to nearest even, NaN lanes made quiet instead.
      Wide u;
      std::memcpy(&u, &v, sizeof u);
      const Wide rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      const Wide nan = (Wide)((u & 0x7fffffffu) > 0x7f800000u);
      const Wide out = (((u >> 16) | 0x40u) & nan) | (rounded & ~nan);
      const Bits bits = __builtin_convertvector(out, Bits);
      std::memcpy(p, &bits, sizeof bits);
    } else {
      typedef T Stored __attribute__((vector_size(kLanes * sizeof(T))));
      const Stored stored = __builtin_convertvector(v, Stored);
      std::memcpy(p, &stored, sizeof stored);
    }
  }
};

// The sum of a vector's lanes, in float64: widened, then halved in a tree (a few instructions,
// cheap enough to flush after every short row).
template <class E, int N>
NK_INLINE double hsum_wide(const double* lanes) {
  if constexpr (N == 1) {
    return lanes[0];
  } else {
    typedef double H __attribute__((vector_size(N / 2 * sizeof(double))));
    H lo, hi;
    std::memcpy(&lo, lanes, sizeof lo);
    std::memcpy(&hi, lanes + N / 2, sizeof hi);
    const H sum = lo + hi;
    double half[N / 2];
    std::memcpy(half, &sum, sizeof half);
    return hsum_wide<E, N / 2>(half);
  }
}

template <class V>
NK_INLINE double hsum(V v) {
  typedef double D __attribute__((vector_size(kLanes * sizeof(double))));
  const D wide = __builtin_convertvector(v, D);
  double lanes[kLanes];
  std::memcpy(lanes, &wide, sizeof lanes);
  return hsum_wide<double, kLanes>(lanes);
}

// ------------------------------------------------------------------------------------------------
// Threads.

constexpr int64_t kGrain = 1 << 15;  // elements a thread should have before another one helps

int threads_for(int64_t elements) { return cpu::threads_for(elements, kGrain); }

// Runs body(tid, nthreads) on nthreads threads. Bodies never throw.
template <class Body>
void parallel(int nthreads, Body&& body) {
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    body(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  body(0, 1);
}

inline void split_range(int64_t n, int tid, int nthreads, int64_t* begin, int64_t* end) {
  *begin = n * tid / nthreads;
  *end = n * (tid + 1) / nthreads;
}

// Calls f(c, n0, n1) for the pieces of rows [begin, end) of the C x N row space (row = c*N + n).
template <class F>
void for_channel_segments(int64_t N, int64_t begin, int64_t end, F&& f) {
  while (begin < end) {
    const int64_t c = begin / N, n0 = begin % N;
    const int64_t n1 = std::min(N, n0 + (end - begin));
    f(c, n0, n1);
    begin += n1 - n0;
  }
}

// ------------------------------------------------------------------------------------------------
// Geometry: the layout shared by all tensors of one call.

enum class Layout { Planar, ChannelsLast, Generic };

Layout choose_layout(std::initializer_list<const NCSView*> views) {
  const NCSView& a = **views.begin();
  bool planar = true, channels_last = true;
  for (const NCSView* v : views) {
    planar = planar && v->sN == a.sN && v->sC == a.sC && (v->S <= 1 || v->sS == 1);
    channels_last = channels_last && v->sN == a.sN && v->sS == a.sS && (v->C <= 1 || v->sC == 1);
  }
  if (planar && a.S > 1) return Layout::Planar;
  if (channels_last) return Layout::ChannelsLast;
  return planar ? Layout::Planar : Layout::Generic;
}

struct Geometry {
  Layout layout;
  int64_t N, C, S;
};

// A typed tensor seen as (N, C, S).
template <class T>
struct Strided {
  T* data;
  int64_t sN, sC, sS;
  T* row(int64_t n, int64_t c) const { return data + n * sN + c * sC; }
};

// Whether the channels-last rows of t follow each other within each sample (sS == C; one row
// per sample has no stride to speak of).
template <class T>
bool rows_adjacent(const Geometry& g, const Strided<T>& t) {
  return g.S == 1 || t.sS == g.C;
}

// Calls f(offset, values) for the flat runs of rows [begin, end) of the (N*S) row space, the rows
// of sample n starting at offset n * sN and adjacent (rows_adjacent): a run per sample, or a
// single run where the samples too follow each other. Every run starts at channel 0.
template <class F>
NK_INLINE void for_flat_runs(const Geometry& g, int64_t sN, int64_t begin, int64_t end, F&& f) {
  const bool samples_adjacent = sN == g.S * g.C;
  while (begin < end) {
    const int64_t n = begin / g.S, s = begin % g.S;
    const int64_t rows = samples_adjacent ? end - begin : std::min(g.S - s, end - begin);
    f(n * sN + s * g.C, rows * g.C);
    begin += rows;
  }
}

template <class T>
Strided<T> strided(const TensorView& t, const NCSView& v) {
  return {t.ptr<T>(), v.sN, v.sC, v.sS};
}

// ------------------------------------------------------------------------------------------------
// Planar kernels: one channel, rows n0..n1 of S contiguous values.

// A is the lane (accumulation) type.
template <class T, class A>
NK_INLINE void pair_sums_rows(const T* a, const T* b, int64_t row_stride, int64_t rows, int64_t S,
                              A ka, A kb, double* out1, double* out2) {
  using L = Lanes<T, A>;
  using V = typename L::V;
  double s1 = 0, s2 = 0;
  V u1 = {}, u2 = {}, w1 = {}, w2 = {};  // two independent chains hide the add latency
  A t1 = 0, t2 = 0;
  int64_t pending = 0;  // values in the float lanes since the last flush
  auto flush = [&] {
    s1 += hsum(u1 + w1) + double(t1);
    s2 += hsum(u2 + w2) + double(t2);
    u1 = u2 = w1 = w2 = V{};
    t1 = t2 = 0;
    pending = 0;
  };
  // Rows far apart in memory (one channel of NCHW) defeat the hardware prefetchers, which must
  // relearn each row's stream: prefetch a later row while reducing this one.
  const int64_t ahead = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, S * int64_t(sizeof(T))));
  for (int64_t n = 0; n < rows; ++n, a += row_stride, b += row_stride) {
    const bool later = n + ahead < rows;
    const T* pa = later ? a + ahead * row_stride : a;
    const T* pb = later ? b + ahead * row_stride : b;
    for (int64_t i = 0; i < S;) {
      const int64_t end = std::min(S, i + kFlushEvery - pending);
      pending += end - i;
      for (; i + 2 * kLanes <= end; i += 2 * kLanes) {
        __builtin_prefetch(pa + i);
        __builtin_prefetch(pa + i + kLanes);
        __builtin_prefetch(pb + i);
        __builtin_prefetch(pb + i + kLanes);
        const V da = L::load(a + i) - ka, ea = L::load(a + i + kLanes) - ka;
        u1 += da;
        u2 += da * (L::load(b + i) - kb);
        w1 += ea;
        w2 += ea * (L::load(b + i + kLanes) - kb);
      }
      if (i + kLanes <= end) {  // short rows (small H*W) would otherwise leave up to 31 to scalars
        const V da = L::load(a + i) - ka;
        u1 += da;
        u2 += da * (L::load(b + i) - kb);
        i += kLanes;
      }
      for (; i < end; ++i) {
        const A d = A(a[i]) - ka;
        t1 += d;
        t2 += d * (A(b[i]) - kb);
      }
      if (pending >= kFlushEvery) flush();
    }
  }
  flush();
  *out1 += s1;
  *out2 += s2;
}

// out = p * u + q * (v - m) + r over rows of one channel; u may be null (p ignored). `stream`: store
// with streaming stores (float32/float64 only).
template <class T>
NK_INLINE void affine_rows(const T* u, const T* v, T* out, int64_t row_stride, int64_t rows,
                           int64_t S, acc_t<T> p, acc_t<T> q, acc_t<T> m, acc_t<T> r, bool stream) {
  using A = acc_t<T>;
  using L = Lanes<T, A>;
  stream = stream && kCanStream<T>;
  for (int64_t n = 0; n < rows; ++n) {
    const T* __restrict vv = v + n * row_stride;
    const T* __restrict uu = u ? u + n * row_stride : nullptr;
    T* __restrict o = out + n * row_stride;
    auto one = [&](int64_t i) {
      o[i] = uu ? T(p * A(uu[i]) + q * (A(vv[i]) - m) + r) : T(q * (A(vv[i]) - m) + r);
    };
    auto lanes = [&](int64_t i) {
      return uu ? p * L::load(uu + i) + q * (L::load(vv + i) - m) + r
                : q * (L::load(vv + i) - m) + r;
    };
    // Scalars up to a line-aligned output first: rows of odd H*W start anywhere in a cache line,
    // and vector stores straddling two lines made the pass up to 1.6x slower (streaming stores
    // must start there whatever the row's length; see cpu_stream.h).
    int64_t i = 0;
    if (S >= 2 * kLanes || stream) {
      for (; i < S && reinterpret_cast<uintptr_t>(o + i) % cpu::kStreamAlign; ++i) one(i);
    }
    if (stream) {
      if constexpr (kCanStream<T>) {
        for (; i + kLanes <= S; i += kLanes) stream_store<T>(o + i, lanes(i));
      }
    } else {
      for (; i + kLanes <= S; i += kLanes) L::store(o + i, lanes(i));
    }
    for (; i < S; ++i) one(i);
  }
}

// The compiled entry points (one call per channel, or per thread's run of planes): each clone
// inlines the row loops above at its own vector width, and small planes do not pay a dispatched
// call each.
template <class T, class A>
NK_HOT void planar_pair_sums(const T* a, const T* b, int64_t row_stride, int64_t rows, int64_t S,
                             A ka, A kb, double* out1, double* out2) {
  pair_sums_rows<T, A>(a, b, row_stride, rows, S, ka, kb, out1, out2);
}

template <class T>
NK_HOT void planar_affine(const T* u, const T* v, T* out, int64_t row_stride, int64_t rows,
                          int64_t S, acc_t<T> p, acc_t<T> q, acc_t<T> m, acc_t<T> r, bool stream) {
  affine_rows<T>(u, v, out, row_stride, rows, S, p, q, m, r, stream);
}

// Planes [begin, end) of the (N, C) plane space in memory order (plane i = (i / C, i % C)).
template <class T, class A>
NK_HOT void planes_pair_sums(Strided<const T> a, Strided<const T> b, int64_t C, int64_t S,
                             int64_t begin, int64_t end, const A* ka, const A* kb, double* s1,
                             double* s2) {
  for (int64_t i = begin, n = begin / C, c = begin % C; i < end; ++i) {
    pair_sums_rows<T, A>(a.row(n, c), b.row(n, c), 0, 1, S, ka[c], kb[c], s1 + c, s2 + c);
    if (++c == C) c = 0, ++n;  // no division per plane: small planes are a few dozen cycles
  }
}

template <class T>
NK_HOT void planes_affine(const Strided<const T>* u, Strided<const T> v, Strided<T> out, int64_t C,
                          int64_t S, int64_t begin, int64_t end, const acc_t<T>* p,
                          const acc_t<T>* q, const acc_t<T>* m, const acc_t<T>* r, bool stream) {
  for (int64_t i = begin, n = begin / C, c = begin % C; i < end; ++i) {
    affine_rows<T>(u ? u->row(n, c) : nullptr, v.row(n, c), out.row(n, c), 0, 1, S, p[c], q[c],
                   m[c], r[c], stream);
    if (++c == C) c = 0, ++n;
  }
}

// ------------------------------------------------------------------------------------------------
// Channels-last kernels: rows [r0, r1) of the (N*S) row space, C contiguous channels per row.

struct RowWalk {  // visits row r = n*S + s at offset n*sN + s*sS
  int64_t S, sN, sS, n, s;
  RowWalk(int64_t S_, int64_t sN_, int64_t sS_, int64_t r) : S(S_), sN(sN_), sS(sS_), n(r / S_), s(r % S_) {}
  int64_t offset() const { return n * sN + s * sS; }
  void next() {
    if (++s == S) { s = 0; ++n; }
  }
};

// The reduction walks the rows in chunks of kFlushRows and, within a chunk, one group of up to
// kGroupBlocks x kLanes channels at a time down all its rows, so the group's per-channel
// accumulators stay in registers instead of being reloaded and stored for every row, while each
// row's group is still a contiguous run of memory (the whole row when C <= 64 in float32). Each
// load also prefetches the same group of the next chunk's row, so the next chunk is on its way
// into cache while this one is reduced (the hardware prefetchers follow a strided walk poorly).

constexpr int kGroupBlocks = 4;

// Fills offsets[0, kFlushRows) with the next chunk's row offsets (the unused tail repeats the last
// one) and returns how many rows the chunk has.
inline int64_t chunk_offsets(RowWalk& walk, int64_t rows_left, int64_t* offsets) {
  const int64_t todo = std::min(kFlushRows, rows_left);
  for (int64_t k = 0; k < todo; ++k, walk.next()) offsets[k] = walk.offset();
  for (int64_t k = todo; k < kFlushRows && todo > 0; ++k) offsets[k] = offsets[todo - 1];
  return todo;
}

// Channels [c, c + NB * kLanes) of one chunk: rows at off[0, todo); next[] are the rows to prefetch.
template <int NB, class T, class A>
NK_INLINE void rows_group_sums(const T* a, const T* b, const int64_t* off, const int64_t* next,
                               int64_t todo, int64_t c, const A* ka, const A* kb, double* s1,
                               double* s2) {
  using L = Lanes<T, A>;
  using V = typename L::V;
  constexpr int64_t kBytes = NB * kLanes * int64_t(sizeof(T));
  V k1[NB], k2[NB], u1[NB], u2[NB];
  for (int j = 0; j < NB; ++j) {
    k1[j] = Lanes<A, A>::load(ka + c + j * kLanes);
    k2[j] = Lanes<A, A>::load(kb + c + j * kLanes);
    u1[j] = u2[j] = V{};
  }
  for (int64_t k = 0; k < todo; ++k) {
    const T* ar = a + off[k] + c;
    const T* br = b + off[k] + c;
    for (int64_t byte = 0; byte < kBytes; byte += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(a + next[k] + c) + byte);
      __builtin_prefetch(reinterpret_cast<const char*>(b + next[k] + c) + byte);
    }
    for (int j = 0; j < NB; ++j) {
      const V d = L::load(ar + j * kLanes) - k1[j];
      u1[j] += d;
      u2[j] += d * (L::load(br + j * kLanes) - k2[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    for (int l = 0; l < kLanes; ++l) {
      s1[c + j * kLanes + l] += double(u1[j][l]);
      s2[c + j * kLanes + l] += double(u2[j][l]);
    }
  }
}

// s1[c] += sum (a - ka[c]), s2[c] += sum (a - ka[c]) (b - kb[c]) over the rows.
template <class T, class A>
NK_HOT void rows_pair_sums(const T* a, const T* b, RowWalk walk, int64_t rows, int64_t C,
                           const A* __restrict ka, const A* __restrict kb,
                           double* __restrict s1, double* __restrict s2) {
  int64_t offsets[2][kFlushRows];
  int64_t todo = chunk_offsets(walk, rows, offsets[0]);
  for (int64_t done = 0, cur = 0; todo > 0; cur ^= 1) {
    const int64_t* off = offsets[cur];
    int64_t* next = offsets[cur ^ 1];
    done += todo;
    const int64_t todo_next = chunk_offsets(walk, rows - done, next);
    if (todo_next == 0) std::copy(off, off + kFlushRows, next);  // last chunk: prefetch itself
    int64_t c = 0;
    for (; c + kGroupBlocks * kLanes <= C; c += kGroupBlocks * kLanes) {
      rows_group_sums<kGroupBlocks, T, A>(a, b, off, next, todo, c, ka, kb, s1, s2);
    }
    for (; c + kLanes <= C; c += kLanes) {
      rows_group_sums<1, T, A>(a, b, off, next, todo, c, ka, kb, s1, s2);
    }
    for (; c < C; ++c) {
      A t1 = 0, t2 = 0;
      for (int64_t k = 0; k < todo; ++k) {
        const A d = A(a[off[k] + c]) - ka[c];
        t1 += d;
        t2 += d * (A(b[off[k] + c]) - kb[c]);
      }
      s1[c] += t1;
      s2[c] += t2;
    }
    todo = todo_next;
  }
}

// Rows that follow each other in memory (sS == C, as in a contiguous NHWC tensor) make each sample
// one flat run of S * C values, whatever C is. Where the channel pattern repeats every
// P = lcm(C, kLanes) <= kPeriodMax values, the run is reduced NB vectors (a multiple of P) at a
// time into NB register accumulators per sum: the lanes stay bound to fixed channels, no row ends
// interrupt the loop, and the lanes are folded into channels only when flushed (every kFlushEvery
// values per lane, as in the planar kernel). The strided walk above made C = 32 two passes of one
// vector per row and paid an offset load and prefetches per row: 1.4-1.65x slower than planar.
constexpr int64_t kPeriodMax = 64;

// Vectors per step of the flat reduction for C channels in lanes of A; 0 where the period is too
// long (those tensors take rows_pair_sums). Four vectors per step keep enough independent chains
// to hide the add latency; float64 lanes take half as many values per vector, so fewer vectors
// keep the accumulators and shifts within the registers.
template <class A>
int flat_blocks(int64_t C) {
  if (C <= 0) return 0;
  const int64_t P = std::lcm(C, int64_t(kLanes));
  if (P > kPeriodMax) return 0;
  if (P % (4 * kLanes) != 0 && (4 * kLanes) % P != 0) return int(P / kLanes);  // P = 48: 3
  return std::is_same_v<A, double> ? int(std::max<int64_t>(2, P / kLanes)) : 4;
}

// `steps` steps of W = NB * kLanes values from a and b into the accumulators. Their local copies
// stay in registers: the accumulators themselves live across the flushes, whose lane-by-lane
// reads would otherwise keep them in memory and every add waiting on a store.
template <int NB, class T, class A, class V>
NK_INLINE void flat_steps(const T* a, const T* b, int64_t steps, const V* k1, const V* k2, V* u1,
                          V* u2) {
  using L = Lanes<T, A>;
  V x1[NB], x2[NB];
  for (int j = 0; j < NB; ++j) x1[j] = u1[j], x2[j] = u2[j];
  for (int64_t i = 0; i < steps * NB * kLanes; i += NB * kLanes) {
    for (int j = 0; j < NB; ++j) {
      const V d = L::load(a + i + j * kLanes) - k1[j];
      x1[j] += d;
      x2[j] += d * (L::load(b + i + j * kLanes) - k2[j]);
    }
  }
  for (int j = 0; j < NB; ++j) u1[j] = x1[j], u2[j] = x2[j];
}

// s1[c] += sum (a - ka[c]), s2[c] += sum (a - ka[c]) (b - kb[c]) over rows [begin, end) of the
// (N*S) row space, sample n's rows starting at n * sN, each sample's rows back to back.
template <int NB, class T, class A>
NK_HOT void flat_pair_sums(const T* a, const T* b, const Geometry& g, int64_t sN, int64_t begin,
                           int64_t end, const A* __restrict ka,
                           const A* __restrict kb, double* __restrict s1,
                           double* __restrict s2) {
  using L = Lanes<T, A>;
  using V = typename L::V;
  constexpr int64_t W = NB * kLanes;  // values per step; lane l of vector j: channel (j*16 + l) % C
  const int64_t C = g.C;
  V k1[NB], k2[NB], u1[NB], u2[NB];
  for (int j = 0; j < NB; ++j) {
    for (int l = 0; l < kLanes; ++l) {
      k1[j][l] = ka[(j * kLanes + l) % C];
      k2[j][l] = kb[(j * kLanes + l) % C];
    }
    u1[j] = u2[j] = V{};
  }
  int64_t pending = 0;  // steps since the last flush: values per lane
  auto flush = [&] {
    for (int j = 0; j < NB; ++j) {
      for (int l = 0; l < kLanes; ++l) {
        s1[(j * kLanes + l) % C] += double(u1[j][l]);
        s2[(j * kLanes + l) % C] += double(u2[j][l]);
      }
      u1[j] = u2[j] = V{};
    }
    pending = 0;
  };
  // One run of len values (whole rows: it starts at channel 0).
  auto run = [&](const T* ar, const T* br, int64_t len) {
    int64_t i = 0;
    while (i + W <= len) {
      const int64_t steps = std::min((len - i) / W, kFlushEvery - pending);
      flat_steps<NB, T, A>(ar + i, br + i, steps, k1, k2, u1, u2);
      i += steps * W;
      pending += steps;
      if (pending == kFlushEvery) flush();
    }
    // The last partial step: its whole vectors still sit at the step's offsets j * kLanes.
    for (int j = 0; i + kLanes <= len; i += kLanes, ++j) {
      const V d = L::load(ar + i) - k1[j];
      u1[j] += d;
      u2[j] += d * (L::load(br + i) - k2[j]);
    }
    if (++pending == kFlushEvery) flush();
    for (; i < len; ++i) {
      const int64_t c = i % C;
      const A d = A(ar[i]) - ka[c];
      s1[c] += double(d);
      s2[c] += double(d * (A(br[i]) - kb[c]));
    }
  };
  for_flat_runs(g, sN, begin, end, [&](int64_t off, int64_t len) { run(a + off, b + off, len); });
  flush();
}

// out = p[c] * u + q[c] * (v - m[c]) + r[c] over the rows; u may be null. Row by row in memory
// order: the coefficient reloads hit L1, and sequential writes keep the store stream fast.
template <class T>
NK_HOT void rows_affine(const T* u, const T* v, T* out, RowWalk walk, int64_t rows, int64_t C,
                        const acc_t<T>* __restrict p, const acc_t<T>* __restrict q,
                        const acc_t<T>* __restrict m, const acc_t<T>* __restrict r) {
  using A = acc_t<T>;
  for (int64_t k = 0; k < rows; ++k, walk.next()) {
    const int64_t off = walk.offset();
    const T* __restrict vv = v + off;
    T* __restrict o = out + off;
    if (u) {
      const T* __restrict uu = u + off;
      for (int64_t c = 0; c < C; ++c) o[c] = T(p[c] * A(uu[c]) + q[c] * (A(vv[c]) - m[c]) + r[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = T(q[c] * (A(vv[c]) - m[c]) + r[c]);
    }
  }
}

// The same map over a contiguous run of whole rows, seen as one flat array: the coefficients come
// from tiles holding them repeated for several rows (L values, a multiple of C), so the inner loop
// is long and branch-free whatever C is, instead of restarting for every short row of C values.
template <class T>
NK_HOT void flat_affine(const T* u, const T* v, T* out, int64_t len, int64_t L,
                        const acc_t<T>* __restrict p, const acc_t<T>* __restrict q,
                        const acc_t<T>* __restrict m, const acc_t<T>* __restrict r, bool stream) {
  using A = acc_t<T>;
  for (int64_t i0 = 0; i0 < len; i0 += L) {
    const int64_t n = std::min(L, len - i0);
    const T* __restrict vv = v + i0;
    const T* __restrict uu = u ? u + i0 : nullptr;
    T* __restrict o = out + i0;
    int64_t j = 0;
    if constexpr (kCanStream<T>) {
      if (stream) {  // whole lines only (see cpu_stream.h)
        using V = Lanes<T>;
        for (; j < n && reinterpret_cast<uintptr_t>(o + j) % cpu::kStreamAlign; ++j) {
          o[j] = uu ? T(p[j] * A(uu[j]) + q[j] * (A(vv[j]) - m[j]) + r[j])
                    : T(q[j] * (A(vv[j]) - m[j]) + r[j]);
        }
        for (; j + kLanes <= n; j += kLanes) {
          const auto t = V::load(vv + j), qj = V::load(q + j), mj = V::load(m + j), rj = V::load(r + j);
          stream_store<T>(o + j, uu ? V::load(p + j) * V::load(uu + j) + qj * (t - mj) + rj
                                    : qj * (t - mj) + rj);
        }
      }
    }
    if (uu) {
      for (; j < n; ++j) o[j] = T(p[j] * A(uu[j]) + q[j] * (A(vv[j]) - m[j]) + r[j]);
    } else {
      for (; j < n; ++j) o[j] = T(q[j] * (A(vv[j]) - m[j]) + r[j]);
    }
  }
}

// The same map over a flat run whose channel pattern repeats within kPeriodMax values (see
// flat_pair_sums): the coefficients sit in registers, NB vectors laid out like a step of the run,
// instead of coming from the tiles with every vector (four loads beside the data's one or two).
// Stores start at a cache-line boundary, as in affine_rows; the patterns start at the channel
// where the scalar peel ends.
template <int NB, bool kHasU, class T>
NK_INLINE void flat_period_affine_run(const T* u, const T* v, T* out, int64_t len, int64_t C,
                                      const acc_t<T>* p, const acc_t<T>* q, const acc_t<T>* m,
                                      const acc_t<T>* r, bool stream) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int64_t W = NB * kLanes;
  stream = stream && kCanStream<T>;
  auto one = [&](int64_t i) {
    const int64_t c = i % C;
    const A value = q[c] * (A(v[i]) - m[c]) + r[c];
    out[i] = kHasU ? T(p[c] * A(u[i]) + value) : T(value);
  };
  int64_t i = 0;
  if (len >= 2 * W || stream) {
    for (; i < len && reinterpret_cast<uintptr_t>(out + i) % cpu::kStreamAlign; ++i) one(i);
  }
  V pv[NB], qv[NB], mv[NB], rv[NB];
  for (int j = 0; j < NB; ++j) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t c = (i + j * kLanes + l) % C;
      pv[j][l] = kHasU ? p[c] : A(0);
      qv[j][l] = q[c];
      mv[j][l] = m[c];
      rv[j][l] = r[c];
    }
  }
  auto lanes = [&](int64_t at, int j) {
    const V value = qv[j] * (L::load(v + at) - mv[j]) + rv[j];
    if constexpr (kHasU) {
      return pv[j] * L::load(u + at) + value;
    } else {
      return value;
    }
  };
  auto put = [&](int64_t at, int j) {
    if constexpr (kCanStream<T>) {
      if (stream) return stream_store<T>(out + at, lanes(at, j));
    }
    L::store(out + at, lanes(at, j));
  };
  for (; i + W <= len; i += W) {
    for (int j = 0; j < NB; ++j) put(i + j * kLanes, j);
  }
  for (int j = 0; i + kLanes <= len; i += kLanes, ++j) put(i, j);
  for (; i < len; ++i) one(i);
}

template <int NB, class T>
NK_HOT void flat_period_affine(const T* u, const T* v, T* out, int64_t len, int64_t C,
                               const acc_t<T>* __restrict p, const acc_t<T>* __restrict q,
                               const acc_t<T>* __restrict m, const acc_t<T>* __restrict r,
                               bool stream) {
  if (u) {
    flat_period_affine_run<NB, true, T>(u, v, out, len, C, p, q, m, r, stream);
  } else {
    flat_period_affine_run<NB, false, T>(u, v, out, len, C, p, q, m, r, stream);
  }
}

// ------------------------------------------------------------------------------------------------
// Generic strided kernels (any strides per tensor): scalar, for the layouts nothing else covers.

template <class T>
void generic_pair_sums(Strided<const T> a, Strided<const T> b, int64_t c, int64_t n0, int64_t n1,
                       int64_t S, double ka, double kb, double* s1, double* s2) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* ar = a.row(n, c);
    const T* br = b.row(n, c);
    for (int64_t s = 0; s < S; ++s) {
      const double d = double(ar[s * a.sS]) - ka;
      *s1 += d;
      *s2 += d * (double(br[s * b.sS]) - kb);
    }
  }
}

template <class T>
void generic_affine(const Strided<const T>* u, Strided<const T> v, Strided<T> out, int64_t c,
                    int64_t n0, int64_t n1, int64_t S, acc_t<T> p, acc_t<T> q, acc_t<T> m,
                    acc_t<T> r) {
  using A = acc_t<T>;
  for (int64_t n = n0; n < n1; ++n) {
    const T* vr = v.row(n, c);
    T* orow = out.row(n, c);
    for (int64_t s = 0; s < S; ++s) {
      A value = q * (A(vr[s * v.sS]) - m) + r;
      if (u) value += p * A(u->row(n, c)[s * u->sS]);
      orow[s * out.sS] = T(value);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The two shapes over a whole tensor, for every layout.

// Per-channel pair sums of a against b (see the top of the file), accumulated in A, returned in
// float64.
template <class T, class A>
void pair_sums(const Geometry& g, Strided<const T> a, Strided<const T> b,
               const std::vector<A>& ka, const std::vector<A>& kb,
               std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = g.C;
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  if (g.N * g.S == 0) return;
  const int nthreads = threads_for(g.N * C * g.S);
  std::vector<double> partial(static_cast<size_t>(nthreads) * 2 * C, 0.0);
  // The layout makes a's and b's row strides equal (choose_layout).
  const int flat = g.layout == Layout::ChannelsLast && rows_adjacent(g, a) ? flat_blocks<A>(C) : 0;
  parallel(nthreads, [&](int tid, int nt) {
    double* p1 = partial.data() + static_cast<size_t>(tid) * 2 * C;
    double* p2 = p1 + C;
    int64_t begin, end;
    if (g.layout == Layout::ChannelsLast) {
      split_range(g.N * g.S, tid, nt, &begin, &end);
      switch (flat) {
        case 2:
          flat_pair_sums<2, T, A>(a.data, b.data, g, a.sN, begin, end, ka.data(), kb.data(), p1,
                                  p2);
          return;
        case 3:
          flat_pair_sums<3, T, A>(a.data, b.data, g, a.sN, begin, end, ka.data(), kb.data(), p1,
                                  p2);
          return;
        case 4:
          flat_pair_sums<4, T, A>(a.data, b.data, g, a.sN, begin, end, ka.data(), kb.data(), p1,
                                  p2);
          return;
      }
      rows_pair_sums<T, A>(a.data, b.data, RowWalk(g.S, a.sN, a.sS, begin), end - begin, C,
                        ka.data(), kb.data(), p1, p2);
      return;
    }
    if (g.layout == Layout::Planar) {  // planes in memory order: one stream per thread
      split_range(g.N * C, tid, nt, &begin, &end);
      planes_pair_sums<T, A>(a, b, C, g.S, begin, end, ka.data(), kb.data(), p1, p2);
      return;
    }
    split_range(C * g.N, tid, nt, &begin, &end);
    for_channel_segments(g.N, begin, end, [&](int64_t c, int64_t n0, int64_t n1) {
      generic_pair_sums<T>(a, b, c, n0, n1, g.S, ka[c], kb[c], p1 + c, p2 + c);
    });
  });
  for (int t = 0; t < nthreads; ++t) {
    const double* p = partial.data() + static_cast<size_t>(t) * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p[c];
      s2[c] += p[C + c];
    }
  }
}

// Per-channel affine map of the whole tensor: out = p * u + q * (v - m) + r; u may be absent.
//
// Planar and channels-last tensors are swept in memory order, one contiguous stream per thread,
// which the hardware prefetchers follow best (sweeping channel by channel, or planar tensors
// backwards to reuse what a preceding reduction left in cache, measured slower). The exception:
// after_reduction, the op has just reduced v (and u) in a pair_sums pass, and flat channels-last
// rows are swept in blocks of kReuseBlockBytes from the end, each block forward, so the first
// blocks are what the reduction read last, still in this core's cache (split_range gives each
// thread the same rows in both passes): (16,32,32,32) NHWC training backward 1.2x faster. Passes
// on their own (normalize, backward_elemt) keep memory order, which the block order cost ~5%.
constexpr int64_t kReuseBlockBytes = 64 << 10;

template <class T>
void affine(const Geometry& g, const Strided<const T>* u, Strided<const T> v, Strided<T> out,
            const std::vector<acc_t<T>>& p, const std::vector<acc_t<T>>& q,
            const std::vector<acc_t<T>>& m, const std::vector<acc_t<T>>& r,
            bool after_reduction = false) {
  using A = acc_t<T>;
  if (g.N * g.S * g.C == 0) return;
  // Channels-last rows that follow each other in memory get the flat kernels: coefficients in
  // registers where the channel pattern is short enough, else from tiles.
  const bool flat = g.layout == Layout::ChannelsLast && rows_adjacent(g, v);
  const int nb = flat ? flat_blocks<A>(g.C) : 0;
  std::vector<A> tiles;
  const int64_t L = g.C * ((kTileValues + g.C - 1) / g.C);
  if (flat && nb == 0) {
    tiles.resize(4 * L);
    for (int64_t i = 0; i < L; ++i) {
      const int64_t c = i % g.C;
      tiles[i] = p[c];
      tiles[L + i] = q[c];
      tiles[2 * L + i] = m[c];
      tiles[3 * L + i] = r[c];
    }
  }
  const int64_t elements = g.N * g.C * g.S;
  const bool stream = should_stream((u ? 3 : 2) * elements * int64_t(sizeof(T)), out.data);
  const int nthreads = threads_for(elements);
  parallel(nthreads, [&](int tid, int nt) {
    int64_t begin, end;
    if (g.layout == Layout::ChannelsLast) {
      split_range(g.N * g.S, tid, nt, &begin, &end);
      if (!flat) {
        rows_affine<T>(u ? u->data : nullptr, v.data, out.data, RowWalk(g.S, v.sN, v.sS, begin),
                       end - begin, g.C, p.data(), q.data(), m.data(), r.data());
        return;
      }
      auto run = [&](int64_t off, int64_t len) {
        const T* uu = u ? u->data + off : nullptr;
        switch (nb) {
          case 2:
            return flat_period_affine<2, T>(uu, v.data + off, out.data + off, len, g.C, p.data(),
                                            q.data(), m.data(), r.data(), stream);
          case 3:
            return flat_period_affine<3, T>(uu, v.data + off, out.data + off, len, g.C, p.data(),
                                            q.data(), m.data(), r.data(), stream);
          case 4:
            return flat_period_affine<4, T>(uu, v.data + off, out.data + off, len, g.C, p.data(),
                                            q.data(), m.data(), r.data(), stream);
        }
        flat_affine<T>(uu, v.data + off, out.data + off, len, L, tiles.data(), tiles.data() + L,
                       tiles.data() + 2 * L, tiles.data() + 3 * L, stream);
      };
      if (!after_reduction) {
        for_flat_runs(g, v.sN, begin, end, run);
      } else {
        // Blocks from the last to the first, each swept forward (see above).
        const int64_t block = std::max<int64_t>(1, kReuseBlockBytes / (g.C * int64_t(sizeof(T))));
        for (int64_t hi = end; hi > begin;) {
          const int64_t lo = std::max(begin, hi - block);
          for_flat_runs(g, v.sN, lo, hi, run);
          hi = lo;
        }
      }
      if (stream) stream_fence();
      return;
    }
    if (g.layout == Layout::Planar) {
      split_range(g.N * g.C, tid, nt, &begin, &end);
      planes_affine<T>(u, v, out, g.C, g.S, begin, end, p.data(), q.data(), m.data(), r.data(),
                       stream);
      if (stream) stream_fence();
      return;
    }
    split_range(g.C * g.N, tid, nt, &begin, &end);
    for_channel_segments(g.N, begin, end, [&](int64_t c, int64_t n0, int64_t n1) {
      generic_affine<T>(u, v, out, c, n0, n1, g.S, p[c], q[c], m[c], r[c]);
    });
  });
}

// Whether a single-process op over a planar tensor should fuse its two passes per channel (a thread
// owns whole channels and applies each one right after reducing it, while its data is in cache)
// rather than make two memory-order passes. Fusing saves a pass over memory but walks each channel's
// rows far apart; that pays off only when rows are long (measured: 12.5 KiB rows of (32,64,56,56)
// gain, 784-byte rows of (64,256,14,14) lose by 20-40%).
constexpr int64_t kFuseMinRowBytes = 4096;

template <class T>
bool fuse_planar(const Geometry& g) {
  return g.S * int64_t(sizeof(T)) >= kFuseMinRowBytes;
}

// ------------------------------------------------------------------------------------------------
// Per-channel vectors (statistics, parameters): strided 1-D arrays of the param dtype.

template <class P>
std::vector<double> read_channels(const TensorView& t, int64_t C, double absent) {
  std::vector<double> out(C, absent);
  if (!t.defined()) return out;
  const P* data = t.ptr<const P>();
  for (int64_t c = 0; c < C; ++c) out[c] = double(data[c * t.strides[0]]);
  return out;
}

template <class P>
void write_channels(const TensorView& t, const std::vector<double>& values) {
  if (!t.defined()) return;
  P* data = t.ptr<P>();
  for (size_t c = 0; c < values.size(); ++c) data[c * t.strides[0]] = P(values[c]);
}

template <class A>
std::vector<A> narrow(const std::vector<double>& v) {
  return std::vector<A>(v.begin(), v.end());
}

template <class A>
std::vector<double> widen(const std::vector<A>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// The shift of the statistics' sums: the mean of each channel's first (up to) kPilot values. Sums
// of (x - shift) then lose nothing to cancellation when |mean| >> std, and one outlier among the
// first values moves the shift by only 1/kPilot of its distance. When the first values are
// unrepresentative of the rest (sorted data, a zeroed border), the shift lands far from the mean:
// the lanes then round (x - shift)^2 ~ d^2 + var (d = mean - shift), so var keeps its digits only
// while d^2 stays within kReshift times var. Past that the sums are taken again around the mean
// they gave, in float64 lanes: the data has shown itself hard (the outliers' squares round in
// float32 lanes too), and the rare second pass is worth being exact.
constexpr int64_t kPilot = 64;
template <class A>
constexpr double kReshift = std::is_same_v<A, double> ? 1e6 : 1.0;

template <class A>
bool needs_reshift(double shift, double mean, double var) {
  const double d = mean - shift;
  return d * d > kReshift<A> * var;  // false for NaN: there is nothing to recover
}

template <class T>
std::vector<double> pilot_means(const Geometry& g, Strided<const T> x) {
  std::vector<double> k(g.C, 0.0);
  const int64_t count = std::min(kPilot, g.N * g.S);
  if (count == 0) return k;
  // In memory order where the channels are adjacent (position by position, every channel at each),
  // else channel by channel; positions are counted, not divided out (a division per value was a
  // tenth of a small NHWC reduction). Either way each channel sums its values in the same order.
  auto each_position = [&](auto&& f) {
    for (int64_t i = 0, n = 0, s = 0; i < count; ++i) {
      f(x.row(n, 0) + s * x.sS);
      if (++s == g.S) s = 0, ++n;
    }
  };
  if (x.sC == 1) {
    each_position([&](const T* at) {
      for (int64_t c = 0; c < g.C; ++c) k[c] += double(at[c]);
    });
  } else {
    for (int64_t c = 0; c < g.C; ++c) {
      each_position([&](const T* at) { k[c] += double(at[c * x.sC]); });
    }
  }
  for (double& sum : k) sum /= double(count);
  return k;
}

// mean and biased var from shifted sums over M values.
void moments(const std::vector<double>& shift, const std::vector<double>& s1,
             const std::vector<double>& s2, double M, std::vector<double>& mean,
             std::vector<double>& var) {
  const size_t C = s1.size();
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  if (M <= 0) return;
  for (size_t c = 0; c < C; ++c) {
    const double d = s1[c] / M;
    mean[c] = shift[c] + d;
    const double v = s2[c] / M - d * d;
    var[c] = v < 0 ? 0.0 : v;  // rounding can go below 0; NaN stays NaN, as in torch
  }
}

// Per-channel mean and biased var of x, shifted sums re-taken around the mean where the first
// shift proved too far from it (see kReshift).
template <class T, class A>
void channel_moments(const Geometry& g, Strided<const T> xs, std::vector<double>& mean,
                     std::vector<double>& var) {
  const std::vector<A> shift = narrow<A>(pilot_means(g, xs));
  std::vector<double> s1, s2;
  pair_sums<T, A>(g, xs, xs, shift, shift, s1, s2);
  moments(widen(shift), s1, s2, double(g.N * g.S), mean, var);
  bool again = false;
  for (int64_t c = 0; c < g.C; ++c) again = again || needs_reshift<A>(shift[c], mean[c], var[c]);
  if (!again) return;
  const std::vector<double> around = mean;
  pair_sums<T, double>(g, xs, xs, around, around, s1, s2);
  moments(around, s1, s2, double(g.N * g.S), mean, var);
}

// ------------------------------------------------------------------------------------------------
// Checks shared by the ops.

struct Checked {
  NCSView x;
  int64_t C;
  DType param;
};

Checked check_input(const char* op, const TensorView& x, const char* name = "x") {
  NK_CHECK_VALUE(x.defined(), op, ": ", name, " is required");
  NK_CHECK_VALUE(x.ndim >= 2, op, ": ", name, " must have shape (N, C, ...), got ", x.ndim,
                 " dim(s)");
  Checked k{as_ncs(x, name), x.shape[1], param_dtype(x.dtype)};
  return k;
}

std::string shape_string(const TensorView& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

void check_same_device(const char* op, const TensorView& t, const char* name, const TensorView& x) {
  NK_CHECK_TYPE(t.device == x.device && t.device_id == x.device_id, op, ": ", name, " is on ",
                device_name(t.device), ":", t.device_id, " but x is on ", device_name(x.device),
                ":", x.device_id);
}

// A tensor shaped like the input x, of its dtype, on its device.
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

// A per-channel vector (C,) of the param dtype. Absent is allowed when `optional`.
void check_channels(const char* op, const TensorView& t, const char* name, const TensorView& x,
                    int64_t C, DType param, bool optional) {
  if (!t.defined()) {
    NK_CHECK_VALUE(optional, op, ": ", name, " is required");
    return;
  }
  check_same_device(op, t, name, x);
  NK_CHECK_TYPE(t.dtype == param, op, ": ", name, " must be ", dtype_name(param), " for ",
                dtype_name(x.dtype), " input, got ", dtype_name(t.dtype));
  NK_CHECK_VALUE(t.ndim == 1 && t.shape[0] == C, op, ": ", name, " must have shape (", C,
                 ",) to match the ", C, " channels of x, got ", shape_string(t));
}

// The running statistics' update of a training forward, as torch's: running = (1 - momentum) *
// running + momentum * batch, with the unbiased variance (count / (count - 1)) into running_var. An
// empty batch leaves them alone. In float64 from the batch statistics as written (rounded to P),
// in this order: normkit.torch's op path (torch.compile, dispatch modes) does the same arithmetic
// with torch ops, so that both paths give the same bits.
template <class P>
void update_running(const TensorView& running_mean, const TensorView& running_var,
                    const std::vector<double>& m, const std::vector<double>& v, int64_t count,
                    double momentum) {
  if (count == 0) return;
  const auto blend = [momentum](P& r, double batch) {
    const double kept = double(r) * (1 - momentum), added = batch * momentum;
    r = P(kept + added);
  };
  if (running_mean.defined()) {
    P* rm = running_mean.ptr<P>();
    for (size_t c = 0; c < m.size(); ++c) blend(rm[c * running_mean.strides[0]], double(P(m[c])));
  }
  if (running_var.defined()) {
    const double unbias = double(count) / double(count - 1);
    P* rv = running_var.ptr<P>();
    for (size_t c = 0; c < v.size(); ++c) {
      blend(rv[c * running_var.strides[0]], double(P(v[c])) * unbias);
    }
  }
}

template <class T>
Strided<const T> in(const TensorView& t, const NCSView& v) {
  return {t.ptr<const T>(), v.sN, v.sC, v.sS};
}

}  // namespace

// ================================================================================================
// The ops.

int64_t batch_norm_workspace_size(const TensorView& x) {
  const char* op = "batch_norm_workspace_size";
  check_input(op, x);
  if (x.device != Device::CUDA) return 0;
  int64_t size = 0;
  dispatch(op, x, [](auto) {}, [&] { size = cuda::batch_norm_workspace_size(x); });
  return size;
}

void batch_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch) {
  const char* op = "batch_norm_stats";
  const Checked k = check_input(op, x);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, var, "var", x, k.C, k.param, false);
  check_output_memory(op, {{mean, "mean", false}, {var, "var", false}}, {{x, "x", true}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x}), k.x.N, k.x.C, k.x.S};
    std::vector<double> m, v;
    channel_moments<T, A>(g, in<T>(x, k.x), m, v);
    write_channels<A>(mean, m);
    write_channels<A>(var, v);
  }, [&] { cuda::batch_norm_stats(x, mean, var, launch); });
}

void batch_norm_normalize(const TensorView& x, const TensorView& mean, const TensorView& invstd,
                          const TensorView& weight, const TensorView& bias, const TensorView& y,
                          const Launch& launch) {
  const char* op = "batch_norm_normalize";
  const Checked k = check_input(op, x);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, invstd, "invstd", x, k.C, k.param, false);
  check_channels(op, weight, "weight", x, k.C, k.param, true);
  check_channels(op, bias, "bias", x, k.C, k.param, true);
  const NCSView yv = check_like_x(op, y, "y", x);
  check_output_memory(op, {{y, "y", true}},
                      {{x, "x", true}, {mean, "mean", false}, {invstd, "invstd", false},
                       {weight, "weight", false}, {bias, "bias", false}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &yv}), k.x.N, k.C, k.x.S};
    const auto m = read_channels<A>(mean, k.C, 0), is = read_channels<A>(invstd, k.C, 0);
    const auto w = read_channels<A>(weight, k.C, 1), b = read_channels<A>(bias, k.C, 0);
    std::vector<double> q(k.C);
    for (int64_t c = 0; c < k.C; ++c) q[c] = is[c] * w[c];
    affine<T>(g, nullptr, in<T>(x, k.x), strided<T>(y, yv), std::vector<A>(k.C, 0), narrow<A>(q),
              narrow<A>(m), narrow<A>(b));
  }, [&] { cuda::batch_norm_normalize(x, mean, invstd, weight, bias, y, launch); });
}

namespace {
// StochNorm's per-channel choice of statistics (the _masked ops): channels with batch[c] == 0 use
// the given statistics instead of the batch ones. Empty for batch norm: every channel's own.
struct Choice {
  std::vector<char> batch;
  std::vector<double> mean, invstd;  // the given statistics (forward only)
  bool uses_batch(int64_t c) const { return batch.empty() || batch[c]; }
  // The statistics channel c is normalized with, given its batch ones.
  double mean_of(int64_t c, double batch_mean) const {
    return uses_batch(c) ? batch_mean : mean[c];
  }
  double invstd_of(int64_t c, double batch_invstd) const {
    return uses_batch(c) ? batch_invstd : invstd[c];
  }
};

template <class P>
Choice read_choice(const TensorView& use_batch, int64_t C) {
  Choice choice;
  for (double flag : read_channels<P>(use_batch, C, 1)) choice.batch.push_back(flag != 0);
  return choice;
}

// The training forward of batch_norm_forward_train (and of its masked variant): the batch mean m,
// biased var v and invstd `is` of every channel, y normalized with them or with the choice's.
template <class T>
void forward_train(const Geometry& g, Strided<const T> xs, Strided<T> ys,
                   const std::vector<double>& w, const std::vector<double>& b, double eps,
                   const Choice& choice, std::vector<double>& m, std::vector<double>& v,
                   std::vector<double>& is) {
  using A = acc_t<T>;
  const double M = double(g.N * g.S);
  m.assign(g.C, 0.0);
  v.assign(g.C, 0.0);
  is.assign(g.C, 0.0);
  const int nthreads = threads_for(g.N * g.C * g.S);
  if (g.layout == Layout::Planar && g.C >= nthreads && M > 0 && fuse_planar<T>(g)) {
    // Fused: a thread owns whole channels, normalizing each right after reducing it, while its
    // rows are still in cache, so x crosses the memory bus once.
    const bool stream = should_stream(2 * g.N * g.C * g.S * int64_t(sizeof(T)), ys.data);
    const auto shift = pilot_means(g, xs);
    parallel(nthreads, [&](int tid, int nt) {
      int64_t c0, c1;
      split_range(g.C, tid, nt, &c0, &c1);
      for (int64_t c = c0; c < c1; ++c) {
        const A ks = A(shift[c]);
        double s1 = 0, s2 = 0;
        planar_pair_sums<T, A>(xs.row(0, c), xs.row(0, c), xs.sN, g.N, g.S, ks, ks, &s1, &s2);
        double k = double(ks), d = s1 / M, var = s2 / M - d * d;
        if (needs_reshift<A>(k, k + d, var)) {  // as in channel_moments
          k += d;
          s1 = s2 = 0;
          planar_pair_sums<T, double>(xs.row(0, c), xs.row(0, c), xs.sN, g.N, g.S, k, k, &s1,
                                      &s2);
          d = s1 / M;
          var = s2 / M - d * d;
        }
        m[c] = k + d;
        v[c] = var < 0 ? 0.0 : var;  // as in moments()
        is[c] = 1.0 / std::sqrt(v[c] + eps);
        planar_affine<T>(nullptr, xs.row(0, c), ys.row(0, c), xs.sN, g.N, g.S, A(0),
                         A(choice.invstd_of(c, is[c]) * w[c]), A(choice.mean_of(c, m[c])),
                         A(b[c]), stream);
      }
      if (stream) stream_fence();
    });
    return;
  }
  std::vector<double> q(g.C), mu(g.C);
  channel_moments<T, A>(g, xs, m, v);
  for (int64_t c = 0; c < g.C; ++c) {
    is[c] = 1.0 / std::sqrt(v[c] + eps);
    q[c] = choice.invstd_of(c, is[c]) * w[c];
    mu[c] = choice.mean_of(c, m[c]);
  }
  affine<T>(g, nullptr, xs, ys, std::vector<A>(g.C, 0), narrow<A>(q), narrow<A>(mu),
            narrow<A>(b), true);
}
}  // namespace

void batch_norm_forward_train(const TensorView& x, const TensorView& weight, const TensorView& bias,
                              double eps, const TensorView& y, const TensorView& mean,
                              const TensorView& var, const TensorView& invstd,
                              const TensorView& running_mean, const TensorView& running_var,
                              double momentum, const Launch& launch) {
  const char* op = "batch_norm_forward_train";
  const Checked k = check_input(op, x);
  check_channels(op, weight, "weight", x, k.C, k.param, true);
  check_channels(op, bias, "bias", x, k.C, k.param, true);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, var, "var", x, k.C, k.param, true);
  check_channels(op, invstd, "invstd", x, k.C, k.param, false);
  check_channels(op, running_mean, "running_mean", x, k.C, k.param, true);
  check_channels(op, running_var, "running_var", x, k.C, k.param, true);
  NK_CHECK_VALUE(eps > 0, op, ": eps must be positive in training (as in torch), got ", eps);
  NK_CHECK_VALUE(std::isfinite(momentum), op, ": momentum must be finite, got ", momentum);
  const int64_t count = k.x.N * k.x.S;
  NK_CHECK_VALUE(!running_var.defined() || count != 1, op,
                 ": updating running_var needs more than 1 value per channel (the unbiased "
                 "variance), x has shape ", shape_string(x));
  const NCSView yv = check_like_x(op, y, "y", x);
  check_output_memory(op, {{y, "y", true}, {mean, "mean", false}, {var, "var", false},
                           {invstd, "invstd", false}, {running_mean, "running_mean", false},
                           {running_var, "running_var", false}},
                      {{x, "x", true}, {weight, "weight", false}, {bias, "bias", false}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &yv}), k.x.N, k.C, k.x.S};
    std::vector<double> m, v, is;
    forward_train<T>(g, in<T>(x, k.x), strided<T>(y, yv), read_channels<A>(weight, k.C, 1),
                     read_channels<A>(bias, k.C, 0), eps, Choice{}, m, v, is);
    write_channels<A>(mean, m);
    write_channels<A>(var, v);
    write_channels<A>(invstd, is);
    update_running<A>(running_mean, running_var, m, v, count, momentum);
  }, [&] {
    cuda::batch_norm_forward_train(x, weight, bias, eps, y, mean, var, invstd, running_mean,
                                   running_var, momentum, launch);
  });
}

void batch_norm_forward_train_masked(const TensorView& x, const TensorView& weight,
                                     const TensorView& bias, const TensorView& use_batch,
                                     const TensorView& running_mean,
                                     const TensorView& running_var, double eps,
                                     const TensorView& y, const TensorView& mean,
                                     const TensorView& var, const TensorView& used_mean,
                                     const TensorView& used_invstd, const Launch& launch) {
  const char* op = "batch_norm_forward_train_masked";
  const Checked k = check_input(op, x);
  check_channels(op, weight, "weight", x, k.C, k.param, true);
  check_channels(op, bias, "bias", x, k.C, k.param, true);
  check_channels(op, use_batch, "use_batch", x, k.C, k.param, false);
  check_channels(op, running_mean, "running_mean", x, k.C, k.param, false);
  check_channels(op, running_var, "running_var", x, k.C, k.param, false);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, var, "var", x, k.C, k.param, false);
  check_channels(op, used_mean, "used_mean", x, k.C, k.param, false);
  check_channels(op, used_invstd, "used_invstd", x, k.C, k.param, false);
  NK_CHECK_VALUE(eps > 0, op, ": eps must be positive in training (as in torch), got ", eps);
  const NCSView yv = check_like_x(op, y, "y", x);
  check_output_memory(op, {{y, "y", true}, {mean, "mean", false}, {var, "var", false},
                           {used_mean, "used_mean", false}, {used_invstd, "used_invstd", false}},
                      {{x, "x", true}, {weight, "weight", false}, {bias, "bias", false},
                       {use_batch, "use_batch", false}, {running_mean, "running_mean", false},
                       {running_var, "running_var", false}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &yv}), k.x.N, k.C, k.x.S};
    Choice choice = read_choice<A>(use_batch, k.C);
    choice.mean = read_channels<A>(running_mean, k.C, 0);
    for (double rv : read_channels<A>(running_var, k.C, 1)) {
      choice.invstd.push_back(1.0 / std::sqrt(rv + eps));
    }
    std::vector<double> m, v, is;
    forward_train<T>(g, in<T>(x, k.x), strided<T>(y, yv), read_channels<A>(weight, k.C, 1),
                     read_channels<A>(bias, k.C, 0), eps, choice, m, v, is);
    std::vector<double> um(k.C), uis(k.C);
    for (int64_t c = 0; c < k.C; ++c) {
      um[c] = choice.mean_of(c, m[c]);
      uis[c] = choice.invstd_of(c, is[c]);
    }
    write_channels<A>(mean, m);
    write_channels<A>(var, v);
    write_channels<A>(used_mean, um);
    write_channels<A>(used_invstd, uis);
  }, [&] {
    cuda::batch_norm_forward_train_masked(x, weight, bias, use_batch, running_mean, running_var,
                                          eps, y, mean, var, used_mean, used_invstd, launch);
  });
}

void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch) {
  const char* op = "batch_norm_backward_reduce";
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, sum_dy, "sum_dy", x, k.C, k.param, false);
  check_channels(op, sum_dy_xmu, "sum_dy_xmu", x, k.C, k.param, false);
  check_output_memory(op, {{sum_dy, "sum_dy", false}, {sum_dy_xmu, "sum_dy_xmu", false}},
                      {{dy, "dy", true}, {x, "x", true}, {mean, "mean", false}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &dyv}), k.x.N, k.C, k.x.S};
    std::vector<double> s1, s2;
    pair_sums<T, A>(g, in<T>(dy, dyv), in<T>(x, k.x), std::vector<A>(k.C, 0),
                 narrow<A>(read_channels<A>(mean, k.C, 0)), s1, s2);
    write_channels<A>(sum_dy, s1);
    write_channels<A>(sum_dy_xmu, s2);
  }, [&] { cuda::batch_norm_backward_reduce(dy, x, mean, sum_dy, sum_dy_xmu, launch); });
}

namespace {
// Coefficients of dx = p * dy + q * (x - mean) + r (see batch_norm_backward_elemt).
void grad_input_coefficients(const std::vector<double>& invstd, const std::vector<double>& weight,
                             const std::vector<double>* sum_dy, const std::vector<double>* sum_dy_xmu,
                             double count, std::vector<double>& p, std::vector<double>& q,
                             std::vector<double>& r) {
  const size_t C = invstd.size();
  p.assign(C, 0.0);
  q.assign(C, 0.0);
  r.assign(C, 0.0);
  for (size_t c = 0; c < C; ++c) {
    p[c] = weight[c] * invstd[c];
    if (sum_dy && count > 0) {
      q[c] = -p[c] * invstd[c] * invstd[c] * (*sum_dy_xmu)[c] / count;
      r[c] = -p[c] * (*sum_dy)[c] / count;
    }
  }
}
}  // namespace

void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                               double count, const TensorView& dx, const Launch& launch) {
  const char* op = "batch_norm_backward_elemt";
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  const NCSView dxv = check_like_x(op, dx, "dx", x);
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, invstd, "invstd", x, k.C, k.param, false);
  check_channels(op, weight, "weight", x, k.C, k.param, true);
  check_channels(op, sum_dy, "sum_dy", x, k.C, k.param, true);
  check_channels(op, sum_dy_xmu, "sum_dy_xmu", x, k.C, k.param, true);
  check_output_memory(op, {{dx, "dx", true}},
                      {{dy, "dy", true}, {x, "x", true}, {mean, "mean", false},
                       {invstd, "invstd", false}, {weight, "weight", false},
                       {sum_dy, "sum_dy", false}, {sum_dy_xmu, "sum_dy_xmu", false}});
  NK_CHECK_VALUE(std::isfinite(count), op, ": count must be finite, got ", count);
  NK_CHECK_VALUE(sum_dy.defined() == sum_dy_xmu.defined(), op,
                 ": pass both sum_dy and sum_dy_xmu (training) or neither (eval)");
  NK_CHECK_VALUE(!sum_dy.defined() || count >= double(k.x.N * k.x.S), op, ": count (", count,
                 ") is smaller than the ", k.x.N * k.x.S, " values per channel of x");
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &dyv, &dxv}), k.x.N, k.C, k.x.S};
    const auto sdy = read_channels<A>(sum_dy, k.C, 0), sdx = read_channels<A>(sum_dy_xmu, k.C, 0);
    std::vector<double> p, q, r;
    grad_input_coefficients(read_channels<A>(invstd, k.C, 0), read_channels<A>(weight, k.C, 1),
                            sum_dy.defined() ? &sdy : nullptr, &sdx, count, p, q, r);
    const auto dys = in<T>(dy, dyv);
    affine<T>(g, &dys, in<T>(x, k.x), strided<T>(dx, dxv), narrow<A>(p), narrow<A>(q),
              narrow<A>(read_channels<A>(mean, k.C, 0)), narrow<A>(r));
  }, [&] {
    cuda::batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx,
                                    launch);
  });
}

namespace {
// The training backward of batch_norm_backward_train (and of its masked variant): the sums of
// every channel, and dx (when dxs.data) through the batch statistics where the choice uses them,
// through constant statistics elsewhere.
template <class T>
void backward_train(const Geometry& g, Strided<const T> dys, Strided<const T> xs, Strided<T> dxs,
                    const std::vector<double>& m, const std::vector<double>& is,
                    const std::vector<double>& w, const Choice& choice, std::vector<double>& s1,
                    std::vector<double>& s2) {
  using A = acc_t<T>;
  const double count = double(g.N * g.S);
  s1.assign(g.C, 0.0);
  s2.assign(g.C, 0.0);
  const int nthreads = threads_for(g.N * g.C * g.S);
  if (g.layout == Layout::Planar && g.C >= nthreads && count > 0 && fuse_planar<T>(g)) {
    // Fused as in the forward: each channel's dx is written while its dy and x are in cache.
    const bool stream = should_stream(3 * g.N * g.C * g.S * int64_t(sizeof(T)), dxs.data);
    parallel(nthreads, [&](int tid, int nt) {
      int64_t c0, c1;
      split_range(g.C, tid, nt, &c0, &c1);
      for (int64_t c = c0; c < c1; ++c) {
        planar_pair_sums<T, A>(dys.row(0, c), xs.row(0, c), xs.sN, g.N, g.S, A(0), A(m[c]),
                               &s1[c], &s2[c]);
        if (!dxs.data) continue;
        const double p = w[c] * is[c];
        const double through = choice.uses_batch(c) ? 1.0 : 0.0;
        planar_affine<T>(dys.row(0, c), xs.row(0, c), dxs.row(0, c), xs.sN, g.N, g.S, A(p),
                         A(-through * p * is[c] * is[c] * s2[c] / count), A(m[c]),
                         A(-through * p * s1[c] / count), stream);
      }
      if (stream) stream_fence();
    });
    return;
  }
  pair_sums<T, A>(g, dys, xs, std::vector<A>(g.C, 0), narrow<A>(m), s1, s2);
  if (!dxs.data) return;
  std::vector<double> p, q, r;
  grad_input_coefficients(is, w, &s1, &s2, count, p, q, r);
  for (int64_t c = 0; c < g.C; ++c) {
    if (!choice.uses_batch(c)) q[c] = r[c] = 0.0;  // constant statistics: dx = p * dy
  }
  affine<T>(g, &dys, xs, dxs, narrow<A>(p), narrow<A>(q), narrow<A>(m), narrow<A>(r), true);
}
}  // namespace

namespace {
// batch_norm_backward_train and its masked variant: one set of checks, one fused pass; the masked
// one's channels without batch statistics get no gradient through them.
void backward_train_checked(const char* op, bool masked, const TensorView& dy, const TensorView& x,
                            const TensorView& mean, const TensorView& invstd,
                            const TensorView& weight, const TensorView& use_batch,
                            const TensorView& dx, const TensorView& sum_dy,
                            const TensorView& sum_dy_xmu, const TensorView& dweight,
                            const Launch& launch) {
  const Checked k = check_input(op, x);
  const NCSView dyv = check_like_x(op, dy, "dy", x);
  const NCSView dxv = dx.defined() ? check_like_x(op, dx, "dx", x) : dyv;
  check_channels(op, mean, "mean", x, k.C, k.param, false);
  check_channels(op, invstd, "invstd", x, k.C, k.param, false);
  check_channels(op, weight, "weight", x, k.C, k.param, true);
  if (masked) check_channels(op, use_batch, "use_batch", x, k.C, k.param, false);
  check_channels(op, sum_dy, "sum_dy", x, k.C, k.param, false);
  check_channels(op, sum_dy_xmu, "sum_dy_xmu", x, k.C, k.param, dweight.defined());
  check_channels(op, dweight, "dweight", x, k.C, k.param, true);
  check_output_memory(op, {{dx, "dx", true}, {sum_dy, "sum_dy", false},
                           {sum_dy_xmu, "sum_dy_xmu", false}, {dweight, "dweight", false}},
                      {{dy, "dy", true}, {x, "x", true}, {mean, "mean", false},
                       {invstd, "invstd", false}, {weight, "weight", false},
                       {use_batch, "use_batch", false}});
  dispatch<true>(op, x, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    using A = acc_t<T>;
    const Geometry g{choose_layout({&k.x, &dyv, &dxv}), k.x.N, k.C, k.x.S};
    const auto dxs = dx.defined() ? strided<T>(dx, dxv) : Strided<T>{nullptr, 0, 0, 0};
    std::vector<double> s1, s2;
    const auto is = read_channels<A>(invstd, k.C, 0);
    backward_train<T>(g, in<T>(dy, dyv), in<T>(x, k.x), dxs, read_channels<A>(mean, k.C, 0), is,
                      read_channels<A>(weight, k.C, 1),
                      masked ? read_choice<A>(use_batch, k.C) : Choice{}, s1, s2);
    write_channels<A>(sum_dy, s1);
    write_channels<A>(sum_dy_xmu, s2);
    if (dweight.defined()) {
      for (int64_t c = 0; c < k.C; ++c) s2[c] *= is[c];
      write_channels<A>(dweight, s2);
    }
  }, [&] {
    if (masked) {
      cuda::batch_norm_backward_train_masked(dy, x, mean, invstd, weight, use_batch, dx, sum_dy,
                                             sum_dy_xmu, launch);
    } else {
      cuda::batch_norm_backward_train(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu,
                                      dweight, launch);
    }
  });
}
}  // namespace

void batch_norm_backward_train(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& dx, const TensorView& sum_dy,
                               const TensorView& sum_dy_xmu, const TensorView& dweight,
                               const Launch& launch) {
  backward_train_checked("batch_norm_backward_train", false, dy, x, mean, invstd, weight,
                         TensorView{}, dx, sum_dy, sum_dy_xmu, dweight, launch);
}

void batch_norm_backward_train_masked(const TensorView& dy, const TensorView& x,
                                      const TensorView& mean, const TensorView& invstd,
                                      const TensorView& weight, const TensorView& use_batch,
                                      const TensorView& dx, const TensorView& sum_dy,
                                      const TensorView& sum_dy_xmu, const Launch& launch) {
  backward_train_checked("batch_norm_backward_train_masked", true, dy, x, mean, invstd,
                         weight, use_batch, dx, sum_dy, sum_dy_xmu, TensorView{}, launch);
}

}  // namespace normkit
