// Per-sample statistics on CUDA: the kernels behind the ops of include/normkit/groupnorm.h for
// CUDA tensors. The ops in src/groupnorm.cpp check every argument and then call these.
//
// The tensor is seen as (N, C, S) with G groups of Cg = C / G channels. Three kernel shapes:
//   moments      per (n, g): count, mean and M2 of the group's Cg * S values;
//   pair sums    per (n, c): sum dy and sum dy * (x - mean[n, g(c)]) over S;
//   maps         out = p[n,c] * u + q[n,c] * (v - m[n,g(c)]) + r[n,c], the affine of the forward
//                (no u) or the backward's dx (u = dy, v = x), coefficients from the small arrays.
// A reduction has two stages, as in cuda/batchnorm.cu: each block writes the partial result of
// its work item into the caller's workspace, then one warp per (n, g) combines the partials in a
// fixed order and writes the results. Deterministic, no allocation, no atomics, no host wait.
// The fused backward's per-(n, g) coefficients (b, c of dx) are computed by that warp too and
// kept in the workspace's first 2 * N * G values for the map that follows.
//
// Numerics as in cuda/batchnorm.cu: chunks of values two-pass in registers, Chan merges into
// float32 moments (float64 for float64 data) flushed into float64 every kFlush iterations, blocks
// and partials merged in float64. Exact when |mean| >> std.
//
// Two layouts of the work:
//   rows           a reduction's segment ((n, g) or (n, c)) as rows of S values (one row per
//                  channel), or as one row of Cg * S values when the segment is contiguous;
//                  a map's segment is a whole sample (C rows). Unit-stride rows load vectors of
//                  up to 16 bytes; any other strides take the same path one value at a time (the
//                  generic path). A block owns a work item, a contiguous range of a segment.
//   channels-last  per sample, S rows of C contiguous channels (NHWC, NDHWC, (N, C)): 2-D blocks
//                  whose x threads span up to 32 vectors of channels and y threads rows; moments
//                  are kept per (n, c) there and the final warp merges a group's channels.
// All indexing is 64-bit and every kernel loops over its work with a block stride, so no size is
// limited by a grid dimension.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common.cuh"
#include "normkit/groupnorm.h"

namespace normkit::cuda {
namespace {

constexpr int kThreads = 256;      // threads per block, every kernel
constexpr int kUnroll = 4;         // independent loads per thread in flight
constexpr int kFlush = 16;         // iterations of float32 accumulation before a float64 merge
constexpr int kMaxChannelVectors = 32;  // x threads of a channels-last block
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxGrid = int64_t(1) << 30;
constexpr int kPartialDoubles = 3;  // workspace values per partial: count, mean, M2 (sums use 2)
constexpr int kCoefDoubles = 2;     // fused backward: b and c of dx per (n, g)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t blocks) { return unsigned(std::clamp<int64_t>(blocks, 1, kMaxGrid)); }

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

cudaStream_t stream_of(const Launch& launch) { return static_cast<cudaStream_t>(launch.stream); }

// ------------------------------------------------------------------------------------------------
// Geometry: how one op's tensors are walked, chosen on the host.

enum class Layout { Rows, ChannelsLast };

// What a plan is for: the segments a reduction produces, or a map over whole samples.
enum class Work { GroupMoments, ChannelSums, Map };

// The maps over whole samples (kernels map_rows and map_channels_last).
enum class Map {
  Affine,         // y = (x - mean[n,g]) * scale[n,c] + shift[n,c]
  Forward,        // y = (x - mean[n,g]) * rstd[n,g] * weight[c] + bias[c]
  Backward,       // dx = a[n,c] * dy + b[n,g] * (x - mean[n,g]) + c[n,g]
  FusedBackward,  // dx = rstd[n,g] * weight[c] * dy + b * (x - mean) + c, b and c in coef
};

struct RowsOperand {  // strides in elements
  int64_t n, seg;     // between samples, between the segments of a sample
  int64_t row, e;     // between the rows of a segment, between the values of a row
};

struct RowsGeometry {
  int64_t N, K;              // segments: K per sample
  int64_t rows, Sv;          // a segment is `rows` rows of Sv vectors
  int64_t P;                 // work items per segment
  int64_t step_r, step_s;    // kThreads vectors = step_r rows + step_s vectors
};

struct ChannelsLastGeometry {
  int64_t N, S, C;
  int64_t slabs;             // blocks across the channels
  int64_t P;                 // row groups: blocks (and partials) per (sample, slab)
  int Wv, R;                 // block shape: Wv channel vectors by R rows
};

struct Operand {
  void* data;
  RowsOperand rows;          // Layout::Rows
  int64_t sN, sS;            // Layout::ChannelsLast (channels are contiguous)
};

struct Plan {
  Layout layout = Layout::Rows;
  int V = 1;                 // values per vector access
  RowsGeometry r{};
  ChannelsLastGeometry cl{};
  std::vector<Operand> operands;  // in the order the tensors were given

