// The extension module normkit._C: errors, build facts, and each op family's bindings.
#include "module.h"

#include "array.h"
#include "normkit/device.h"
#include "normkit/error.h"

namespace normkit::bindings {

PYBIND11_MODULE(_C, m) {
  m.doc() = "normkit's native core: normalization kernels over NumPy / DLPack arrays";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* type = e.kind() == ErrorKind::Value  ? PyExc_ValueError
                       : e.kind() == ErrorKind::Type ? PyExc_TypeError
                                                     : PyExc_RuntimeError;
      PyErr_SetString(type, e.what());
    }
  });

  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA module was compiled in.");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices usable now (0 without a GPU).");
  m.def("cuda_has_primary_context", &cuda_has_primary_context, py::arg("device"),
        "Whether the device's primary CUDA context exists (making it current would create it).");
  m.def(
      "cuda_capture_id",
      [](uintptr_t stream) { return cuda_capture_id(reinterpret_cast<void*>(stream)); },
      py::arg("stream"),
      "The id of the CUDA-graph capture the stream (a cudaStream_t) is in; 0 when not capturing.");
  m.def(
      "ncs_collapsible",
      [](py::handle x) {
        auto X = as_array(x, "ncs_collapsible", "x", Access::Shape);
        return ncs_collapsible(X.view);
      },
      "Whether x's spatial dims flatten to one strided dim (else the ops need a contiguous copy).");

  bind_batchnorm(m);
  bind_encoding(m);
  bind_groupnorm(m);
  bind_im2col(m);
  bind_wsconv(m);
}

}  // namespace normkit::bindings
