// Private to the CPU sources: splitting work among OpenMP threads in contiguous ranges that depend
// only on the thread count, so that reductions merged in thread order are reproducible.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "normkit/gemm_threads.h"

#if defined(NORMKIT_ISA_CLONES) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Hot loops compiled for AVX-512, AVX2 and baseline x86-64, picked when the module loads.
#define NK_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NK_HOT
#endif

namespace normkit::cpu {

// Threads worth using for `work` units when each thread should get at least `grain` of them.
inline int threads_for(int64_t work, int64_t grain) {
#ifdef _OPENMP
  const int64_t wanted = std::max<int64_t>(1, work / grain);
  return static_cast<int>(std::min<int64_t>(wanted, omp_get_max_threads()));
#else
  (void)work;
  (void)grain;
  return 1;
#endif
}

// threads_for, capped by the setting of the kernels that run between the caller's GEMMs.
inline int threads_between_gemms(int64_t work, int64_t grain) {
  const int cap = between_gemm_threads();
  const int wanted = threads_for(work, grain);
  return cap == 0 ? wanted : std::min(wanted, cap);
}

// Runs body(tid, first, last) with [first, last) thread tid's share of [0, count), on nthreads
// threads. Bodies must not throw.
template <class Body>
void parallel_ranges(int nthreads, int64_t count, Body&& body) {
  auto run = [&](int tid, int nt) { body(tid, count * tid / nt, count * (tid + 1) / nt); };
#ifdef _OPENMP
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    run(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  run(0, 1);
}

}  // namespace normkit::cpu