  int64_t blocks() const {
    return layout == Layout::Rows ? r.N * r.K * r.P : cl.N * cl.slabs * cl.P;
  }
};

// Vector widths tried, widest first: 16 and 8 bytes, then one value. A channels-last thread keeps
// running sums for each value of its vector, so there vectors stop at 4 values (registers).
std::vector<int> vector_widths(Layout layout, int64_t item_size) {
  std::vector<int> widths;
  for (int64_t bytes : {16, 8}) {
    const int V = int(bytes / item_size);
    if (V > 1 && (layout == Layout::Rows || V <= 4)) widths.push_back(V);
  }
  widths.push_back(1);
  return widths;
}

// The kernel a plan launches: `work` (`map` names the map of Work::Map and is ignored otherwise),
// in `layout` with vectors of V values.
struct Kernel {
  Work work;
  Map map;
  Layout layout;
  int V;
};

// Blocks of `kernel` for `dtype` that one multiprocessor of `device` holds at once (defined
// after the kernels).
int resident_blocks_per_sm(const Kernel& kernel, DType dtype, int device);

// The blocks a plan aims for: one wave of the kernel it launches, so that every work item of the
// pass is resident at once. Each pass has a plan of its own (a fused op's passes share no work
// items), so each aims at its own kernel's occupancy: 1 to 5 blocks of 256 threads per SM on
// sm_90 (nvcc -Xptxas -v: 46-158 registers per thread; the widest bfloat16 backward maps fit 1).
// A fixed 4 blocks per SM, rounded up per segment, overshot where registers fit fewer: the maps
// of (32,256,28,28) float32 (88-122 registers, 2 blocks per SM) ran 544 blocks in 2.06 waves of
// 264, where 256 blocks now run in one.
int target_blocks(const Kernel& kernel, DType dtype, int device) {
  return resident_blocks_per_sm(kernel, dtype, device) * multiprocessor_count(device);
}

// Items per segment: as many as fit segments * items <= target (rounded down, so the grid stays
// within one wave), at least 1, and none shorter than two unrolled steps of each thread.
int64_t items_per_segment(int64_t segments, int64_t target, int64_t most) {
  return std::clamp<int64_t>(target / std::max<int64_t>(segments, 1), 1, most);
}

int64_t rows_items(int64_t segments, int64_t Lv, int target) {
  const int64_t most = std::max<int64_t>(1, ceil_div(Lv, int64_t(kThreads) * kUnroll * 2));
  return items_per_segment(segments, target, most);
}

ChannelsLastGeometry channels_last_geometry(int64_t N, int64_t S, int64_t C, int V, int target) {
  ChannelsLastGeometry g{};
  g.N = N;
  g.S = S;
  g.C = C;
  const int64_t Cv = std::max<int64_t>(C / V, 1);
  g.slabs = ceil_div(Cv, kMaxChannelVectors);
  g.Wv = int(ceil_div(Cv, g.slabs));
  g.R = kThreads / g.Wv;
  const int64_t most = std::max<int64_t>(1, ceil_div(S, int64_t(g.R) * kUnroll * 2));
  g.P = items_per_segment(N * g.slabs, target, most);
  return g;
}

// The plan for the tensors of one op (all of x's shape, checked by the caller) doing `work`;
// `map` names the map of a Work::Map plan (a reduction's plan ignores it).
Plan make_plan(std::initializer_list<const TensorView*> tensors, int64_t groups, Work work,
               DType dtype, int device, Map map = Map::Affine) {
  const int64_t item_size = dtype_size(dtype);
  std::vector<NCSView> views;
  for (const TensorView* t : tensors) views.push_back(as_ncs(*t, "tensor"));
  const int64_t N = views[0].N, C = views[0].C, S = views[0].S;
  const int64_t K = work == Work::GroupMoments ? groups : work == Work::ChannelSums ? C : 1;
  const int64_t Cs = K > 0 ? C / K : 0;

  bool planar = S > 1, channels_last = C > 1;
  for (const NCSView& v : views) {
    planar = planar && v.sS == 1;
    channels_last = channels_last && v.sC == 1;
  }
  // A reduction's segment of Cs channels is one row of Cs * S values when every tensor stores
  // its channels one after another (NCHW, or no spatial dims): more vectors for odd S.
  bool flat = work != Work::Map;
  for (const NCSView& v : views) flat = flat && (S <= 1 || C <= 1 || v.sC == S * v.sS);

  Plan plan;
  plan.layout = planar || !channels_last ? Layout::Rows : Layout::ChannelsLast;
  for (size_t i = 0; i < views.size(); ++i) {
    const NCSView& v = views[i];
    Operand op{tensors.begin()[i]->data, {}, v.sN, v.sS};
    if (flat) op.rows = {v.sN, Cs * v.sC, 0, S > 1 ? v.sS : v.sC};
    else op.rows = {v.sN, Cs * v.sC, v.sC, v.sS};
    plan.operands.push_back(op);
  }
  const int64_t row_length = flat ? Cs * S : S;
  for (int V : vector_widths(plan.layout, item_size)) {
    bool ok = true;
    for (const Operand& op : plan.operands) {
      ok = ok && aligned(op.data, V * item_size) && op.rows.n % V == 0;
      if (plan.layout == Layout::Rows) {
        ok = ok && op.rows.e == 1 && op.rows.seg % V == 0 && op.rows.row % V == 0;
      } else {
        ok = ok && op.sS % V == 0;
      }
    }
    ok = ok && (plan.layout == Layout::Rows ? row_length % V == 0 : C % V == 0);
    if (ok || V == 1) {
      plan.V = V;
      break;
    }
  }
  const int target = target_blocks({work, map, plan.layout, plan.V}, dtype, device);
  if (plan.layout == Layout::Rows) {
    RowsGeometry& g = plan.r;
    g.N = N;
    g.K = K;
    g.rows = flat ? 1 : Cs;
    g.Sv = row_length / plan.V;
    g.P = rows_items(N * K, g.rows * g.Sv, target);
    g.step_r = g.Sv > 0 ? kThreads / g.Sv : 0;
    g.step_s = g.Sv > 0 ? kThreads % g.Sv : 0;
  } else {
    plan.cl = channels_last_geometry(N, S, C, plan.V, target);
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Device building blocks.

// Walks vector j of a segment's rows, kThreads vectors per step, without dividing.
struct RowWalk {
  int64_t r, sv;
  __device__ RowWalk(int64_t j, int64_t Sv) : r(j / Sv), sv(j % Sv) {}
  __device__ void advance(const RowsGeometry& g) {
    sv += g.step_s;
    r += g.step_r;
    if (sv >= g.Sv) {
      sv -= g.Sv;
      ++r;
    }
  }
  template <int V>
  __device__ int64_t offset(const RowsOperand& s) const {
    return r * s.row + sv * V * s.e;
  }
};

// An (N, G) or (N, C) array of statistics or coefficients (param dtype, any strides), or a (C,)
// one (s1 unused); null when absent. P is const for inputs.
template <class P>
struct Matrix {
  P* data;
  int64_t s0, s1;

  __device__ double at(int64_t i, int64_t j, double absent) const {
    return data ? double(data[i * s0 + j * s1]) : absent;
  }
  __device__ double at(int64_t i, double absent) const {
    return data ? double(data[i * s0]) : absent;
  }
  __device__ void set(int64_t i, int64_t j, double value) const { data[i * s0 + j * s1] = value; }
};

template <class P>
Matrix<P> matrix(const TensorView& t) {
  if (!t.defined()) return {nullptr, 0, 0};
  return {static_cast<P*>(t.data), t.strides[0], t.ndim > 1 ? t.strides[1] : 0};
}

// One segment's partial moments into the workspace.
__device__ __forceinline__ void write_moments(double* out, const Moments<double>& m) {
  out[0] = m.n;
  out[1] = m.mean;
  out[2] = m.m2;
}

// ------------------------------------------------------------------------------------------------
// Reductions, first stage. Partials go to the workspace (after the fused backward's coefficients)
// in the order the final warps read them: moments of the rows layout at ((n * G + g) * P + p),
// those of the channels-last layout and every pair sum at ((n * C + c) * P + p).

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_rows(const T* __restrict__ x, RowsOperand xs, RowsGeometry g,
                 double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Moments<double> scratch[kThreads / 32];
  const int64_t Lv = g.rows * g.Sv, items = g.N * g.K * g.P;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t seg = w / g.P, n = seg / g.K, k = seg - n * g.K;
    int64_t j, end;
    item_range(w - seg * g.P, Lv, g.P, &j, &end);
    j += threadIdx.x;
    const T* base = x + n * xs.n + k * xs.seg;
    Moments<A> fast = Moments<A>::zero();
    Moments<double> total = Moments<double>::zero();
    if (j < end) {
      RowWalk at(j, g.Sv);
      for (int iteration = 1; j < end; ++iteration) {
        Vec<T, V> buf[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          ok[u] = j < end;
          if (ok[u]) buf[u] = load<T, V>(base + at.offset<V>(xs));
          j += kThreads;
          at.advance(g);
        }
        // The chunk's moments, two-pass in registers (ok[0] holds: the chunk is not empty).
        A sum = 0;
        int count = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
          count += V;
#pragma unroll
          for (int i = 0; i < V; ++i) sum += to_acc(buf[u].v[i]);
        }
        const A mean = sum / A(count);
        A m2 = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A d = to_acc(buf[u].v[i]) - mean;
            m2 += d * d;
          }
        }
        fast.merge(A(count), mean, m2);
        if (iteration % kFlush == 0) {
          total.merge(fast.n, fast.mean, fast.m2);
          fast = Moments<A>::zero();
        }
      }
    }
    total.merge(fast.n, fast.mean, fast.m2);
    total = block_reduce<kThreads>(total, scratch);
    if (threadIdx.x == 0) write_moments(ws + w * kPartialDoubles, total);
  }
}

