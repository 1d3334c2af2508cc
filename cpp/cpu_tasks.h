// Task running and GEMM helpers shared by the CPU kernels that block their work and call ATen's BLAS GEMM.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

namespace fcnkern {

// Runs body(begin, end) over [0, tasks): spread across threads when there are enough tasks to go round, else on
// this thread, so that the GEMMs inside get ATen's threads instead (fc6 / fc7 have one or two pixel blocks).
inline bool spread_tasks(int64_t tasks) { return tasks >= 2 * at::get_num_threads(); }

template <typename Body>
void run_tasks(int64_t tasks, bool spread, const Body& body) {
  if (spread) {
    at::parallel_for(0, tasks, 1, body);
  } else {
    body(0, tasks);
  }
}

// A contiguous rows x cols acc_t matrix over a raw buffer, for at::mm_out / addmm_.
inline at::Tensor matrix(void* data, int64_t rows, int64_t cols, at::ScalarType acc) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(acc));
}

}  // namespace fcnkern
