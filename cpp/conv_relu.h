// ConvGeometry and argument checks of the fused Conv2d + ReLU (fcnkern.conv2d_relu), shared by the CPU and CUDA kernels.
//
// x N x C x H x W, weight K x C/groups x R x S, output N x K x OH x OW; J = C/groups * R * S is the reduction length
// of one group's implicit GEMM.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>

namespace fcnkern {

struct ConvGeometry {
  int64_t n, c, h, w, k, r, s, oh, ow, groups, c_g, k_g, j;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

inline ConvGeometry make_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "stride, padding and dilation must have two entries each");
  ConvGeometry g{};
  g.n = x.size(0), g.c = x.size(1), g.h = x.size(2), g.w = x.size(3);
  g.k = weight.size(0), g.r = weight.size(2), g.s = weight.size(3);
  g.groups = groups, g.c_g = weight.size(1), g.k_g = g.k / std::max<int64_t>(groups, 1);
  g.stride_h = stride[0], g.stride_w = stride[1], g.pad_h = padding[0], g.pad_w = padding[1];
  g.dil_h = dilation[0], g.dil_w = dilation[1];
  g.oh = (g.h + 2 * g.pad_h - g.dil_h * (g.r - 1) - 1) / std::max<int64_t>(g.stride_h, 1) + 1;
  g.ow = (g.w + 2 * g.pad_w - g.dil_w * (g.s - 1) - 1) / std::max<int64_t>(g.stride_w, 1) + 1;
  g.j = g.c_g * g.r * g.s;
  return g;
}

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g) {
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4, "x and weight must be 4-d");
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  TORCH_CHECK_VALUE(x.device() == weight.device(), "x and weight must be on one device");
  TORCH_CHECK_VALUE(g.c_g >= 1 && g.k >= 1, "weight ", weight.sizes(), " has no input or output channels");
  TORCH_CHECK_VALUE(g.groups >= 1 && g.k % g.groups == 0 && g.c == g.c_g * g.groups,
                    "weight ", weight.sizes(), " with groups=", g.groups, " does not fit ", g.c, " input channels");
  TORCH_CHECK_VALUE(g.stride_h >= 1 && g.stride_w >= 1 && g.dil_h >= 1 && g.dil_w >= 1 && g.pad_h >= 0 &&
                        g.pad_w >= 0,
                    "need stride >= 1, dilation >= 1, padding >= 0");
  TORCH_CHECK_VALUE(g.oh >= 1 && g.ow >= 1, "the padded input is smaller than the dilated kernel");
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, const ConvGeometry& g) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.k, "bias must be a vector of ", g.k);
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype");
}

// The backward's output gradient and saved output against the forward's geometry.
inline void check_bwd_args(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& x, const ConvGeometry& g) {
  TORCH_CHECK_VALUE(grad.sizes() == y.sizes() && y.dim() == 4 && y.size(0) == g.n && y.size(1) == g.k &&
                        y.size(2) == g.oh && y.size(3) == g.ow,
                    "grad and y must be the N x K x OH x OW output of this convolution");
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type(),
                   "grad, y and x must have one dtype");
}

}  // namespace fcnkern
