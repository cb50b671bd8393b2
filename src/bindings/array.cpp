#include "array.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

#include "normkit/device.h"

namespace normkit::bindings {

namespace {

// The DLPack ABI (https://dmlc.github.io/dlpack), the legacy unversioned capsule "dltensor".
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
constexpr int32_t kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;
constexpr uint8_t kDLFloat = 2, kDLBfloat = 4;

[[noreturn]] void unsupported_dtype(const char* op, const char* name, const std::string& what) {
  fail(ErrorKind::Type, op, ": ", name, " has dtype ", what,
       "; normkit takes float16, bfloat16 (GPU), float32 and float64 arrays");
}

// A DLPack dtype as torch and NumPy name it ("complex64"), so that the error names the dtype
// the user passed; an unknown code keeps its number.
std::string dlpack_dtype_name(DLDataType dtype) {
  static const char* const kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex"};
  const std::string bits = std::to_string(dtype.bits);
  if (dtype.code == 6) return "bool (DLPack, " + bits + " bits)";
  if (dtype.code < 6) return kinds[dtype.code] + bits + " (DLPack)";
  return "code " + std::to_string(dtype.code) + " with " + bits + " bits (DLPack)";
}

DType dtype_from_format(std::string format, int64_t itemsize, const char* op, const char* name) {
  if (!format.empty() && (format[0] == '<' || format[0] == '=' || format[0] == '@')) format.erase(0, 1);
  if (format == "e" && itemsize == 2) return DType::Float16;
  if (format == "f" && itemsize == 4) return DType::Float32;
  if (format == "d" && itemsize == 8) return DType::Float64;
  unsupported_dtype(op, name, "with buffer format '" + format + "'");
}

// The kernels read and write whole elements (vector loads go through memcpy, scalars do not):
// an array that does not start on a multiple of its item size (a NumPy view at a byte offset, a
// CUDA pointer at an odd address) would make every scalar access undefined behaviour on the CPU
// and a sticky misaligned-address fault, which ends the CUDA context, on the GPU. Refused for
// every data pointer; normkit.functional passes an aligned copy of such inputs instead.
void check_item_alignment(const TensorView& v, const char* op, const char* name) {
  NK_CHECK_VALUE(reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) == 0, op, ": ", name,
                 " is not aligned to its ", dtype_size(v.dtype), "-byte items; pass an aligned ",
                 "copy (numpy.require(a, requirements='A'), or a fresh CuPy/torch copy)");
}

Array aligned(Array a, const char* op, const char* name) {
  check_item_alignment(a.view, op, name);
  return a;
}

void check_ndim(int64_t ndim, const char* op, const char* name) {
  NK_CHECK_VALUE(ndim <= kMaxDims, op, ": ", name, " has ", ndim, " dims; at most ", kMaxDims,
                 " are supported");
}

Array from_buffer(py::handle obj, const char* op, const char* name, Access access) {
  Array a;
  a.buffer = std::make_unique<py::buffer_info>(py::reinterpret_borrow<py::buffer>(obj).request());
  const py::buffer_info& info = *a.buffer;
  NK_CHECK_VALUE(!(access == Access::Write && info.readonly), op, ": output ", name,
                 " is read-only; pass a writable array");
  check_ndim(info.ndim, op, name);
  TensorView& v = a.view;
  v.dtype = dtype_from_format(info.format, info.itemsize, op, name);
  v.data = info.ptr;
  v.ndim = static_cast<int>(info.ndim);
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = info.shape[d];
    NK_CHECK_VALUE(info.strides[d] % info.itemsize == 0, op, ": ", name,
                   " has a stride that is not a multiple of its item size");
    v.strides[d] = info.strides[d] / info.itemsize;
  }
  return a;
}

