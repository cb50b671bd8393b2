// Bindings of include/normkit/encoding.h. Arguments are positional arrays (None for an absent
// optional one); outputs are passed in, allocated by the caller's array library.
#include "normkit/encoding.h"
#include "normkit/gemm_threads.h"

#include "array.h"
#include "module.h"

namespace normkit::bindings {

void bind_encoding(py::module_& m) {
  m.attr("encoding_cancellation_ratio") = kCancellationRatio;
  m.def("set_between_gemm_threads", &set_between_gemm_threads, py::arg("threads"),
        "Threads of the CPU kernels run between BLAS products (Encoding family, im2col/col2im): "
        "1 (default) the calling thread, 0 OpenMP's default.");
  m.def("between_gemm_threads", &between_gemm_threads);
  m.def("scaled_l2_forward", [](py::handle X, py::handle C, py::handle s, py::handle XC,
                                py::handle D2, py::handle SL) {
    const char* op = "scaled_l2_forward";
    auto x = as_array(X, op, "X", Access::Read), c = as_array(C, op, "C", Access::Read);
    auto sv = as_array(s, op, "s", Access::Read), xc = as_array(XC, op, "XC", Access::Read);
    auto d2 = as_array(D2, op, "D2", Access::Write), sl = as_array(SL, op, "SL", Access::Write);
    without_gil([&] { scaled_l2_forward(x.view, c.view, sv.view, xc.view, d2.view, sl.view); });
  });
  m.def("scaled_l2_backward", [](py::handle dSL, py::handle s, py::handle D2, py::handle W,
                                 py::handle r, py::handle sumW, py::handle ds) {
    const char* op = "scaled_l2_backward";
    auto g = as_array(dSL, op, "dSL", Access::Read), sv = as_array(s, op, "s", Access::Read);
    auto d2 = as_array(D2, op, "D2", Access::Read), w = as_array(W, op, "W", Access::Write);
    auto rv = as_array(r, op, "r", Access::Write), sw = as_array(sumW, op, "sumW", Access::Write);
    auto dsv = as_array(ds, op, "ds", Access::Write);
    without_gil([&] {
      scaled_l2_backward(g.view, sv.view, d2.view, w.view, rv.view, sw.view, dsv.view);
    });
  });
  m.def("encoding_forward", [](py::handle X, py::handle C, py::handle s, py::handle XC,
                               py::handle D2, py::handle A, py::handle sumA) {
    const char* op = "encoding_forward";
    auto x = as_array(X, op, "X", Access::Read), c = as_array(C, op, "C", Access::Read);
    auto sv = as_array(s, op, "s", Access::Read), xc = as_array(XC, op, "XC", Access::Read);
    auto d2 = as_array(D2, op, "D2", Access::Write), a = as_array(A, op, "A", Access::Write);
    auto sa = as_array(sumA, op, "sumA", Access::Write);
    without_gil([&] {
      encoding_forward(x.view, c.view, sv.view, xc.view, d2.view, a.view, sa.view);
    });
  });
  m.def("encoding_backward", [](py::handle G, py::handle C, py::handle s, py::handle A,
                                py::handle D2, py::handle XG, py::handle W, py::handle r,
                                py::handle sumW, py::handle sumA, py::handle ds) {
    const char* op = "encoding_backward";
    auto g = as_array(G, op, "G", Access::Read), c = as_array(C, op, "C", Access::Read);
    auto sv = as_array(s, op, "s", Access::Read), a = as_array(A, op, "A", Access::Read);
    auto d2 = as_array(D2, op, "D2", Access::Read), xg = as_array(XG, op, "XG", Access::Read);
    auto w = as_array(W, op, "W", Access::Write), rv = as_array(r, op, "r", Access::Write);
    auto sw = as_array(sumW, op, "sumW", Access::Write);
    auto sa = as_array(sumA, op, "sumA", Access::Write);
    auto dsv = as_array(ds, op, "ds", Access::Write);
    without_gil([&] {
      encoding_backward(g.view, c.view, sv.view, a.view, d2.view, xg.view, w.view, rv.view,
                        sw.view, sa.view, dsv.view);
    });
  });
  m.def("add_scaled_features", [](py::handle X, py::handle r, py::handle dX) {
    const char* op = "add_scaled_features";
    auto x = as_array(X, op, "X", Access::Read), rv = as_array(r, op, "r", Access::Read);
    auto dx = as_array(dX, op, "dX", Access::Write);
    without_gil([&] { add_scaled_features(x.view, rv.view, dx.view); });
  });
}

}  // namespace normkit::bindings
