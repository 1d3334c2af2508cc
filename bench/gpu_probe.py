"""A/B probes for a GPU session, each against the alternative in the same process (median ms, triton do_bench).
One JSON line per case:

- ce: the Triton cross-entropy took 0.76 ms on 1 x 21 x 500 x 500 logits but 0.20 ms on 8 x 21 x 512 x 512 (H100,
  bench/results/h100-*): the forward at batch 1 and 8, sides 500 and 512, next to the CUDA C++ kernel and
  F.cross_entropy.
- ce_train: cross-entropy forward + backward, do_bench time per step (see ce_train_probe) and the device time of
  its kernels (`<backend>_kernels`, torch.profiler; see kernels_ms).
- bilinear_index: the CUDA bilinear forward with its 32-bit multiply-shift index plan (the default) against the
  64-bit plan (FCNKERN_CUDA_WIDE_INDEX=1), FCN-32s's final layer at batch 1 and 8; predicted 0.61 -> ~0.1-0.15 ms
  at batch 8 on the H100 (cpp/fast_div.h).
- step_profile: where the FCN-8s bf16 training step's time goes (torch.profiler, 5 steps), fcnkern against the
  eager twin: total host and device time and the ten largest device-time ops of each, for the 13.4 vs 11.6 ms the
  H100 measured (issue 5).
- call_path: forward + backward of each op through the eager autograd.Function (the default) against the
  torch.library registration (fcnkern/_autograd.py), fused head and cross-entropy at batch 1; the host time saved
  per call was 30-45 us on the 2-core CPU machine.
- triton_conv: the Triton conv + ReLU after session 11's rewrite (channels_last operands, one (tap, channel block)
  loop, 32-bit indices, 64 x 128 tiles) against cuDNN, FCN-8s's conv3_2 (1 x 256 x 175 x 175, bf16) and conv1_2
  (1 x 64 x 698 x 698): forward and forward + backward, NCHW and channels_last input, and the 64-bit plan
  (FCNKERN_TRITON_WIDE_INDEX=1). Before: 1.27 ms forward for conv3_2 (ncu, 255 registers, 1 KB spills, scalar
  gathers); predicted 0.2-0.35 ms (sm_90 PTX now has cp.async 16-byte loads, 3 stages, no spills).
- head_profile: the fused head at batch 1 (1 x 21 x 17 x 17 scores -> 500 x 500, cuda and triton backends) under
  torch.profiler: host time, kernel launches and the costliest host ops per call (issue 8: a constant ~0.4-0.5 ms
  per forward + backward on the GPUs against ~0.11 ms of host time on the CPU machine).
- graph_step: the FCN-8s bf16 training step captured in a CUDA graph, fcnkern against the eager twin, batch 1 and 8
  (issue 5 without host time; and whether fcnkern's ops capture).
- head_device: the fused head against the unfused fcnkern ops and PyTorch's head, device time of the kernels per
  forward + backward at batch 1 and 8 (issue 8).
- triton_bilinear: the Triton bilinear forward and backward, tiled by output row since session 11 (no 64-bit
  division per element), against the CUDA kernel and F.interpolate, FCN-32s's final layer at batch 8. Before:
  1.156 ms forward (CUDA 0.248); predicted ~0.25 ms.
"""

import json
import os

import torch
import torch.nn.functional as F
import triton.testing

import fcnkern
from fcnkern import _autograd


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def ce_probe(g: torch.Generator) -> None:
    # 496: a multiple of 16 that is not a power of two; triton_flat: the same contiguous logits seen as one row of
    # H*W pixels (W = 250000 is a multiple of 16), to tell a width effect from a size effect.
    for n, side in ((1, 500), (1, 512), (1, 496), (8, 500), (8, 512)):
        x = torch.randn(n, 21, side, side, device="cuda", generator=g)
        t = torch.randint(0, 21, (n, side, side), device="cuda", generator=g)
        row = {"probe": "ce", "shape": [n, 21, side, side]}
        with torch.no_grad():
            for backend in ("triton", "cuda"):
                row[backend] = bench(lambda b=backend, x=x, t=t: fcnkern.pixelwise_cross_entropy(x, t, backend=b))
            row["torch"] = bench(lambda x=x, t=t: F.cross_entropy(x, t, ignore_index=255, reduction="sum"))
            xf, tf = x.view(n, 21, 1, side * side), t.view(n, 1, side * side)
            row["triton_flat"] = bench(lambda x=xf, t=tf: fcnkern.pixelwise_cross_entropy(x, t, backend="triton"))
        row["GBps_triton"] = x.numel() * 4 / row["triton"] / 1e6
        print(json.dumps(row), flush=True)


