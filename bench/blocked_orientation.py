"""A/B of the CPU blocked kernels' transposed orientation (FCNKERN_CONV_BLOCKED_TRANSPOSE, read per call), in one
process, the two settings alternating.

    python bench/blocked_orientation.py strips   # one JSON line per 3 x 3 layer shape: fwd and fwd+bwd ms, eager too
    python bench/blocked_orientation.py step     # the main job's training step, 16 alternating rounds: one JSON line

"as_is" is FCNKERN_CONV_BLOCKED_TRANSPOSE=0 (every map as it is), "default" the library's choice (maps under 10
columns wide and taller than wide transposed). Times are medians; the machine's other load moves single runs.
"""

import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import fcnkern
from fcnkern import benchmarking, train

SETTING = {"as_is": "0", "default": ""}
# (batch, in, out, H, W, padding): the frame strips of the main job's tracked layers, then wider maps that stay as is.
STRIPS = [
    (8, 8, 8, 262, 3, 0), (8, 16, 16, 129, 4, 0), (8, 16, 16, 127, 5, 0), (8, 32, 32, 58, 7, 0),
    (8, 64, 64, 25, 7, 0), (8, 32, 32, 60, 6, 0), (8, 64, 64, 19, 9, 0), (8, 32, 32, 40, 12, 0),
    (8, 64, 64, 35, 17, 1), (8, 32, 32, 66, 33, 1), (8, 8, 8, 66, 64, 1),
]  # fmt: skip


def median_ms(fn, reps: int = 25) -> float:
    return benchmarking.median_ms(fn, "cpu", rounds=reps, warmup=4)


def layer_ms(x, weight, bias, padding: int, grad) -> tuple[float, float, float]:
    """(fwd, fwd+bwd, eager fwd+bwd) in ms of one 3 x 3 layer under the current setting."""
    args = (x, weight, bias)

    def fwd():
        with torch.no_grad():
            fcnkern.conv2d_relu(*args, padding=padding, backend="cpu")

    def fwd_bwd():
        torch.autograd.grad(fcnkern.conv2d_relu(*args, padding=padding, backend="cpu"), args, grad)

    def eager():
        torch.autograd.grad(F.relu(F.conv2d(*args, padding=padding)), args, grad)

    return median_ms(fwd), median_ms(fwd_bwd), median_ms(eager)


def strips() -> None:
    torch.manual_seed(0)
    for n, c, k, h, w, p in STRIPS:
        x = torch.randn(n, c, h, w, requires_grad=True)
        weight = (torch.randn(k, c, 3, 3) * 0.1).requires_grad_()
        bias = torch.randn(k, requires_grad=True)
        grad = torch.randn(n, k, h + 2 * p - 2, w + 2 * p - 2)
        row = {"batch": n, "in": c, "out": k, "input_hw": [h, w], "padding": p, "output_hw": list(grad.shape[2:])}
        best: dict[str, list[float]] = {}
        for name in ("as_is", "default", "as_is", "default"):
            os.environ["FCNKERN_CONV_BLOCKED_TRANSPOSE"] = SETTING[name]
            times = layer_ms(x, weight, bias, p, grad)
            best[name] = [min(a, b) for a, b in zip(best.get(name, times), times, strict=True)]
        for name, (f, fb, _) in best.items():
            row[f"fwd_ms_{name}"], row[f"fwdbwd_ms_{name}"] = round(f, 3), round(fb, 3)
        row["fwdbwd_ms_eager"] = round(min(best["as_is"][2], best["default"][2]), 3)
        print(json.dumps(row), flush=True)


def step(rounds: int = 16) -> None:
    cfg = train.TrainConfig()
    train_set, _, num_classes = train.make_datasets(cfg)
    model = train.build_model(cfg, num_classes)
    optimizer = train.make_optimizer(cfg, model)
    images = torch.stack([train_set[i][0] for i in range(cfg.batch)])
    target = torch.stack([train_set[i][1] for i in range(cfg.batch)])

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        train.training_loss(cfg, model, images, target).backward()
        optimizer.step()

    for _ in range(5):
        one_step()
    per_round: dict[str, list[float]] = {"as_is": [], "default": []}
    for r in range(rounds):
        for name in ("as_is", "default") if r % 2 == 0 else ("default", "as_is"):
            os.environ["FCNKERN_CONV_BLOCKED_TRANSPOSE"] = SETTING[name]
            per_round[name].append(median_ms(one_step, reps=5))
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    faster = sum(d < a for d, a in zip(per_round["default"], per_round["as_is"], strict=True))
    print(json.dumps({
        "step_median_ms": {name: round(v, 2) for name, v in medians.items()},
        "speedup": round(medians["as_is"] / medians["default"], 3),
        "rounds_default_faster": f"{faster}/{rounds}",
        "per_round_ms": {name: [round(v, 1) for v in vs] for name, vs in per_round.items()},
    }))  # fmt: skip


if __name__ == "__main__":
    {"strips": strips, "step": step}[sys.argv[1] if len(sys.argv) > 1 else "strips"]()