// Block b of the channels-last layout: its sample, slab of channels and row group.
struct ChannelsLastBlock {
  int64_t n, slab, p;
  __device__ ChannelsLastBlock(int64_t b, const ChannelsLastGeometry& g) {
    slab = b % g.slabs;
    const int64_t rest = b / g.slabs;
    p = rest % g.P;
    n = rest / g.P;
  }
};

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_channels_last(const T* __restrict__ x, int64_t sN, int64_t sS,
                          ChannelsLastGeometry g, double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Moments<double> scratch[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.P;
  for (int64_t b = blockIdx.x; b < g.N * g.slabs * g.P; b += gridDim.x) {
    const ChannelsLastBlock at(b, g);
    const int64_t c0 = (at.slab * g.Wv + tx) * V;
    const T* xn = x + at.n * sN;
    // Every value of a thread's V channels shares one count, so the moments keep one too.
    A fast_n = 0, fast_mean[V], fast_m2[V];
    double total_n = 0, total_mean[V], total_m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) fast_mean[i] = fast_m2[i] = total_mean[i] = total_m2[i] = 0;
    if (c0 < g.C) {
      int iteration = 0;
      for (int64_t r = at.p * g.R + ty; r < g.S; r += kUnroll * row_step) {
        Vec<T, V> buf[kUnroll];
        int count = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * row_step;
          if (row < g.S) {
            buf[u] = load<T, V>(xn + row * sS + c0);
            ++count;
          }
        }
        // Rows r, r + row_step, ... are valid up to `count`: the chunk of each channel.
        const A f = A(count) / (fast_n + A(count));
#pragma unroll
        for (int i = 0; i < V; ++i) {
          A sum = 0;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (u < count) sum += to_acc(buf[u].v[i]);
          }
          const A mean = sum / A(count);
          A m2 = 0;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (u < count) {
              const A d = to_acc(buf[u].v[i]) - mean;
              m2 += d * d;
            }
          }
          const A delta = mean - fast_mean[i];
          fast_mean[i] += delta * f;
          fast_m2[i] += m2 + delta * delta * fast_n * f;
        }
        fast_n += A(count);
        if (++iteration % kFlush == 0) {
          const double ft = double(fast_n) / (total_n + double(fast_n));
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const double delta = double(fast_mean[i]) - total_mean[i];
            total_mean[i] += delta * ft;
            total_m2[i] += double(fast_m2[i]) + delta * delta * total_n * ft;
            fast_mean[i] = fast_m2[i] = 0;
          }
          total_n += double(fast_n);
          fast_n = 0;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      Moments<double> m{total_n, total_mean[i], total_m2[i]};
      m.merge(double(fast_n), double(fast_mean[i]), double(fast_m2[i]));
      scratch[ty * g.Wv + tx] = m;
      column_reduce(scratch);
      if (ty == 0 && c0 < g.C) {
        const int64_t partial = (at.n * g.C + c0 + i) * g.P + at.p;
        write_moments(ws + partial * kPartialDoubles, scratch[tx]);
      }
      __syncthreads();  // scratch is rewritten for the next channel of the vector
    }
  }
}

