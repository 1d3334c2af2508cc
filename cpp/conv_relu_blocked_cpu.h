// Register-blocked direct convolution for the CPU's small stride-1 layers (few channels, small maps), where
// im2col + GEMM ran at 0.4-0.8x oneDNN's own convolution: FMA micro-kernels over a zero-padded fp32 copy of the
// input rows (bf16 layers: AVX512-BF16 dot products over a bf16 copy, where the CPU has them), for the forward and
// for dx (the stride-1 transposed convolution, a convolution of dy' with the flipped, transposed weight). Declared
// here, defined in conv_relu_blocked_cpu.cpp, called from conv_relu_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "conv_relu.h"

namespace fcnkern {

enum class BlockedPass { kForward, kDgrad, kWgrad };

// Whether bf16 layers on the direct path run on the AVX512-BF16 dot-product kernels (the CPU has AVX512-BF16 and
// FCNKERN_CONV_BF16_DOT is not "0"); otherwise they compute in fp32 like fp16 layers.
bool blocked_bf16_dot_available();

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
