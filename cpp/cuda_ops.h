// The CUDA implementations of fcnkern's operators (schemas in ops.cpp), defined in the *_cuda.cu files and registered
// with the dispatcher by cuda_ops.cpp. Registration lives in a host-compiled .cpp because torch/library.h costs each
// .cu about 20 s of nvcc time (its front end parses it once for the host and once per device architecture).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace fcnkern {

// cross_entropy_cuda.cu
std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_grad_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t ignore_index);
at::Tensor pixelwise_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                 int64_t ignore_index);
void pixelwise_ce_scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale);

// upsample_cuda.cu
at::Tensor bilinear_upsample_crop_cuda(const at::Tensor& x, int64_t factor, int64_t top, int64_t left, int64_t out_h,
                                       int64_t out_w);
at::Tensor bilinear_upsample_crop_bwd_cuda(const at::Tensor& grad, int64_t factor, int64_t top, int64_t left,
                                           int64_t in_h, int64_t in_w);
at::Tensor upsample_crop_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef crop, at::IntArrayRef out_size,
                              int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_crop_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       at::IntArrayRef stride, at::IntArrayRef crop,
                                                                       int64_t groups, std::array<bool, 3> mask);

// upsample_ce_cuda.cu
std::tuple<at::Tensor, at::Tensor> upsample_ce_fwd_cuda(const at::Tensor& scores, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight, int64_t factor,
                                                        int64_t top, int64_t left, int64_t ignore_index,
                                                        bool with_grad);
at::Tensor upsample_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& scores, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t factor, int64_t top, int64_t left,
                                int64_t ignore_index);

// conv_relu_cuda.cu
at::Tensor conv2d_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_bwd_cuda(const at::Tensor& grad, const at::Tensor& y,
                                                                    const at::Tensor& x, const at::Tensor& weight,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                                    at::IntArrayRef dilation, int64_t groups,
                                                                    bool relu, std::array<bool, 3> output_mask);

}  // namespace fcnkern
