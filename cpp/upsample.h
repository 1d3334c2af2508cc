// Geometry and argument checks shared by the CPU and CUDA kernels of fcnkern.upsample_crop and
// fcnkern.bilinear_upsample_crop.
#pragma once

#include <ATen/core/Tensor.h>

namespace fcnkern {

// A learned transposed convolution (weight Cin x Cout_g x kh x kw, stride sh x sw) cropped to the oh x ow window
// at (top, left) of its full (h - 1) s + k output.
struct UpGeometry {
  int64_t n, cin, h, w, cout, groups, cin_g, cout_g, kh, kw, sh, sw, top, left, oh, ow;
};

UpGeometry make_up_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef crop, int64_t out_h, int64_t out_w, int64_t groups);

void check_bilinear_args(const at::Tensor& x, int64_t factor, int64_t top, int64_t left, int64_t out_h,
                         int64_t out_w);

}  // namespace fcnkern
