// Fused pixelwise softmax cross-entropy: shared declarations of the CPU and CUDA implementations.
//
// Layout: logits N x C x H x W with arbitrary strides (NCHW, channels_last, or a cropped view), target N x H x W
// int64 with arbitrary strides, weight an optional contiguous C-vector. Everything is computed in fp32.
//
// forward returns (loss, stats): loss N x H x W, stats 2 x N x H x W, fp32 (fp64 for fp64 logits), contiguous:
//   stats[0][p] = m[p] = max_c x[c, p],  stats[1][p] = ls[p] = log(sum_c exp(x[c, p] - m[p]))
//   loss[p] = weight[t] * ((m[p] - x[t, p]) + ls[p])  for t = target[p] != ignore_index, else 0
// backward returns grad_logits (logits' dtype and memory format):
//   grad[c, p] = grad_loss[p] * weight[t] * (exp((x[c, p] - m[p]) - ls[p]) - [c == t]), 0 at ignored pixels.
// m and ls are kept apart (not one log-sum-exp) so that x - m is exact, as in PyTorch's log_softmax: one fp32
// m + ls would round away ~5e-4 of the exponent at logits of 1e4.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fcnkern {

std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        int64_t ignore_index);
// (loss, grad) with grad the gradient for an upstream gradient of 1, computed in the same pass: the logits are read
// once. On the CPU the forward is compute-bound, so this beats recomputing softmax in the backward; on CUDA it
// halves the logits' DRAM reads, the backward scaling in place on the device (see fcnkern/cross_entropy.py).
std::tuple<at::Tensor, at::Tensor> pixelwise_ce_fwd_grad_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t ignore_index);
at::Tensor pixelwise_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                int64_t ignore_index);

// grad *= scale[0] in place (grad dense, scale one value of the accumulation dtype on grad's device), zeros kept
// exactly zero, and nothing done when scale[0] == 1: decided where scale lives, so never a host sync on CUDA.
void pixelwise_ce_scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale);
void check_ce_scale_args(const at::Tensor& grad, const at::Tensor& scale);

// Common argument checks of both devices; raise c10::Error (a Python RuntimeError/ValueError) on misuse.
void check_ce_args(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight);
void check_ce_bwd_args(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& stats);

}  // namespace fcnkern
