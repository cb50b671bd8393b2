// Batch normalization on CUDA: the kernels behind the ops of include/normkit/batchnorm.h for CUDA
// tensors. The ops in src/batchnorm.cpp check every argument and then call these.
//
// Every op is built from two kernel shapes over the tensor seen as (N, C, S), as on the CPU:
//   reductions   per channel: the moments (count, mean, M2) of x, or the backward's pair sums
//                (sum dy, sum dy * (x - mean));
//   affine       out = p[c] * u + q[c] * (v - m[c]) + r[c]  (normalize: no u; backward: u = dy).
// A reduction has two stages: each block writes the partial result of its part of a channel into
// the caller's workspace, then one warp per channel combines the partials in a fixed order and
// writes the statistics. So results are deterministic, nothing is allocated, no atomics are used
// and the host never waits: a training step can be captured in a CUDA graph.
//
// Numerics: moments merge with Chan's formula (no E[x^2] - E[x]^2, exact when |mean| >> std).
// Each thread takes a chunk of values per iteration, computes the chunk's mean and M2 two-pass in
// registers, merges it into float32 moments (float64 for float64 data), and every few iterations
// merges those into float64 ones; blocks and the final combination merge in float64. Pair sums
// accumulate in float32 and flush into float64 the same way.
//
// Two layouts of the work:
//   rows           each channel's N*S values as N rows of S values (stride sS). Contiguous
//                  channels-first data (NCHW, NCL; sS == 1) loads vectors of up to 16 bytes; any
//                  other strides take the same path one value at a time (the generic path). A block
//                  owns "work items", contiguous ranges of one channel's values.
//   channels-last  rows of C contiguous channels (NHWC, NDHWC, (N, C)) with one row stride:
//                  2-D blocks whose x threads span up to 32 vectors of channels and y threads rows.
// All indexing is 64-bit, and grids are 1-D with block-stride loops, so no size is limited by a
// grid dimension.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common.cuh"
#include "normkit/batchnorm.h"

namespace normkit::cuda {
namespace {

constexpr int kThreads = 256;      // threads per block, every kernel
constexpr int kUnroll = 4;         // independent loads per thread in flight
constexpr int kFlush = 16;         // iterations of float32 accumulation before a float64 merge
constexpr int kMaxChannelVectors = 32;  // x threads of a channels-last block
constexpr int64_t kMaxGrid = int64_t(1) << 30;
constexpr int kStatsDoubles = 3;   // workspace values per partial: count, mean, M2 (sums use 2)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// Geometry: how one op's tensors are walked, chosen on the host.

enum class Layout { Rows, ChannelsLast };

struct Strides {  // of one tensor in the rows layout, in elements
  int64_t n, c, s;
};

struct RowsGeometry {
  int64_t N, C;
  int64_t Sv;                // vectors per row (S / V)
  int64_t G;                 // work items per channel
  int64_t step_n, step_s;    // kThreads vectors = step_n rows + step_s vectors
};

struct ChannelsLastGeometry {
  int64_t rows, C;           // rows = N * S
  int64_t slabs;             // blocks across the channels
  int64_t G;                 // row groups: blocks (and partials) per channel
  int Wv, R;                 // block shape: Wv channel vectors by R rows
};

struct Operand {
  void* data;
  Strides rows;              // Layout::Rows
  int64_t row_stride;        // Layout::ChannelsLast (channels are contiguous)
};

struct Plan {
  Layout layout = Layout::Rows;
  int V = 1;                 // values per vector access
  RowsGeometry r{};
  ChannelsLastGeometry cl{};
  std::vector<Operand> operands;  // in the order the tensors were given