// Pair sums sum dy and sum dy * (x - mean[n, g(c)]) per (n, c): segments of one channel each.
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_rows(const T* __restrict__ dy, RowsOperand dys, const T* __restrict__ x, RowsOperand xs,
              Matrix<const acc_t<T>> mean, int64_t Cg, RowsGeometry g, double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Sums scratch[kThreads / 32];
  const int64_t Lv = g.rows * g.Sv, items = g.N * g.K * g.P;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t seg = w / g.P, n = seg / g.K, c = seg - n * g.K;
    int64_t j, end;
    item_range(w - seg * g.P, Lv, g.P, &j, &end);
    j += threadIdx.x;
    const T* dy_c = dy + n * dys.n + c * dys.seg;
    const T* x_c = x + n * xs.n + c * xs.seg;
    const A m = A(mean.at(n, c / Cg, 0));
    A fast1 = 0, fast2 = 0;
    Sums total = Sums::zero();
    if (j < end) {
      RowWalk at(j, g.Sv);
      for (int iteration = 1; j < end; ++iteration) {
        Vec<T, V> a[kUnroll], b[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          ok[u] = j < end;
          if (ok[u]) {
            a[u] = load<T, V>(dy_c + at.offset<V>(dys));
            b[u] = load<T, V>(x_c + at.offset<V>(xs));
          }
          j += kThreads;
          at.advance(g);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A d = to_acc(a[u].v[i]);
            fast1 += d;
            fast2 += d * (to_acc(b[u].v[i]) - m);
          }
        }
        if (iteration % kFlush == 0) {
          total.s1 += fast1;
          total.s2 += fast2;
          fast1 = fast2 = 0;
        }
      }
    }
    total.s1 += fast1;
    total.s2 += fast2;
    total = block_reduce<kThreads>(total, scratch);
    if (threadIdx.x == 0) {
      ws[w * kPartialDoubles] = total.s1;
      ws[w * kPartialDoubles + 1] = total.s2;
    }
  }
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_channels_last(const T* __restrict__ dy, int64_t dy_sN, int64_t dy_sS,
                       const T* __restrict__ x, int64_t x_sN, int64_t x_sS,
                       Matrix<const acc_t<T>> mean, int64_t Cg, ChannelsLastGeometry g,
                       double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Sums scratch[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.P;
  for (int64_t b = blockIdx.x; b < g.N * g.slabs * g.P; b += gridDim.x) {
    const ChannelsLastBlock at(b, g);
    const int64_t c0 = (at.slab * g.Wv + tx) * V;
    const T* dyn = dy + at.n * dy_sN;
    const T* xn = x + at.n * x_sN;
    A m[V], fast1[V], fast2[V];
    double total1[V], total2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      m[i] = c0 < g.C ? A(mean.at(at.n, (c0 + i) / Cg, 0)) : A(0);
      fast1[i] = fast2[i] = 0;
      total1[i] = total2[i] = 0;
    }
    if (c0 < g.C) {
      int iteration = 0;
      for (int64_t r = at.p * g.R + ty; r < g.S; r += kUnroll * row_step) {
        Vec<T, V> a[kUnroll], bx[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * row_step;
          ok[u] = row < g.S;
          if (ok[u]) {
            a[u] = load<T, V>(dyn + row * dy_sS + c0);
            bx[u] = load<T, V>(xn + row * x_sS + c0);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (!ok[u]) continue;
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A d = to_acc(a[u].v[i]);
            fast1[i] += d;
            fast2[i] += d * (to_acc(bx[u].v[i]) - m[i]);
          }
        }
        if (++iteration % kFlush == 0) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            total1[i] += fast1[i];
            total2[i] += fast2[i];
            fast1[i] = fast2[i] = 0;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      scratch[ty * g.Wv + tx] = {total1[i] + fast1[i], total2[i] + fast2[i]};
      column_reduce(scratch);
      if (ty == 0 && c0 < g.C) {
        double* out = ws + ((at.n * g.C + c0 + i) * g.P + at.p) * kPartialDoubles;
        out[0] = scratch[tx].s1;
        out[1] = scratch[tx].s2;
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Reductions, second stage: one warp per (n, g) combines its partials in a fixed order.

// Output o = n * G + g merges the M partials at o * M.. (M = P in the rows layout, Cg * P in the
// channels-last one, whose partials are per channel).
template <class P>
__global__ void __launch_bounds__(kThreads)
    finalize_moments(const double* __restrict__ ws, int64_t outputs, int64_t M, int64_t G,
                     Matrix<P> mean, Matrix<P> var, Matrix<P> rstd, double eps) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  // Whole warps step together, so every lane takes part in the shuffles.
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < outputs;
       o += warps) {
    Moments<double> m = Moments<double>::zero();
    for (int64_t i = lane; i < M; i += 32) {
      const double* p = ws + (o * M + i) * kPartialDoubles;
      m.merge(p[0], p[1], p[2]);
    }
    m = warp_reduce(m);
    if (lane != 0) continue;
    const int64_t n = o / G, g = o - n * G;
    // An empty group gives mean 0 and var 0, as on the CPU.
    const double v = m.n > 0 ? fmax(m.m2 / m.n, 0.0) : 0.0;
    mean.set(n, g, m.n > 0 ? m.mean : 0.0);
    var.set(n, g, v);
    if (rstd.data) rstd.set(n, g, 1.0 / sqrt(v + eps));
  }
}

// Each lane takes channels of the group and merges their P partials in order into sum_dy and
// sum_dy_xmu. kFused: the warp also sums w[c] * those over the group into the coefficients of
// dx = w * rstd * dy + b * (x - mean) + c, with M = Cg * S values per group:
//   b = -rstd^3 * sum_c w[c] sum_dy_xmu[n,c] / M,   c = -rstd * sum_c w[c] sum_dy[n,c] / M.
template <class P, bool kFused>
__global__ void __launch_bounds__(kThreads)
    finalize_sums(const double* __restrict__ partials, int64_t N, int64_t G, int64_t Cg,
                  int64_t per_channel, Matrix<P> sum_dy, Matrix<P> sum_dy_xmu,
                  Matrix<const P> weight, Matrix<const P> rstd, double count,
                  double* __restrict__ coef) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5, C = G * Cg;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < N * G;
       o += warps) {
    const int64_t n = o / G, g = o - n * G;
    Sums weighted = Sums::zero();
    for (int64_t i = lane; i < Cg; i += 32) {
      const int64_t c = g * Cg + i;
      const double* p = partials + (n * C + c) * per_channel * kPartialDoubles;
      Sums s = Sums::zero();
      for (int64_t q = 0; q < per_channel; ++q) {
        s.merge({p[q * kPartialDoubles], p[q * kPartialDoubles + 1]});
      }
      sum_dy.set(n, c, s.s1);
      sum_dy_xmu.set(n, c, s.s2);
      if constexpr (kFused) {
        const double w = weight.at(c, 1.0);
        weighted.merge({w * s.s1, w * s.s2});
      }
    }
    if constexpr (kFused) {
      weighted = warp_reduce(weighted);
      if (lane != 0) continue;
      const double r = rstd.at(n, g, 0.0);
      coef[o * kCoefDoubles] = count > 0 ? -r * r * r * weighted.s2 / count : 0.0;
      coef[o * kCoefDoubles + 1] = count > 0 ? -r * weighted.s1 / count : 0.0;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Maps (enum Map above): out = p * u + q * (v - m) + r with coefficients per (n, c), computed
// in float64 from the small arrays and used in the arithmetic type.

template <class P>
struct MapArgs {
  int64_t G, Cg;
  Matrix<const P> mean;          // (N, G)
  Matrix<const P> m1, m2, m3;    // Affine: scale, shift; Forward: rstd; Backward: a, b, c;
                                 // FusedBackward: rstd
  Matrix<const P> weight, bias;  // (C,)
  const double* coef;            // FusedBackward: (b, c) per (n, g)
};

template <class A>
struct Coefficients {
  A p, q, m, r;
};

template <Map kMap, class P>
__device__ Coefficients<P> coefficients(const MapArgs<P>& a, int64_t n, int64_t c) {
  const int64_t g = c / a.Cg;
  const P m = P(a.mean.at(n, g, 0.0));
  if constexpr (kMap == Map::Affine) {
    return {P(0), P(a.m1.at(n, c, 0.0)), m, P(a.m2.at(n, c, 0.0))};
  } else if constexpr (kMap == Map::Forward) {
    return {P(0), P(a.m1.at(n, g, 0.0) * a.weight.at(c, 1.0)), m, P(a.bias.at(c, 0.0))};
  } else if constexpr (kMap == Map::Backward) {
    return {P(a.m1.at(n, c, 0.0)), P(a.m2.at(n, g, 0.0)), m, P(a.m3.at(n, g, 0.0))};
  } else {
    const double* k = a.coef + (n * a.G + g) * kCoefDoubles;
    return {P(a.m1.at(n, g, 0.0) * a.weight.at(c, 1.0)), P(k[0]), m, P(k[1])};
  }
}

__host__ __device__ constexpr bool has_grad(Map kMap) {
  return kMap == Map::Backward || kMap == Map::FusedBackward;
}

template <Map kMap, class T>
__device__ __forceinline__ T map_value(const Coefficients<acc_t<T>>& k, T u, T v) {
  if constexpr (has_grad(kMap)) {
    return from_acc<T>(k.p * to_acc(u) + k.q * (to_acc(v) - k.m) + k.r);
  } else {
    return from_acc<T>(k.q * (to_acc(v) - k.m) + k.r);
  }
}

// Segments are whole samples (rows = channels). Coefficients are recomputed when a vector's
// channel differs from the previous one of the same slot.
// out may be u or v (in place, out=x / out=dy): no pointer is __restrict__, so the compiler
// keeps every load before the store of the same element.
template <class T, int V, Map kMap>
__global__ void __launch_bounds__(kThreads)
    map_rows(const T* u, RowsOperand us, const T* v, RowsOperand vs,
             T* out, RowsOperand os, RowsGeometry g, MapArgs<acc_t<T>> args) {
  constexpr bool kGrad = has_grad(kMap);
  const int64_t Lv = g.rows * g.Sv, items = g.N * g.P;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t n = w / g.P;
    int64_t j, end;
    item_range(w - n * g.P, Lv, g.P, &j, &end);
    j += threadIdx.x;
    if (j >= end) continue;
    const T* u_n = kGrad ? u + n * us.n : nullptr;
    const T* v_n = v + n * vs.n;
    T* out_n = out + n * os.n;
    Coefficients<acc_t<T>> coef[kUnroll];
    int64_t channel[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) channel[q] = -1;
    RowWalk at(j, g.Sv);
    while (j < end) {
      Vec<T, V> a[kUnroll], b[kUnroll];
      int64_t where[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        ok[q] = j < end;
        where[q] = at.offset<V>(os);
        if (ok[q]) {
          if (at.r != channel[q]) {
            channel[q] = at.r;
            coef[q] = coefficients<kMap>(args, n, at.r);
          }
          if constexpr (kGrad) a[q] = load<T, V>(u_n + at.offset<V>(us));
          b[q] = load<T, V>(v_n + at.offset<V>(vs));
        }
        j += kThreads;
        at.advance(g);
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (!ok[q]) continue;
        Vec<T, V> result;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          result.v[i] = map_value<kMap, T>(coef[q], kGrad ? a[q].v[i] : b[q].v[i], b[q].v[i]);
        }
        store<T, V>(out_n + where[q], result);
      }
    }
  }
}

template <class T, int V, Map kMap>
__global__ void __launch_bounds__(kThreads)
    map_channels_last(const T* u, int64_t u_sN, int64_t u_sS,
                      const T* v, int64_t v_sN, int64_t v_sS, T* out,
                      int64_t out_sN, int64_t out_sS, ChannelsLastGeometry g,
                      MapArgs<acc_t<T>> args) {
  constexpr bool kGrad = has_grad(kMap);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.P;
  for (int64_t b = blockIdx.x; b < g.N * g.slabs * g.P; b += gridDim.x) {
    const ChannelsLastBlock at(b, g);
    const int64_t c0 = (at.slab * g.Wv + tx) * V;
    if (c0 >= g.C) continue;
    const T* u_n = kGrad ? u + at.n * u_sN + c0 : nullptr;
    const T* v_n = v + at.n * v_sN + c0;
    T* out_n = out + at.n * out_sN + c0;
    Coefficients<acc_t<T>> coef[V];
#pragma unroll
    for (int i = 0; i < V; ++i) coef[i] = coefficients<kMap>(args, at.n, c0 + i);
    for (int64_t r = at.p * g.R + ty; r < g.S; r += kUnroll * row_step) {
      Vec<T, V> a[kUnroll], bv[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t row = r + q * row_step;
        if (row < g.S) {
          if constexpr (kGrad) a[q] = load<T, V>(u_n + row * u_sS);
          bv[q] = load<T, V>(v_n + row * v_sS);
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t row = r + q * row_step;
        if (row >= g.S) continue;
        Vec<T, V> result;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          result.v[i] = map_value<kMap, T>(coef[i], kGrad ? a[q].v[i] : bv[q].v[i], bv[q].v[i]);
        }
        store<T, V>(out_n + row * out_sS, result);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: occupancy and launches.

// Calls fn(std::integral_constant<int, V>) for the plan's vector width (one of vector_widths).
template <class T, Layout kLayout, class Fn>
void with_width(int V, Fn&& fn) {
  constexpr int wide = int(16 / sizeof(T)), narrow = int(8 / sizeof(T));
  if constexpr (kLayout == Layout::Rows || wide <= 4) {
    if (V == wide) return fn(std::integral_constant<int, wide>{});
  }
  if constexpr (narrow > 1) {
    if (V == narrow) return fn(std::integral_constant<int, narrow>{});
  }
  fn(std::integral_constant<int, 1>{});
}

// Calls rows(width) or channels_last(width) for the plan's layout and vector width.
template <class T, class RowsFn, class ChannelsLastFn>
void with_plan(const Plan& plan, RowsFn&& rows, ChannelsLastFn&& channels_last) {
  if (plan.layout == Layout::Rows) with_width<T, Layout::Rows>(plan.V, rows);
  else with_width<T, Layout::ChannelsLast>(plan.V, channels_last);
}

// The map kernel for T, V and the layout (kRows: map_rows, else map_channels_last).
template <class T, int V, bool kRows>
const void* map_kernel(Map map) {
  const auto pick = [](auto kind) {
    constexpr Map kMap = decltype(kind)::value;
    if constexpr (kRows) return reinterpret_cast<const void*>(&map_rows<T, V, kMap>);
    else return reinterpret_cast<const void*>(&map_channels_last<T, V, kMap>);
  };
  switch (map) {
    case Map::Affine: return pick(std::integral_constant<Map, Map::Affine>{});
    case Map::Forward: return pick(std::integral_constant<Map, Map::Forward>{});
    case Map::Backward: return pick(std::integral_constant<Map, Map::Backward>{});
    case Map::FusedBackward: break;
  }
  return pick(std::integral_constant<Map, Map::FusedBackward>{});
}

// The kernel that `kernel` names, for T (its V is one of vector_widths(kernel.layout)).
template <class T>
const void* kernel_of(const Kernel& kernel) {
  const void* found = nullptr;
  const auto rows = [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (kernel.work == Work::GroupMoments) {
      found = reinterpret_cast<const void*>(&moments_rows<T, V>);
    } else if (kernel.work == Work::ChannelSums) {
      found = reinterpret_cast<const void*>(&sums_rows<T, V>);
    } else {
      found = map_kernel<T, V, true>(kernel.map);
    }
  };
  const auto channels_last = [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (kernel.work == Work::GroupMoments) {
      found = reinterpret_cast<const void*>(&moments_channels_last<T, V>);
    } else if (kernel.work == Work::ChannelSums) {
      found = reinterpret_cast<const void*>(&sums_channels_last<T, V>);
    } else {
      found = map_kernel<T, V, false>(kernel.map);
    }
  };
  if (kernel.layout == Layout::Rows) with_width<T, Layout::Rows>(kernel.V, rows);
  else with_width<T, Layout::ChannelsLast>(kernel.V, channels_last);
  return found;
}

// Cache slots: the two reductions and the four maps, by layout, by vector width (16 bytes, 8
// bytes, one value).
constexpr int kPasses = 6, kLayouts = 2, kWidths = 3;

int resident_blocks_per_sm(const Kernel& kernel, DType dtype, int device) {
  static ResidentBlocks<kPasses * kLayouts * kWidths> cache;
  const int pass = kernel.work == Work::Map ? 2 + static_cast<int>(kernel.map)
                                            : static_cast<int>(kernel.work);
  const int width = kernel.V == 1 ? 2 : kernel.V * dtype_size(dtype) == 16 ? 0 : 1;
  const int kind = (pass * kLayouts + static_cast<int>(kernel.layout)) * kWidths + width;
  return cache.get(device, dtype, kind, kThreads, [&](auto tag, int) {
    return std::vector<const void*>{kernel_of<decltype(tag)>(kernel)};
  });
}

dim3 channels_last_block(const ChannelsLastGeometry& g) { return dim3(g.Wv, g.R); }

unsigned warp_grid(int64_t warps) { return grid_for(ceil_div(warps, kWarpsPerBlock)); }

// The caller's workspace: the fused backward's coefficients, then the partials.
struct Workspace {
  double* coef;
  double* partials;
};

int64_t coef_doubles(const NCSView& v, int64_t groups) { return v.N * groups * kCoefDoubles; }

// Most partials any reducing plan of x's shape can take (every vector width, both layouts, each
// aiming at its own kernel's wave).
int64_t most_partials(const NCSView& v, int64_t groups, DType dtype, int device) {
  const int64_t Cg = v.C / groups, item_size = dtype_size(dtype);
  const auto target = [&](Work work, Layout layout, int V) {
    return target_blocks({work, Map::Affine, layout, V}, dtype, device);
  };
  int64_t most = 0;
  for (int V : vector_widths(Layout::Rows, item_size)) {
    const int moments = target(Work::GroupMoments, Layout::Rows, V);
    const int sums = target(Work::ChannelSums, Layout::Rows, V);
    most = std::max(most, v.N * groups * rows_items(v.N * groups, ceil_div(Cg * v.S, V), moments));
    most = std::max(most, v.N * v.C * rows_items(v.N * v.C, ceil_div(v.S, V), sums));
  }
  for (int V : vector_widths(Layout::ChannelsLast, item_size)) {
    for (Work work : {Work::GroupMoments, Work::ChannelSums}) {
      const int t = target(work, Layout::ChannelsLast, V);
      most = std::max(most, v.N * v.C * channels_last_geometry(v.N, v.S, v.C, V, t).P);
    }
  }
  return most;
}

Workspace workspace(const char* op, const Launch& launch, const TensorView& x, int64_t groups) {
  const NCSView v = as_ncs(x, "x");
  const int64_t coef = coef_doubles(v, groups);
  const int64_t need = coef + most_partials(v, groups, x.dtype, x.device_id) * kPartialDoubles;
  double* ws =
      checked_workspace(op, launch.workspace, x, need, "group_norm_workspace_size(x, groups)");
  return {ws, ws + coef};
}

template <class T>
void launch_moments(const Plan& plan, int64_t groups, const Workspace& ws, const TensorView& mean,
                    const TensorView& var, const TensorView& rstd, double eps,
                    cudaStream_t stream) {
  const Operand& x = plan.operands[0];
  const T* data = static_cast<const T*>(x.data);
  const unsigned grid = grid_for(plan.blocks());
  int64_t per_output = 0;
  with_plan<T>(
      plan,
      [&](auto width) {
        moments_rows<T, decltype(width)::value>
            <<<grid, kThreads, 0, stream>>>(data, x.rows, plan.r, ws.partials);
        check_launch("group_norm moments_rows");
        per_output = plan.r.P;
      },
      [&](auto width) {
        moments_channels_last<T, decltype(width)::value>
            <<<grid, channels_last_block(plan.cl), 0, stream>>>(data, x.sN, x.sS, plan.cl,
                                                                ws.partials);
        check_launch("group_norm moments_channels_last");
        per_output = plan.cl.C / groups * plan.cl.P;
      });
  using P = acc_t<T>;
  const int64_t outputs = (plan.layout == Layout::Rows ? plan.r.N : plan.cl.N) * groups;
  finalize_moments<P><<<warp_grid(outputs), kThreads, 0, stream>>>(
      ws.partials, outputs, per_output, groups, matrix<P>(mean), matrix<P>(var), matrix<P>(rstd),
      eps);
  check_launch("group_norm finalize_moments");
}

// Pair sums into sum_dy, sum_dy_xmu; with weight/rstd given (kFused) also dx's coefficients.
template <class T, bool kFused>
void launch_sums(const Plan& plan, int64_t groups, const Workspace& ws, const TensorView& mean,
                 const TensorView& sum_dy, const TensorView& sum_dy_xmu, const TensorView& weight,
                 const TensorView& rstd, cudaStream_t stream) {
  using P = acc_t<T>;
  const Operand &dy = plan.operands[0], &x = plan.operands[1];
  const auto m = matrix<const P>(mean);
  const T* dy_data = static_cast<const T*>(dy.data);
  const T* x_data = static_cast<const T*>(x.data);
  const unsigned grid = grid_for(plan.blocks());
  const int64_t N = plan.layout == Layout::Rows ? plan.r.N : plan.cl.N;
  const int64_t C = plan.layout == Layout::Rows ? plan.r.K : plan.cl.C;
  const int64_t S = plan.layout == Layout::Rows ? plan.r.rows * plan.r.Sv * plan.V : plan.cl.S;
  const int64_t Cg = C / groups;
  with_plan<T>(
      plan,
      [&](auto width) {
        sums_rows<T, decltype(width)::value><<<grid, kThreads, 0, stream>>>(
            dy_data, dy.rows, x_data, x.rows, m, Cg, plan.r, ws.partials);
        check_launch("group_norm sums_rows");
      },
      [&](auto width) {
        sums_channels_last<T, decltype(width)::value>
            <<<grid, channels_last_block(plan.cl), 0, stream>>>(
                dy_data, dy.sN, dy.sS, x_data, x.sN, x.sS, m, Cg, plan.cl, ws.partials);
        check_launch("group_norm sums_channels_last");
      });
  const int64_t per_channel = plan.layout == Layout::Rows ? plan.r.P : plan.cl.P;
  finalize_sums<P, kFused><<<warp_grid(N * groups), kThreads, 0, stream>>>(
      ws.partials, N, groups, Cg, per_channel, matrix<P>(sum_dy), matrix<P>(sum_dy_xmu),
      matrix<const P>(weight), matrix<const P>(rstd), double(Cg * S), ws.coef);
  check_launch("group_norm finalize_sums");
}

// operands: (v, out) for the forward maps, (u, v, out) for the backward ones.
template <class T, Map kMap>
void launch_map(const Plan& plan, const MapArgs<acc_t<T>>& args, cudaStream_t stream) {
  constexpr bool kGrad = has_grad(kMap);
  const Operand* u = kGrad ? &plan.operands[0] : nullptr;
  const Operand& v = plan.operands[kGrad ? 1 : 0];
  const Operand& out = plan.operands[kGrad ? 2 : 1];
  const T* u_data = u ? static_cast<const T*>(u->data) : nullptr;
  const RowsOperand u_rows = u ? u->rows : RowsOperand{0, 0, 0, 0};
  const int64_t u_sN = u ? u->sN : 0, u_sS = u ? u->sS : 0;
  const T* v_data = static_cast<const T*>(v.data);
  T* out_data = static_cast<T*>(out.data);
  const unsigned grid = grid_for(plan.blocks());
  with_plan<T>(
      plan,
      [&](auto width) {
        map_rows<T, decltype(width)::value, kMap><<<grid, kThreads, 0, stream>>>(
            u_data, u_rows, v_data, v.rows, out_data, out.rows, plan.r, args);
        check_launch("group_norm map_rows");
      },
      [&](auto width) {
        map_channels_last<T, decltype(width)::value, kMap>
            <<<grid, channels_last_block(plan.cl), 0, stream>>>(
                u_data, u_sN, u_sS, v_data, v.sN, v.sS, out_data, out.sN, out.sS, plan.cl, args);
        check_launch("group_norm map_channels_last");
      });
}

template <class P>
MapArgs<P> map_args(const TensorView& x, const TensorView& mean) {
  MapArgs<P> args{};
  args.G = mean.shape[1];
  args.Cg = args.G > 0 ? x.shape[1] / args.G : 1;
  args.mean = matrix<const P>(mean);
  return args;
}

// Nothing to do for an empty tensor (and nothing to reduce over without samples or channels).
bool empty_ncs(const TensorView& x) { return x.shape[0] == 0 || x.shape[1] == 0; }

}  // namespace

// ================================================================================================
// The ops (arguments checked by src/groupnorm.cpp).

int64_t group_norm_workspace_size(const TensorView& x, int64_t groups) {
  const NCSView v = as_ncs(x, "x");
  if (v.N == 0 || v.C == 0 || groups <= 0) return 0;
  return coef_doubles(v, groups) + most_partials(v, groups, x.dtype, x.device_id) * kPartialDoubles;
}

void group_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch) {
  if (empty_ncs(x)) return;
  DeviceGuard guard(x.device_id);
  const int64_t groups = mean.shape[1];
  const Plan plan = make_plan({&x}, groups, Work::GroupMoments, x.dtype, x.device_id);
  const Workspace ws = workspace("group_norm_stats", launch, x, groups);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_moments<T>(plan, groups, ws, mean, var, TensorView{}, 0.0, stream_of(launch));
  });
}

void group_norm_affine(const TensorView& x, const TensorView& mean, const TensorView& scale,
                       const TensorView& shift, const TensorView& y, const Launch& launch) {
  if (x.numel() == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan =
      make_plan({&x, &y}, mean.shape[1], Work::Map, x.dtype, x.device_id, Map::Affine);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using P = acc_t<T>;
    MapArgs<P> args = map_args<P>(x, mean);
    args.m1 = matrix<const P>(scale);
    args.m2 = matrix<const P>(shift);
    launch_map<T, Map::Affine>(plan, args, stream_of(launch));
  });
}

void group_norm_forward(const TensorView& x, const TensorView& weight, const TensorView& bias,
                        double eps, const TensorView& y, const TensorView& mean,
                        const TensorView& var, const TensorView& rstd, const Launch& launch) {
  if (empty_ncs(x)) return;
  DeviceGuard guard(x.device_id);
  const int64_t groups = mean.shape[1];
  const Plan stats = make_plan({&x}, groups, Work::GroupMoments, x.dtype, x.device_id);
  const Plan map = make_plan({&x, &y}, groups, Work::Map, x.dtype, x.device_id, Map::Forward);
  const Workspace ws = workspace("group_norm_forward", launch, x, groups);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using P = acc_t<T>;
    launch_moments<T>(stats, groups, ws, mean, var, rstd, eps, stream_of(launch));
    if (x.numel() == 0) return;
    MapArgs<P> args = map_args<P>(x, mean);
    args.m1 = matrix<const P>(rstd);
    args.weight = matrix<const P>(weight);
    args.bias = matrix<const P>(bias);
    launch_map<T, Map::Forward>(map, args, stream_of(launch));
  });
}

