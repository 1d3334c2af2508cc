"""Command line: ``python -m fcnkern`` (or ``fcnkern``).

- ``fcnkern info``: versions, how the C++/CUDA extension was obtained, and which backends can run here and why not.
- ``fcnkern bench``: each op's fcnkern backends (cross-entropy, conv + ReLU, bilinear upsampling) and the whole FCN-8s
  training step against the PyTorch way on the devices present, time and peak memory, as a table (and JSON with
  ``--json FILE``).
- ``fcnkern train``: train an FCN end to end (default: a small FCN-8s on built-in synthetic scenes, a few minutes
  on 2 CPU cores), evaluate it with the paper's metrics and time a training step against the pure-PyTorch twin.
- ``fcnkern eval --checkpoint FILE``: the paper's four metrics and a PNG of predictions.

With no sub-command it runs ``info`` and then ``train`` with its defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from functools import partial

import torch

import fcnkern
from fcnkern import _ext
from fcnkern.benchmarking import cross_entropy_step, median_ms, peak_extra_bytes


def cmd_info(_args: argparse.Namespace) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fcnkern {fcnkern.__version__} | torch {torch.__version__} | triton {triton_version} | "
          f"python {platform.python_version()} | CUDA devices: {torch.cuda.device_count()}")  # fmt: skip
    status = _ext.load()
    print(f"C++ extension: {status.origin if status.error is None else status.error}")
    print(f"{'backend':<8} {'available':<10} reason")
    for info in fcnkern.backends().values():
        print(f"{info.name:<8} {'yes' if info.available else 'no':<10} {info.reason}")
    return 0


def _benchmarkable(backend: str, device: torch.device) -> bool:
    """A kernel backend that runs natively on ``device``: never torch (the baseline) and never the Triton
    interpreter, whose timings mean nothing (a 500 x 500 learned upsampling would take many minutes in it)."""
    if backend == "torch" or (backend == "triton" and fcnkern.backend.triton_interpreter()):
        return False
    return fcnkern.backend._device_problem(backend, device) is None


def _available(backend: str, device: str) -> bool:
    info = fcnkern.backend_info(backend)
    if not info.available:
        print(f"  skipped {backend} on {device}: {info.reason}", file=sys.stderr)
    return info.available


def _ce_cases(args: argparse.Namespace, device: str):
    for shape in args.shapes:
        g = torch.Generator().manual_seed(0)
        n, c, h, w = shape
        logits = (torch.randn(shape, generator=g) * 3).to(device)
        target = torch.randint(0, c, (n, h, w), generator=g).to(device)
        for mode in ("fwd", "fwd+bwd"):
            impls = {"torch": cross_entropy_step("torch", logits, target, mode)}
            for backend in ("cpu",) if device == "cpu" else ("cuda", "triton"):
                if _available(backend, device):
                    impls[backend] = cross_entropy_step(backend, logits, target, mode)
            yield "cross_entropy", "x".join(map(str, shape)), mode, impls


def _grad_step(fn, leaves, mode):
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(*leaves)

        return step
    leaves = [t.detach().requires_grad_() for t in leaves]
    upstream = torch.randn_like(fn(*leaves).detach())

    def step():
        fn(*leaves).backward(upstream)
        for t in leaves:
            t.grad = None

    return step


def _conv_relu_eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int) -> torch.Tensor:
    import torch.nn.functional as F

    return F.relu(F.conv2d(x, w, b, 1, padding))


def _conv_cases(args: argparse.Namespace, device: str):

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # FCN-8s layers at a 500 x 500 input: conv2_2 (3x3, 128 channels, 349^2) and fc6 (7x7 on a 22^2 map).
    for name, (cin, cout, size, k, pad) in {"conv2_2": (128, 128, 349, 3, 1), "fc6": (512, 4096, 22, 7, 0)}.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, cin, size, size, generator=g).to(device, dtype)
        w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device, dtype)
        b = torch.zeros(cout).to(device, dtype)
        for mode in ("fwd", "fwd+bwd"):
            impls = {"torch": _grad_step(partial(_conv_relu_eager, padding=pad), [x, w, b], mode)}
            for backend in ("cpu",) if device == "cpu" else ("triton",):
                if _available(backend, device):
                    fn = partial(fcnkern.conv2d_relu, stride=1, padding=pad, backend=backend)
                    impls[backend] = _grad_step(fn, [x, w, b], mode)
            yield "conv2d_relu", f"{name} {cin}x{size}x{size}", mode, impls


def _bilinear_fcn32s(t: torch.Tensor, backend: str) -> torch.Tensor:
    return fcnkern.bilinear_upsample_crop(t, 32, (19, 19), (500, 500), backend=backend)


def _upsample_cases(args: argparse.Namespace, device: str):
    import torch.nn.functional as F

    x = torch.randn(1, 21, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    weight = fcnkern.bilinear_weight(21, 64).to(device)

    def full(t):  # pytorch-fcn's way: the whole ConvTranspose2d, then the crop
        return F.conv_transpose2d(t, weight, stride=32)[:, :, 19:519, 19:519]

    for mode in ("fwd", "fwd+bwd"):
        impls = {"torch": _grad_step(full, [x], mode)}
        for backend in fcnkern.upsample.IMPLEMENTED["bilinear_upsample_crop"]:
            runs_here = _benchmarkable(backend, x.device)
            if runs_here and _available(backend, device):
                impls[backend] = _grad_step(partial(_bilinear_fcn32s, backend=backend), [x], mode)
        yield "upsample", "FCN-32s final 21x16x16", mode, impls

    # The noise is drawn on the CPU (one seed, the same weights on every device), then moved beside the weight.
    noise = 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    learned = weight + noise.to(weight.device)
    for mode in ("fwd", "fwd+bwd"):
        impls = {"torch": _grad_step(lambda t, w: F.conv_transpose2d(t, w, stride=32)[:, :, 19:519, 19:519],
                                     [x, learned], mode)}  # fmt: skip
        for backend in fcnkern.upsample.IMPLEMENTED["upsample_crop"]:
            runs_here = _benchmarkable(backend, x.device)
            if runs_here and _available(backend, device):
                fn = partial(fcnkern.upsample_crop, stride=32, crop=(19, 19), out_size=(500, 500), backend=backend)
                impls[backend] = _grad_step(fn, [x, learned], mode)
        yield "upsample", "FCN-32s learned 21x21x64x64", mode, impls


def _model_cases(args: argparse.Namespace, device: str):

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    size = 256 if device == "cpu" else 500
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=g).to(device, dtype)
    target = torch.randint(0, 21, (1, size, size), generator=g).to(device)
    impls = {}
    for impl, twin in (("torch", True), ("fcnkern", False)):
        torch.manual_seed(0)
        model = fcnkern.models.fcn8s(21, twin=twin).to(device, dtype)
        opt = torch.optim.SGD(model.parameters(), lr=1e-10, momentum=0.99)

        def step(model=model, opt=opt, twin=twin):
            opt.zero_grad(set_to_none=True)
            model(x, target, reduction="sum").backward()  # fcnkern: the fused head; twin: F.cross_entropy
            opt.step()

        impls[impl] = step
    yield "fcn8s", f"1x3x{size}x{size}", "train-step", impls


_BENCH_OPS = {"cross_entropy": _ce_cases, "conv2d_relu": _conv_cases, "upsample": _upsample_cases,
              "fcn8s": _model_cases}  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> int:
    rows = []
    print(f"{'op':<14} {'device':<6} {'case':<24} {'mode':<10} {'impl':<8} {'ms':>9} {'vs torch':>9} {'peak MB':>9}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for op in args.ops:
            for op_name, case, mode, impls in _BENCH_OPS[op](args, device):
                base = None
                for impl, step in impls.items():
                    ms = median_ms(step, device, rounds=args.rounds)
                    base = base or ms
                    peak = (peak_extra_bytes(step, device) or 0) / 2**20
                    row = {"op": op_name, "device": device, "case": case, "mode": mode, "impl": impl, "ms": ms,
                           "speedup_vs_torch": base / ms, "peak_extra_MB": peak}  # fmt: skip
                    rows.append(row)
                    print(f"{op_name:<14} {device:<6} {case:<24} {mode:<10} {impl:<8} {ms:9.2f} "
                          f"{row['speedup_vs_torch']:8.2f}x {peak:9.1f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "fcnkern": fcnkern.__version__, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _config(args: argparse.Namespace):
    from fcnkern.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def _compare_with_twin(cfg, steps: int) -> dict:
    """Median training-step time of the fcnkern model and its pure-PyTorch twin on one batch, same weights."""
    import dataclasses

    from fcnkern import train as t

    train_set, _, num_classes = t.make_datasets(cfg)
    images, labels = zip(*(train_set[i] for i in range(cfg.batch)), strict=True)
    image = torch.stack(images).to(cfg.device, t.DTYPES[cfg.dtype])
    label = torch.stack(labels).to(cfg.device)
    result = {}
    for name, twin in (("fcnkern", False), ("pytorch", True)):
        c = dataclasses.replace(cfg, twin=twin)
        model = t.build_model(c, num_classes).to(cfg.device, t.DTYPES[cfg.dtype])
        opt, scaler = t.make_optimizer(c, model), t.make_scaler(c)

        def step(model=model, opt=opt, scaler=scaler, c=c):
            t.training_step(c, model, opt, scaler, image, label)

        result[name] = median_ms(step, cfg.device, rounds=steps)
    result["speedup"] = result["pytorch"] / result["fcnkern"]
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from fcnkern import train as t

    cfg = _config(args)
    cfg.check_precision()
    precision = cfg.dtype if cfg.amp is None else f"fp32 weights, {cfg.amp} autocast"
    print(f"training {cfg.model} (width {cfg.width}) on {cfg.data} data, {cfg.size}x{cfg.size}, batch {cfg.batch}, "
          f"{cfg.iters} iterations, recipe {cfg.recipe}, backend {cfg.backend or 'auto'}, {precision} on {cfg.device}",
          flush=True)  # fmt: skip
    from tqdm import tqdm

    summary = t.train(cfg, resume=args.resume, log=tqdm.write)  # between progress-bar redraws
    if summary["rank"] != 0:  # the process group has ended: ranks speak through the summary
        return 0
    before, after = summary["before"], summary["after"]
    line = f"after {summary['iterations']} iterations: "
    if before:
        line += f"mean IU {100 * before['mean_iu']:.1f}% -> "
    line += (f"{100 * after['mean_iu']:.1f}% | pixel acc {100 * after['pixel_acc']:.1f}% | mean acc "
             f"{100 * after['mean_acc']:.1f}% | fw IU {100 * after['fw_iu']:.1f}%")  # fmt: skip
    print(line)
    if summary["ms_per_iter"]:
        print(f"speed: {summary['ms_per_iter']:.0f} ms/iter, {summary['images_per_s']:.1f} images/s")
    if args.compare_steps > 0:
        cmp = _compare_with_twin(cfg, args.compare_steps)
        summary["vs_pytorch"] = cmp
        print(f"training step, same batch and weights: fcnkern {cmp['fcnkern']:.0f} ms vs pure PyTorch "
              f"{cmp['pytorch']:.0f} ms ({cmp['speedup']:.2f}x)")  # fmt: skip
    print(f"checkpoint: {summary['checkpoint']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fcnkern import train as t

    state = t.load_checkpoint(args.checkpoint)
    cfg = t.TrainConfig(**state["config"])
    for key in ("backend", "device", "data", "root"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    _, val_set, num_classes = t.make_datasets(cfg)
    model = t.build_model(cfg, num_classes)
    t._restore(model, state, args.checkpoint)
    model = model.to(cfg.device, t.DTYPES[cfg.dtype])
    scores, _ = t.evaluate(model, val_set, num_classes, cfg)
    print(f"{len(val_set)} images: pixel acc {100 * scores['pixel_acc']:.1f}% | mean acc "
          f"{100 * scores['mean_acc']:.1f}% | mean IU {100 * scores['mean_iu']:.1f}% | fw IU "
          f"{100 * scores['fw_iu']:.1f}%")  # fmt: skip
    png = Path(args.png or Path(cfg.out) / "predictions.png")
    t.save_prediction_grid(model, val_set, cfg, png)
    print(f"predictions: {png}")
    return 0


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be NxCxHxW with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcnkern", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, extension origin and available backends")
    bench = sub.add_parser("bench", help="fcnkern ops vs PyTorch: time and peak memory")
    bench.add_argument("--shapes", type=_shape, nargs="+", default=[(1, 21, 500, 500), (8, 21, 512, 512)],
                       metavar="NxCxHxW", help="cross-entropy logits (default 1x21x500x500 8x21x512x512)")  # fmt: skip
    bench.add_argument("--ops", nargs="+", choices=list(_BENCH_OPS), default=list(_BENCH_OPS),
                       help="which ops (default: all, the whole FCN-8s training step included)")  # fmt: skip
    bench.add_argument("--rounds", type=int, default=5, help="timed calls per case; the median is reported")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    train = sub.add_parser("train", help="train an FCN end to end (default: synthetic scenes, a few CPU minutes)")
    train.add_argument("--model", choices=("fcn32s", "fcn16s", "fcn8s"), help="architecture (default fcn8s)")
    train.add_argument("--width", type=float, help="channel multiplier of VGG16 (default 0.125; 1 = the paper's)")
    train.add_argument("--data", choices=("synthetic", "voc"), help="built-in synthetic scenes or PASCAL VOC")
    train.add_argument("--root", help="PASCAL VOC / SBD directory (with --data voc)")
    train.add_argument("--size", type=int, help="image side: synthetic scene size, or VOC resize (default 64)")
    train.add_argument("--num-classes", dest="num_classes", type=int, help="synthetic classes incl. background")
    train.add_argument("--train-len", dest="train_len", type=int, help="synthetic training scenes")
    train.add_argument("--val-len", dest="val_len", type=int, help="synthetic validation scenes")
    train.add_argument("--batch", type=int, help="images per step per process (default 8)")
    train.add_argument("--iters", type=int, help="training iterations (default 300)")
    train.add_argument("--recipe", choices=("modern", "paper"),
                       help="modern: Adam 1e-3 on the mean loss (default); paper: SGD momentum 0.99, weight decay "
                            "5e-4, summed loss, lr 1e-10")  # fmt: skip
    train.add_argument("--lr", type=float, help="learning rate (overrides the recipe's)")
    train.add_argument("--backend", choices=fcnkern.BACKENDS, help="fcnkern backend (default: automatic)")
    train.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="model and input dtype (default fp32)")
    train.add_argument("--amp", choices=("bf16", "fp16"),
                       help="mixed precision: fp32 weights, forward under torch.autocast in this dtype (fp16 with "
                            "a gradient scaler)")  # fmt: skip
    train.add_argument("--device", help="cpu or cuda (default cpu)")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    train.add_argument("--seed", type=int, help="seed of weights, data order and dropout")
    train.add_argument("--out", help="output directory for checkpoints (default runs/fcn)")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="iterations between saves")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue exactly from this checkpoint")
    train.add_argument("--init-from", dest="init_from", metavar="CHECKPOINT",
                       help="start from a coarser FCN's weights (FCN-16s from FCN-32s, ...)")  # fmt: skip
    train.add_argument("--vgg16-weights", dest="vgg16_weights", metavar="FILE",
                       help="a torchvision VGG16 state_dict file for the backbone (nothing is downloaded)")  # fmt: skip
    train.add_argument("--compare-steps", dest="compare_steps", type=int, default=5,
                       help="training steps timed against the pure-PyTorch twin at the end (0: skip)")  # fmt: skip
    train.add_argument("--json", metavar="FILE", help="also write the summary as JSON")

    ev = sub.add_parser("eval", help="the paper's four metrics for a checkpoint, and a PNG of predictions")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint written by fcnkern train")
    ev.add_argument("--backend", choices=fcnkern.BACKENDS, help="fcnkern backend (default: the checkpoint's)")
    ev.add_argument("--device", help="cpu or cuda (default: the checkpoint's)")
    ev.add_argument("--data", choices=("synthetic", "voc"), help="default: the checkpoint's")
    ev.add_argument("--root", help="PASCAL VOC directory (with --data voc)")
    ev.add_argument("--png", help="where to write the prediction grid (default OUT/predictions.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command in ("train", "eval"):
        try:
            return cmd_train(args) if args.command == "train" else cmd_eval(args)
        except (ValueError, FileNotFoundError, fcnkern.BackendUnavailableError) as exc:
            print(f"fcnkern {args.command}: error: {exc}", file=sys.stderr)
            return 2
    cmd_info(args)
    print()
    return cmd_train(build_parser().parse_args(["train"]))


if __name__ == "__main__":
    sys.exit(main())
