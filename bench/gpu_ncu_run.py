"""Kernels for Nsight Compute (``ncu --profile-from-start off``), each warmed up first and then run once inside
cudaProfilerStart/Stop, so that only that launch is profiled:

- the Triton cross-entropy forward at 1 x 21 x 500 x 500 and 1 x 21 x 512 x 512 (14-40x apart on the H100, cause
  unknown from the compiled code: DRAM throughput, sectors per request and stall reasons tell);
- FCN-8s's conv3_2 (256 -> 256, 3 x 3, 175 x 175, bf16) forward and backward on the Triton backend (9x slower than
  cuDNN forward, 30x forward + backward): tensor-pipe use, issue slots and stall reasons of each kernel.
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
    with torch.no_grad():
        for side in (500, 512):
            x = torch.randn(1, 21, side, side, device="cuda", generator=g)
            t = torch.randint(0, 21, (1, side, side), device="cuda", generator=g)
            profiled(lambda x=x, t=t: fcnkern.pixelwise_cross_entropy(x, t, backend="triton"))
    x = torch.randn(1, 256, 175, 175, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(256, 256, 3, 3, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    b = torch.zeros(256, device="cuda").bfloat16().requires_grad_()
    profiled(lambda: fcnkern.conv2d_relu(x, w, b, padding=1, backend="triton").float().sum().backward())


if __name__ == "__main__":
    main()
