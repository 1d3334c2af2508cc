// Accumulation-dtype math for the CUDA kernels: fp32's fast expf/logf for float, the double versions otherwise.
#pragma once

namespace fcnkern {

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  return ::exp(x);
}
template <>
__device__ __forceinline__ float exp_acc<float>(float x) {
  return ::expf(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t log_acc(acc_t x) {
  return ::log(x);
}
template <>
__device__ __forceinline__ float log_acc<float>(float x) {
  return ::logf(x);
}

}  // namespace fcnkern
