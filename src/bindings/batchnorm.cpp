// Bindings of include/normkit/batchnorm.h. Arguments are positional arrays (None for an absent
// optional one); outputs are passed in, allocated by the caller's array library. Every op also
// takes `stream` (the cudaStream_t, as an int, that GPU work runs on: CuPy's or PyTorch's current
// stream; 0 is the legacy default stream) and `workspace` (a float64 array of
// batch_norm_workspace_size(x) values on x's device, for the ops that reduce); CPU arrays ignore
// both.
#include "normkit/batchnorm.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_batchnorm(py::module_& m) {
  const auto stream_arg = py::arg("stream") = uintptr_t(0);
  const auto workspace_arg = py::arg("workspace") = py::none();

  m.def(
      "batch_norm_workspace_size",
      [](py::handle x) {
        const char* op = "batch_norm_workspace_size";
        auto X = as_array(x, op, "x", Access::Shape);
        return batch_norm_workspace_size(X.view);
      },
      py::arg("x"),
      "float64 values of workspace the reducing batch-norm ops need for x (0 for CPU arrays).");

  m.def(
      "batch_norm_stats",
      [](py::handle x, py::handle mean, py::handle var, uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_stats";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto V = as_array(var, op, "var", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&X, &M, &V, &WS},
            [&](const Launch& l) { batch_norm_stats(X.view, M.view, V.view, l); });
      },
      py::arg("x"), py::arg("mean"), py::arg("var"), stream_arg, workspace_arg);

  m.def(
      "batch_norm_normalize",
      [](py::handle x, py::handle mean, py::handle invstd, py::handle weight, py::handle bias,
         py::handle y, uintptr_t stream) {
        const char* op = "batch_norm_normalize";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto I = as_array(invstd, op, "invstd", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto B = as_array(bias, op, "bias", Access::Read, stream);
        auto Y = as_array(y, op, "y", Access::Write, stream);
        run(stream, Array{}, {&X, &M, &I, &W, &B, &Y}, [&](const Launch& l) {
          batch_norm_normalize(X.view, M.view, I.view, W.view, B.view, Y.view, l);
        });
      },
      py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"),
      py::arg("y"), stream_arg);

  m.def(
      "batch_norm_forward_train",
      [](py::handle x, py::handle weight, py::handle bias, double eps, py::handle y,
         py::handle mean, py::handle var, py::handle invstd, py::handle running_mean,
         py::handle running_var, double momentum, uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_forward_train";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto B = as_array(bias, op, "bias", Access::Read, stream);
        auto Y = as_array(y, op, "y", Access::Write, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto V = as_array(var, op, "var", Access::Write, stream);
        auto I = as_array(invstd, op, "invstd", Access::Write, stream);
        auto RM = as_array(running_mean, op, "running_mean", Access::Write, stream);
        auto RV = as_array(running_var, op, "running_var", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&X, &W, &B, &Y, &M, &V, &I, &RM, &RV, &WS}, [&](const Launch& l) {
          batch_norm_forward_train(X.view, W.view, B.view, eps, Y.view, M.view, V.view, I.view,
                                   RM.view, RV.view, momentum, l);
        });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("y"),
      py::arg("mean"), py::arg("var"), py::arg("invstd"), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("momentum") = 0.0, stream_arg, workspace_arg,
      "The training forward; var, running_mean and running_var may be None (the running "
      "statistics, when given, are updated in place with momentum, as torch's).");

  m.def(
      "batch_norm_backward_reduce",
      [](py::handle dy, py::handle x, py::handle mean, py::handle sum_dy, py::handle sum_dy_xmu,
         uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_backward_reduce";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&DY, &X, &M, &S1, &S2, &WS}, [&](const Launch& l) {
          batch_norm_backward_reduce(DY.view, X.view, M.view, S1.view, S2.view, l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("sum_dy"), py::arg("sum_dy_xmu"),
      stream_arg, workspace_arg);

  m.def(
      "batch_norm_backward_elemt",
      [](py::handle dy, py::handle x, py::handle mean, py::handle invstd, py::handle weight,
         py::handle sum_dy, py::handle sum_dy_xmu, double count, py::handle dx,
         uintptr_t stream) {
        const char* op = "batch_norm_backward_elemt";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto I = as_array(invstd, op, "invstd", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Read, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Read, stream);
        auto DX = as_array(dx, op, "dx", Access::Write, stream);
        run(stream, Array{}, {&DY, &X, &M, &I, &W, &S1, &S2, &DX}, [&](const Launch& l) {
          batch_norm_backward_elemt(DY.view, X.view, M.view, I.view, W.view, S1.view, S2.view,
                                    count, DX.view, l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
      py::arg("sum_dy"), py::arg("sum_dy_xmu"), py::arg("count"), py::arg("dx"), stream_arg);

  m.def(
      "batch_norm_backward_train",
      [](py::handle dy, py::handle x, py::handle mean, py::handle invstd, py::handle weight,
         py::handle dx, py::handle sum_dy, py::handle sum_dy_xmu, py::handle dweight,
         uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_backward_train";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto I = as_array(invstd, op, "invstd", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto DX = as_array(dx, op, "dx", Access::Write, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write, stream);
        auto DW = as_array(dweight, op, "dweight", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&DY, &X, &M, &I, &W, &DX, &S1, &S2, &DW, &WS}, [&](const Launch& l) {
          batch_norm_backward_train(DY.view, X.view, M.view, I.view, W.view, DX.view, S1.view,
                                    S2.view, DW.view, l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
      py::arg("dx"), py::arg("sum_dy"), py::arg("sum_dy_xmu"), py::arg("dweight") = py::none(),
      stream_arg, workspace_arg,
      "The training backward; dx may be None; dweight (optional) gets sum_dy_xmu * invstd, and "
      "sum_dy_xmu may then be None.");

  m.def(
      "batch_norm_forward_train_masked",
      [](py::handle x, py::handle weight, py::handle bias, py::handle use_batch,
         py::handle running_mean, py::handle running_var, double eps, py::handle y,
         py::handle mean, py::handle var, py::handle used_mean, py::handle used_invstd,
         uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_forward_train_masked";
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto B = as_array(bias, op, "bias", Access::Read, stream);
        auto U = as_array(use_batch, op, "use_batch", Access::Read, stream);
        auto RM = as_array(running_mean, op, "running_mean", Access::Read, stream);
        auto RV = as_array(running_var, op, "running_var", Access::Read, stream);
        auto Y = as_array(y, op, "y", Access::Write, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto V = as_array(var, op, "var", Access::Write, stream);
        auto UM = as_array(used_mean, op, "used_mean", Access::Write, stream);
        auto UI = as_array(used_invstd, op, "used_invstd", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&X, &W, &B, &U, &RM, &RV, &Y, &M, &V, &UM, &UI, &WS},
            [&](const Launch& l) {
              batch_norm_forward_train_masked(X.view, W.view, B.view, U.view, RM.view, RV.view,
                                              eps, Y.view, M.view, V.view, UM.view, UI.view, l);
            });
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("use_batch"),
      py::arg("running_mean"), py::arg("running_var"), py::arg("eps"), py::arg("y"),
      py::arg("mean"), py::arg("var"), py::arg("used_mean"), py::arg("used_invstd"), stream_arg,
      workspace_arg);

  m.def(
      "batch_norm_backward_train_masked",
      [](py::handle dy, py::handle x, py::handle mean, py::handle invstd, py::handle weight,
         py::handle use_batch, py::handle dx, py::handle sum_dy, py::handle sum_dy_xmu,
         uintptr_t stream, py::handle workspace) {
        const char* op = "batch_norm_backward_train_masked";
        auto DY = as_array(dy, op, "dy", Access::Read, stream);
        auto X = as_array(x, op, "x", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto I = as_array(invstd, op, "invstd", Access::Read, stream);
        auto W = as_array(weight, op, "weight", Access::Read, stream);
        auto U = as_array(use_batch, op, "use_batch", Access::Read, stream);
        auto DX = as_array(dx, op, "dx", Access::Write, stream);
        auto S1 = as_array(sum_dy, op, "sum_dy", Access::Write, stream);
        auto S2 = as_array(sum_dy_xmu, op, "sum_dy_xmu", Access::Write, stream);
        auto WS = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, WS, {&DY, &X, &M, &I, &W, &U, &DX, &S1, &S2, &WS}, [&](const Launch& l) {
          batch_norm_backward_train_masked(DY.view, X.view, M.view, I.view, W.view, U.view,
                                           DX.view, S1.view, S2.view, l);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("weight"),
      py::arg("use_batch"), py::arg("dx"), py::arg("sum_dy"), py::arg("sum_dy_xmu"), stream_arg,
      workspace_arg);
}

}  // namespace normkit::bindings