def ce_train_probe(g: torch.Generator) -> None:
    """Forward + backward (loss.backward(), gradient dropped) at 8 x 21 x 512 x 512 fp32 and bf16 through do_bench,
    whose calls run ahead of the GPU: device time per step, unlike the synchronised single calls of the benchmarks
    (bench/test_bench_cross_entropy.py), where host time showed (run 9: 0.565 ms against a 155 us kernel). Session 16
    made the training forward of both kernel backends read each logit once for C <= 32 (predicted CUDA 155 -> 95-105
    us). bytes_min: the logits read once and the gradient written once."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 21, 512, 512, device="cuda", generator=g).to(dtype)
        t = torch.randint(0, 21, (8, 512, 512), device="cuda", generator=g)
        row = {"probe": "ce_train", "shape": list(x.shape), "dtype": str(dtype)[6:], "bytes_min": 2 * x.nbytes}
        losses = {
            "cuda": lambda v, t=t: fcnkern.pixelwise_cross_entropy(v, t, backend="cuda"),
            "triton": lambda v, t=t: fcnkern.pixelwise_cross_entropy(v, t, backend="triton"),
            "torch": lambda v, t=t: F.cross_entropy(v, t, ignore_index=255, reduction="sum"),
        }
        for name, loss in losses.items():
            leaf = x.clone().requires_grad_()

            def step(loss=loss, leaf=leaf):
                loss(leaf).backward()
                leaf.grad = None

            row[name] = bench(step)
            row[f"{name}_kernels"] = kernels_ms(step)
        print(json.dumps(row), flush=True)


def bilinear_index_probe(g: torch.Generator) -> None:
    for n in (1, 8):
        scores = torch.randn(n, 21, 16, 16, device="cuda", generator=g)
        fwd = lambda s=scores: fcnkern.bilinear_upsample_crop(s, 32, (19, 19), (500, 500), backend="cuda")  # noqa: E731
        row = {"probe": "bilinear_index", "shape": [n, 21, 500, 500]}
        with torch.no_grad():
            narrow = fwd()
            row["int32_ms"] = bench(fwd)
            os.environ["FCNKERN_CUDA_WIDE_INDEX"] = "1"
            try:
                wide = fwd()
                row["int64_ms"] = bench(fwd)
            finally:
                del os.environ["FCNKERN_CUDA_WIDE_INDEX"]
        row["same_result"] = bool(torch.equal(narrow, wide))
        row["write_GBps_int32"] = narrow.numel() * 4 / row["int32_ms"] / 1e6
        print(json.dumps(row), flush=True)


def call_path_probe(g: torch.Generator) -> None:
    registered = lambda name, *args: _autograd._op(name)(*args)  # noqa: E731
    eager = _autograd.call
    for side in (8, 500):
        t = torch.randint(0, 21, (1, side, side), device="cuda", generator=g)
        scores = torch.randn(1, 21, side // 32 + 2, side // 32 + 2, device="cuda", generator=g, requires_grad=True)
        logits = torch.randn(1, 21, side, side, device="cuda", generator=g, requires_grad=True)
        cases = {
            "head": lambda s=scores, t=t: fcnkern.upsample_cross_entropy(s, t, 32, (19, 19), backend="cuda").backward(),
            "ce": lambda x=logits, t=t: fcnkern.pixelwise_cross_entropy(x, t, backend="cuda").backward(),
        }
        for name, fn in cases.items():
            row = {"probe": "call_path", "op": name, "side": side}
            for label, call in (("function_ms", eager), ("registration_ms", registered)):
                _autograd.call = call
                try:
                    row[label] = bench(fn)
                finally:
                    _autograd.call = eager
            print(json.dumps(row), flush=True)


def _profiled_events(fn, calls: int):
    """torch.profiler events (CPU and CUDA) of `calls` calls of fn after 5 warm-up calls, and a per-event device-time
    getter (its name differs across torch versions)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device_us = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    return prof.key_averages(), device_us


