// Bindings of include/normkit/wsconv.h. Arrays are positional (None for an absent optional one);
// outputs are passed in, allocated by the caller's array library. `convention` is the int of
// WSConvention (0 elektronn3, 1 nfnet, 2 timm); `stream` is the cudaStream_t GPU work runs on.
#include "normkit/wsconv.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_wsconv(py::module_& m) {
  const auto stream_arg = py::arg("stream") = uintptr_t(0);

  m.def(
      "ws_standardize_forward",
      [](py::handle w, py::handle gain, int64_t convention, double eps, py::handle w_hat,
         py::handle mean, py::handle rstd, uintptr_t stream) {
        const char* op = "ws_standardize_forward";
        const WSConvention c = ws_convention(convention);
        auto W = as_array(w, op, "w", Access::Read, stream);
        auto G = as_array(gain, op, "gain", Access::Read, stream);
        auto Y = as_array(w_hat, op, "w_hat", Access::Write, stream);
        auto M = as_array(mean, op, "mean", Access::Write, stream);
        auto R = as_array(rstd, op, "rstd", Access::Write, stream);
        run(stream, Array{}, {&W, &G, &Y, &M, &R}, [&](const Launch& l) {
          ws_standardize_forward(W.view, G.view, c, eps, Y.view, M.view, R.view, l);
        });
      },
      py::arg("w"), py::arg("gain"), py::arg("convention"), py::arg("eps"), py::arg("w_hat"),
      py::arg("mean"), py::arg("rstd"), stream_arg,
      "w_hat = (w - mean) * gain * rstd per channel of dim 0; writes mean and rstd.");

  m.def(
      "ws_standardize_backward",
      [](py::handle dw_hat, py::handle w, py::handle gain, py::handle mean, py::handle rstd,
         int64_t convention, double eps, py::handle dw, py::handle dgain, uintptr_t stream) {
        const char* op = "ws_standardize_backward";
        const WSConvention c = ws_convention(convention);
        auto DY = as_array(dw_hat, op, "dw_hat", Access::Read, stream);
        auto W = as_array(w, op, "w", Access::Read, stream);
        auto G = as_array(gain, op, "gain", Access::Read, stream);
        auto M = as_array(mean, op, "mean", Access::Read, stream);
        auto R = as_array(rstd, op, "rstd", Access::Read, stream);
        auto DW = as_array(dw, op, "dw", Access::Write, stream);
        auto DG = as_array(dgain, op, "dgain", Access::Write, stream);
        run(stream, Array{}, {&DY, &W, &G, &M, &R, &DW, &DG}, [&](const Launch& l) {
          ws_standardize_backward(DY.view, W.view, G.view, M.view, R.view, c, eps, DW.view,
                                  DG.view, l);
        });
      },
      py::arg("dw_hat"), py::arg("w"), py::arg("gain"), py::arg("mean"), py::arg("rstd"),
      py::arg("convention"), py::arg("eps"), py::arg("dw"), py::arg("dgain"), stream_arg,
      "dw and dgain (either may be None) of ws_standardize_forward from dw_hat.");
}

}  // namespace normkit::bindings
