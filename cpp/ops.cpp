// Registers fcnkern's C++/CUDA operators with the PyTorch dispatcher.
//
// Schemas live here; each device's implementation registers itself with TORCH_LIBRARY_IMPL in its own source
// file, so a build without nvcc simply has no CUDA kernel for these ops. Fake (meta) kernels and autograd are
// registered from Python (fcnkern/_ext.py), as in PyTorch's custom-op tutorial.
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "common.h"
#include "conv_relu_blocked_cpu.h"
#include "cpu_tasks.h"
#include "cross_entropy.h"
#include "large_block_cache.h"

namespace fcnkern {

bool poison_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FCNKERN_POISON");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

void maybe_poison(const at::Tensor& out) {
  if (poison_enabled() && out.numel() > 0) out.fill_(std::numeric_limits<double>::quiet_NaN());
}

void check_ce_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(logits.dim() == 4, "logits must be N x C x H x W, got ", logits.dim(), " dimensions");
  TORCH_CHECK_VALUE(target.dim() == 3, "target must be N x H x W, got ", target.dim(), " dimensions");
  TORCH_CHECK_VALUE(logits.size(0) == target.size(0) && logits.size(2) == target.size(1) &&
                        logits.size(3) == target.size(2),
                    "target shape ", target.sizes(), " does not match logits shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits need at least one class (C > 0)");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                       logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kDouble,
                   "logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == logits.device(), "target is on ", target.device(), " but logits on ",
                    logits.device());
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == logits.size(1), "weight must be a vector of ",
                      logits.size(1), " class weights, got shape ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == logits.device(), "weight is on ", weight->device(), " but logits on ",
                      logits.device());
    const auto acc = acc_type_of(logits);
    TORCH_CHECK_TYPE(weight->scalar_type() == acc, "weight must be ", acc, " (the computation dtype), got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->is_contiguous(), "weight must be contiguous");
  }
}

void check_ce_scale_args(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.is_non_overlapping_and_dense(), "grad must be dense (no gaps, no overlaps)");
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.scalar_type() == acc_type_of(grad) && scale.device() == grad.device(),
                    "scale must be one ", acc_type_of(grad), " value on ", grad.device());
}

// Reading the CPU scale is free; the rule is the CUDA kernel's (zeros stay zero, 1 leaves grad untouched).
void pixelwise_ce_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  check_ce_scale_args(grad, scale);
  const double s = scale.item<double>();
  if (s == 1.0 || grad.numel() == 0) return;
  grad.copy_(at::where(grad != 0, grad.to(scale.scalar_type()) * s, at::zeros_like(grad)));
}

void check_ce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& stats) {
  const auto n = logits.size(0), h = logits.size(2), w = logits.size(3);
  const auto acc = acc_type_of(logits);
  TORCH_CHECK_VALUE(grad_loss.dim() == 3 && grad_loss.size(0) == n && grad_loss.size(1) == h &&
                        grad_loss.size(2) == w && grad_loss.scalar_type() == acc,
                    "grad_loss must be a ", acc, " N x H x W tensor (strides may be 0)");
  TORCH_CHECK_VALUE(stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == n && stats.size(2) == h &&
                        stats.size(3) == w && stats.scalar_type() == acc && stats.is_contiguous(),
                    "stats must be the contiguous ", acc, " 2 x N x H x W tensor returned by the forward");
  TORCH_CHECK_VALUE(grad_loss.device() == logits.device() && stats.device() == logits.device(),
                    "grad_loss, stats and logits must be on one device");
}

}  // namespace fcnkern

TORCH_LIBRARY(fcnkern, m) {
  m.def("pixelwise_ce_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "pixelwise_ce_fwd_grad(Tensor logits, Tensor target, Tensor? weight, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "pixelwise_ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "int ignore_index) -> Tensor");
  m.def("pixelwise_ce_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  // Fixed bilinear upsampling by `factor`, cropped to rows top:top+out_h and columns left:left+out_w.
  m.def("bilinear_upsample_crop(Tensor x, int factor, int top, int left, int out_h, int out_w) -> Tensor");
  // Conv2d (+ ReLU when relu): y = relu(conv2d(x, weight, bias, stride, padding, dilation, groups)).
  m.def(
      "conv2d_relu(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool relu) -> Tensor");
  // Its gradients (dx, dweight, dbias) for the saved output y, as output_mask asks; zero-size where not asked.
  m.def(
      "conv2d_relu_bwd(Tensor grad, Tensor y, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("bilinear_upsample_crop_bwd(Tensor grad, int factor, int top, int left, int in_h, int in_w) -> Tensor");
  // Learned transposed conv, cropped: conv_transpose2d(x, weight, bias, stride, groups=groups) restricted to rows
  // crop[0]:crop[0]+out_size[0] and columns crop[1]:crop[1]+out_size[1].
  m.def(
      "upsample_crop(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] crop, int[2] out_size, "
      "int groups) -> Tensor");
  // Its gradients (dx, dweight, dbias) as output_mask asks; zero-size where not asked.
  m.def(
      "upsample_crop_bwd(Tensor grad, Tensor x, Tensor weight, int[2] stride, int[2] crop, int groups, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Fused head: softmax cross-entropy of bilinear_upsample_crop(scores, factor, top, left, H, W) against target
  // (N x H x W). Returns (per-pixel loss, gradient of its sum w.r.t. scores if with_grad else empty).
  m.def(
      "upsample_ce_fwd(Tensor scores, Tensor target, Tensor? weight, int factor, int top, int left, "
      "int ignore_index, bool with_grad) -> (Tensor, Tensor)");
  // Gradient w.r.t. scores of sum(grad_loss * loss), softmax recomputed.
  m.def(
      "upsample_ce_bwd(Tensor grad_loss, Tensor scores, Tensor target, Tensor? weight, int factor, int top, "
      "int left, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(fcnkern, CPU, m) {
  m.impl("pixelwise_ce_fwd", &fcnkern::pixelwise_ce_fwd_cpu);
  m.impl("pixelwise_ce_fwd_grad", &fcnkern::pixelwise_ce_fwd_grad_cpu);
  m.impl("pixelwise_ce_bwd", &fcnkern::pixelwise_ce_bwd_cpu);
  m.impl("pixelwise_ce_scale_grad_", &fcnkern::pixelwise_ce_scale_grad_cpu);
}

// The module says how it was built and manages the CPU block cache; operators are reached through torch.ops.fcnkern.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("empty_cache", [] { return fcnkern::large_block_cache().clear() + fcnkern::release_scratch(); },
        "Free the CPU kernels' cached large output blocks and scratch block; returns the bytes released.");
  m.def("cached_bytes", [] { return fcnkern::large_block_cache().cached_bytes(); });
  m.def("cpu_gemm_library", [] { return std::string(fcnkern::gemm_library_name()); },
        "Which library the CPU kernels' fp32 GEMMs use: 'onednn' or 'mkl' (FCNKERN_CPU_GEMM; see cpu_tasks.h).");
  m.def("cpu_conv_bf16_dot", [] { return fcnkern::bf16_dot_products({at::kBFloat16}); },
        "Whether the CPU convolution kernels compute bf16 layers with AVX512-BF16 dot products where they can (the "
        "register-blocked kernels, the batch-wide GEMMs): this CPU has it and FCNKERN_CONV_BF16_DOT is not 0.");
#ifdef FCNKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
