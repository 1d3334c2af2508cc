"""Triton kernel of the fused FCN head: fixed bilinear upsampling by f, crop, and softmax cross-entropy, without the
N x C x H x W full-resolution logits or their gradient (the maths is in cpp/upsample_ce.h).

The kept full-resolution pixels of cell (r, q) (full rows r f .. r f + f - 1, columns likewise) all read the same
2 x 2 x C scores. A program owns BLOCK_P of one cell's kept pixels and walks the classes BLOCK_C at a time: each
logit tile is four outer products (tap weights per pixel x scores per class), then an online max and rescaled sum
per pixel gives the loss. With a gradient, a second walk recomputes the tile (four multiply-adds per logit, no
memory traffic) and reduces the logit gradient over the pixels into the four weighted per-class partials of this
slice of the cell, stored to a workspace; combine_kernel then sums, for each score pixel, the partials of the
four cells that tap it over every slice, in a fixed order (deterministic; no atomics).

Labels outside [0, C) that are not ignore_index give a NaN loss and gradient at that pixel (no host sync).
"""

from __future__ import annotations

import triton
import triton.language as tl
from fcnkern.kernels.cross_entropy import class_weight

__all__ = ["COMBINE_BLOCK", "HEAD_NUM_WARPS", "combine_kernel", "head_blocks", "head_kernel", "launch_configs"]

HEAD_NUM_WARPS = 4
COMBINE_BLOCK = 256


def head_blocks(factor: int, num_classes: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): pixels of one cell per program (256, or 64 / 16 for small cells so that a program is not
    mostly padding: an FCN-8s cell has 64) and classes per step (32 as in the plain loss, 8 for C <= 8). Three by
    two shapes, so that every one is compile-checked."""
    cell = factor * factor
    return (16 if cell <= 16 else 64 if cell <= 64 else 256), (8 if num_classes <= 8 else 32)


@triton.jit
def _logit_tile(s_base, c, cmask, ss_c, off00, off01, off10, off11, w00, w01, w10, w11, ACC: tl.constexpr):
    """BLOCK_C x BLOCK_P logits of classes c at the program's pixels: four outer products of scores and weights."""
    cs = c.to(tl.int64) * ss_c
    s00 = tl.load(s_base + off00 + cs, mask=cmask, other=0.0).to(ACC)
    s01 = tl.load(s_base + off01 + cs, mask=cmask, other=0.0).to(ACC)
    s10 = tl.load(s_base + off10 + cs, mask=cmask, other=0.0).to(ACC)
    s11 = tl.load(s_base + off11 + cs, mask=cmask, other=0.0).to(ACC)
    return (
        s00[:, None] * w00[None, :]
        + s01[:, None] * w01[None, :]
        + s10[:, None] * w10[None, :]
        + s11[:, None] * w11[None, :]
    )