  int64_t partials_per_channel() const { return layout == Layout::Rows ? r.G : cl.G; }
  int64_t elements() const {
    return layout == Layout::Rows ? r.N * r.Sv * V * r.C : cl.rows * cl.C;
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

// Blocks of the family's kernels for `dtype` that one multiprocessor of `device` holds at once:
// the least over the kernels that share a plan (defined after the kernels).
int resident_blocks_per_sm(DType dtype, int device);

// The work items a plan aims for: one wave of the tightest kernel, so that every item of every
// pass is resident at once. (Aiming past a wave leaves a partial last wave: on (256,64,112,112)
// float32 a fixed 4 blocks per SM ran the 92-register backward in 2.18 waves.)
int target_blocks(DType dtype, int device) {
  return resident_blocks_per_sm(dtype, device) * multiprocessor_count(device);
}

// Items per channel: as many as fit C * G <= target (rounded down, so the grid stays within one
// wave), at least 1, and none shorter than two unrolled block passes.
int64_t items_per_channel(int64_t C, int64_t target, int64_t most) {
  return std::clamp<int64_t>(target / std::max<int64_t>(C, 1), 1, most);
}

int64_t rows_items_per_channel(int64_t C, int64_t L, int V, int target) {
  const int64_t Lv = L / V;
  const int64_t most = std::max<int64_t>(1, ceil_div(Lv, int64_t(kThreads) * kUnroll * 2));
  return items_per_channel(C, target, most);
}

ChannelsLastGeometry channels_last_geometry(int64_t rows, int64_t C, int V, int target) {
  ChannelsLastGeometry g{};
  g.rows = rows;
  g.C = C;
  const int64_t Cv = std::max<int64_t>(C / V, 1);
  g.slabs = ceil_div(Cv, kMaxChannelVectors);
  g.Wv = int(ceil_div(Cv, g.slabs));
  g.R = kThreads / g.Wv;
  const int64_t most = std::max<int64_t>(1, ceil_div(rows, int64_t(g.R) * kUnroll * 2));
  g.G = items_per_channel(g.slabs, target, most);
  return g;
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

// The plan for the tensors of one op (all of x's shape, checked by the caller).
Plan make_plan(std::initializer_list<const TensorView*> tensors, DType dtype, int device) {
  const int64_t item_size = dtype_size(dtype);
  std::vector<NCSView> views;
  for (const TensorView* t : tensors) views.push_back(as_ncs(*t, "tensor"));
  const int64_t N = views[0].N, C = views[0].C, S = views[0].S;

  // Flatten (n, s) into one row of N*S values when every tensor allows it: (N, C) inputs and
  // channels-last ones then have one uniform row stride.
  bool flat = true;
  for (const NCSView& v : views) flat = flat && (N <= 1 || S <= 1 || v.sN == S * v.sS);
  std::vector<Strides> strides;
  for (const NCSView& v : views) {
    if (flat) strides.push_back({0, v.sC, S > 1 ? v.sS : v.sN});
    else strides.push_back({v.sN, v.sC, v.sS});
  }
  const int64_t rowsN = flat ? 1 : N, rowS = flat ? N * S : S;

  bool planar = rowS > 1, channels_last = flat;
  for (const Strides& s : strides) {
    planar = planar && s.s == 1;
    channels_last = channels_last && (C <= 1 || s.c == 1);
  }
  Plan plan;
  plan.layout = planar || !channels_last ? Layout::Rows : Layout::ChannelsLast;
  const int target = target_blocks(dtype, device);
  for (int V : vector_widths(plan.layout, item_size)) {
    bool ok = true;
    int i = 0;
    for (const TensorView* t : tensors) {
      const Strides& s = strides[i++];
      ok = ok && aligned(t->data, V * item_size);
      if (plan.layout == Layout::Rows) ok = ok && planar && s.n % V == 0 && s.c % V == 0;
      else ok = ok && s.s % V == 0;
    }
    ok = ok && (plan.layout == Layout::Rows ? rowS % V == 0 : C % V == 0);
    if (ok || V == 1) {
      plan.V = V;
      break;
    }
  }
  int i = 0;
  for (const TensorView* t : tensors) {
    const Strides& s = strides[i++];
    plan.operands.push_back({t->data, s, s.s});
  }
  if (plan.layout == Layout::Rows) {
    RowsGeometry& g = plan.r;
    g.N = rowsN;
    g.C = C;
    g.Sv = rowS / plan.V;
    g.G = rows_items_per_channel(C, rowsN * rowS, plan.V, target);
    g.step_n = g.Sv > 0 ? kThreads / g.Sv : 0;
    g.step_s = g.Sv > 0 ? kThreads % g.Sv : 0;
  } else {
    plan.cl = channels_last_geometry(N * S, C, plan.V, target);
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Device building blocks.

// Walks vector j of a channel's rows, kThreads vectors per step, without dividing.
struct RowWalk {
  int64_t n, sv;
  __device__ RowWalk(int64_t j, int64_t Sv) : n(j / Sv), sv(j % Sv) {}
  __device__ void advance(const RowsGeometry& g) {
    sv += g.step_s;
    n += g.step_n;
    if (sv >= g.Sv) {
      sv -= g.Sv;
      ++n;
    }
  }
  template <int V>
  __device__ int64_t offset(const Strides& s) const {
    return n * s.n + sv * V * s.s;
  }
};

// A per-channel vector of parameters or statistics (strided, param dtype); null when absent.
template <class P>
struct ChannelVector {
  P* data;
  int64_t stride;

  __device__ double at(int64_t c, double absent) const {
    return data ? double(data[c * stride]) : absent;
  }
  __device__ void set(int64_t c, double value) const { data[c * stride] = P(value); }
};

template <class P>
ChannelVector<P> channel_vector(const TensorView& t) {
  if (!t.defined()) return {nullptr, 0};
  return {static_cast<P*>(t.data), t.shape[0] > 1 ? t.strides[0] : 0};
}

// ------------------------------------------------------------------------------------------------
// Reductions, first stage: one partial per (channel, work item or row group) into the workspace,
// at index (c * G + g) * kStatsDoubles.

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_rows(const T* __restrict__ x, Strides xs, RowsGeometry g, double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Moments<double> scratch[kThreads / 32];
  const int64_t Lv = g.N * g.Sv, items = g.C * g.G;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t c = w / g.G;
    int64_t j, end;
    item_range(w - c * g.G, Lv, g.G, &j, &end);
    j += threadIdx.x;
    const T* base = x + c * xs.c;
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
    if (threadIdx.x == 0) {
      double* out = ws + w * kStatsDoubles;
      out[0] = total.n;
      out[1] = total.mean;
      out[2] = total.m2;
    }
  }
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    moments_channels_last(const T* __restrict__ x, int64_t row_stride, ChannelsLastGeometry g,
                          double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Moments<double> scratch[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.G;
  for (int64_t b = blockIdx.x; b < g.slabs * g.G; b += gridDim.x) {
    const int64_t slab = b % g.slabs, group = b / g.slabs;
    const int64_t c0 = (slab * g.Wv + tx) * V;
    // Every value of a thread's V channels shares one count, so the moments keep one too.
    A fast_n = 0, fast_mean[V], fast_m2[V];
    double total_n = 0, total_mean[V], total_m2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) fast_mean[i] = fast_m2[i] = total_mean[i] = total_m2[i] = 0;
    if (c0 < g.C) {
      int iteration = 0;
      for (int64_t r = group * g.R + ty; r < g.rows; r += kUnroll * row_step) {
        Vec<T, V> buf[kUnroll];
        int count = 0;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * row_step;
          if (row < g.rows) {
            buf[u] = load<T, V>(x + row * row_stride + c0);
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
        const Moments<double> total = scratch[tx];
        double* out = ws + ((c0 + i) * g.G + group) * kStatsDoubles;
        out[0] = total.n;
        out[1] = total.mean;
        out[2] = total.m2;
      }
      __syncthreads();  // scratch is rewritten for the next channel of the vector
    }
  }
}

// Pair sums sum dy and sum dy * (x - mean[c]).
template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_rows(const T* __restrict__ dy, Strides dys, const T* __restrict__ x, Strides xs,
              ChannelVector<const acc_t<T>> mean, RowsGeometry g, double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Sums scratch[kThreads / 32];
  const int64_t Lv = g.N * g.Sv, items = g.C * g.G;
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t c = w / g.G;
    int64_t j, end;
    item_range(w - c * g.G, Lv, g.G, &j, &end);
    j += threadIdx.x;
    const T* dy_c = dy + c * dys.c;
    const T* x_c = x + c * xs.c;
    const A m = A(mean.at(c, 0));
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
      ws[w * kStatsDoubles] = total.s1;
      ws[w * kStatsDoubles + 1] = total.s2;
    }
  }
}

template <class T, int V>
__global__ void __launch_bounds__(kThreads)
    sums_channels_last(const T* __restrict__ dy, int64_t dy_row_stride, const T* __restrict__ x,
                       int64_t x_row_stride, ChannelVector<const acc_t<T>> mean,
                       ChannelsLastGeometry g, double* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ Sums scratch[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.G;
  for (int64_t b = blockIdx.x; b < g.slabs * g.G; b += gridDim.x) {
    const int64_t slab = b % g.slabs, group = b / g.slabs;
    const int64_t c0 = (slab * g.Wv + tx) * V;
    A m[V], fast1[V], fast2[V];
    double total1[V], total2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      m[i] = c0 < g.C ? A(mean.at(c0 + i, 0)) : A(0);
      fast1[i] = fast2[i] = 0;
      total1[i] = total2[i] = 0;
    }
    if (c0 < g.C) {
      int iteration = 0;
      for (int64_t r = group * g.R + ty; r < g.rows; r += kUnroll * row_step) {
        Vec<T, V> a[kUnroll], bx[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t row = r + u * row_step;
          ok[u] = row < g.rows;
          if (ok[u]) {
            a[u] = load<T, V>(dy + row * dy_row_stride + c0);
            bx[u] = load<T, V>(x + row * x_row_stride + c0);
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
        double* out = ws + ((c0 + i) * g.G + group) * kStatsDoubles;
        out[0] = scratch[tx].s1;
        out[1] = scratch[tx].s2;
      }
      __syncthreads();
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Reductions, second stage: one warp per channel combines its G partials in a fixed order.

constexpr int kWarpsPerBlock = kThreads / 32;

// StochNorm's choice of statistics (the _masked forward): channels with use_batch[c] == 0 are
// normalized with the running statistics. used_mean and used_invstd get what each channel uses.
// Absent (null used_mean) for batch norm.
template <class P>
struct Choice {
  ChannelVector<const P> use_batch, running_mean, running_var;
  ChannelVector<P> used_mean, used_invstd;
};

// The running statistics a training forward updates in place (absent: null data), as torch's:
// running = (1 - momentum) * running + momentum * batch, the variance unbiased.
template <class P>
struct Running {
  ChannelVector<P> mean, var;
  double momentum;
};

template <class P>
__global__ void __launch_bounds__(kThreads)
    finalize_moments(const double* __restrict__ ws, int64_t C, int64_t G, ChannelVector<P> mean,
                     ChannelVector<P> var, ChannelVector<P> invstd, double eps,
                     Choice<P> choice, Running<P> running) {
  const int lane = threadIdx.x & 31;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= C) return;  // whole warps leave together
  Moments<double> m = Moments<double>::zero();
  for (int64_t g = lane; g < G; g += 32) {
    const double* p = ws + (c * G + g) * kStatsDoubles;
    m.merge(p[0], p[1], p[2]);
  }
  m = warp_reduce(m);
  if (lane != 0) return;
  // An empty batch gives mean 0 and var 0, as on the CPU.
  // Rounding can leave m2 slightly negative; a NaN must stay NaN (fmax would drop it), as in torch.
  const double q = m.n > 0 ? m.m2 / m.n : 0.0;
  const double v = q < 0 ? 0.0 : q;
  mean.set(c, m.n > 0 ? m.mean : 0.0);
  if (var.data) var.set(c, v);
  if (invstd.data) invstd.set(c, 1.0 / sqrt(v + eps));
  // An empty batch leaves the running statistics alone (the host checked m.n != 1 for var). From
  // the statistics as written (rounded to P), as on the CPU.
  const double k = running.momentum;
  if (running.mean.data && m.n > 0) {
    running.mean.set(c, running.mean.at(c, 0) * (1 - k) + double(P(m.mean)) * k);
  }
  if (running.var.data && m.n > 1) {
    running.var.set(c, running.var.at(c, 0) * (1 - k) + double(P(v)) * (m.n / (m.n - 1)) * k);
  }
  if (choice.used_mean.data) {
    const bool batch = choice.use_batch.at(c, 1) != 0;
    choice.used_mean.set(c, batch ? (m.n > 0 ? m.mean : 0.0) : choice.running_mean.at(c, 0));
    choice.used_invstd.set(c, 1.0 / sqrt((batch ? v : choice.running_var.at(c, 1)) + eps));
  }
}

template <class P>
__global__ void __launch_bounds__(kThreads)
    finalize_sums(const double* __restrict__ ws, int64_t C, int64_t G, ChannelVector<P> sum_dy,
                  ChannelVector<P> sum_dy_xmu, ChannelVector<P> dweight,
                  ChannelVector<const P> invstd) {
  const int lane = threadIdx.x & 31;
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= C) return;
  Sums s = Sums::zero();
  for (int64_t g = lane; g < G; g += 32) {
    const double* p = ws + (c * G + g) * kStatsDoubles;
    s.merge({p[0], p[1]});
  }
  s = warp_reduce(s);
  if (lane != 0) return;
  sum_dy.set(c, s.s1);
  if (sum_dy_xmu.data) sum_dy_xmu.set(c, s.s2);
  if (dweight.data) dweight.set(c, s.s2 * invstd.at(c, 0));
}

// ------------------------------------------------------------------------------------------------
// Affine maps: out = p[c] * u + q[c] * (v - m[c]) + r[c], coefficients from the per-channel
// vectors, computed in float64 once per thread and channel and used in the arithmetic type.

template <class P>
struct AffineArgs {
  ChannelVector<const P> mean, invstd, weight, bias;  // normalize: y = (x - mean) * invstd * w + b
  ChannelVector<const P> sum_dy, sum_dy_xmu;          // backward, present in training
  bool xmu_scaled;  // sum_dy_xmu holds sum_dy_xmu * invstd (the fused backward's dweight)
  double count;
  ChannelVector<const P> use_batch;  // masked backward: 0 where the statistics are constants
};

template <class A>
struct Coefficients {
  A p, q, m, r;
};

// kGrad: dx = w * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count),
// the gradient through batch statistics (constant statistics without the sums); else normalize.
template <bool kGrad, class P>
__device__ Coefficients<P> coefficients(const AffineArgs<P>& a, int64_t c) {
  const double mean = a.mean.at(c, 0), invstd = a.invstd.at(c, 0), w = a.weight.at(c, 1);
  if constexpr (!kGrad) {
    return {P(0), P(invstd * w), P(mean), P(a.bias.at(c, 0))};
  } else {
    const double p = w * invstd;
    double q = 0, r = 0;
    if (a.sum_dy.data && a.count > 0 && a.use_batch.at(c, 1) != 0) {
      q = -p * invstd * (a.xmu_scaled ? 1.0 : invstd) * a.sum_dy_xmu.at(c, 0) / a.count;
      r = -p * a.sum_dy.at(c, 0) / a.count;
    }
    return {P(p), P(q), P(mean), P(r)};
  }
}

template <bool kGrad, class T>
__device__ __forceinline__ T affine_value(const Coefficients<acc_t<T>>& k, T u, T v) {
  if constexpr (kGrad) {
    return from_acc<T>(k.p * to_acc(u) + k.q * (to_acc(v) - k.m) + k.r);
  } else {
    return from_acc<T>(k.q * (to_acc(v) - k.m) + k.r);
  }
}

// Work items run last-first: after a reduction over the same items, what it read last is still
// in L2 and is read first here.
// out may be u or v (in place, out=x / out=dy): no pointer is __restrict__, so the compiler
// keeps every load before the store of the same element.
template <class T, int V, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    affine_rows(const T* u, Strides us, const T* v, Strides vs,
                T* out, Strides os, RowsGeometry g, AffineArgs<acc_t<T>> args) {
  const int64_t Lv = g.N * g.Sv, items = g.C * g.G;
  for (int64_t k = blockIdx.x; k < items; k += gridDim.x) {
    const int64_t w = items - 1 - k, c = w / g.G;
    int64_t j, end;
    item_range(w - c * g.G, Lv, g.G, &j, &end);
    j += threadIdx.x;
    if (j >= end) continue;
    const Coefficients<acc_t<T>> coef = coefficients<kGrad>(args, c);
    const T* u_c = kGrad ? u + c * us.c : nullptr;
    const T* v_c = v + c * vs.c;
    T* out_c = out + c * os.c;
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
          if constexpr (kGrad) a[q] = load<T, V>(u_c + at.offset<V>(us));
          b[q] = load<T, V>(v_c + at.offset<V>(vs));
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
          result.v[i] = affine_value<kGrad, T>(coef, kGrad ? a[q].v[i] : b[q].v[i], b[q].v[i]);
        }
        store<T, V>(out_c + where[q], result);
      }
    }
  }
}

template <class T, int V, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    affine_channels_last(const T* u, int64_t u_row_stride, const T* v,
                         int64_t v_row_stride, T* out, int64_t out_row_stride,
                         ChannelsLastGeometry g, AffineArgs<acc_t<T>> args) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row_step = int64_t(g.R) * g.G, blocks = g.slabs * g.G;
  for (int64_t k = blockIdx.x; k < blocks; k += gridDim.x) {
    const int64_t b = blocks - 1 - k;
    const int64_t slab = b % g.slabs, group = b / g.slabs;
    const int64_t c0 = (slab * g.Wv + tx) * V;
    if (c0 >= g.C) continue;
    Coefficients<acc_t<T>> coef[V];
#pragma unroll
    for (int i = 0; i < V; ++i) coef[i] = coefficients<kGrad>(args, c0 + i);
    for (int64_t r = group * g.R + ty; r < g.rows; r += kUnroll * row_step) {
      Vec<T, V> a[kUnroll], bv[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t row = r + q * row_step;
        if (row < g.rows) {
          if constexpr (kGrad) a[q] = load<T, V>(u + row * u_row_stride + c0);
          bv[q] = load<T, V>(v + row * v_row_stride + c0);
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t row = r + q * row_step;
        if (row >= g.rows) continue;
        Vec<T, V> result;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          result.v[i] =
              affine_value<kGrad, T>(coef[i], kGrad ? a[q].v[i] : bv[q].v[i], bv[q].v[i]);
        }
        store<T, V>(out + row * out_row_stride + c0, result);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: occupancy and launches.

// The kernels a plan for T may run: both layouts, every vector width, the reductions and both
// elementwise passes (channels-last blocks have at most kThreads). They use 40-96 registers per
// thread (nvcc -Xptxas -v), which fit 2-4 blocks of 256 threads on an SM of 64K registers.
template <class T>
std::vector<const void*> plan_kernels() {
  std::vector<const void*> kernels;
  const auto rows = [&](auto width) {
    constexpr int V = decltype(width)::value;
    for (const void* k : {reinterpret_cast<const void*>(&moments_rows<T, V>),
                          reinterpret_cast<const void*>(&sums_rows<T, V>),
                          reinterpret_cast<const void*>(&affine_rows<T, V, false>),
                          reinterpret_cast<const void*>(&affine_rows<T, V, true>)}) {
      kernels.push_back(k);
    }
  };
  const auto channels_last = [&](auto width) {
    constexpr int V = decltype(width)::value;
    for (const void* k : {reinterpret_cast<const void*>(&moments_channels_last<T, V>),
                          reinterpret_cast<const void*>(&sums_channels_last<T, V>),
                          reinterpret_cast<const void*>(&affine_channels_last<T, V, false>),
                          reinterpret_cast<const void*>(&affine_channels_last<T, V, true>)}) {
      kernels.push_back(k);
    }
  };
  constexpr int wide = int(16 / sizeof(T)), narrow = int(8 / sizeof(T));
  rows(std::integral_constant<int, wide>{});
  if constexpr (narrow > 1) rows(std::integral_constant<int, narrow>{});
  rows(std::integral_constant<int, 1>{});
  if constexpr (wide <= 4) channels_last(std::integral_constant<int, wide>{});
  if constexpr (narrow > 1 && narrow <= 4) channels_last(std::integral_constant<int, narrow>{});
  channels_last(std::integral_constant<int, 1>{});
  return kernels;
}

int resident_blocks_per_sm(DType dtype, int device) {
  static ResidentBlocks<1> cache;  // one kind: the forward and backward share a plan's items
  return cache.get(device, dtype, 0, kThreads,
                   [](auto tag, int) { return plan_kernels<decltype(tag)>(); });
}

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

unsigned grid_for(int64_t blocks) {
  return unsigned(std::clamp<int64_t>(blocks, 1, kMaxGrid));
}

dim3 channels_last_block(const ChannelsLastGeometry& g) { return dim3(g.Wv, g.R); }

template <class T>
void launch_moments(const Plan& plan, double* ws, cudaStream_t stream) {
  const Operand& x = plan.operands[0];
  const T* data = static_cast<const T*>(x.data);
  with_plan<T>(
      plan,
      [&](auto width) {
        moments_rows<T, decltype(width)::value>
            <<<grid_for(plan.r.C * plan.r.G), kThreads, 0, stream>>>(data, x.rows, plan.r, ws);
        check_launch("moments_rows");
      },
      [&](auto width) {
        moments_channels_last<T, decltype(width)::value>
            <<<grid_for(plan.cl.slabs * plan.cl.G), channels_last_block(plan.cl), 0, stream>>>(
                data, x.row_stride, plan.cl, ws);
        check_launch("moments_channels_last");
      });
}

template <class T>
void launch_sums(const Plan& plan, const TensorView& mean, double* ws, cudaStream_t stream) {
  const Operand &dy = plan.operands[0], &x = plan.operands[1];
  const auto m = channel_vector<const acc_t<T>>(mean);
  const T* dy_data = static_cast<const T*>(dy.data);
  const T* x_data = static_cast<const T*>(x.data);
  with_plan<T>(
      plan,
      [&](auto width) {
        sums_rows<T, decltype(width)::value>
            <<<grid_for(plan.r.C * plan.r.G), kThreads, 0, stream>>>(dy_data, dy.rows, x_data,
                                                                     x.rows, m, plan.r, ws);
        check_launch("sums_rows");
      },
      [&](auto width) {
        sums_channels_last<T, decltype(width)::value>
            <<<grid_for(plan.cl.slabs * plan.cl.G), channels_last_block(plan.cl), 0, stream>>>(
                dy_data, dy.row_stride, x_data, x.row_stride, m, plan.cl, ws);
        check_launch("sums_channels_last");
      });
}

int64_t channels_of(const Plan& plan) {
  return plan.layout == Layout::Rows ? plan.r.C : plan.cl.C;
}

unsigned finalize_grid(int64_t C) { return grid_for(ceil_div(C, kWarpsPerBlock)); }

template <class P>
void launch_finalize_moments(const Plan& plan, const double* ws, const TensorView& mean,
                             const TensorView& var, const TensorView& invstd, double eps,
                             cudaStream_t stream, const Choice<P>& choice = {},
                             const Running<P>& running = {}) {
  const int64_t C = channels_of(plan);
  finalize_moments<P><<<finalize_grid(C), kThreads, 0, stream>>>(
      ws, C, plan.partials_per_channel(), channel_vector<P>(mean), channel_vector<P>(var),
      channel_vector<P>(invstd), eps, choice, running);
  check_launch("finalize_moments");
}

template <class P>
void launch_finalize_sums(const Plan& plan, const double* ws, const TensorView& sum_dy,
                          const TensorView& sum_dy_xmu, cudaStream_t stream,
                          const TensorView& dweight = {}, const TensorView& invstd = {}) {
  const int64_t C = channels_of(plan);
  finalize_sums<P><<<finalize_grid(C), kThreads, 0, stream>>>(
      ws, C, plan.partials_per_channel(), channel_vector<P>(sum_dy),
      channel_vector<P>(sum_dy_xmu), channel_vector<P>(dweight),
      channel_vector<const P>(invstd));
  check_launch("finalize_sums");
}

// operands: (v, out) to normalize, (u, v, out) for the backward.
template <class T, bool kGrad>
void launch_affine(const Plan& plan, const AffineArgs<acc_t<T>>& args, cudaStream_t stream) {
  if (plan.elements() == 0) return;
  const Operand* u = kGrad ? &plan.operands[0] : nullptr;
  const Operand& v = plan.operands[kGrad ? 1 : 0];
  const Operand& out = plan.operands[kGrad ? 2 : 1];
  const T* u_data = u ? static_cast<const T*>(u->data) : nullptr;
  const Strides u_rows = u ? u->rows : Strides{0, 0, 0};
  const int64_t u_row_stride = u ? u->row_stride : 0;
  const T* v_data = static_cast<const T*>(v.data);
  T* out_data = static_cast<T*>(out.data);
  with_plan<T>(
      plan,
      [&](auto width) {
        affine_rows<T, decltype(width)::value, kGrad>
            <<<grid_for(plan.r.C * plan.r.G), kThreads, 0, stream>>>(
                u_data, u_rows, v_data, v.rows, out_data, out.rows, plan.r, args);
        check_launch(kGrad ? "affine_rows (backward)" : "affine_rows (normalize)");
      },
      [&](auto width) {
        affine_channels_last<T, decltype(width)::value, kGrad>
            <<<grid_for(plan.cl.slabs * plan.cl.G), channels_last_block(plan.cl), 0, stream>>>(
                u_data, u_row_stride, v_data, v.row_stride, out_data, out.row_stride, plan.cl,
                args);
        check_launch(kGrad ? "affine_channels_last (backward)"
                           : "affine_channels_last (normalize)");
      });
}

template <class P>
AffineArgs<P> normalize_args(const TensorView& mean, const TensorView& invstd,
                             const TensorView& weight, const TensorView& bias) {
  return {channel_vector<const P>(mean), channel_vector<const P>(invstd),
          channel_vector<const P>(weight), channel_vector<const P>(bias), {nullptr, 0},
          {nullptr, 0}, false, 0.0, {nullptr, 0}};
}

template <class P>
AffineArgs<P> backward_args(const TensorView& mean, const TensorView& invstd,
                            const TensorView& weight, const TensorView& sum_dy,
                            const TensorView& sum_dy_xmu, double count,
                            const TensorView& use_batch = {}, bool xmu_scaled = false) {
  return {channel_vector<const P>(mean), channel_vector<const P>(invstd),
          channel_vector<const P>(weight), {nullptr, 0}, channel_vector<const P>(sum_dy),
          channel_vector<const P>(sum_dy_xmu), xmu_scaled, count,
          channel_vector<const P>(use_batch)};
}

// ------------------------------------------------------------------------------------------------
// The caller's stream and workspace.

cudaStream_t stream_of(const Launch& launch) { return static_cast<cudaStream_t>(launch.stream); }

// The workspace of a reducing op on x, checked against what its plan needs.
double* workspace(const char* op, const Launch& launch, const TensorView& x, const Plan& plan) {
  const int64_t need = channels_of(plan) * plan.partials_per_channel() * kStatsDoubles;
  return checked_workspace(op, launch.workspace, x, need, "batch_norm_workspace_size(x)");
}

// The fused training forward of batch norm and of StochNorm: the statistics (mean, var, invstd
// when defined, and the choice's used statistics when it has one), then the normalization with
// norm_mean and norm_invstd (the batch statistics, or the choice's used ones).
template <class T>
void forward_train(const char* op, const TensorView& x, const TensorView& weight,
                   const TensorView& bias, double eps, const TensorView& y,
                   const TensorView& mean, const TensorView& var, const TensorView& invstd,
                   const Choice<acc_t<T>>& choice, const TensorView& norm_mean,
                   const TensorView& norm_invstd, const Launch& launch,
                   const Running<acc_t<T>>& running = {}) {
  using P = acc_t<T>;
  // One plan for both passes, so that the normalization revisits the reduction's work items.
  const Plan plan = make_plan({&x, &y}, x.dtype, x.device_id);
  double* ws = workspace(op, launch, x, plan);
  launch_moments<T>(plan, ws, stream_of(launch));
  launch_finalize_moments<P>(plan, ws, mean, var, invstd, eps, stream_of(launch), choice,
                             running);
  launch_affine<T, false>(plan, normalize_args<P>(norm_mean, norm_invstd, weight, bias),
                          stream_of(launch));
}

// The fused training backward of batch norm (use_batch undefined) and of StochNorm.
template <class T>
void backward_train(const char* op, const TensorView& dy, const TensorView& x,
                    const TensorView& mean, const TensorView& invstd, const TensorView& weight,
                    const TensorView& use_batch, const TensorView& dx, const TensorView& sum_dy,
                    const TensorView& sum_dy_xmu, const TensorView& dweight,
                    const Launch& launch) {
  using P = acc_t<T>;
  // dx (when wanted) joins the plan, so that the elementwise pass revisits the reduction's items.
  const Plan plan = dx.defined() ? make_plan({&dy, &x, &dx}, x.dtype, x.device_id)
                                 : make_plan({&dy, &x}, x.dtype, x.device_id);
  double* ws = workspace(op, launch, x, plan);
  const NCSView v = as_ncs(x, "x");
  const double count = double(v.N * v.S);
  launch_sums<T>(plan, mean, ws, stream_of(launch));
  launch_finalize_sums<P>(plan, ws, sum_dy, sum_dy_xmu, stream_of(launch), dweight, invstd);
  if (dx.defined()) {
    // Without sum_dy_xmu, dx reads dweight = sum_dy_xmu * invstd in its place.
    const bool scaled = !sum_dy_xmu.defined();
    launch_affine<T, true>(plan,
                           backward_args<P>(mean, invstd, weight, sum_dy,
                                            scaled ? dweight : sum_dy_xmu, count, use_batch,
                                            scaled),
                           stream_of(launch));
  }
}

}  // namespace

// ================================================================================================
// The ops (arguments checked by src/batchnorm.cpp).

int64_t batch_norm_workspace_size(const TensorView& x) {
  const NCSView v = as_ncs(x, "x");
  if (v.C == 0) return 0;
  const int target = target_blocks(x.dtype, x.device_id);
  int64_t most = 0;
  for (int V : vector_widths(Layout::Rows, dtype_size(x.dtype))) {
    most = std::max(most, rows_items_per_channel(v.C, v.N * v.S, V, target));
  }
  for (int V : vector_widths(Layout::ChannelsLast, dtype_size(x.dtype))) {
    most = std::max(most, channels_last_geometry(v.N * v.S, v.C, V, target).G);
  }
  return v.C * most * kStatsDoubles;
}

void batch_norm_stats(const TensorView& x, const TensorView& mean, const TensorView& var,
                      const Launch& launch) {
  const char* op = "batch_norm_stats";
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan = make_plan({&x}, x.dtype, x.device_id);
  double* ws = workspace(op, launch, x, plan);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_moments<T>(plan, ws, stream_of(launch));
    launch_finalize_moments<acc_t<T>>(plan, ws, mean, var, TensorView{}, 0.0, stream_of(launch));
  });
}

void batch_norm_normalize(const TensorView& x, const TensorView& mean, const TensorView& invstd,
                          const TensorView& weight, const TensorView& bias, const TensorView& y,
                          const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan = make_plan({&x, &y}, x.dtype, x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_affine<T, false>(plan, normalize_args<acc_t<T>>(mean, invstd, weight, bias),
                            stream_of(launch));
  });
}

void batch_norm_forward_train(const TensorView& x, const TensorView& weight, const TensorView& bias,
                              double eps, const TensorView& y, const TensorView& mean,
                              const TensorView& var, const TensorView& invstd,
                              const TensorView& running_mean, const TensorView& running_var,
                              double momentum, const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using P = acc_t<decltype(tag)>;
    const Running<P> running{channel_vector<P>(running_mean), channel_vector<P>(running_var),
                             momentum};
    forward_train<decltype(tag)>("batch_norm_forward_train", x, weight, bias, eps, y, mean, var,
                                 invstd, {}, mean, invstd, launch, running);
  });
}

void batch_norm_forward_train_masked(const TensorView& x, const TensorView& weight,
                                     const TensorView& bias, const TensorView& use_batch,
                                     const TensorView& running_mean,
                                     const TensorView& running_var, double eps,
                                     const TensorView& y, const TensorView& mean,
                                     const TensorView& var, const TensorView& used_mean,
                                     const TensorView& used_invstd, const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using P = acc_t<T>;
    const Choice<P> choice{channel_vector<const P>(use_batch),
                           channel_vector<const P>(running_mean),
                           channel_vector<const P>(running_var), channel_vector<P>(used_mean),
                           channel_vector<P>(used_invstd)};
    forward_train<T>("batch_norm_forward_train_masked", x, weight, bias, eps, y, mean, var,
                     TensorView{}, choice, used_mean, used_invstd, launch);
  });
}

void batch_norm_backward_reduce(const TensorView& dy, const TensorView& x, const TensorView& mean,
                                const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                                const Launch& launch) {
  const char* op = "batch_norm_backward_reduce";
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan = make_plan({&dy, &x}, x.dtype, x.device_id);
  double* ws = workspace(op, launch, x, plan);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_sums<T>(plan, mean, ws, stream_of(launch));
    launch_finalize_sums<acc_t<T>>(plan, ws, sum_dy, sum_dy_xmu, stream_of(launch));
  });
}

