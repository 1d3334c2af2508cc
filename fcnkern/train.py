"""Training and evaluation of an FCN end to end: the main job behind ``python -m fcnkern train`` / ``eval``.

One process, or several through ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA): each rank takes
its share of every epoch's shuffled order (DistributedSampler), gradients are averaged by DDP, and the confusion
matrix of the evaluation is summed over ranks. Rank 0 alone prints, saves checkpoints and writes files.

Mixed precision (``amp="bf16"`` or ``"fp16"``, the CLI's ``--amp``): fp32 weights and optimiser state, each step's
forward under ``torch.autocast`` in that dtype (the fcnkern layers cast as nn.Conv2d does, the losses stay fp32),
and for fp16 a ``torch.amp.GradScaler`` so that small gradients do not flush to zero. Evaluation runs under the same
autocast. ``dtype`` instead casts the whole model and its input (weights and updates in that dtype too).

Checkpoints hold the model, the optimiser, the gradient scaler (fp16 mixed precision), the iteration, the RNG state
and the configuration; they are written to a temporary file and renamed, so a crash never leaves a half-written
one. Resuming continues exactly: the epoch's order is a function of (seed, epoch), and the batches already done are
skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fcnkern import models
from fcnkern.data import IGNORE_INDEX, SyntheticScenes, VOCSegmentation, denormalize, voc_palette
from fcnkern.metrics import confusion_matrix, segmentation_scores

__all__ = ["TrainConfig", "autocast", "evaluate", "load_checkpoint", "make_scaler", "save_checkpoint", "train",
           "training_step"]  # fmt: skip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in checkpoints). Defaults: the built-in synthetic scenes and a small
    FCN-8s (width 1/8) that learns them in a few minutes on 2 CPU cores."""

    model: str = "fcn8s"
    width: float = 0.125
    data: str = "synthetic"
    root: str | None = None
    size: int = 64
    num_classes: int = 5
    train_len: int = 2048
    val_len: int = 128
    batch: int = 8
    iters: int = 300
    recipe: str = "modern"  # modern: Adam, mean loss; paper: SGD momentum 0.99, summed loss, fixed tiny lr
    lr: float | None = None
    backend: str | None = None
    twin: bool = False
    dtype: str = "fp32"
    amp: str | None = None  # mixed precision: fp32 weights, forward under torch.autocast in bf16 / fp16
    device: str = "cpu"
    compile: bool = False
    seed: int = 0
    out: str = "runs/fcn"
    checkpoint_every: int = 100
    init_from: str | None = None
    vgg16_weights: str | None = None

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.recipe == "modern" else 1e-10

    def check_precision(self) -> None:
        """ValueError for a dtype or amp setting the loop cannot run."""
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp dtype {self.amp!r}; choose one of {', '.join(AMP_DTYPES)}")
        if self.amp is not None and self.dtype != "fp32":
            raise ValueError(f"--amp {self.amp} keeps fp32 weights and computes in {self.amp}: use it with --dtype "
                             f"fp32, not {self.dtype}")  # fmt: skip


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """torch.autocast in cfg.amp's dtype on cfg.device's type, or a no-op context without amp."""
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=AMP_DTYPES[cfg.amp])