def kernels_ms(fn, calls: int = 20) -> float:
    """Device time of the kernels of one call of fn (torch.profiler, mean of `calls`): the GPU's own work, which
    do_bench's event timing shows only when the host keeps ahead of the GPU. Run 14 found fcnkern's Triton-backend
    calls taking 0.4-1.2 ms of host time per forward + backward, more than their kernels (bench/gpu_host_profile.py),
    so the do_bench numbers of runs 1-13 for them were partly host time."""
    events, device_us = _profiled_events(fn, calls)
    return sum(device_us(e) for e in events) / calls / 1e3


def head_profile_probe(g: torch.Generator) -> None:
    """Where a batch-1 head call's ~0.4-0.5 ms goes on a GPU (issue 8; ~0.11 ms of host time on the CPU machine):
    host time per call, kernel launches per call and the host ops with the most self time."""
    t = torch.randint(0, 21, (1, 500, 500), device="cuda", generator=g)
    scores = torch.randn(1, 21, 17, 17, device="cuda", generator=g, requires_grad=True)
    for backend in ("cuda", "triton"):
        fn = lambda b=backend: fcnkern.upsample_cross_entropy(scores, t, 32, (19, 19), backend=b).backward()  # noqa: E731
        events, device_us = _profiled_events(fn, 20)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        launches = sum(e.count for e in events if "LaunchKernel" in e.key or "cuLaunch" in e.key)
        row = {
            "probe": "head_profile",
            "backend": backend,
            "host_ms_per_call": sum(e.self_cpu_time_total for e in events) / 20 / 1e3,
            "device_ms_per_call": sum(device_us(e) for e in events) / 20 / 1e3,
            "launches_per_call": launches / 20,
            "top_host_ops": [[e.key[:60], round(e.self_cpu_time_total / 20 / 1e3, 4), e.count // 20] for e in top],
        }
        print(json.dumps(row), flush=True)


def _head_calls(scores: torch.Tensor, t: torch.Tensor) -> dict:
    """Forward + backward of FCN-32s's head on scores (N x 21 x q x q) against t (N x side x side): PyTorch's
    (depthwise bilinear ConvTranspose2d + slice + F.cross_entropy), the fused head and the unfused fcnkern ops."""
    side = t.shape[-1]
    weight = fcnkern.bilinear_kernel(64).expand(21, 1, 64, 64).to("cuda")
    window = (slice(None), slice(None), slice(19, 19 + side), slice(19, 19 + side))

    def pytorch():
        full = F.conv_transpose2d(scores, weight, stride=32, groups=21)
        F.cross_entropy(full[window], t, ignore_index=255, reduction="sum").backward()

    calls = {"pytorch": pytorch}
    for be in ("cuda", "triton"):
        calls[f"fused_{be}"] = lambda be=be: fcnkern.upsample_cross_entropy(
            scores, t, 32, (19, 19), backend=be
        ).backward()
        calls[f"unfused_{be}"] = lambda be=be: fcnkern.pixelwise_cross_entropy(
            fcnkern.bilinear_upsample_crop(scores, 32, (19, 19), (side, side), backend=be), t, backend=be
        ).backward()
    return calls


def head_device_probe(g: torch.Generator) -> None:
    """Issue 8's ratio in device time: the fused head against the unfused fcnkern ops and PyTorch's head (see
    _head_calls), FCN-32s's geometry at batch 1 (500^2) and 8 (512^2): the kernels' time per call (kernels_ms), since
    the synchronised single calls of bench/test_bench_head.py are mostly host time at these sizes."""
    for n, side in ((1, 500), (8, 512)):
        t = torch.randint(0, 21, (n, side, side), device="cuda", generator=g)
        q = (side + 2 * 19) // 32 + 1
        scores = torch.randn(n, 21, q, q, device="cuda", generator=g, requires_grad=True)
        row = {"probe": "head_device", "shape": [n, 21, side, side]}
        for name, fn in _head_calls(scores, t).items():
            row[f"{name}_kernels_ms"] = kernels_ms(fn)
        print(json.dumps(row), flush=True)


def training_step(model, x: torch.Tensor, target: torch.Tensor):
    """(optimiser, step): an SGD optimiser of model and one training step of it on images x against target
    (forward with the summed loss, backward, SGD step)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-10, momentum=0.99)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, target, reduction="sum").backward()
        opt.step()

    return opt, step


def step_profile_probe() -> None:
    from fcnkern import models

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 500, 500, generator=g).to("cuda", torch.bfloat16)
    target = torch.randint(0, 21, (1, 500, 500), generator=g).to("cuda")
    torch.manual_seed(0)
    ours = models.fcn8s(21).to("cuda", torch.bfloat16).train()
    twin = models.fcn8s(21, twin=True).to("cuda", torch.bfloat16).train()
    twin.load_state_dict(ours.state_dict())
    for name, model in (("fcnkern", ours), ("pytorch-eager", twin)):
        _, step = training_step(model, x, target)
        events, device_us = _profiled_events(step, 5)
        top = sorted(events, key=device_us, reverse=True)[:10]
        row = {
            "probe": "step_profile",
            "model": name,
            "device_ms_per_step": sum(device_us(e) for e in events) / 5 / 1e3,
            "host_ms_per_step": sum(e.self_cpu_time_total for e in events) / 5 / 1e3,
            "top_device_ops": [[e.key[:80], round(device_us(e) / 5 / 1e3, 3), e.count // 5] for e in top],
        }
        print(json.dumps(row), flush=True)


def _conv_relu(x, w, b, backend):
    if backend == "cudnn":
        return F.relu(F.conv2d(x, w, b, padding=1))
    return fcnkern.conv2d_relu(x, w, b, padding=1, backend=backend)


def _conv_row(name: str, x, w, b, dy, layout: str) -> dict:
    row = {"probe": "triton_conv", "layer": name, "shape": list(x.shape), "layout": layout}
    with torch.no_grad():
        err = _conv_relu(x, w, b, "triton").float() - _conv_relu(x, w, b, "cudnn").float()
        row["max_abs_err_vs_cudnn"] = float(err.abs().max())
        for backend in ("triton", "cudnn"):
            row[f"{backend}_fwd_ms"] = bench(lambda: _conv_relu(x, w, b, backend))  # noqa: B023 (called here)
        os.environ["FCNKERN_TRITON_WIDE_INDEX"] = "1"
        try:
            row["triton_fwd_int64_ms"] = bench(lambda: _conv_relu(x, w, b, "triton"))
        finally:
            del os.environ["FCNKERN_TRITON_WIDE_INDEX"]
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    for backend in ("triton", "cudnn"):
        step = lambda: torch.autograd.grad(_conv_relu(xr, wr, b, backend), (xr, wr), dy)  # noqa: B023, E731
        row[f"{backend}_fwd_bwd_ms"] = bench(step)
        row[f"{backend}_fwd_bwd_kernels_ms"] = kernels_ms(step)
    c, side = x.shape[1], x.shape[2]
    row["tflops_triton_fwd"] = 2 * c * c * 9 * side * side / row["triton_fwd_ms"] / 1e9
    return row


def triton_conv_probe(g: torch.Generator) -> None:
    for name, c, side in (("conv3_2", 256, 175), ("conv1_2", 64, 698)):
        x = torch.randn(1, c, side, side, device="cuda", generator=g).bfloat16()
        w = (torch.randn(c, c, 3, 3, device="cuda", generator=g) * 0.02).bfloat16()
        b = torch.zeros(c, device="cuda").bfloat16()
        dy = torch.randn(1, c, side, side, device="cuda", generator=g).bfloat16()
        for layout in ("nchw", "channels_last"):
            xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
            print(json.dumps(_conv_row(name, xl, w, b, dy, layout)), flush=True)


def triton_bilinear_probe(g: torch.Generator) -> None:
    scores = torch.randn(8, 21, 16, 16, device="cuda", generator=g)
    grad = torch.randn(8, 21, 500, 500, device="cuda", generator=g)
    row = {"probe": "triton_bilinear", "shape": [8, 21, 500, 500]}
    with torch.no_grad():
        for backend in ("triton", "cuda"):
            fwd = lambda b=backend: fcnkern.bilinear_upsample_crop(scores, 32, (19, 19), (500, 500), backend=b)  # noqa: E731
            row[f"{backend}_fwd_ms"] = bench(fwd)
            row[f"{backend}_fwd_kernels_ms"] = kernels_ms(fwd)
        row["same_result"] = bool(
            torch.allclose(
                fcnkern.bilinear_upsample_crop(scores, 32, (19, 19), (500, 500), backend="triton"),
                fcnkern.bilinear_upsample_crop(scores, 32, (19, 19), (500, 500), backend="cuda"),
                atol=1e-5,
            )
        )
        row["interpolate_ms"] = bench(lambda: F.interpolate(scores, size=(500, 500), mode="bilinear"))
    for backend in ("triton", "cuda"):
        s = scores.detach().requires_grad_()
        out = fcnkern.bilinear_upsample_crop(s, 32, (19, 19), (500, 500), backend=backend)
        bwd = lambda out=out, s=s: torch.autograd.grad(out, s, grad, retain_graph=True)  # noqa: E731
        row[f"{backend}_bwd_ms"] = bench(bwd)
        row[f"{backend}_bwd_kernels_ms"] = kernels_ms(bwd)
    print(json.dumps(row), flush=True)


def _graphed_step(model, x: torch.Tensor, target: torch.Tensor):
    """One SGD training step of model (forward with its loss, backward, step) captured whole in a CUDA graph, after
    three warm-up steps on a side stream (PyTorch's whole-network capture recipe): its replay."""
    opt, step = training_step(model, x, target)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(x, target, reduction="sum").backward()
        opt.step()
    return graph.replay


def graph_step_probe() -> None:
    """Issue 5 without host time: the FCN-8s bf16 training step captured in a CUDA graph, fcnkern's network (no host
    sync in its ops, so it should capture) against the eager twin's, at batch 1 x 500^2 and 8 x 512^2, beside the
    same steps run eagerly (do_bench). A capture that fails is a finding of its own: its error is printed."""
    from fcnkern import models

    for n, side in ((1, 500), (8, 512)):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, side, side, generator=gen).to("cuda", torch.bfloat16)
        target = torch.randint(0, 21, (n, side, side), generator=gen).to("cuda")
        row = {"probe": "graph_step", "shape": [n, 3, side, side]}
        for name, twin in (("fcnkern", False), ("pytorch-eager", True)):
            torch.manual_seed(0)
            model = models.fcn8s(21, twin=twin).to("cuda", torch.bfloat16).train()
            row[f"{name}_eager_ms"] = bench(training_step(model, x, target)[1])
            try:
                row[f"{name}_graph_ms"] = bench(_graphed_step(model, x, target))
            except Exception as exc:  # the finding: what in the step cannot be captured
                row[f"{name}_graph_error"] = repr(exc)[:300]
            del model
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    triton_conv_probe(g)
    triton_bilinear_probe(g)
    bilinear_index_probe(g)
    call_path_probe(g)
    head_profile_probe(g)
    head_device_probe(g)
    step_profile_probe()
    ce_train_probe(g)
    ce_probe(g)
    graph_step_probe()


if __name__ == "__main__":
    main()
