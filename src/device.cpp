#include "normkit/device.h"

#include "normkit/error.h"

#ifdef NORMKIT_WITH_CUDA
namespace normkit::cuda {  // cuda/runtime.cu
int device_count();
int pointer_device(const void* ptr);
int current_device();
void stream_wait(int device, void* producer, void* consumer);
unsigned long long capture_id(void* stream);
bool has_primary_context(int device);
}  // namespace normkit::cuda
#endif

namespace normkit {

bool built_with_cuda() {
#ifdef NORMKIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef NORMKIT_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

#ifndef NORMKIT_WITH_CUDA
namespace {
[[noreturn]] void no_cuda(const char* what) {
  fail(ErrorKind::Runtime, "normkit: ", what, " needs CUDA, but this build of normkit has none ",
       "(it was built without the CUDA toolkit; rebuild with NORMKIT_CUDA=ON)");
}
}  // namespace
#endif

int cuda_pointer_device(const void* ptr) {
#ifdef NORMKIT_WITH_CUDA
  return cuda::pointer_device(ptr);
#else
  (void)ptr;
  no_cuda("a CUDA array");
#endif
}

int cuda_current_device() {
#ifdef NORMKIT_WITH_CUDA
  return cuda::current_device();
#else
  no_cuda("a CUDA array");
#endif
}

void cuda_stream_wait(int device, void* producer, void* consumer) {
#ifdef NORMKIT_WITH_CUDA
  cuda::stream_wait(device, producer, consumer);
#else
  (void)device, (void)producer, (void)consumer;
  no_cuda("a CUDA stream");
#endif
}

bool cuda_has_primary_context(int device) {
#ifdef NORMKIT_WITH_CUDA
  return cuda::has_primary_context(device);
#else
  (void)device;
  return false;
#endif
}

unsigned long long cuda_capture_id(void* stream) {
#ifdef NORMKIT_WITH_CUDA
  return cuda::capture_id(stream);
#else
  (void)stream;
  return 0;
#endif
}

}  // namespace normkit