// The CUDA Array Interface, version 3 (https://numba.readthedocs.io/en/stable/cuda/
// cuda_array_interface.html): a dict with shape, typestr, data = (pointer, read-only), strides in
// bytes or None (C-contiguous), no mask, and a stream to synchronize with.
Array from_cuda_array_interface(py::handle obj, const char* op, const char* name, Access access) {
  const py::dict cai = obj.attr("__cuda_array_interface__");
  Array a;
  TensorView& v = a.view;
  const py::tuple shape = cai["shape"];
  check_ndim(static_cast<int64_t>(shape.size()), op, name);
  NK_CHECK_VALUE(!cai.contains("mask") || cai["mask"].is_none(), op, ": ", name,
                 " is a masked CUDA array; pass one without a mask");
  // typestr: byte order, kind, item size in bytes, as NumPy's dtype.str ('<f4').
  const std::string typestr = py::str(cai["typestr"]);
  const std::string kind = typestr.substr(0, 2), size = typestr.size() > 2 ? typestr.substr(2) : "";
  if (kind == "<f" || kind == "=f") {
    if (size == "2") v.dtype = DType::Float16;
    else if (size == "4") v.dtype = DType::Float32;
    else if (size == "8") v.dtype = DType::Float64;
    else unsupported_dtype(op, name, "'" + typestr + "' (CUDA Array Interface)");
  } else if (typestr == "<V2" || typestr == "|V2") {
    unsupported_dtype(op, name, "'" + typestr + "' (2-byte void, perhaps bfloat16: pass bfloat16 "
                      "arrays through DLPack, which names the type)");
  } else {
    unsupported_dtype(op, name, "'" + typestr + "' (CUDA Array Interface)");
  }
  const int64_t itemsize = dtype_size(v.dtype);
  const py::tuple data = cai["data"];
  v.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  NK_CHECK_VALUE(!(access == Access::Write && data[1].cast<bool>()), op, ": output ", name,
                 " is read-only; pass a writable array");
  v.ndim = static_cast<int>(shape.size());
  py::object strides = py::none();
  if (cai.contains("strides")) strides = cai["strides"];
  int64_t compact = 1, count = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d].cast<int64_t>();
    if (strides.is_none()) {
      v.strides[d] = compact;
    } else {
      const int64_t bytes = py::tuple(strides)[d].cast<int64_t>();
      NK_CHECK_VALUE(bytes % itemsize == 0, op, ": ", name,
                     " has a stride that is not a multiple of its item size");
      v.strides[d] = bytes / itemsize;
    }
    compact *= v.shape[d];
    count *= v.shape[d];
  }
  if (cai.contains("stream") && !cai["stream"].is_none()) {
    const auto stream = cai["stream"].cast<uintptr_t>();
    NK_CHECK_VALUE(stream != 0, op, ": ", name, " has __cuda_array_interface__ stream 0, which ",
                   "the interface disallows (1 is the legacy default stream)");
    a.has_producer_stream = true;
    a.producer_stream = stream;
  }
  // Checked before the driver is asked about the pointer: a misaligned pointer is the caller's
  // mistake on any machine, and a misaligned access on the GPU is a sticky fault.
  check_item_alignment(v, op, name);
  v.device = Device::CUDA;
  // The interface does not name the device: ask the driver who owns the memory (an empty array
  // may have no memory at all; it lives where its library allocates, the current device).
  v.device_id = v.data && count > 0 ? cuda_pointer_device(v.data) : cuda_current_device();
  return a;
}

