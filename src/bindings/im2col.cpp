// Bindings of include/normkit/im2col.h: the geometry comes as sequences of ints, one per spatial
// dim; `stream` is the cudaStream_t (as an int) GPU work runs on, ignored for CPU arrays.
#include "normkit/im2col.h"

#include <pybind11/stl.h>

#include <vector>

#include "array.h"
#include "module.h"

namespace normkit::bindings {

namespace {

ConvGeometry geometry(const char* op, const std::vector<int64_t>& kernel,
                      const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                      const std::vector<int64_t>& dilation) {
  const size_t dims = kernel.size();
  NK_CHECK_VALUE(dims >= 1 && dims <= static_cast<size_t>(kMaxSpatialDims), op, ": 1 to ",
                 kMaxSpatialDims, " spatial dims are supported, got a kernel of ", dims);
  NK_CHECK_VALUE(stride.size() == dims && padding.size() == dims && dilation.size() == dims, op,
                 ": kernel, stride, padding and dilation must have one value per spatial dim (",
                 dims, "), got ", stride.size(), ", ", padding.size(), " and ", dilation.size());
  ConvGeometry g;
  g.dims = static_cast<int>(dims);
  for (size_t d = 0; d < dims; ++d) {
    g.kernel[d] = kernel[d];
    g.stride[d] = stride[d];
    g.padding[d] = padding[d];
    g.dilation[d] = dilation[d];
  }
  return g;
}

}  // namespace

void bind_im2col(py::module_& m) {
  m.def("conv_output_size", &conv_output_size, py::arg("n"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"));
  m.def(
      "im2col",
      [](py::handle x, py::handle cols, const std::vector<int64_t>& kernel,
         const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
         const std::vector<int64_t>& dilation, uintptr_t stream) {
        const char* op = "im2col";
        const ConvGeometry g = geometry(op, kernel, stride, padding, dilation);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto Cols = as_array(cols, op, "cols", Access::Write, stream);
        run(stream, Array{}, {&X, &Cols},
            [&](const Launch& l) { im2col(X.view, g, Cols.view, l); });
      },
      py::arg("x"), py::arg("cols"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("stream") = uintptr_t(0));
  m.def(
      "col2im",
      [](py::handle cols, py::handle x, const std::vector<int64_t>& kernel,
         const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
         const std::vector<int64_t>& dilation, uintptr_t stream) {
        const char* op = "col2im";
        const ConvGeometry g = geometry(op, kernel, stride, padding, dilation);
        auto Cols = as_array(cols, op, "cols", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Write, stream);
        run(stream, Array{}, {&Cols, &X},
            [&](const Launch& l) { col2im(Cols.view, g, X.view, l); });
      },
      py::arg("cols"), py::arg("x"), py::arg("kernel"), py::arg("stride"), py::arg("padding"),
      py::arg("dilation"), py::arg("stream") = uintptr_t(0));
}

}  // namespace normkit::bindings