def make_scaler(cfg: TrainConfig) -> torch.amp.GradScaler:
    """The loss scaler of fp16 mixed precision; for every other setting a disabled one, whose scale(), step()
    and update() are plain loss, optimizer.step() and nothing."""
    return torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.amp == "fp16")


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process)
# ---------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device: str) -> bool:
    """Join the torchrun job if there is one; True if this call created the process group (and must end it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return True
    return False


def _is_main() -> bool:
    return _world()[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# Data, model, checkpoints
# ---------------------------------------------------------------------------------------------------------------


def make_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, int]:
    """(train, val, num_classes) for the configured data."""
    if cfg.data == "synthetic":
        train = SyntheticScenes(cfg.train_len, cfg.size, cfg.num_classes, seed=cfg.seed)
        val = SyntheticScenes(cfg.val_len, cfg.size, cfg.num_classes, seed=cfg.seed + 1_000)
        return train, val, cfg.num_classes
    if cfg.data == "voc":
        if cfg.root is None:
            raise ValueError("--data voc needs --root DIR (a PASCAL VOC / SBD directory)")
        train = VOCSegmentation(cfg.root, "train", size=cfg.size)
        val = VOCSegmentation(cfg.root, "val", size=cfg.size)
        return train, val, VOCSegmentation.NUM_CLASSES
    raise ValueError(f"unknown data {cfg.data!r}; choose synthetic or voc")


def build_model(cfg: TrainConfig, num_classes: int) -> models.FCN:
    torch.manual_seed(cfg.seed)
    model = models.FCN(cfg.model, num_classes, backend=cfg.backend, twin=cfg.twin, width=cfg.width)
    if cfg.vgg16_weights:
        state = torch.load(cfg.vgg16_weights, map_location="cpu", weights_only=True)
        model.load_state_dict(models.vgg16_backbone_from_state_dict(state), strict=False)
    if cfg.init_from:
        source = torch.load(cfg.init_from, map_location="cpu", weights_only=False)
        models.init_from(model, source["model"] if isinstance(source, dict) and "model" in source else source)
    return model


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.recipe == "paper":
        return torch.optim.SGD(params, lr=cfg.learning_rate(), momentum=0.99, weight_decay=5e-4)
    if cfg.recipe == "modern":
        return torch.optim.Adam(params, lr=cfg.learning_rate())
    raise ValueError(f"unknown recipe {cfg.recipe!r}; choose modern or paper")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    cfg: TrainConfig, scaler: torch.amp.GradScaler | None = None) -> None:  # fmt: skip
    """Write atomically: to a temporary file in the same directory, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "fcnkern-checkpoint-1",
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iteration": iteration,
        "rng": torch.get_rng_state(),
        "config": dataclasses.asdict(cfg),
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; ValueError (not a traceback from pickle) if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != "fcnkern-checkpoint-1":
        raise ValueError(f"{path} is not an fcnkern checkpoint")
    return state


def _restore(model: nn.Module, state: dict, path: str) -> None:
    try:
        _unwrap(model).load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"checkpoint {path} does not fit this model ({first}); check --model / --width") from None


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------------------------


def training_loss(cfg: TrainConfig, net: nn.Module, image: Tensor, target: Tensor) -> Tensor:
    """The step's loss through the model (``FCN.forward(x, target)``): the fcnkern network's fused head (final
    upsampling + crop + loss without full-resolution logits), F.cross_entropy on the twin. The modern recipe
    averages over labelled pixels; the paper's sums."""
    reduction = "mean" if cfg.recipe == "modern" else "sum"
    return net(image, target, reduction=reduction, ignore_index=IGNORE_INDEX)


