#include "normkit/tensor.h"

namespace normkit {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
  }
  return "unknown dtype";
}

const char* device_name(Device device) { return device == Device::CPU ? "cpu" : "cuda"; }

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::Float32: return 4;
    case DType::Float64: return 8;
  }
  return 0;
}

namespace {
// Flattens dims 2.. of t into one (size, stride), skipping size-1 dims whose stride is meaningless.
bool flatten_spatial(const TensorView& t, int64_t* size, int64_t* stride) {
  int64_t S = 1, inner_stride = 0;
  bool have_inner = false;
  for (int d = t.ndim - 1; d >= 2; --d) {
    if (t.shape[d] == 1) continue;
    if (!have_inner) {
      inner_stride = t.strides[d];
      have_inner = true;
    } else if (t.strides[d] != inner_stride * S) {
      return false;
    }
    S *= t.shape[d];
  }
  for (int d = 2; d < t.ndim; ++d) {
    if (t.shape[d] == 0) S = 0;  // an empty spatial dim empties the tensor, whatever its strides
  }
  *size = S;
  *stride = S > 1 ? inner_stride : 0;
  return true;
}
}  // namespace

bool ncs_collapsible(const TensorView& t) {
  int64_t S, sS;
  return t.ndim >= 2 && flatten_spatial(t, &S, &sS);
}

NCSView as_ncs(const TensorView& t, const char* name) {
  NK_CHECK_VALUE(t.ndim >= 2, name, " must have at least 2 dims (N, C, ...), got ", t.ndim);
  NCSView v;
  NK_CHECK_VALUE(flatten_spatial(t, &v.S, &v.sS), name,
                 ": the strides of its spatial dims cannot be flattened into one; pass a "
                 "contiguous (or channels-last) array");
  v.N = t.shape[0];
  v.C = t.shape[1];
  v.sN = v.N > 1 ? t.strides[0] : 0;
  v.sC = v.C > 1 ? t.strides[1] : 0;
  return v;
}

}  // namespace normkit
