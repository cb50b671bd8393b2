// Threads of the CPU kernels that run between the caller's matrix products: the Encoding family
// and im2col/col2im.
//
// Those kernels are called in alternation with the array library's BLAS, whose thread pool keeps
// spinning on the other cores for a while after each product (OpenBLAS's, NumPy's, for ~0.1 s).
// A second pool competing with it for the same cores loses more than its threads gain (on two
// cores, two threads made the Encoding's forward + backward 1.6-1.9x slower than one), so these
// kernels run on the calling thread unless told otherwise. Raise the count where the BLAS runs
// single-threaded, or leaves cores idle.
#pragma once

namespace normkit {

// 1 (the default): the calling thread; n > 1: up to n OpenMP threads; 0: OpenMP's default.
void set_between_gemm_threads(int threads);
int between_gemm_threads();

}  // namespace normkit
