#include "normkit/tensor.h"

#include <cstdlib>
#include <utility>

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

namespace {
// The byte range [*lo, *hi) that t's elements occupy.
void byte_range(const TensorView& t, uintptr_t* lo, uintptr_t* hi) {
  const auto base = reinterpret_cast<uintptr_t>(t.data);
  int64_t low = 0, high = 0;
  for (int d = 0; d < t.ndim; ++d) {
    const int64_t span = (t.shape[d] - 1) * t.strides[d];
    (span < 0 ? low : high) += span;
  }
  const int64_t item = dtype_size(t.dtype);
  *lo = base + low * item;
  *hi = base + (high + 1) * item;
}
}  // namespace

bool has_internal_overlap(const TensorView& t) {
  if (t.numel() <= 1) return false;
  std::pair<int64_t, int64_t> dims[kMaxDims];  // (|stride|, size) of the dims of size > 1
  int n = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] > 1) dims[n++] = {std::llabs(t.strides[d]), t.shape[d]};
  }
  for (int i = 1; i < n; ++i) {  // insertion sort by stride: at most kMaxDims entries
    for (int j = i; j > 0 && dims[j] < dims[j - 1]; --j) std::swap(dims[j], dims[j - 1]);
  }
  int64_t extent = 1;  // elements spanned by the dims with smaller strides
  for (int i = 0; i < n; ++i) {
    if (dims[i].first < extent) return true;
    extent = dims[i].first * (dims[i].second - 1) + extent;
  }
  return false;
}

bool may_overlap(const TensorView& a, const TensorView& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  if (a.device != b.device || a.device_id != b.device_id) return false;
  uintptr_t alo, ahi, blo, bhi;
  byte_range(a, &alo, &ahi);
  byte_range(b, &blo, &bhi);
  return alo < bhi && blo < ahi;
}

bool same_view(const TensorView& a, const TensorView& b) {
  if (a.data != b.data || a.dtype != b.dtype || a.ndim != b.ndim) return false;
  for (int d = 0; d < a.ndim; ++d) {
    if (a.shape[d] != b.shape[d]) return false;
    if (a.shape[d] > 1 && a.strides[d] != b.strides[d]) return false;
  }
  return true;
}

void check_output_memory(const char* op, std::initializer_list<NamedView> outputs,
                         std::initializer_list<NamedView> inputs) {
  for (const NamedView& out : outputs) {
    if (!out.view.defined()) continue;
    NK_CHECK_VALUE(!has_internal_overlap(out.view), op, ": output ", out.name,
                   " has overlapping elements (a broadcast view, stride 0, or strides that ",
                   "revisit memory); pass an array that owns every element");
    for (const NamedView& other : outputs) {
      if (&other == &out) break;
      NK_CHECK_VALUE(!may_overlap(out.view, other.view), op, ": outputs ", other.name, " and ",
                     out.name, " overlap in memory; pass separate arrays");
    }
    for (const NamedView& in : inputs) {
      if (!may_overlap(out.view, in.view)) continue;
      const bool in_place = out.elementwise && in.elementwise && same_view(out.view, in.view);
      NK_CHECK_VALUE(in_place, op, ": output ", out.name, " overlaps input ", in.name,
                     out.elementwise && in.elementwise
                         ? " without being exactly the same array (in place)" : "",
                     "; pass a separate output array");
    }
  }
}

}  // namespace normkit
