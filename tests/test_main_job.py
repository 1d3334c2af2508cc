"""The main job: metrics against hand-computed values, the synthetic and VOC datasets, training that learns, the
fcnkern model and its twin training together, checkpoints and exact resume, the CLI, and two-process DDP."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fcnkern
from fcnkern import metrics
from fcnkern import train as t
from fcnkern.__main__ import main
from fcnkern.data import IGNORE_INDEX, SyntheticScenes, VOCSegmentation, voc_palette

TINY = dict(width=1 / 32, size=32, train_len=32, val_len=8, batch=4, num_classes=3, checkpoint_every=0)


def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])
    hist = metrics.confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(hist, expected)
    s = metrics.segmentation_scores(hist)
    assert s["pixel_acc"] == pytest.approx(5 / 7)
    assert s["mean_acc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)  # class 3: absent from truth, left out
    ius = [2 / 4, 2 / 3, 1 / 2]  # class 3 absent from truth and predictions (the ignored pixel): left out
    assert s["mean_iu"] == pytest.approx(sum(ius) / 3)
    assert math.isnan(s["iu"][3])
    assert s["fw_iu"] == pytest.approx((3 * ius[0] + 2 * ius[1] + 2 * ius[2]) / 7)


def test_class_only_predicted_counts_with_iu_zero():
    hist = metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), num_classes=2)
    s = metrics.segmentation_scores(hist)
    assert s["iu"] == [0.5, 0.0] and s["mean_iu"] == 0.25 and s["mean_acc"] == 0.5


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)


def test_synthetic_scenes_are_reproducible_and_labelled():
    ds = SyntheticScenes(8, 48, num_classes=5, seed=3)
    image, label = ds[2]
    image2, label2 = SyntheticScenes(8, 48, num_classes=5, seed=3)[2]
    assert torch.equal(image, image2) and torch.equal(label, label2)
    assert image.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
    values = set(torch.cat([ds[i][1].flatten() for i in range(8)]).tolist())
    assert 0 in values and IGNORE_INDEX in values and len(values - {0, IGNORE_INDEX}) >= 2
    assert values <= {0, 1, 2, 3, 4, IGNORE_INDEX}
    assert not torch.equal(ds[0][0], SyntheticScenes(8, 48, num_classes=5, seed=4)[0][0])


def _fake_voc(root: Path, ids=("a", "b")) -> Path:
    from PIL import Image

    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ids:
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = Image.fromarray(rng.choice([0, 5, 20, 255], (20, 24)).astype(np.uint8), mode="P")
        label.putpalette(voc_palette().flatten().tolist())
        label.save(root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_loader_reads_the_directory_layout(tmp_path):
    ds = VOCSegmentation(_fake_voc(tmp_path / "voc"), "train")
    image, label = ds[1]
    assert len(ds) == 2 and image.shape == (3, 20, 24) and label.shape == (20, 24)
    assert set(label.unique().tolist()) <= {0, 5, 20, 255}
    with pytest.raises(FileNotFoundError, match="not a PASCAL VOC directory"):
        VOCSegmentation(tmp_path / "missing")


def test_training_lowers_the_loss_and_raises_mean_iu(tmp_path):
    cfg = t.TrainConfig(**{**TINY, "width": 1 / 16, "size": 40, "train_len": 512, "val_len": 32, "batch": 8,
                           "num_classes": 3}, iters=150, out=str(tmp_path))  # fmt: skip
    summary = t.train(cfg, log=lambda *_: None)
    assert summary["last_loss"] < 0.7 * summary["first_loss"]
    assert summary["after"]["mean_iu"] > summary["before"]["mean_iu"] + 0.1


def test_fcnkern_model_and_twin_train_together(tmp_path):
    """Same seed, weights and batches: the losses of the first steps agree."""
    configs = (t.TrainConfig(**TINY, iters=4, twin=is_twin, out=str(tmp_path)) for is_twin in (False, True))
    fused, twin = (_steps(cfg, 4) for cfg in configs)
    np.testing.assert_allclose(fused, twin, rtol=1e-4)


def _steps(cfg: t.TrainConfig, steps: int = 3) -> list[float]:
    """The training loop's step (autocast, scaler, optimizer) ``steps`` times on the first batch: the losses.
    Each step's gradients (left in place by the step) must be fp32 like the weights."""
    train_set, _, num_classes = t.make_datasets(cfg)
    model = t.build_model(cfg, num_classes)
    opt, scaler = t.make_optimizer(cfg, model), t.make_scaler(cfg)
    image, label = (torch.stack(v) for v in zip(*(train_set[i] for i in range(cfg.batch)), strict=True))
    losses = []
    for _ in range(steps):
        loss = t.training_step(cfg, model, opt, scaler, image, label)
        assert loss.dtype == torch.float32
        for name, p in model.named_parameters():
            assert p.dtype == p.grad.dtype == torch.float32, name
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights_and_matches_the_twin(tmp_path, amp):
    """--amp: fp32 weights and gradients; the fcnkern model and its twin, both under autocast, agree; and autocast
    is really on (the losses differ from fp32 training's by the low-precision rounding)."""
    cfg = t.TrainConfig(**TINY, iters=3, amp=amp, out=str(tmp_path))
    fused = _steps(cfg)
    twin = _steps(dataclasses.replace(cfg, twin=True))
    fp32 = _steps(dataclasses.replace(cfg, amp=None))
    np.testing.assert_allclose(fused, twin, rtol=1e-3)  # observed 7e-5 (bf16) and 1e-5 (fp16)
    np.testing.assert_allclose(fused, fp32, rtol=1e-2)
    assert not np.allclose(fused, fp32, rtol=1e-5, atol=0), (fused, fp32)


