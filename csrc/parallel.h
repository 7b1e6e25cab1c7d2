// Splitting independent rows over OpenMP threads. A process has one libgomp, so these threads are the team that
// torch's CPU ops (and vLLM's CPU worker) use: after an op its workers spin for a while, and a parallel region here
// hands them work at once, where a separate thread pool would wake up beside them and compete for the same cores.
#pragma once

#include <omp.h>

#include <cstdint>

namespace nq {

// run(begin, end) over contiguous, near-equal parts of [0, rows), one per thread (at most `threads`).
template <class Run>
void parallel_rows(int64_t rows, int threads, const Run& run) {
  if (threads <= 1 || rows <= 1) {
    run(int64_t{0}, rows);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    run(rows * t / n, rows * (t + 1) / n);
  }
}

}  // namespace nq
