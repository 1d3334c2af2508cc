"""Kernels for Nsight Compute (``ncu --profile-from-start off``), each warmed up first and then run once inside
cudaProfilerStart/Stop, so that only that launch is profiled (gpu_suite.sh keeps fcnkern's own kernels by name):

- FCN-8s's conv3_2 (256 -> 256, 3 x 3, 175 x 175, bf16, channels_last) forward and backward on the Triton backend:
  run 4 (H200) found its wgrad at 979 us, shared-memory bound; session 12 took the bias reduction out of its loop;
- the same layer on the CUDA backend (gather_gemm: forward, dgrad, wgrad): run 9 timed it at 5.5 ms forward and
  28.6 ms forward + backward; session 16 replaced per-element index decoding by row / column contexts and batched
  the loads (SASS per 32-deep slice per thread: forward ~5.7k -> 1038 instructions), predicted ~1 ms forward;
- the FCN-32s learned upsampling (21 -> 21, k 64, stride 32, 8 x 21 x 16 x 16 -> 500 x 500) on the Triton backend,
  forward and backward: run 6 had the phase-GEMM forward at 2.63 ms (12.5 % occupancy, integer-math bound);
  session 14 made forward and backward GEMMs over output cells (predicted 0.1-0.2 ms forward, 0.3-0.4 backward);
- the FCN-32s fixed bilinear forward on the CUDA backend (0.21 ms against F.interpolate's 0.14-0.16; run 9: 269 us
  under ncu, issue-bound at ~130 instructions per output; session 15 made it walk rows, predicted 0.05-0.08 ms) and
  backward on the Triton backend (1.72 ms in run 4; session 12 made its width pass read runs of columns) and on the
  CUDA backend (0.24 ms; session 15 put its height pass first, predicted 0.06-0.09 ms). Session 32 gave the CUDA
  forward tiles of 16 rows (predicted 0.05-0.065 ms at N = 8) and the backward a 32-bit index plan;
- the cross-entropy's training forward (loss and gradient in one sweep) on 8 x 21 x 512 x 512 fp32 logits, CUDA and
  Triton (issue 2: 85 % of the floor of reading the logits once and writing the gradient once, 352 MB), and the
  fused head at FCN-32s's geometry, batch 8 (issue 8).
"""

import torch

import fcnkern


def profiled(fn) -> None:
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 256, 175, 175, device="cuda", generator=g).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(256, 256, 3, 3, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    b = torch.zeros(256, device="cuda").bfloat16().requires_grad_()
    for backend in ("triton", "cuda"):
        if fcnkern.backend_info(backend).available:
            profiled(lambda be=backend: fcnkern.conv2d_relu(x, w, b, padding=1, backend=be).float().sum().backward())

    scores = torch.randn(8, 21, 16, 16, device="cuda", generator=g)
    weight = (fcnkern.bilinear_weight(21, 64) + 0.01 * torch.randn(21, 21, 64, 64)).cuda()
    with torch.no_grad():
        profiled(lambda: fcnkern.upsample_crop(scores, weight, 32, (19, 19), (500, 500), backend="triton"))
    learned = scores.clone().requires_grad_()
    weight.requires_grad_()
    profiled(
        lambda: fcnkern.upsample_crop(learned, weight, 32, (19, 19), (500, 500), backend="triton").sum().backward()
    )
    with torch.no_grad():
        profiled(lambda: fcnkern.bilinear_upsample_crop(scores, 32, (19, 19), (500, 500), backend="cuda"))
    leaf = scores.clone().requires_grad_()
    for backend in ("triton", "cuda"):
        up = fcnkern.bilinear_upsample_crop(leaf, 32, (19, 19), (500, 500), backend=backend)
        upstream = torch.randn_like(up)
        profiled(lambda up=up, upstream=upstream: torch.autograd.grad(up, leaf, upstream, retain_graph=True))

    logits = torch.randn(8, 21, 512, 512, device="cuda", generator=g).requires_grad_()
    t = torch.randint(0, 21, (8, 512, 512), device="cuda", generator=g)
    head_scores = torch.randn(8, 21, 18, 18, device="cuda", generator=g).requires_grad_()
    for backend in ("cuda", "triton"):
        profiled(lambda be=backend: fcnkern.pixelwise_cross_entropy(logits, t, backend=be).backward())
        profiled(lambda be=backend: fcnkern.upsample_cross_entropy(head_scores, t, 32, (19, 19), backend=be).backward())


if __name__ == "__main__":
    main()
