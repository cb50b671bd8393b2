// Python arrays -> TensorView without copies: the buffer protocol (NumPy), DLPack (PyTorch and
// anything else that speaks it) and "dltensor" capsules. The returned Array keeps the exporter's
// buffer or capsule alive.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "normkit/tensor.h"

namespace normkit::bindings {

namespace py = pybind11;

struct Array {
  TensorView view;  // undefined (ndim -1) for None
  std::unique_ptr<py::buffer_info> buffer;
  py::object capsule;
};

enum class Access { Read, Write };

// `obj` as a tensor view; None gives an undefined view. `op` and `name` go into error messages.
Array as_array(py::handle obj, const char* op, const char* name, Access access);

}  // namespace normkit::bindings
