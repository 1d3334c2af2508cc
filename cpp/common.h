// Helpers shared by every fcnkern operator, on both devices.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <string_view>

// Marks functions that the CUDA kernels call and that CPU-side tests of their index arithmetic call too.
#ifdef __CUDACC__
#define FCNK_HD __host__ __device__
#else
#define FCNK_HD
#endif

namespace fcnkern {

// Dtype the kernels accumulate in: fp64 for fp64 inputs (gradchecks), fp32 for everything else.
inline at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The value of environment variable `name`, "" where it is unset: the CPU kernels' path knobs (FCNKERN_CONV_*), read
// per call so that A/B measurements and tests can switch paths in one process.
inline std::string_view env_setting(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

// With FCNKERN_POISON=1 in the environment, fresh outputs are filled with NaN before a kernel runs, so that the
// parity tests see every element a kernel forgot to write. Off (and free) otherwise.
bool poison_enabled();
void maybe_poison(const at::Tensor& out);

}  // namespace fcnkern
