// The CUDA module's runtime queries. The CUDA runtime is linked statically and loads the driver
// lazily, so the extension imports on machines with no GPU or driver; there the queries say 0, and
// anything that needs a device is a RuntimeError.
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <utility>

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

int least_resident_blocks(const std::vector<const void*>& kernels, int threads) {
  int least = 1 << 30;
  for (const void* kernel : kernels) {
    int blocks = 0;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    least = std::min(least, blocks);
  }
  return std::max(least, 1);
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

static bool is_default_stream(cudaStream_t stream) {
  return stream == cudaStreamLegacy || stream == cudaStreamPerThread;
}

static bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status == cudaStreamCaptureStatusActive;
}

unsigned long long capture_id(void* stream) {
  const cudaStream_t s = canonical(stream);
  if (is_default_stream(s)) return 0;  // never queried: a capture elsewhere may forbid it
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  check(cudaStreamGetCaptureInfo(s, &status, &id), "cudaStreamGetCaptureInfo");
  return status == cudaStreamCaptureStatusActive ? id : 0;
}

// One event per device and producer stream, created once and re-recorded by each wait outside a
// producer's capture, instead of an event created and destroyed per array per call. A capturing
// consumer's graph keeps a reference to it (an external wait node), so it is never destroyed.
// The record and the wait that follows it are made under one lock: a wait takes the event's
// latest record, and the per-thread default stream (cudaStreamPerThread) is one handle for the
// streams of all threads, so another thread's record in between would be waited on instead.
static std::mutex producer_events_mutex;

static cudaEvent_t producer_event(int device, cudaStream_t producer) {
  static std::map<std::pair<int, cudaStream_t>, cudaEvent_t> events;
  cudaEvent_t& event = events[{device, producer}];
  if (!event) {
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
  return event;
}

void stream_wait(int device, void* producer, void* consumer) {
  const cudaStream_t from = canonical(producer), to = canonical(consumer);
  if (from == to) return;
  // The event is created and recorded with the array's device current, so the default streams
  // named by `from` and `to` are that device's.
  DeviceGuard guard(device);
  // The default streams are never queried or used while the consumer captures: touching the
  // legacy stream during a capture invalidates it (cudaErrorStreamCaptureImplicit).
  const bool consumer_captures = !is_default_stream(to) && capturing(to);
  if (consumer_captures && is_default_stream(from)) {
    // The producer's default-stream work was queued before the capture began, and a captured
    // graph's replays are ordered by the stream they are launched on, not by this wait.
    return;
  }
  const bool producer_captures = !is_default_stream(from) && capturing(from);
  if (!producer_captures) {
    // Recorded outside any capture, so the cached event serves: for a capturing consumer the
    // wait crosses the capture boundary (an external wait node), else it is an ordinary one.
    const std::lock_guard<std::mutex> lock(producer_events_mutex);
    const cudaEvent_t event = producer_event(device, from);
    check(cudaEventRecord(event, from), "recording the producer stream's event");
    check(cudaStreamWaitEvent(to, event, consumer_captures ? cudaEventWaitExternal : 0),
          consumer_captures ? "waiting (external, under capture) for the producer stream"
                            : "waiting for the stream of a __cuda_array_interface__ producer");
    return;
  }
  // The producer captures (into the consumer's capture, or CUDA refuses the wait): a record there
  // is a capture-time dependency, which must not touch the cached events that eager waits and
  // earlier graphs use. A fresh event, released once the capture has taken the dependency.
  cudaEvent_t event;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  cudaError_t status = cudaEventRecord(event, from);
  if (status == cudaSuccess) status = cudaStreamWaitEvent(to, event, 0);
  cudaEventDestroy(event);
  check(status, "waiting for the stream of a __cuda_array_interface__ producer");
}

}  // namespace normkit::cuda
