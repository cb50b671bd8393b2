#pragma once

#include <pybind11/pybind11.h>

namespace normkit::bindings {

namespace py = pybind11;

// Runs f with the GIL released: kernels never touch Python objects.
template <class F>
void without_gil(F&& f) {
  py::gil_scoped_release released;
  f();
}

// One registration function per op family.
void bind_batchnorm(py::module_& m);
void bind_encoding(py::module_& m);
void bind_im2col(py::module_& m);
void bind_wsconv(py::module_& m);

}  // namespace normkit::bindings
