// Bindings of include/normkit/batchnorm.h. Arguments are positional arrays (None for an absent
// optional one); outputs are passed in, allocated by the caller's array library.
#include "normkit/batchnorm.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_batchnorm(py::module_& m) {
  m.def("batch_norm_stats", [](py::handle x, py::handle mean, py::handle var) {
    const char* op = "batch_norm_stats";
    auto X = as_array(x, op, "x", Access::Read);
    auto M = as_array(mean, op, "mean", Access::Write), V = as_array(var, op, "var", Access::Write);
    without_gil([&] { batch_norm_stats(X.view, M.view, V.view); });
  });
  m.def("batch_norm_normalize", [](py::handle x, py::handle mean, py::handle invstd,
                                   py::handle weight, py::handle bias, py::handle y) {
    const char* op = "batch_norm_normalize";
    auto X = as_array(x, op, "x", Access::Read), M = as_array(mean, op, "mean", Access::Read);
    auto I = as_array(invstd, op, "invstd", Access::Read);
    auto W = as_array(weight, op, "weight", Access::Read), B = as_array(bias, op, "bias", Access::Read);
    auto Y = as_array(y, op, "y", Access::Write);
    without_gil([&] { batch_norm_normalize(X.view, M.view, I.view, W.view, B.view, Y.view); });
  });
  m.def("batch_norm_forward_train", [](py::handle x, py::handle weight, py::handle bias, double eps,
                                       py::handle y, py::handle mean, py::handle var,
                                       py::handle invstd) {
    const char* op = "batch_norm_forward_train";
    auto X = as_array(x, op, "x", Access::Read);
    auto W = as_array(weight, op, "weight", Access::Read), B = as_array(bias, op, "bias", Access::Read);
    auto Y = as_array(y, op, "y", Access::Write), M = as_array(mean, op, "mean", Access::Write);
    auto V = as_array(var, op, "var", Access::Write), I = as_array(invstd, op, "invstd", Access::Write);
    without_gil([&] {
      batch_norm_forward_train(X.view, W.view, B.view, eps, Y.view, M.view, V.view, I.view);
    });
  });
  m.def("batch_norm_backward_reduce", [](py::handle dy, py::handle x, py::handle mean,
                                         py::handle sum_dy, py::handle sum_dy_xmu) {
    const char* op = "batch_norm_backward_reduce";
    auto DY = as_array(dy, op, "dy", Access::Read), X = as_array(x, op, "x", Access::Read);
    auto M = as_array(mean, op, "mean", Access::Read);
    auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write);
    auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write);
    without_gil([&] { batch_norm_backward_reduce(DY.view, X.view, M.view, S1.view, S2.view); });
  });
  m.def("batch_norm_backward_elemt", [](py::handle dy, py::handle x, py::handle mean,
                                        py::handle invstd, py::handle weight, py::handle sum_dy,
                                        py::handle sum_dy_xmu, double count, py::handle dx) {
    const char* op = "batch_norm_backward_elemt";
    auto DY = as_array(dy, op, "dy", Access::Read), X = as_array(x, op, "x", Access::Read);
    auto M = as_array(mean, op, "mean", Access::Read), I = as_array(invstd, op, "invstd", Access::Read);
    auto W = as_array(weight, op, "weight", Access::Read);
    auto S1 = as_array(sum_dy, op, "sum_dy", Access::Read);
    auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Read);
    auto DX = as_array(dx, op, "dx", Access::Write);
    without_gil([&] {
      batch_norm_backward_elemt(DY.view, X.view, M.view, I.view, W.view, S1.view, S2.view, count,
                                DX.view);
    });
  });
  m.def("batch_norm_backward_train", [](py::handle dy, py::handle x, py::handle mean,
                                        py::handle invstd, py::handle weight, py::handle dx,
                                        py::handle sum_dy, py::handle sum_dy_xmu) {
    const char* op = "batch_norm_backward_train";
    auto DY = as_array(dy, op, "dy", Access::Read), X = as_array(x, op, "x", Access::Read);
    auto M = as_array(mean, op, "mean", Access::Read), I = as_array(invstd, op, "invstd", Access::Read);
    auto W = as_array(weight, op, "weight", Access::Read), DX = as_array(dx, op, "dx", Access::Write);
    auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write);
    auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write);
    without_gil([&] {
      batch_norm_backward_train(DY.view, X.view, M.view, I.view, W.view, DX.view, S1.view, S2.view);
    });
  });
}

}  // namespace normkit::bindings
