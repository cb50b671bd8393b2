// Bindings of include/normkit/groupnorm.h, in the conventions of src/bindings/batchnorm.cpp:
// positional arrays in the header's order (None for an absent optional one), outputs passed in,
// `stream` (a cudaStream_t as an int) on every op and `workspace` (float64, of
// group_norm_workspace_size(x, groups) values on x's device) on those that reduce; CPU arrays
// ignore both.
#include "normkit/groupnorm.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_groupnorm(py::module_& m) {
  const auto stream_arg = py::arg("stream") = uintptr_t(0);
  const auto workspace_arg = py::arg("workspace") = py::none();

  m.def(
      "group_norm_workspace_size",
      [](py::handle x, int64_t groups) {
        auto X = as_array(x, "group_norm_workspace_size", "x", Access::Shape);
        return group_norm_workspace_size(X.view, groups);
      },
      py::arg("x"), py::arg("groups"),
      "float64 values of workspace the reducing group-norm ops need (0 for CPU arrays).");

  m.def(
      "group_norm_stats",
      [](py::handle x, py::handle mean, py::handle var, uintptr_t stream, py::handle workspace) {
        const char* op = "group_norm_stats";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto V = as_array(var, op, "var", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&X, &M, &V, &WS},
            [&](const Launch& l) { group_norm_stats(X.view, M.view, V.view, l); });
      },
      py::arg("x"), py::arg("mean"), py::arg("var"), stream_arg, workspace_arg);

  m.def(
      "group_norm_affine",
      [](py::handle x, py::handle mean, py::handle scale, py::handle shift, py::handle y,
         uintptr_t stream) {
        const char* op = "group_norm_affine";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto SC = as_array(scale, op, "scale", Access::Read, stream);
        auto SH = as_array(shift, op, "shift", Access::Read, stream);
        auto Y = as_array(y, op, "y", Access::Write, stream);
        run(stream, Array{}, {&X, &M, &SC, &SH, &Y}, [&](const Launch& l) {
          group_norm_affine(X.view, M.view, SC.view, SH.view, Y.view, l);
        });
      },
      py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("shift"), py::arg("y"),
      stream_arg);

  m.def(
      "group_norm_forward",
      [](py::handle x, py::handle weight, py::handle bias, double eps, py::handle y,
         py::handle mean, py::handle var, py::handle rstd, uintptr_t stream,
         py::handle workspace) {
        const char* op = "group_norm_forward";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto B = as_array(bias, op, "bias", Access::Read, stream);
        auto Y = as_array(y, op, "y", Access::Write, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto V = as_array(var, op, "var", Access::Write, stream);
        auto R = as_array(rstd, op, "rstd", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&X, &W, &B, &Y, &M, &V, &R, &WS}, [&](const Launch& l) {
          group_norm_forward(X.view, W.view, B.view, eps, Y.view, M.view, V.view, R.view, l);
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("mean"), py::arg("var"), py::arg("rstd"), stream_arg, workspace_arg);

  m.def(
      "group_norm_backward_reduce",
      [](py::handle dy, py::handle x, py::handle mean, py::handle sum_dy, py::handle sum_dy_xmu,
         uintptr_t stream, py::handle workspace) {
        const char* op = "group_norm_backward_reduce";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&DY, &X, &M, &S1, &S2, &WS}, [&](const Launch& l) {
          group_norm_backward_reduce(DY.view, X.view, M.view, S1.view, S2.view, l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("sum_dy"), py::arg("sum_dy_xmu"),
      stream_arg, workspace_arg);

  m.def(
      "group_norm_backward_elemt",
      [](py::handle dy, py::handle x, py::handle mean, py::handle a, py::handle b, py::handle c,
         py::handle dx, uintptr_t stream) {
        const char* op = "group_norm_backward_elemt";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto PA = as_array(a, op, "a", Access::Read, stream);
        auto PB = as_array(b, op, "b", Access::Read, stream);
        auto PC = as_array(c, op, "c", Access::Read, stream);
        auto DX = as_array(dx, op, "dx", Access::Write, stream);
        run(stream, Array{}, {&DY, &X, &M, &PA, &PB, &PC, &DX}, [&](const Launch& l) {
          group_norm_backward_elemt(DY.view, X.view, M.view, PA.view, PB.view, PC.view, DX.view,
                                    l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("a"), py::arg("b"), py::arg("c"),
      py::arg("dx"), stream_arg);

  m.def(
      "group_norm_backward",
      [](py::handle dy, py::handle x, py::handle mean, py::handle rstd, py::handle weight,
         py::handle dx, py::handle sum_dy, py::handle sum_dy_xmu, uintptr_t stream,
         py::handle workspace) {
        const char* op = "group_norm_backward";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto R = as_array(rstd, op, "rstd", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto DX = as_array(dx, op, "dx", Access::Write, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&DY, &X, &M, &R, &W, &DX, &S1, &S2, &WS}, [&](const Launch& l) {
          group_norm_backward(DY.view, X.view, M.view, R.view, W.view, DX.view, S1.view, S2.view,
                              l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
      py::arg("dx"), py::arg("sum_dy"), py::arg("sum_dy_xmu"), stream_arg, workspace_arg);
}

}  // namespace normkit::bindings
