// The CUDA module's runtime queries. The CUDA runtime is linked statically and loads the driver
// lazily, so the extension imports on machines with no GPU or driver; there the queries say 0.
#include <cuda_runtime.h>

namespace normkit::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return count;
}

}  // namespace normkit::cuda
