// Register-blocked direct convolution for the CPU's small stride-1 layers (few channels, small maps), where
// im2col + GEMM ran at 0.4-0.8x oneDNN's own convolution: FMA micro-kernels over a zero-padded fp32 copy of the
// input rows (bf16 layers: AVX512-BF16 dot products over a bf16 copy, where the CPU has them), for the forward and
// for dx (the stride-1 transposed convolution, a convolution of dy' with the flipped, transposed weight). Declared
// here, defined in conv_relu_blocked_cpu.cpp, called from conv_relu_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <optional>

#include "conv_relu.h"

namespace fcnkern {

enum class BlockedPass { kForward, kDgrad, kWgrad };

// Whether a pass whose operands have these dtypes runs on the AVX512-BF16 dot-product kernels: every one bf16 (their
// products are then exact in fp32 either way), a CPU with AVX512-BF16, and FCNKERN_CONV_BF16_DOT not "0" (read per
// call, for A/B measurements and the tests). Otherwise bf16 layers compute in fp32 like fp16 layers.
bool bf16_dot_products(std::initializer_list<at::ScalarType> operands);

// GEMMs of bf16 operands on the same dot-product micro-kernel, for the batch-wide GEMMs of bf16 layers where
// bf16_dot_products(): out (M x N, fp32, any strides) = a @ b, or += where !overwrite, each product exact
// in fp32. The operands are packed from bf16 tensors (any strides) by word copies: the left one (pack_bf16_left:
// a, M x K) as [ceil(M / 8)][ceil(K / 2)][8] int32 of bf16 pairs along K, the right one (pack_bf16_right: b, K x N)
// as [ceil(K / 2)][N rounded up to 48] int32 of pairs along K, zero past K and N.
at::Tensor pack_bf16_left(const at::Tensor& a);
at::Tensor pack_bf16_right(const at::Tensor& b);
void gemm_bf16(const at::Tensor& out, const at::Tensor& left, const at::Tensor& right, int64_t depth, bool overwrite);

// Whether the CPU kernel takes the direct path for this geometry and pass (FCNKERN_CONV_BLOCKED=0|fwd|all overrides).
bool use_blocked(const ConvGeometry& g, BlockedPass pass);

// y = act(conv(x, weight) + bias) for a geometry use_blocked(g, kForward) accepts; x and y any strides and layout.
void blocked_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& y, const ConvGeometry& g, bool relu);

// dx = conv_transpose(grad * (y > 0 if relu), weight) for a geometry use_blocked(g, kDgrad) accepts; dx any strides.
void blocked_dgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& dx,
                  const ConvGeometry& g, bool relu);

// dW (K x C/G x R x S) where need_w and db (K) where need_b, in fp32, for a geometry use_blocked(g, kWgrad) accepts.
// Returns false, with dw and db undefined, where x holds an inf or NaN (the caller's GEMM path computes them then).
bool blocked_wgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const ConvGeometry& g, bool relu,
                   bool need_w, bool need_b, at::Tensor& dw, at::Tensor& db);

}  // namespace fcnkern
