// The one dispatch point: picks the kernel for a tensor's device and dtype. Every op family calls
// `dispatch`, so supporting a new dtype or device means changing this file, not every op.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "normkit/tensor.h"

namespace normkit {

// CPU storage type of float16. Arithmetic on it always happens in float32.
using Half = _Float16;

// CPU storage type of bfloat16: the upper 16 bits of a float32 (torch's and JAX's layout). The
// compiler (GCC 12) has no arithmetic on __bf16, so kernels load it as float32 through
// bf16_to_float (exact) and store through float_to_bf16 (round to nearest even, NaN kept NaN).
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(BFloat16) == 2, "BFloat16 must be two bytes");

inline float bf16_to_float(BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline BFloat16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

// Whether this build has the CUDA kernels (NORMKIT_WITH_CUDA is set for the core's sources).
#ifdef NORMKIT_WITH_CUDA
inline constexpr bool kBuiltWithCuda = true;
#else
inline constexpr bool kBuiltWithCuda = false;
#endif

// Calls cpu(T{}) with T the CPU storage type of dtype. A family whose CPU kernels take bfloat16
// (as BFloat16, computing in float32) opts in with kCpuBFloat16 = true; for the others bfloat16
// stays a TypeError on the CPU, so their kernels are never instantiated for it.
template <bool kCpuBFloat16 = false, class CpuFn>
void dispatch_cpu(const char* op, DType dtype, CpuFn&& cpu) {
  switch (dtype) {
    case DType::Float32: return cpu(float{});
    case DType::Float64: return cpu(double{});
    case DType::Float16: return cpu(Half{});
    case DType::BFloat16:
      if constexpr (kCpuBFloat16) return cpu(BFloat16{});
      [[fallthrough]];
    default:
      fail(ErrorKind::Type, op, ": ", dtype_name(dtype), " is not supported on the CPU (",
           kCpuBFloat16 ? "float16, bfloat16" : "float16", ", float32 and float64 are)");
  }
}

// Runs an op on the device of `x`: cpu(T{}) for CPU tensors, gpu() for CUDA tensors (the CUDA
// kernels pick their dtype themselves; every DType has one). In a build without CUDA, a CUDA
// tensor is a clear RuntimeError, and gpu is never instantiated, so the CUDA entry points it
// names need not exist.
template <bool kCpuBFloat16 = false, class CpuFn, class GpuFn>
void dispatch(const char* op, const TensorView& x, CpuFn&& cpu, GpuFn&& gpu) {
  if (x.device == Device::CUDA) {
    if constexpr (kBuiltWithCuda) {
      gpu();
      return;
    } else {
      fail(ErrorKind::Runtime, op, ": x is a CUDA array but this build of normkit has no CUDA ",
           "kernels (it was built without the CUDA toolkit; rebuild with NORMKIT_CUDA=ON)");
    }
  }
  NK_CHECK_RUNTIME(x.device == Device::CPU, op, ": no kernel for device ", device_name(x.device));
  dispatch_cpu<kCpuBFloat16>(op, x.dtype, cpu);
}

// Runs an op whose CPU kernels take float32 and float64 (float16 is a TypeError there): cpu(T{})
// for CPU tensors, gpu() for CUDA ones, as `dispatch`.
template <class CpuFn, class GpuFn>
void dispatch_float(const char* op, const TensorView& x, CpuFn&& cpu, GpuFn&& gpu) {
  dispatch(op, x, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, Half>) {
      fail(ErrorKind::Type, op, ": float16 is not supported on the CPU (float32 and float64 are)");
    } else {
      cpu(tag);
    }
  }, gpu);
}

}  // namespace normkit
