"""The whole network: VGG16 FCN-8s (the paper's, width 1) on fcnkern layers vs its pure-PyTorch twin, eager and under
torch.compile, measured in the same run: forward, and a training step (forward + loss + backward + SGD), with peak
memory in extra_info. CPU: 1 x 3 x 256 x 256 in fp32. CUDA: 1 x 3 x 500 x 500 and 8 x 3 x 512 x 512 (issue 5's
sizes) in bf16. At batch 8 the GPU's work, not the host's, sets the step time; skipping the padding's background
(fcnkern.background) leaves 78.6 % of the trunk's forward FLOPs to compute there (conv1_1 52 %, conv3_1 63 %,
conv4_1 81 %, dense from conv5_1 on; fc6 and fc7 dense), so the interleaved case runs fcnkern-skip beside the dense
network on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from fcnkern import models
from fcnkern.benchmarking import peak_extra_bytes, run_interleaved, synchronized

# case -> (device, input shape, dtype)
CASES = {
    "cpu": ("cpu", (1, 3, 256, 256), torch.float32),
    "cuda": ("cuda", (1, 3, 500, 500), torch.bfloat16),
    "cuda-b8": ("cuda", (8, 3, 512, 512), torch.bfloat16),
}
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cases():
    return [pytest.param(case, marks=[] if case == "cpu" else [NO_CUDA], id=case) for case in CASES]


def _params():
    for case in CASES:
        for impl in ("fcnkern", "pytorch-eager", "pytorch-compile"):
            yield pytest.param(case, impl, marks=[] if case == "cpu" else [NO_CUDA], id=f"{case}-{impl}")


def _training_step(model, net, x, target, device):
    """One SGD training step of `model` through `net` (the model itself or its compiled form), synchronised."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-10, momentum=0.99)

    def step():
        opt.zero_grad(set_to_none=True)
        net(x, target, reduction="sum").backward()  # fcnkern: fused head; twins: F.cross_entropy
        opt.step()

    return synchronized(step, device)


@pytest.mark.parametrize("mode", ["fwd", "train-step"])
@pytest.mark.parametrize(("case", "impl"), list(_params()))
def test_fcn8s(benchmark, case, impl, mode):
    device, shape, dtype = CASES[case]
    torch.manual_seed(0)
    model = models.fcn8s(21, twin=impl != "fcnkern").to(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    target = torch.randint(0, 21, (shape[0], *shape[2:]), generator=g).to(device)
    net = torch.compile(model) if impl == "pytorch-compile" else model

    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return net(x)

        step = synchronized(step, device)
    else:
        step = _training_step(model.train(), net, x, target, device)
    step()
    benchmark.group = f"FCN-8s {device} {'x'.join(map(str, shape))} {mode}"
    benchmark.extra_info["peak_extra_MB"] = (peak_extra_bytes(step, device) or 0) / 2**20
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("per_turn", [1, 3], ids=["alternating", "warm-turns"])
@pytest.mark.parametrize("case", _cases())
def test_fcn8s_train_step_interleaved(benchmark, case, per_turn):
    """The training-step ratio against the eager twin, the steps alternating round by round (see
    fcnkern.benchmarking.run_interleaved; extra_info's fcnkern_speedup_median is twin time / fcnkern time), with
    fcnkern's network also run with the other background setting (fcnkern-dense on CPU, fcnkern-skip on CUDA).
    warm-turns: each step runs three times per turn and the last is timed, as in a loop that trains one model (see
    run_interleaved's per_turn)."""
    if benchmark.disabled and per_turn > 1:
        pytest.skip("--benchmark-disable: one call per step, the same calls as the alternating case")
    device, shape, dtype = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    target = torch.randint(0, 21, (shape[0], *shape[2:]), generator=g).to(device)
    torch.manual_seed(0)
    ours = models.fcn8s(21).to(device, dtype).train()
    # The same network with the other background setting (default: skipped on CPU, not on CUDA), to show what each
    # part gives: the kernels alone, and the skipped background.
    other_skip = not ours.skips_background(x)
    other = models.fcn8s(21, skip_background=other_skip).to(device, dtype).train()
    twin = models.fcn8s(21, twin=True).to(device, dtype).train()
    other.load_state_dict(ours.state_dict())
    twin.load_state_dict(ours.state_dict())
    named = (("fcnkern", ours), (f"fcnkern-{'skip' if other_skip else 'dense'}", other), ("pytorch-eager", twin))
    steps = {name: _training_step(m, m, x, target, device) for name, m in named}
    benchmark.group = f"FCN-8s {device} {'x'.join(map(str, shape))} train-step interleaved"
    run_interleaved(benchmark, steps, baseline="pytorch-eager", per_turn=per_turn)