// A "dltensor" capsule, from an exporter's __dlpack__ or passed in directly (torch's to_dlpack
// makes one in a fraction of the time of Tensor.__dlpack__, which matters for small tensors).
Array from_capsule(py::object capsule, const char* op, const char* name) {
  Array a;
  a.capsule = std::move(capsule);
  NK_CHECK_VALUE(PyCapsule_IsValid(a.capsule.ptr(), "dltensor"), op, ": ", name,
                 " is a capsule but not an unconsumed DLPack \"dltensor\" one");
  // The capsule is not renamed "used_dltensor": its destructor returns the tensor to the exporter
  // once it is dropped, after the op.
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(a.capsule.ptr(), "dltensor"));
  const DLTensor& t = managed->dl_tensor;
  check_ndim(t.ndim, op, name);
  TensorView& v = a.view;
  NK_CHECK_TYPE(t.dtype.lanes == 1, op, ": ", name, " has vector lanes");
  if (t.dtype.code == kDLFloat && t.dtype.bits == 16) v.dtype = DType::Float16;
  else if (t.dtype.code == kDLBfloat && t.dtype.bits == 16) v.dtype = DType::BFloat16;
  else if (t.dtype.code == kDLFloat && t.dtype.bits == 32) v.dtype = DType::Float32;
  else if (t.dtype.code == kDLFloat && t.dtype.bits == 64) v.dtype = DType::Float64;
  else unsupported_dtype(op, name, dlpack_dtype_name(t.dtype));
  switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: v.device = Device::CPU; break;
    // Managed memory is CUDA memory: the capsule names the device, so the driver is not asked.
    case kDLCUDA:
    case kDLCUDAManaged: v.device = Device::CUDA; break;
    default:
      fail(ErrorKind::Type, op, ": ", name, " lives on DLPack device type ",
           t.device.device_type, "; normkit takes CPU and CUDA arrays");
  }
  v.device_id = v.device == Device::CUDA ? t.device.device_id : 0;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.ndim = t.ndim;
  int64_t compact = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = t.shape[d];
    v.strides[d] = t.strides ? t.strides[d] : compact;
    compact *= t.shape[d];
  }
  return a;
}

// The attribute names the protocols look up, made (and interned) once.
struct Names {
  py::handle is_neg, is_conj, dlpack, dlpack_device, cuda_array_interface;
};

const Names& names() {
  static const Names n{PyUnicode_InternFromString("is_neg"), PyUnicode_InternFromString("is_conj"),
                       PyUnicode_InternFromString("__dlpack__"),
                       PyUnicode_InternFromString("__dlpack_device__"),
                       PyUnicode_InternFromString("__cuda_array_interface__")};
  return n;
}

// obj.<name>, or a null object where obj has no such attribute. py::hasattr
// (PyObject_HasAttrString) raises an AttributeError and clears it, and raising one formats its
// message: ~1.5 us per missing attribute, which every array from an exporter without torch's
// is_neg and is_conj (CuPy, JAX, Numba) paid twice per call. This lookup raises nothing for a
// missing attribute (as Python's own hasattr), so only the attributes that exist cost anything.
py::object optional_attr(py::handle obj, py::handle name) {
  PyObject* value = nullptr;
#if PY_VERSION_HEX >= 0x030D0000
  const int found = PyObject_GetOptionalAttr(obj.ptr(), name.ptr(), &value);
#else
  const int found = _PyObject_LookupAttr(obj.ptr(), name.ptr(), &value);
#endif
  if (found < 0) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(value);
}

// Whether obj (a torch tensor) has a lazy negation or conjugation bit set, which a DLPack capsule
// cannot carry: its exported values would be read with the wrong sign.
bool has_lazy_bit(py::handle obj, py::handle method) {
  const py::object bit = optional_attr(obj, method);
  return bit && bit().cast<bool>();
}

Array from_dlpack(py::handle obj, const char* op, const char* name, Access access,
                  uintptr_t stream) {
  NK_CHECK_VALUE(!has_lazy_bit(obj, names().is_neg) && !has_lazy_bit(obj, names().is_conj), op,
                 ": ", name, " has torch's negative or conjugate bit set, which DLPack drops ",
                 "(the values would be read with the wrong sign); pass ",
                 "t.resolve_neg().resolve_conj()");
  bool cuda = false;
  if (const py::object device_of = optional_attr(obj, names().dlpack_device)) {
    const py::tuple device = device_of();
    const auto type = device[0].cast<int32_t>();
    cuda = type == kDLCUDA || type == kDLCUDAManaged;
  }
  // A CUDA exporter makes its data ready on the consumer's stream (DLPack's stream protocol;
  // 0 is not allowed there, 1 names the legacy default stream, -1 asks for no synchronization).
  py::object capsule;
  if (!cuda) capsule = obj.attr("__dlpack__")();
  else if (access == Access::Shape) capsule = obj.attr("__dlpack__")(py::arg("stream") = -1);
  else capsule = obj.attr("__dlpack__")(py::arg("stream") = stream ? stream : 1);
  return from_capsule(std::move(capsule), op, name);
}

}  // namespace

