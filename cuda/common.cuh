// Helpers shared by the CUDA kernels: error checks, the current device, storage types and their
// conversions, aligned vector loads and stores, and the building blocks of block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <type_traits>
#include <vector>

#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit::cuda {

// --- runtime (cuda/runtime.cu) ----------------------------------------------------------------------

int device_count();
// Streaming multiprocessors of `device`, queried once per device.
int multiprocessor_count(int device);

// A failed CUDA call as a RuntimeError naming what failed.
inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that it is reported once
    fail(ErrorKind::Runtime, "normkit: ", what, " failed: ", cudaGetErrorName(status), " (",
         cudaGetErrorString(status), ")");
  }
}

// Before an op launches anything: an error already recorded on this thread (a failed call or an
// asynchronous fault of earlier GPU work) is reported as that, so that the op's own launch checks
// below do not blame its first kernel for it.
inline void check_no_pending_error(const char* where) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    fail(ErrorKind::Runtime, "normkit: an earlier CUDA error was pending before ", where,
         " launched anything: ", cudaGetErrorName(status), " (", cudaGetErrorString(status),
         "); it comes from earlier GPU work, not from normkit's kernels");
  }
}

// After every kernel launch: a bad configuration surfaces here, named by the kernel. Errors
// pending before the op were reported by check_no_pending_error; an asynchronous fault of
// earlier work that lands between the two checks can still surface here, as the message says.
// Never synchronizes.
inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    fail(ErrorKind::Runtime, "normkit: launching CUDA kernel ", kernel, " failed: ",
         cudaGetErrorName(status), " (", cudaGetErrorString(status), "; an asynchronous fault of ",
         "earlier GPU work can also surface at a launch: CUDA_LAUNCH_BLOCKING=1 tells them apart)");
  }
}

// Whether `device`'s primary context exists (is active): making a device current with
// cudaSetDevice creates its context (CUDA 12+), which costs hundreds of MB of GPU memory on a device
// the process may never use. The driver is asked through the runtime's entry point, so the module
// still loads without a driver; where the driver cannot answer, the context is taken to exist.
bool has_primary_context(int device);

// Makes `device` current for the scope: kernels launch on the device of their stream and data.
// Every CUDA op starts with one, so it first reports an error left pending by earlier work.
// On exit the previous device is made current again only where its context exists: a thread that
// never touched a device reports device 0 as current, and restoring it would create a context on
// GPU 0 (in every rank of a job whose ranks use cuda:k without set_device). A failed restore is a
// RuntimeError, unless another error is already propagating (that one is reported).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device)
      : device_(device), exceptions_(std::uncaught_exceptions()) {
    check_no_pending_error("the op");
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ == device_) return;
    restore_ = has_primary_context(previous_);
    check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() noexcept(false) {
    if (previous_ == device_ || !restore_) return;
    const cudaError_t status = cudaSetDevice(previous_);
    if (status == cudaSuccess) return;
    if (std::uncaught_exceptions() > exceptions_) {
      cudaGetLastError();  // the error in flight is the one to report
      return;
    }
    check(status, "restoring the previous CUDA device (cudaSetDevice)");
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_, previous_ = 0;
  bool restore_ = false;
  int exceptions_;
};

// The caller's float64 scratch for an op on `ref`'s device, checked: defined, float64, contiguous,
// on that device and at least `need` values long. `size_fn` names the function that sizes it.
inline double* checked_workspace(const char* op, const TensorView& w, const TensorView& ref,
                                 int64_t need, const char* size_fn) {
  NK_CHECK_VALUE(w.defined(), op, ": CUDA arrays need a workspace of ", need, " float64 values (",
                 size_fn, ")");
  NK_CHECK_TYPE(w.device == Device::CUDA && w.device_id == ref.device_id, op,
                ": the workspace is on ", device_name(w.device), ":", w.device_id,
                " but the arrays are on cuda:", ref.device_id);
  NK_CHECK_TYPE(w.dtype == DType::Float64, op, ": the workspace must be float64, got ",
                dtype_name(w.dtype));
  NK_CHECK_VALUE(w.ndim == 1 && (w.shape[0] <= 1 || w.strides[0] == 1), op,
                 ": the workspace must be a contiguous 1-D array");
  NK_CHECK_VALUE(w.shape[0] >= need, op, ": the workspace has ", w.shape[0],
                 " float64 values, the op needs ", need, " (", size_fn, ")");
  return w.ptr<double>();
}

// --- storage types ----------------------------------------------------------------------------------

// Arithmetic type of a storage type: float32 for float16/bfloat16/float32, float64 for float64. It
// is also the dtype of parameters and statistics (param_dtype).
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <class T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// V consecutive values, loaded and stored as one aligned access (up to 16 bytes).
template <class T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <class T, int V>
__device__ __forceinline__ void store(T* p, const Vec<T, V>& value) {
  *reinterpret_cast<Vec<T, V>*>(p) = value;
}

// Calls fn(T{}) with T the device storage type of dtype.
template <class Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
  }
  fail(ErrorKind::Type, "normkit: no CUDA kernel for dtype ", dtype_name(dtype));
}

