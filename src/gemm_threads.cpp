#include "normkit/gemm_threads.h"

#include <atomic>

#include "normkit/error.h"

namespace normkit {

namespace {
std::atomic<int> g_threads{1};
}  // namespace

void set_between_gemm_threads(int threads) {
  NK_CHECK_VALUE(threads >= 0, "set_between_gemm_threads: threads must be >= 0 (0: OpenMP's "
                 "default), got ", threads);
  g_threads.store(threads);
}

int between_gemm_threads() { return g_threads.load(); }

}  // namespace normkit