def test_mixed_precision_fp16_scaler_is_checkpointed_and_resumed(tmp_path):
    """fp16 mixed precision scales the loss; its scaler's state is saved and restored, so resuming continues
    exactly (the growth tracker counts every step of both halves)."""
    full = t.TrainConfig(**TINY, iters=4, amp="fp16", out=str(tmp_path / "full"))
    t.train(full, log=lambda *_: None)
    t.train(dataclasses.replace(full, iters=2, out=str(tmp_path / "half")), log=lambda *_: None)
    t.train(dataclasses.replace(full, out=str(tmp_path / "half")), resume=str(tmp_path / "half" / "last.pt"),
            log=lambda *_: None)  # fmt: skip
    a, b = (t.load_checkpoint(tmp_path / run / "last.pt") for run in ("full", "half"))
    assert a["scaler"]["scale"] == 2.0**16 and a["scaler"]["_growth_tracker"] == 4, a["scaler"]
    assert a["scaler"] == b["scaler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert t.load_checkpoint(tmp_path / "full" / "last.pt")["config"]["amp"] == "fp16"
    with pytest.raises(ValueError, match="use it with --dtype fp32"):
        t.train(dataclasses.replace(full, dtype="bf16"), log=lambda *_: None)


def test_resume_continues_exactly(tmp_path):
    full = t.TrainConfig(**TINY, iters=6, out=str(tmp_path / "full"))
    t.train(full, log=lambda *_: None)
    half = t.TrainConfig(**TINY, iters=3, out=str(tmp_path / "half"))
    t.train(half, log=lambda *_: None)
    rest = t.TrainConfig(**TINY, iters=6, out=str(tmp_path / "half"))
    t.train(rest, resume=str(tmp_path / "half" / "last.pt"), log=lambda *_: None)
    a = t.load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = t.load_checkpoint(tmp_path / "half" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        t.load_checkpoint(bad)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an fcnkern checkpoint"):
        t.load_checkpoint(tmp_path / "other.pt")
    cfg = t.TrainConfig(**TINY, iters=1, out=str(tmp_path / "run"))
    t.train(cfg, log=lambda *_: None)
    wider = t.TrainConfig(**{**TINY, "width": 1 / 16}, iters=2, out=str(tmp_path / "run2"))
    with pytest.raises(ValueError, match="does not fit this model"):
        t.train(wider, resume=str(tmp_path / "run" / "last.pt"), log=lambda *_: None)


def test_cli_train_eval_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--width", "0.03125", "--size", "32", "--train-len", "16", "--val-len", "4", "--batch", "4",
            "--iters", "2", "--num-classes", "3", "--out", str(out), "--compare-steps", "1"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean IU" in text and "pure PyTorch" in text and (out / "last.pt").exists()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--png", str(tmp_path / "p.png")]) == 0
    assert "mean IU" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 0
    assert main(["train", "--data", "voc", "--root", str(tmp_path / "nowhere"), "--iters", "1"]) == 2
    assert "not a PASCAL VOC directory" in capsys.readouterr().err
    assert main(["train", "--data", "voc", "--iters", "1"]) == 2
    assert "--root" in capsys.readouterr().err
    assert main(["train", "--amp", "bf16", "--dtype", "fp16", "--iters", "1"]) == 2
    assert "use it with --dtype fp32" in capsys.readouterr().err
    assert main([*args[:-4], "--amp", "bf16", "--out", str(tmp_path / "amp"), "--compare-steps", "1"]) == 0
    assert "fp32 weights, bf16 autocast" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "amp" / "last.pt"), "--png", str(tmp_path / "q.png")]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--model", "fcn4s"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--recipe" in capsys.readouterr().out


def test_cli_trains_on_a_voc_tree(tmp_path, capsys):
    root = _fake_voc(tmp_path / "voc", ids=("a", "b", "c", "d"))
    args = ["train", "--data", "voc", "--root", str(root), "--size", "24", "--width", "0.03125", "--batch", "2",
            "--iters", "2", "--out", str(tmp_path / "o"), "--compare-steps", "0"]  # fmt: skip
    assert main(args) == 0
    assert "after 2 iterations" in capsys.readouterr().out


def test_two_process_ddp_keeps_replicas_in_sync(tmp_path):
    """torchrun with gloo on CPU: both ranks end with the same parameters and the same all-reduced metrics."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from fcnkern import train as t\n"
        "cfg = t.TrainConfig(width=1/32, size=32, train_len=16, val_len=4, batch=2, num_classes=3, iters=3,\n"
        "                    checkpoint_every=0, out=sys.argv[1])\n"
        "models = []\n"
        "s = t.train(cfg, log=lambda *_: None, on_finish=models.append)\n"
        "rank = int(os.environ['RANK'])\n"
        "flat = torch.cat([p.detach().flatten() for p in models[0].parameters()])\n"
        "json.dump({'sum': float(flat.double().sum()), 'iu': s['after']['mean_iu']},\n"
        "          open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w'))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
         str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sum"] == r1["sum"] and r0["iu"] == r1["iu"]


def test_cli_bench_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--ops", "upsample", "cross_entropy", "--shapes", "1x5x8x8", "--rounds", "1",
                 "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    impls = {(r["op"], r["mode"], r["impl"]) for r in rows}
    assert ("upsample", "fwd+bwd", "torch") in impls and ("cross_entropy", "fwd", "torch") in impls
    if fcnkern.backend_info("cpu").available:
        assert ("upsample", "fwd+bwd", "cpu") in impls and ("cross_entropy", "fwd+bwd", "cpu") in impls
    assert all(r["ms"] > 0 for r in rows) and "vs torch" in capsys.readouterr().out