void batch_norm_backward_elemt(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& sum_dy, const TensorView& sum_dy_xmu,
                               double count, const TensorView& dx, const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  const Plan plan = make_plan({&dy, &x, &dx}, x.dtype, x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_affine<T, true>(
        plan, backward_args<acc_t<T>>(mean, invstd, weight, sum_dy, sum_dy_xmu, count),
        stream_of(launch));
  });
}

void batch_norm_backward_train(const TensorView& dy, const TensorView& x, const TensorView& mean,
                               const TensorView& invstd, const TensorView& weight,
                               const TensorView& dx, const TensorView& sum_dy,
                               const TensorView& sum_dy_xmu, const TensorView& dweight,
                               const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    backward_train<decltype(tag)>("batch_norm_backward_train", dy, x, mean, invstd, weight,
                                  TensorView{}, dx, sum_dy, sum_dy_xmu, dweight, launch);
  });
}

void batch_norm_backward_train_masked(const TensorView& dy, const TensorView& x,
                                      const TensorView& mean, const TensorView& invstd,
                                      const TensorView& weight, const TensorView& use_batch,
                                      const TensorView& dx, const TensorView& sum_dy,
                                      const TensorView& sum_dy_xmu, const Launch& launch) {
  if (x.shape[1] == 0) return;
  DeviceGuard guard(x.device_id);
  dispatch_dtype(x.dtype, [&](auto tag) {
    backward_train<decltype(tag)>("batch_norm_backward_train_masked", dy, x, mean, invstd, weight,
                                  use_batch, dx, sum_dy, sum_dy_xmu, TensorView{}, launch);
  });
}

}  // namespace normkit::cuda
