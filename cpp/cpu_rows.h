// Unit-stride fp32 (and bf16) row loops of the CPU convolution kernels, compiled once per ISA level (target_clones in
// cpu_rows.cpp). The kernels' generic loops take runtime strides and any dtype; GCC vectorises neither those nor,
// at the extension's baseline ISA, templates and lambdas, so the common case (NCHW fp32 rows) comes here.
#pragma once

#include <cstdint>

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

// The same loops for bf16 tensors, whose elements are passed as their bit patterns (c10::BFloat16's uint16_t):
// dst[i] = src[i] as float (exact)
void bf16_row_to_f(const uint16_t* src, int64_t width, float* dst);
// masked_row_f on bf16 grad and y, into floats
void masked_row_bf16(const uint16_t* grad, const uint16_t* y, int64_t width, float* dst);
// bias_relu_row_f into bf16, rounded to nearest even as c10::BFloat16's conversion rounds (a NaN becomes 0x7fc0)
void bias_relu_row_bf16(const float* src, float add, bool relu, int64_t width, uint16_t* dst);
// Whether any of the n bf16 values is inf or NaN (exponent bits all ones)
bool any_non_finite_bf16(const uint16_t* v, int64_t n);

}  // namespace fcnkern