// --- occupancy ------------------------------------------------------------------------------------

// Blocks of `threads` threads that one multiprocessor of the current device holds at once for the
// tightest of `kernels` (their registers and static shared memory), at least 1 (cuda/runtime.cu).
int least_resident_blocks(const std::vector<const void*>& kernels, int threads);

// A family's resident blocks per multiprocessor, asked of the runtime once per device, dtype and
// kind of plan, then cached. The families aim their grids at one wave of the tightest kernel a
// plan may launch, so that every work item of a pass is resident at once: a fixed number of blocks
// per SM overshoots where the kernels' registers fit fewer, and the partial last wave runs at a
// fraction of the bandwidth.
template <int kKinds>
class ResidentBlocks {
 public:
  // kernels(T{}, kind): the kernels (as const void*) that a plan of `kind` may launch for storage
  // type T, each at `threads` threads per block or fewer.
  template <class Kernels>
  int get(int device, DType dtype, int kind, int threads, Kernels&& kernels) {
    const bool cached = device >= 0 && device < kDevices;
    std::atomic<int>* slot = cached ? &cache_[device][static_cast<int>(dtype)][kind] : nullptr;
    if (slot) {
      if (const int known = slot->load(std::memory_order_relaxed)) return known;
    }
    int blocks = 0;
    {
      DeviceGuard guard(device);  // the occupancy query is about the current device
      dispatch_dtype(dtype, [&](auto tag) {
        blocks = least_resident_blocks(kernels(tag, kind), threads);
      });
    }
    if (slot) slot->store(blocks, std::memory_order_relaxed);
    return blocks;
  }

 private:
  static constexpr int kDevices = 64, kDTypes = 4;
  std::atomic<int> cache_[kDevices][kDTypes][kKinds] = {};  // 0: not asked yet
};

// --- block reductions ----------------------------------------------------------------------------

// Moments of a set of values: count, mean, and M2 = sum (x - mean)^2. Plain data (no
// constructors), so that it can live in shared memory.
template <class A>
struct Moments {
  A n, mean, m2;

  __device__ static Moments zero() { return {A(0), A(0), A(0)}; }
  // Chan et al.'s merge of another set's moments into these.
  __device__ void merge(A bn, A bmean, A bm2) {
    if (bn == A(0)) return;
    const A total = n + bn, f = bn / total, delta = bmean - mean;
    mean += delta * f;
    m2 += bm2 + delta * delta * n * f;
    n = total;
  }
  __device__ void merge(const Moments& b) { merge(b.n, b.mean, b.m2); }
  __device__ Moments shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, n, offset), __shfl_down_sync(0xffffffffu, mean, offset),
            __shfl_down_sync(0xffffffffu, m2, offset)};
  }
};

// The backward's pair sums.
struct Sums {
  double s1, s2;

  __device__ static Sums zero() { return {0.0, 0.0}; }
  __device__ void merge(const Sums& b) {
    s1 += b.s1;
    s2 += b.s2;
  }
  __device__ Sums shfl_down(int offset) const {
    return {__shfl_down_sync(0xffffffffu, s1, offset), __shfl_down_sync(0xffffffffu, s2, offset)};
  }
};

// Tree reduction over a full warp; lane 0 holds the result, combined in a fixed order.
template <class R>
__device__ R warp_reduce(R value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value.merge(value.shfl_down(offset));
  return value;
}

// Reduction over a 1-D block of kBlockThreads; thread 0 holds the result. Every thread must call
// it.
template <int kBlockThreads, class R>
__device__ R block_reduce(R value, R* scratch /* kBlockThreads / 32 */) {
  value = warp_reduce(value);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlockThreads / 32 ? scratch[lane] : R::zero();
    value = warp_reduce(value);
  }
  __syncthreads();  // the scratch is reused by the block's next work item
  return value;
}

// Reduction over the y threads of a 2-D block, separately for each x thread: scratch[ty * Wv + tx]
// holds each thread's value; afterwards scratch[tx] holds the column's result. Every thread of
// the block must call it.
template <class R>
__device__ void column_reduce(R* scratch) {
  const int tx = threadIdx.x, ty = threadIdx.y, Wv = blockDim.x, R_ = blockDim.y;
  int p = 1;
  while (2 * p <= R_) p *= 2;
  __syncthreads();
  if (ty < R_ - p) scratch[ty * Wv + tx].merge(scratch[(ty + p) * Wv + tx]);
  __syncthreads();
  for (int h = p / 2; h > 0; h /= 2) {
    if (ty < h) scratch[ty * Wv + tx].merge(scratch[(ty + h) * Wv + tx]);
    __syncthreads();
  }
}

// The work item's range of vectors within a run of Lv vectors split into G near-equal parts.
__device__ __forceinline__ void item_range(int64_t g, int64_t Lv, int64_t G, int64_t* begin,
                                           int64_t* end) {
  const int64_t q = Lv / G, r = Lv % G;
  *begin = g * q + (g < r ? g : r);
  *end = *begin + q + (g < r ? 1 : 0);
}

}  // namespace normkit::cuda
