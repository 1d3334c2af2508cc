// Registers the CUDA implementations (cuda_ops.h) with the dispatcher; built only with the CUDA part.
#include <torch/library.h>

#include "cuda_ops.h"

TORCH_LIBRARY_IMPL(fcnkern, CUDA, m) {
  m.impl("pixelwise_ce_fwd", &fcnkern::pixelwise_ce_fwd_cuda);
  m.impl("pixelwise_ce_bwd", &fcnkern::pixelwise_ce_bwd_cuda);
  m.impl("pixelwise_ce_fwd_grad", &fcnkern::pixelwise_ce_fwd_grad_cuda);
  m.impl("pixelwise_ce_scale_grad_", &fcnkern::pixelwise_ce_scale_grad_cuda);
  m.impl("bilinear_upsample_crop", &fcnkern::bilinear_upsample_crop_cuda);
  m.impl("bilinear_upsample_crop_bwd", &fcnkern::bilinear_upsample_crop_bwd_cuda);
  m.impl("upsample_crop", &fcnkern::upsample_crop_cuda);
  m.impl("upsample_crop_bwd", &fcnkern::upsample_crop_bwd_cuda);
  m.impl("upsample_ce_fwd", &fcnkern::upsample_ce_fwd_cuda);
  m.impl("upsample_ce_bwd", &fcnkern::upsample_ce_bwd_cuda);
  m.impl("conv2d_relu", &fcnkern::conv2d_relu_cuda);
  m.impl("conv2d_relu_bwd", &fcnkern::conv2d_relu_bwd_cuda);
}
