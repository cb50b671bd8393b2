// The CUDA module's runtime queries. The CUDA runtime is linked statically and loads the driver
// lazily, so the extension imports on machines with no GPU or driver; there the queries say 0, and
// anything that needs a device is a RuntimeError.
#include <cudaTypedefs.h>

#include <atomic>

#include "common.cuh"

namespace normkit::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

int multiprocessor_count(int device) {
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached];  // zero-initialized: 0 means not queried yet
  if (device >= 0 && device < kCached) {
    if (const int known = cache[device].load(std::memory_order_relaxed)) return known;
  }
  int count = 0;
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(multiprocessor count)");
  if (device >= 0 && device < kCached) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

bool has_primary_context(int device) {
  // cuDevicePrimaryCtxGetState has had one signature since CUDA 7; looked up once per process.
  static const PFN_cuDevicePrimaryCtxGetState_v7000 get_state = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 7000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuDevicePrimaryCtxGetState_v7000>(fn);
  }();
  if (!get_state) return true;  // cannot tell: restore as before
  unsigned flags = 0;
  int active = 0;
  if (get_state(device, &flags, &active) != CUDA_SUCCESS) return true;
  return active != 0;
}

// A RuntimeError that says plainly when CUDA cannot run here at all.
static void check_usable(cudaError_t status, const char* what) {
  if (status != cudaSuccess && device_count() == 0) {
    cudaGetLastError();
    fail(ErrorKind::Runtime, "normkit: got a CUDA array, but CUDA cannot run here (no GPU or no ",
         "driver): ", what, " failed with ", cudaGetErrorName(status));
  }
  check(status, what);
}

int pointer_device(const void* ptr) {
  cudaPointerAttributes attributes{};
  check_usable(cudaPointerGetAttributes(&attributes, ptr), "cudaPointerGetAttributes");
  NK_CHECK_TYPE(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
                "normkit: a CUDA array's pointer is not device memory (cudaMemoryType ",
                static_cast<int>(attributes.type), ")");
  return attributes.device;
}

int current_device() {
  int device = 0;
  check_usable(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// The legacy default stream has two names: 0 (the null stream) and cudaStreamLegacy.
static cudaStream_t canonical(void* stream) {
  return stream ? static_cast<cudaStream_t>(stream) : cudaStreamLegacy;
}

void stream_wait(int device, void* producer, void* consumer) {
  const cudaStream_t from = canonical(producer), to = canonical(consumer);
  if (from == to) return;
  DeviceGuard guard(device);
  cudaEvent_t event;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t status = cudaEventRecord(event, from);
  if (status == cudaSuccess) status = cudaStreamWaitEvent(to, event, 0);
  cudaEventDestroy(event);  // released once the wait is satisfied
  check(status, "waiting for the stream of a __cuda_array_interface__ producer");
}

}  // namespace normkit::cuda