void group_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch) {
  if (empty_ncs(x)) return;
  DeviceGuard guard(x.device_id);
  const int64_t groups = mean.shape[1];
  const Plan plan =
      make_plan({&dy, &x}, groups, Work::ChannelSums, x.dtype, x.device_id);
  const Workspace ws = workspace("group_norm_backward_reduce", launch, x, groups);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_sums<T, false>(plan, groups, ws, mean, sum_dy, sum_dy_xmu, TensorView{}, TensorView{},
                          stream_of(launch));
  });
}

void group_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& a, const TensorView& b, const TensorView& c,
                               const TensorView& dx, const Launch& launch) {
  if (x.numel() == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan =
      make_plan({&dy, &x, &dx}, mean.shape[1], Work::Map, x.dtype, x.device_id,
                Map::Backward);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using P = acc_t<T>;
    MapArgs<P> args = map_args<P>(x, mean);
    args.m1 = matrix<const P>(a);
    args.m2 = matrix<const P>(b);
    args.m3 = matrix<const P>(c);
    launch_map<T, Map::Backward>(plan, args, stream_of(launch));
  });
}

void group_norm_backward(const TensorView& dy, const TensorView& x, const TensorView& mean,
                         const TensorView& rstd, const TensorView& weight, const TensorView& dx,
                         const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                         const Launch& launch) {
  if (empty_ncs(x)) return;
  DeviceGuard guard(x.device_id);
  const int64_t groups = mean.shape[1];
  const Plan sums = make_plan({&dy, &x}, groups, Work::ChannelSums, x.dtype, x.device_id);
  const Workspace ws = workspace("group_norm_backward", launch, x, groups);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using P = acc_t<T>;
    if (!dx.defined()) {
      launch_sums<T, false>(sums, groups, ws, mean, sum_dy, sum_dy_xmu, TensorView{},
                            TensorView{}, stream_of(launch));
      return;
    }
    launch_sums<T, true>(sums, groups, ws, mean, sum_dy, sum_dy_xmu, weight, rstd,
                         stream_of(launch));
    if (x.numel() == 0) return;
    const Plan map = make_plan({&dy, &x, &dx}, groups, Work::Map, x.dtype, x.device_id,
                               Map::FusedBackward);
    MapArgs<P> args = map_args<P>(x, mean);
    args.m1 = matrix<const P>(rstd);
    args.weight = matrix<const P>(weight);
    args.coef = ws.coef;
    launch_map<T, Map::FusedBackward>(map, args, stream_of(launch));
  });
}

}  // namespace normkit::cuda
