// Bindings of include/normkit/encoding.h. Arguments are positional arrays (None for an absent
// optional one); outputs are passed in, allocated by the caller's array library. Every op also
// takes `stream` (the cudaStream_t, as an int, that GPU work runs on; 0 is the legacy default
// stream), and all but add_scaled_features `workspace` (a float64 array of
// encoding_workspace_size(B, N, K) values on the arrays' device); CPU arrays ignore both.
#include "normkit/encoding.h"
#include "normkit/gemm_threads.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_encoding(py::module_& m) {
  const auto stream_arg = py::arg("stream") = uintptr_t(0);
  const auto workspace_arg = py::arg("workspace") = py::none();

  m.attr("encoding_cancellation_ratio") = kCancellationRatio;
  m.def("set_between_gemm_threads", &set_between_gemm_threads, py::arg("threads"),
        "Threads of the CPU kernels run between BLAS products (Encoding family, im2col/col2im): "
        "1 (default) the calling thread, 0 OpenMP's default.");
  m.def("between_gemm_threads", &between_gemm_threads);
  m.def("encoding_workspace_size", &encoding_workspace_size, py::arg("B"), py::arg("N"),
        py::arg("K"),
        "float64 values of workspace the encoding ops need on CUDA arrays for B batches of N "
        "rows and K codewords.");

  m.def(
      "scaled_l2_forward",
      [](py::handle X, py::handle C, py::handle s, py::handle XC, py::handle D2, py::handle SL,
         uintptr_t stream, py::handle workspace) {
        const char* op = "scaled_l2_forward";
        auto x = as_array(X, op, "X", Access::Read, stream);
        auto c = as_array(C, op, "C", Access::Read, stream);
        auto sv = as_array(s, op, "s", Access::Read, stream);
        auto xc = as_array(XC, op, "XC", Access::Read, stream);
        auto d2 = as_array(D2, op, "D2", Access::Write, stream);
        auto sl = as_array(SL, op, "SL", Access::Write, stream);
        auto ws = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, ws, {&x, &c, &sv, &xc, &d2, &sl, &ws}, [&](const Launch& l) {
          scaled_l2_forward(x.view, c.view, sv.view, xc.view, d2.view, sl.view, l);
        });
      },
      py::arg("X"), py::arg("C"), py::arg("s"), py::arg("XC"), py::arg("D2"), py::arg("SL"),
      stream_arg, workspace_arg);

  m.def(
      "scaled_l2_backward",
      [](py::handle dSL, py::handle s, py::handle D2, py::handle W, py::handle r,
         py::handle sumW, py::handle ds, uintptr_t stream, py::handle workspace) {
        const char* op = "scaled_l2_backward";
        auto g = as_array(dSL, op, "dSL", Access::Read, stream);
        auto sv = as_array(s, op, "s", Access::Read, stream);
        auto d2 = as_array(D2, op, "D2", Access::Read, stream);
        auto w = as_array(W, op, "W", Access::Write, stream);
        auto rv = as_array(r, op, "r", Access::Write, stream);
        auto sw = as_array(sumW, op, "sumW", Access::Write, stream);
        auto dsv = as_array(ds, op, "ds", Access::Write, stream);
        auto wsp = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, wsp, {&g, &sv, &d2, &w, &rv, &sw, &dsv, &wsp}, [&](const Launch& l) {
          scaled_l2_backward(g.view, sv.view, d2.view, w.view, rv.view, sw.view, dsv.view, l);
        });
      },
      py::arg("dSL"), py::arg("s"), py::arg("D2"), py::arg("W"), py::arg("r"), py::arg("sumW"),
      py::arg("ds"), stream_arg, workspace_arg);

  m.def(
      "encoding_forward",
      [](py::handle X, py::handle C, py::handle s, py::handle XC, py::handle D2, py::handle A,
         py::handle sumA, uintptr_t stream, py::handle workspace) {
        const char* op = "encoding_forward";
        auto x = as_array(X, op, "X", Access::Read, stream);
        auto c = as_array(C, op, "C", Access::Read, stream);
        auto sv = as_array(s, op, "s", Access::Read, stream);
        auto xc = as_array(XC, op, "XC", Access::Read, stream);
        auto d2 = as_array(D2, op, "D2", Access::Write, stream);
        auto a = as_array(A, op, "A", Access::Write, stream);
        auto sa = as_array(sumA, op, "sumA", Access::Write, stream);
        auto ws = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, ws, {&x, &c, &sv, &xc, &d2, &a, &sa, &ws}, [&](const Launch& l) {
          encoding_forward(x.view, c.view, sv.view, xc.view, d2.view, a.view, sa.view, l);
        });
      },
      py::arg("X"), py::arg("C"), py::arg("s"), py::arg("XC"), py::arg("D2"), py::arg("A"),
      py::arg("sumA"), stream_arg, workspace_arg);

  m.def(
      "encoding_backward",
      [](py::handle G, py::handle C, py::handle s, py::handle A, py::handle D2, py::handle XG,
         py::handle W, py::handle r, py::handle sumW, py::handle sumA, py::handle ds,
         uintptr_t stream, py::handle workspace) {
        const char* op = "encoding_backward";
        auto g = as_array(G, op, "G", Access::Read, stream);
        auto c = as_array(C, op, "C", Access::Read, stream);
        auto sv = as_array(s, op, "s", Access::Read, stream);
        auto a = as_array(A, op, "A", Access::Read, stream);
        auto d2 = as_array(D2, op, "D2", Access::Read, stream);
        auto xg = as_array(XG, op, "XG", Access::Read, stream);
        auto w = as_array(W, op, "W", Access::Write, stream);
        auto rv = as_array(r, op, "r", Access::Write, stream);
        auto sw = as_array(sumW, op, "sumW", Access::Write, stream);
        auto sa = as_array(sumA, op, "sumA", Access::Write, stream);
        auto dsv = as_array(ds, op, "ds", Access::Write, stream);
        auto wsp = as_array(workspace, op, "workspace", Access::Write, stream);
        run(stream, wsp, {&g, &c, &sv, &a, &d2, &xg, &w, &rv, &sw, &sa, &dsv, &wsp},
            [&](const Launch& l) {
              encoding_backward(g.view, c.view, sv.view, a.view, d2.view, xg.view, w.view,
                                rv.view, sw.view, sa.view, dsv.view, l);
            });
      },
      py::arg("G"), py::arg("C"), py::arg("s"), py::arg("A"), py::arg("D2"), py::arg("XG"),
      py::arg("W"), py::arg("r"), py::arg("sumW"), py::arg("sumA"), py::arg("ds"), stream_arg,
      workspace_arg);

  m.def(
      "add_scaled_features",
      [](py::handle X, py::handle r, py::handle dX, uintptr_t stream) {
        const char* op = "add_scaled_features";
        auto x = as_array(X, op, "X", Access::Read, stream);
        auto rv = as_array(r, op, "r", Access::Read, stream);
        auto dx = as_array(dX, op, "dX", Access::Write, stream);
        run(stream, Array{}, {&x, &rv, &dx},
            [&](const Launch& l) { add_scaled_features(x.view, rv.view, dx.view, l); });
      },
      py::arg("X"), py::arg("r"), py::arg("dX"), stream_arg);
}

}  // namespace normkit::bindings
