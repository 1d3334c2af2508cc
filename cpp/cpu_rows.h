// Unit-stride fp32 (and bf16) row loops of the CPU convolution kernels, compiled once per ISA level (target_clones in
// cpu_rows.cpp). The kernels' generic loops take runtime strides and any dtype; GCC vectorises neither those nor,
// at the extension's baseline ISA, templates and lambdas, so the common case (NCHW fp32 rows) comes here.
#pragma once

#include <cstdint>
#include <cstring>

namespace fcnkern {

// dst[i] = src[i]
void copy_row_f(const float* src, int64_t width, float* dst);
// dst[i] = grad[i], or 0 where y[i] <= 0: PyTorch's ReLU backward (a NaN output passes its gradient). Written as a
// select: a branch on the mask was mispredicted enough to make these fills a third of a weight gradient.
void masked_row_f(const float* grad, const float* y, int64_t width, float* dst);
// dst[i] += src[i]
void add_row_f(const float* src, int64_t width, float* dst);
// dst[i] = src[i] + add, then max(., 0) if relu (NaN stays NaN, as torch.relu keeps it)
void bias_relu_row_f(const float* src, float add, bool relu, int64_t width, float* dst);

// The bf16 bit pattern of a float that holds a bf16 value (a bf16 tensor's element read as float): its top half.
inline __attribute__((always_inline)) uint32_t bf16_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits >> 16;
}

// The same loops for bf16 tensors, whose elements are passed as their bit patterns (c10::BFloat16's uint16_t):
// dst[i] = src[i] as float (exact)
void bf16_row_to_f(const uint16_t* src, int64_t width, float* dst);
// masked_row_f on bf16 grad and y, into floats
void masked_row_bf16(const uint16_t* grad, const uint16_t* y, int64_t width, float* dst);
// bias_relu_row_f into bf16, rounded to nearest even as c10::BFloat16's conversion rounds (a NaN becomes 0x7fc0)
void bias_relu_row_bf16(const float* src, float add, bool relu, int64_t width, uint16_t* dst);
// dst[i] = the bf16 bits of src[i], which holds a bf16 value (a bf16 tensor's element read as float): exact
void f_row_to_bf16_bits(const float* src, int64_t width, uint16_t* dst);
// dst[i] = the bf16 bits of lo[i] (low half) and hi[i] (high half), both holding bf16 values: two rows as channel
// pairs, the operand layout of AVX512-BF16's dot products
void bf16_pair_row(const float* lo, const float* hi, int64_t width, uint32_t* dst);
// Whether any of the n bf16 values is inf or NaN (exponent bits all ones)
bool any_non_finite_bf16(const uint16_t* v, int64_t n);

}  // namespace fcnkern