@triton.jit
def head_kernel(
    s_ptr, t_ptr, w_ptr, g_ptr, loss_ptr, ws_ptr,
    N, C, h, w, H, W, f, top, left, r0, q0, CR, CQ, S,
    ss_n, ss_c, ss_h, ss_w,
    t_sn, t_sh, t_sw,
    g_sn, g_sh, g_sw,
    ignore_index, has_weight,
    WRITE_LOSS: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_UPSTREAM: tl.constexpr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Grid: S slices x CQ x (N * CR) cells. loss: N x H x W contiguous (WRITE_LOSS). ws: 4 x N x C x CR x CQ x S
    partials (WITH_GRAD), for an upstream gradient of 1 or g (N x H x W, HAS_UPSTREAM)."""
    sl = tl.program_id(0)
    cq = tl.program_id(1)
    cr = tl.program_id(2) % CR
    n = tl.program_id(2) // CR
    r = r0 + cr
    q = q0 + cq
    u_lo = tl.maximum(top - r * f, 0)
    u_hi = tl.minimum(top + H - r * f, f)
    v_lo = tl.maximum(left - q * f, 0)
    v_hi = tl.minimum(left + W - q * f, f)
    nv = v_hi - v_lo
    count = (u_hi - u_lo) * nv

    p = sl * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < count
    u = u_lo + p // nv
    v = v_lo + p % nv
    y = (r * f + u - top).to(tl.int64)
    x = (q * f + v - left).to(tl.int64)
    a1 = (u.to(ACC) + 0.5) / f
    b1 = (v.to(ACC) + 0.5) / f
    # Taps outside the input weigh 0 (their clamped index is never used for a nonzero term); so do padding lanes.
    a0 = tl.where(pmask & (r >= 1), 1.0 - a1, 0.0)
    a1 = tl.where(pmask & (r < h), a1, 0.0)
    b0 = tl.where(q >= 1, 1.0 - b1, 0.0)
    b1 = tl.where(q < w, b1, 0.0)
    w00, w01, w10, w11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    row0 = tl.maximum(r - 1, 0).to(tl.int64) * ss_h
    row1 = tl.minimum(r, h - 1).to(tl.int64) * ss_h
    col0 = tl.maximum(q - 1, 0).to(tl.int64) * ss_w
    col1 = tl.minimum(q, w - 1).to(tl.int64) * ss_w
    off00, off01, off10, off11 = row0 + col0, row0 + col1, row1 + col0, row1 + col1
    s_base = s_ptr + n.to(tl.int64) * ss_n

    label = tl.load(t_ptr + n * t_sn + y * t_sh + x * t_sw, mask=pmask, other=ignore_index)
    m = tl.full([BLOCK_P], float("-inf"), ACC)
    s = tl.zeros([BLOCK_P], ACC)
    xt = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        v_tile = _logit_tile(s_base, c, cmask, ss_c, off00, off01, off10, off11, w00, w01, w10, w11, ACC)
        v_tile = tl.where(cmask[:, None], v_tile, float("-inf"))
        m_new = tl.maximum(m, tl.max(v_tile, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(v_tile - m_new[None, :]), axis=0)
        xt += tl.sum(tl.where(c[:, None] == label[None, :], v_tile, 0.0), axis=0)
        m = m_new
    ls = tl.log(s)

    valid = label != ignore_index
    in_range = (label >= 0) & (label < C)
    wt = class_weight(w_ptr, label, pmask & valid & in_range, has_weight, ACC)
    if WRITE_LOSS:
        loss = tl.where(valid, tl.where(in_range, wt * ((m - xt) + ls), float("nan")), 0.0)
        tl.store(loss_ptr + (n * H + y) * W + x, loss, mask=pmask)
    if WITH_GRAD:
        g = wt
        if HAS_UPSTREAM:
            g = g * tl.load(g_ptr + n * g_sn + y * g_sh + x * g_sw, mask=pmask & valid, other=0.0).to(ACC)
        g = tl.where(pmask & valid, tl.where(in_range, g, float("nan")), 0.0)
        ws_slice = (n.to(tl.int64) * C * CR + cr) * CQ * S + cq * S + sl
        plane = tl.cast(N, tl.int64) * C * CR * CQ * S  # one tap's block; tl.cast: N may be a constexpr 1
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            v_tile = _logit_tile(s_base, c, cmask, ss_c, off00, off01, off10, off11, w00, w01, w10, w11, ACC)
            prob = tl.exp((v_tile - m[None, :]) - ls[None, :])
            dlogit = tl.where(c[:, None] == label[None, :], prob - 1.0, prob)
            d = tl.where(g[None, :] == 0.0, 0.0, g[None, :] * dlogit)
            at = ws_ptr + ws_slice + c.to(tl.int64) * (CR * CQ * S)
            tl.store(at, tl.sum(d * w00[None, :], axis=1), mask=cmask)
            tl.store(at + plane, tl.sum(d * w01[None, :], axis=1), mask=cmask)
            tl.store(at + 2 * plane, tl.sum(d * w10[None, :], axis=1), mask=cmask)
            tl.store(at + 3 * plane, tl.sum(d * w11[None, :], axis=1), mask=cmask)


@triton.jit
def combine_kernel(ws_ptr, grad_ptr, total, NC, h, w, r0, q0, CR, CQ, S, BLOCK: tl.constexpr):
    """Grid: cdiv(total, BLOCK) programs over grad (NC x h x w, contiguous, the workspace's dtype; total = NC h w).
    Score pixel (i, j) is tap (a, b) of cell (i + 1 - a, j + 1 - b): its gradient is those taps' partials in ws
    (4 x NC x CR x CQ x S) over every slice, added in a fixed order (taps 3..0, slices in order; deterministic).
    The Triton twin of combine_one in cpp/upsample_ce.h: one launch where a slice sum, a zero fill and four strided
    adds took six."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    j = offs % w
    i = (offs // w) % h
    nc = offs // w // h
    acc = tl.zeros([BLOCK], dtype=ws_ptr.dtype.element_ty)
    for k in tl.static_range(4):
        cr = i + (1 - (3 - k) // 2) - r0
        cq = j + (1 - (3 - k) % 2) - q0
        ok = mask & (cr >= 0) & (cr < CR) & (cq >= 0) & (cq < CQ)
        base = (((3 - k) * NC + nc) * CR + cr) * CQ * S + cq * S
        for s in range(S):
            acc += tl.load(ws_ptr + base + s, mask=ok, other=0.0)
    tl.store(grad_ptr + offs, acc, mask=mask)


def launch_configs():
    """Every (name, kernel, signature, constexprs, num_warps) the launcher in fcnkern.upsample_ce can produce: all
    scores dtypes, the forward with and without the gradient, the per-pixel backward, and every block shape (class
    weights or none is a run-time switch). Used to prove they compile for each GPU architecture."""
    ints = "i32"
    for scores_ty, acc_ty, acc in (("fp32", "fp32", tl.float32), ("fp16", "fp32", tl.float32),
                                   ("bf16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)):  # fmt: skip
        sig = {
            "s_ptr": f"*{scores_ty}", "t_ptr": "*i64", "w_ptr": f"*{acc_ty}", "g_ptr": f"*{acc_ty}",
            "loss_ptr": f"*{acc_ty}", "ws_ptr": f"*{acc_ty}",
            **{name: ints for name in ("N", "C", "h", "w", "H", "W", "f", "top", "left", "r0", "q0", "CR", "CQ",
                                       "S", "ss_n", "ss_c", "ss_h", "ss_w", "t_sn", "t_sh", "t_sw", "g_sn",
                                       "g_sh", "g_sw", "ignore_index")},
            "has_weight": "u1",
        }  # fmt: skip
        for write_loss, with_grad, upstream in ((True, False, False), (True, True, False), (False, True, True)):
            for block_p in (16, 64, 256):
                for block_c in (8, 32):
                    consts = {
                        "WRITE_LOSS": write_loss, "WITH_GRAD": with_grad,
                        "HAS_UPSTREAM": upstream, "ACC": acc, "BLOCK_P": block_p, "BLOCK_C": block_c,
                    }  # fmt: skip
                    tag = f"{scores_ty}_l{int(write_loss)}g{int(with_grad)}u{int(upstream)}"
                    yield f"head_{tag}_p{block_p}c{block_c}", head_kernel, sig, consts, HEAD_NUM_WARPS
        if scores_ty in ("fp16", "bf16"):
            continue  # their workspace is fp32, as fp32's: one combine per workspace dtype
        combine_sig = {"ws_ptr": f"*{acc_ty}", "grad_ptr": f"*{acc_ty}", "total": "i64",
                       **{name: ints for name in ("NC", "h", "w", "r0", "q0", "CR", "CQ", "S")}}  # fmt: skip
        yield f"head_combine_{acc_ty}", combine_kernel, combine_sig, {"BLOCK": COMBINE_BLOCK}, HEAD_NUM_WARPS
