// The core's only view of memory: a non-owning, strided tensor view. The core never allocates
// memory a caller can see; every input, output and workspace arrives as a TensorView whose memory
// belongs to the caller's array library (NumPy, CuPy's pool, PyTorch's caching allocator).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "normkit/error.h"

namespace normkit {

enum class DType : int8_t { Float16, BFloat16, Float32, Float64 };
enum class Device : int8_t { CPU, CUDA };

const char* dtype_name(DType dtype);
const char* device_name(Device device);
int64_t dtype_size(DType dtype);

// Parameters and statistics of an input dtype: float16/bfloat16 inputs take float32 parameters
// and statistics (mixed precision); float32 and float64 take their own dtype.
inline DType param_dtype(DType input) {
  return input == DType::Float64 ? DType::Float64 : DType::Float32;
}

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device = Device::CPU;
  int device_id = 0;
  int ndim = -1;  // -1: an absent optional argument (Python None)
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, not bytes

  bool defined() const { return ndim >= 0; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

// An (N, C, *) tensor seen as three dims: batch, channel and all spatial dims flattened to S,
// each with one stride. Strides of size-1 dims are set to 0 so that views compare equal.
struct NCSView {
  int64_t N = 0, C = 0, S = 0;
  int64_t sN = 0, sC = 0, sS = 0;
};

// Whether the spatial dims of t (dims 2..) can be flattened into one strided dim.
bool ncs_collapsible(const TensorView& t);
// The NCS view of t; a ValueError naming `name` if t's spatial strides cannot be flattened.
NCSView as_ncs(const TensorView& t, const char* name);

// Whether two indices of t may name one element: false is certain (every dim's stride, by
// magnitude, passes the extent of the dims with smaller strides), true is conservative.
bool has_internal_overlap(const TensorView& t);
// Whether the memory of a and b may share a byte: their address ranges intersect.
bool may_overlap(const TensorView& a, const TensorView& b);
// Whether a and b are exactly one view (data, dtype, shape and strides), which an elementwise op
// may read and write in place.
bool same_view(const TensorView& a, const TensorView& b);
// An argument of an op, for the memory checks below. `elementwise`: read or written at the same
// index as the op's other elementwise tensors (x, y, dy, dx), so that an output may be exactly
// such an input (in place).
struct NamedView {
  const TensorView& view;
  const char* name;
  bool elementwise;
};
// ValueErrors for outputs that overlap themselves or each other, or an input other than exactly
// in place (an elementwise output that is the same view as an elementwise input).
void check_output_memory(const char* op, std::initializer_list<NamedView> outputs,
                         std::initializer_list<NamedView> inputs);

}  // namespace normkit
