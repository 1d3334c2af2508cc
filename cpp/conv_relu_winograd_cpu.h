// Winograd convolutions for the CPU's stride-1 3 x 3 layers (VGG's conv1_2 .. conv5_3): F(m x m, 3 x 3) for the
// forward and dx, F(3 x 3, 2 x 2) for dW and db. Declared here, defined in conv_relu_winograd_cpu.cpp, called from
// conv_relu_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "conv_relu.h"

namespace fcnkern {

enum class WinogradPass { kForward, kDgrad, kWgrad };

// Whether the CPU kernel takes the Winograd path for this geometry and pass (dW's includes db).
bool use_winograd(const ConvGeometry& g, WinogradPass pass);

// y = act(conv(x, weight) + bias) for a geometry use_winograd(g, kForward) accepts; y any strides, x's dtype.
// Returns false, y partly written, where x or the weight holds inf or NaN: the transforms would turn an inf into
// NaN (inf - inf) where the direct form keeps it, so the caller computes such a call with the direct kernels.
bool winograd_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& y, const ConvGeometry& g, bool relu);

// dx = conv_transpose(grad * (y > 0 if relu), weight) for a geometry use_winograd(g, kDgrad) accepts: the stride-1
// transposed convolution is a 3 x 3 convolution of the masked gradient with the flipped, transposed weight and
// padding 2 - pad. dx any strides, x's dtype. Returns false like winograd_forward (non-finite dy' or weight).
bool winograd_dgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& dx,
                    const ConvGeometry& g, bool relu);

// dW (K x C/G x 3 x 3) where need_w and db (K) where need_b, in the accumulation type (fp32; fp64 for fp64), by
// F(3 x 3, 2 x 2) over the output's 2 x 2 tiles, for a geometry use_winograd(g, kWgrad) accepts. Returns false,
// nothing set, where x or dy' holds inf or NaN.
bool winograd_wgrad(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const ConvGeometry& g,
                    bool relu, bool need_w, bool need_b, at::Tensor& dw, at::Tensor& db);

}  // namespace fcnkern