def training_step(cfg: TrainConfig, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  image: Tensor, target: Tensor) -> Tensor:  # fmt: skip
    """One optimiser step on one batch: the loss under cfg's autocast, the (scaled) backward, the step. Returns the
    loss (fp32 under autocast, unscaled)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(cfg):
        loss = training_loss(cfg, net, image, target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def _progress(iterable, total: int, desc: str, initial: int = 0):
    if not _is_main():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, cfg: TrainConfig) -> tuple[dict, Tensor]:
    """The paper's four metrics on ``dataset`` (each rank its share; the confusion matrix is summed over ranks).
    Leaves the global RNG as it found it (a DataLoader draws a seed from it), so evaluating never changes how
    training continues: a resumed run repeats an uninterrupted one exactly."""
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model, dataset, num_classes, cfg)


def _evaluate(model: nn.Module, dataset: Dataset, num_classes: int, cfg: TrainConfig) -> tuple[dict, Tensor]:
    rank, world = _world()
    model.eval()
    sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(dataset, batch_size=cfg.batch, sampler=sampler)
    hist = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=cfg.device)
    for image, label in _progress(loader, len(loader), "eval"):
        with autocast(cfg):
            logits = model(image.to(cfg.device, DTYPES[cfg.dtype]))
        hist += confusion_matrix(logits.argmax(1), label.to(cfg.device), num_classes, IGNORE_INDEX)
    if world > 1:
        dist.all_reduce(hist)
    model.train()
    return segmentation_scores(hist), hist


def _batches(sampler: DistributedSampler, epoch: int, batch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


def train(cfg: TrainConfig, resume: str | None = None, log=print, on_finish=None) -> dict:
    """Train for cfg.iters iterations, evaluate, save the final checkpoint; returns a summary dict (JSON-ready).
    ``on_finish(model)``, if given, sees the trained model (every rank's replica under DDP). A process group this
    call created is ended before it returns: a rank leaving with gloo's threads still up aborts the process."""
    owns_group = _init_distributed(cfg.device)
    try:
        summary = _train(cfg, resume, log, on_finish)
        if owns_group:
            dist.barrier()  # rank 0 may still be writing the checkpoint
        return summary
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: str | None, log, on_finish) -> dict:
    cfg.check_precision()
    rank, world = _world()
    train_set, val_set, num_classes = make_datasets(cfg)
    model = build_model(cfg, num_classes).to(cfg.device, DTYPES[cfg.dtype])
    optimizer = make_optimizer(cfg, model)
    scaler = make_scaler(cfg)
    start = 0
    if resume:
        state = load_checkpoint(resume)
        _restore(model, state, resume)
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        torch.set_rng_state(state["rng"])
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    if cfg.compile:
        net = torch.compile(net)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    per_epoch = len(_batches(sampler, 0, cfg.batch))
    if per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images over {world} ranks) is smaller than one batch")
    out = Path(cfg.out)
    before = evaluate(net, val_set, num_classes, cfg)[0] if start == 0 else None
    if before is not None and _is_main():
        log(f"before training: mean IU {100 * before['mean_iu']:.1f}%, pixel acc {100 * before['pixel_acc']:.1f}%")

    net.train()
    it, losses, step_times = start, [], []
    order_epoch, order = -1, []  # the batches of the current epoch, drawn once per epoch
    bar = _progress(range(start, cfg.iters), cfg.iters, "train", initial=start)
    for _ in bar:
        epoch, pos = divmod(it, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, _batches(sampler, epoch, cfg.batch)
        indices = order[pos]
        images, labels = zip(*(train_set[i] for i in indices), strict=True)
        image = torch.stack(images).to(cfg.device, DTYPES[cfg.dtype])
        label = torch.stack(labels).to(cfg.device)
        t0 = time.perf_counter()
        loss = training_step(cfg, net, optimizer, scaler, image, label)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        it += 1
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if (it % per_epoch == 0 or it == cfg.iters) and _is_main():
            recent = losses[-min(len(losses), per_epoch) :]
            log(f"epoch {it / per_epoch:.2f} | iter {it}/{cfg.iters} | loss {sum(recent) / len(recent):.4g} | "
                f"{1000 * sum(step_times[-len(recent):]) / len(recent):.0f} ms/iter")  # fmt: skip
        if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.iters and _is_main():
            save_checkpoint(out / "last.pt", model, optimizer, it, cfg, scaler)
    scores, _ = evaluate(net, val_set, num_classes, cfg)
    if on_finish is not None:
        on_finish(model)
    if _is_main():
        save_checkpoint(out / "last.pt", model, optimizer, it, cfg, scaler)
    timed = step_times[len(step_times) // 5 :] or step_times  # the first steps warm up
    summary = {
        "iterations": it,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "ms_per_iter": 1000 * sum(timed) / len(timed) if timed else None,
        "images_per_s": cfg.batch * world * len(timed) / sum(timed) if timed else None,
        "before": before,
        "after": scores,
        "checkpoint": str(out / "last.pt"),
        "rank": rank,
    }
    return summary


def save_prediction_grid(model: nn.Module, dataset: Dataset, cfg: TrainConfig, path: Path, count: int = 4) -> None:
    """A PNG of ``count`` rows: image | ground truth | prediction, labels in the VOC palette (void white)."""
    from PIL import Image

    palette = voc_palette()
    palette[255] = (255, 255, 255)
    model.eval()
    rows = []
    with torch.no_grad(), autocast(cfg):
        for i in range(min(count, len(dataset))):
            image, label = dataset[i]
            pred = model(image[None].to(cfg.device, DTYPES[cfg.dtype])).argmax(1)[0].cpu()
            rgb = (denormalize(image).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            rows.append([rgb, palette[label.numpy()], palette[pred.numpy()]])
    import numpy as np

    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
