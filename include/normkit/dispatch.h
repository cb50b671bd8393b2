// The one dispatch point: picks the kernel for a tensor's device and dtype. Every op family calls
// `dispatch`, so supporting a new dtype or device means changing this file, not every op.
#pragma once

#include "normkit/tensor.h"

namespace normkit {

// CPU storage type of float16. Arithmetic on it always happens in float32.
using Half = _Float16;

// Calls cpu(T{}) with T the CPU storage type of dtype.
template <class CpuFn>
void dispatch_cpu(const char* op, DType dtype, CpuFn&& cpu) {
  switch (dtype) {
    case DType::Float32: return cpu(float{});
    case DType::Float64: return cpu(double{});
    case DType::Float16: return cpu(Half{});
    default:
      fail(ErrorKind::Type, op, ": ", dtype_name(dtype),
           " is not supported on the CPU (float16, float32 and float64 are)");
  }
}

// Runs an op on the device of `x`. CUDA kernels arrive with the CUDA backend; until an op has one,
// asking for it on a GPU array is a clear RuntimeError rather than a silent host copy.
template <class CpuFn>
void dispatch(const char* op, const TensorView& x, CpuFn&& cpu) {
  NK_CHECK_RUNTIME(x.device == Device::CPU, op, ": this build of normkit has no ",
                   device_name(x.device), " kernel for it");
  dispatch_cpu(op, x.dtype, cpu);
}

}  // namespace normkit
