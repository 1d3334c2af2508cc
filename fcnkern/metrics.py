"""The FCN paper's four segmentation metrics from a confusion matrix accumulated on the device.

With n_ij the number of pixels of class i predicted as class j, t_i = sum_j n_ij and n_cl classes (paper, section 5):
pixel accuracy sum_i n_ii / sum_i t_i; mean accuracy (1/n_cl) sum_i n_ii / t_i; mean IU
(1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii); frequency-weighted IU (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j
n_ji - n_ii). As in the reference code, a class whose ratio is 0/0 (absent from the truth, and for IU also from the
predictions) is left out of the means; a class only predicted has IU 0 and counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """num_classes x num_classes int64 counts (rows: truth, columns: prediction) on pred's device, by one
    bincount; pixels labelled ``ignore_index`` are skipped. Labels outside [0, num_classes) raise ValueError."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    t, p = target[valid], pred[valid]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target has labels outside [0, {num_classes}) that are not {ignore_index}")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"predictions outside [0, {num_classes})")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(hist: Tensor) -> dict[str, float]:
    """pixel_acc, mean_acc, mean_iu, fw_iu (fractions in [0, 1]) and per-class IU (NaN where undefined)."""
    h = hist.double()
    diag, truth, predicted = h.diag(), h.sum(1), h.sum(0)
    total = h.sum()
    with torch.no_grad():
        acc = diag / truth  # NaN for classes absent from the truth
        iu = diag / (truth + predicted - diag)  # NaN for classes absent from both
        freq = truth / total
        present = freq > 0
    return {
        "pixel_acc": float(diag.sum() / total),
        "mean_acc": float(acc.nanmean()),
        "mean_iu": float(iu.nanmean()),
        "fw_iu": float((freq[present] * iu[present]).sum()),
        "iu": [float(v) for v in iu],
    }
