// How an op runs on a GPU: on the caller's stream, with the caller's scratch memory. The core
// never synchronizes with the host and never allocates device memory, so a step built from its ops
// can be captured in a CUDA graph. CPU ops ignore both fields.
#pragma once

#include "normkit/tensor.h"

namespace normkit {

struct Launch {
  // A cudaStream_t from the caller's array library (CuPy's or PyTorch's current stream). Null is
  // the legacy default stream.
  void* stream = nullptr;
  // 1-D contiguous float64 scratch on the input's device, at least as long as the op family's
  // *_workspace_size(x) asks for; it may stay undefined for ops that reduce nothing.
  TensorView workspace;
};

}  // namespace normkit
