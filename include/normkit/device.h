// What this build of the core can run on.
#pragma once

namespace normkit {

// Whether the CUDA module was compiled into this build.
bool built_with_cuda();
// CUDA devices usable now: 0 without a CUDA build, a driver or a GPU (never an error).
int cuda_device_count();

}  // namespace normkit
