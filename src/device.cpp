#include "normkit/device.h"

#ifdef NORMKIT_WITH_CUDA
namespace normkit::cuda {
int device_count();  // cuda/runtime.cu
}
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

}  // namespace normkit