// Whether obj is a NumPy masked array (or a subclass), whose buffer holds the masked values too.
// Plain ndarrays, the common case, are told apart by their type's name without an attribute
// lookup.
bool is_masked_array(py::handle obj) {
  if (std::strcmp(Py_TYPE(obj.ptr())->tp_name, "numpy.ndarray") == 0) return false;
  return py::hasattr(obj, "_mask") && py::hasattr(obj, "filled");
}

Array as_array(py::handle obj, const char* op, const char* name, Access access,
               uintptr_t stream) {
  if (obj.is_none()) return Array{};
  if (PyObject_CheckBuffer(obj.ptr())) {
    NK_CHECK_TYPE(!is_masked_array(obj), op, ": ", name, " is a NumPy masked array; the ",
                  "kernels would read its masked values too: pass x.filled(...) or ",
                  "x.compressed()");
    return aligned(from_buffer(obj, op, name, access), op, name);
  }
  if (PyCapsule_CheckExact(obj.ptr())) {
    return aligned(from_capsule(py::reinterpret_borrow<py::object>(obj), op, name), op, name);
  }
  // DLPack before the CUDA Array Interface: its exporter makes the data ready on the consumer's
  // stream (torch and JAX export interface v2, which names no stream at all, so nothing would
  // order normkit's work after theirs), and it names the device, which the interface leaves to a
  // driver query.
  // Only a size query looks for the interface here, and on the type: an exporter's property
  // (CuPy's builds its dict on every access) is then neither run nor able to fail the query.
  if (optional_attr(obj, names().dlpack)) {
    if (access != Access::Shape ||
        !optional_attr(py::type::of(obj), names().cuda_array_interface)) {
      return aligned(from_dlpack(obj, op, name, access, stream), op, name);
    }
    // A size query asks for stream -1 (no synchronization), which exporters older than the
    // Array API's 2023 DLPack rules may refuse: the interface then describes the array, still
    // without touching any stream.
    try {
      return aligned(from_dlpack(obj, op, name, access, stream), op, name);
    } catch (const py::error_already_set&) {
      return from_cuda_array_interface(obj, op, name, access);
    }
  }
  if (optional_attr(obj, names().cuda_array_interface)) {
    return from_cuda_array_interface(obj, op, name, access);  // checks the alignment itself
  }
  fail(ErrorKind::Type, op, ": ", name, " must be an array (buffer protocol, CUDA Array ",
       "Interface, DLPack or a DLPack capsule), got ",
       std::string(py::str(py::type::of(obj).attr("__name__"))));
}

void wait_for_producers(std::initializer_list<const Array*> arrays, uintptr_t stream) {
  // One wait per producer stream: arrays of one producer (an op's inputs and outputs often are)
  // need it only once, and each wait is an event record and a stream wait.
  std::pair<int, uintptr_t> waited[16];
  size_t count = 0;
  for (const Array* a : arrays) {
    if (!a->view.defined() || a->view.device != Device::CUDA || !a->has_producer_stream) continue;
    const std::pair<int, uintptr_t> producer{a->view.device_id, a->producer_stream};
    if (std::find(waited, waited + count, producer) != waited + count) continue;
    cuda_stream_wait(producer.first, reinterpret_cast<void*>(producer.second),
                     reinterpret_cast<void*>(stream));
    if (count < std::size(waited)) waited[count++] = producer;
  }
}

}  // namespace normkit::bindings
