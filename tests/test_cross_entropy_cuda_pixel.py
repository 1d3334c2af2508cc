"""The CUDA cross-entropy's register-resident pixel function, run on the CPU.

For C <= 32 classes the CUDA forward reads each pixel's logits once into registers and writes loss and statistics,
or in training loss and gradient, from them (cpp/cross_entropy_pixel.h, host-and-device code). Here that function
is compiled for the CPU and called for every pixel of NCHW logits, against F.cross_entropy's loss and autograd
gradient: a check of its maths without a GPU. The kernel around it (grid-stride loop, pixel decoding) runs only on
a GPU (bench/gpu_suite.sh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import generator, load_cpu_check

SOURCE = r"""
#include <ATen/ATen.h>
#include "cross_entropy_pixel.h"

using namespace fcnkern;

// Per-pixel losses (N x H x W), the gradient (the logits' shape and strides) for an upstream gradient of 1, and the
// softmax statistics (max, log-sum; 2 x N x H x W).
std::vector<at::Tensor> loss_and_grad(at::Tensor x, at::Tensor t, std::optional<at::Tensor> weight,
                                      int64_t ignore_index) {
  TORCH_CHECK(x.size(1) <= ce_pixel::kMaxC);
  at::Tensor loss = at::full({x.size(0), x.size(2), x.size(3)}, NAN, x.options());
  at::Tensor grad = at::full_like(x, NAN);
  at::Tensor stats = at::full({2, x.size(0), x.size(2), x.size(3)}, NAN, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor w = weight ? weight->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
    for (int64_t n = 0; n < x.size(0); ++n) {
      for (int64_t h = 0; h < x.size(2); ++h) {
        for (int64_t i = 0; i < x.size(3); ++i) {
          const scalar_t* xp = x.data_ptr<scalar_t>() + n * x.stride(0) + h * x.stride(2) + i * x.stride(3);
          scalar_t* gp = grad.data_ptr<scalar_t>() + n * grad.stride(0) + h * grad.stride(2) + i * grad.stride(3);
          const int C = static_cast<int>(x.size(1));
          const int64_t label = t[n][h][i].item<int64_t>();
          const int k = ce_pixel::class_of(label, C);
          const auto px = ce_pixel::load_pixel<ce_pixel::kMaxC>(xp, x.stride(1), C, k);
          const acc_t g = ce_pixel::label_factor(label, k, ignore_index, w.defined() ? w.data_ptr<acc_t>() : nullptr);
          loss[n][h][i] = static_cast<double>(ce_pixel::pixel_loss(px, label, ignore_index, g));
          ce_pixel::store_pixel_grad(px, gp, grad.stride(1), C, k, g);
          // What the statistics forward saves and the recomputing backward reads.
          stats[0][n][h][i] = static_cast<double>(px.m);
          stats[1][n][h][i] = static_cast<double>(px.ls);
        }
      }
    }
  });
  return {loss, grad, stats};
}
"""


@pytest.fixture(scope="module")
def pixel():
    return load_cpu_check("fcnkern_ce_pixel_cpu", SOURCE, ["loss_and_grad"])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("classes", [1, 2, 21, 32])
def test_pixel_matches_cross_entropy(pixel, classes, channels_last, weighted):
    g = generator("ce-pixel", classes, channels_last, weighted)
    x = torch.randn(2, classes, 5, 7, generator=g, dtype=torch.float64) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, classes, (2, 5, 7), generator=g)
    t[0, 1, 2] = t[1, 4, 6] = 255  # ignored pixels
    weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    loss, grad, stats = pixel.loss_and_grad(x, t, weight, 255)

    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, weight=weight, ignore_index=255, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[0], x.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(stats[1], torch.logsumexp(x - x.amax(1, keepdim=True), 1), rtol=1e-12, atol=1e-12)


def test_pixel_low_precision_and_bad_inputs(pixel):
    g = generator("ce-pixel-edge")
    x = torch.randn(1, 21, 3, 4, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 21, (1, 3, 4), generator=g)
    ref_x = x.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, t, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        loss, grad, _ = pixel.loss_and_grad(x.to(dtype), t, None, 255)
        assert loss.dtype == dtype and grad.dtype == dtype
        assert ((loss.double() - ref.detach()).norm() / ref.norm()).item() < tol
        assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < tol
    # Logits of +-1e4 stay finite; a label outside [0, C) that is not ignored makes that pixel NaN, not wrong.
    big = torch.zeros(1, 21, 1, 2, dtype=torch.float64)
    big[0, :, 0, 0] = torch.linspace(-1e4, 1e4, 21, dtype=torch.float64)
    big[0, :, 0, 1] = torch.linspace(1e4, -1e4, 21, dtype=torch.float64)
    loss, grad, _ = pixel.loss_and_grad(big, torch.tensor([[[3, 40]]]), None, 255)
    assert torch.isfinite(loss[0, 0, 0]) and torch.isfinite(grad[0, :, 0, 0]).all()
    assert torch.isnan(loss[0, 0, 1]) and torch.isnan(grad[0, :, 0, 1]).all()
