"""Triton kernels of the fused pixelwise softmax cross-entropy.

A program owns BLOCK_P consecutive pixels and walks the classes BLOCK_C at a time, holding a BLOCK_C x BLOCK_P tile
whose pixel axis is the fast one: in NCHW the pixel stride is 1 and the class stride H*W, so every tile row is one
coalesced load. The forward keeps an online max and rescaled sum per pixel (one pass over the logits); the
backward recomputes softmax as exp((x - max) - logsum) from the two saved per-pixel statistics (one read of the
logits, one write of the gradient). Max and log-sum stay separate so that x - max is exact for large logits.
Pixels are addressed through (n, h, w) strides, so NCHW, channels_last and cropped views work unchanged.

A program's pixels are BLOCK_P consecutive ones of a single row (n, h): the row comes from the program id by one
scalar division, and the pixel offsets are w * stride_w with w = start + arange, so the compiler sees the pixel axis
as contiguous whatever W is. Decoding a flat pixel index per element instead (p % W, p // W) hid that contiguity when
W was not a multiple of 16, and triton 3.6 then laid the warps' threads along the class axis: 32 class planes per
load, 60x the DRAM traffic (ncu, H100), 14-40x slower. The launcher makes a whole image one row where its pixels are
back to back (contiguous NCHW), so that short rows do not leave lanes idle.

Accumulation is fp32 (fp64 for fp64 logits, which exists for gradcheck). Labels outside [0, C) that are not
ignore_index give a NaN loss at that pixel: raising would need a host sync (the Python layer checks CPU tensors).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "CE_BLOCK_P",
    "CE_SCALE_BLOCK",
    "ce_block_c",
    "ce_bwd_kernel",
    "ce_fwd_kernel",
    "ce_scale_kernel",
    "class_weight",
]

# 256 pixels x up to 32 classes is 64 fp32 values per thread at 4 warps: enough loads in flight to cover DRAM
# latency, few enough registers for full occupancy.
CE_BLOCK_P = 256
CE_NUM_WARPS = 4
# Elements per program of the in-place gradient scaling: 8 per thread at 4 warps.
CE_SCALE_BLOCK = 1024


def ce_block_c(num_classes: int) -> int:
    """Class-chunk width for C classes: all of them when C <= 32, else chunks of 32."""
    return min(triton.next_power_of_2(num_classes), 32)


@triton.jit
def _row_pixels(pid, H, W, BLOCK_P: tl.constexpr):
    """(n, h) of this program's row (int64 scalars), w (int32 vector), the in-row mask, and each pixel's flat index
    n*H*W + h*W + w (int64)."""
    blocks_per_row = tl.cdiv(W, BLOCK_P)
    row = pid.to(tl.int64) // blocks_per_row
    w = (pid % blocks_per_row) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = row // H
    h = row % H
    return n, h, w, w < W, row * W + w


@triton.jit
def class_weight(w_ptr, label, mask, has_weight, ACC: tl.constexpr):
    """weight[label] where mask, else 1 (a lane outside mask is never used); has_weight is a run-time bool, so
    weighted and unweighted losses share one compiled kernel, and without a weight nothing is read."""
    return tl.load(w_ptr + label, mask=mask & has_weight, other=1.0).to(ACC)


@triton.jit
def ce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, stats_ptr, gx_ptr,
    num_pixels, C, H, W,
    x_sn, x_sc, x_sh, x_sw,
    t_sn, t_sh, t_sw,
    gx_sn, gx_sc, gx_sh, gx_sw,
    ignore_index, has_weight,
    WITH_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    # WITH_GRAD: also the logits' gradient for an upstream gradient of 1, and no stats. ONE_CHUNK (C <= BLOCK_C, FCN's
    # 21 classes): the tile stays in registers and the gradient comes from it, each logit read once; otherwise a
    # second sweep over this program's classes re-reads them.
    n, h, w, pmask, p = _row_pixels(tl.program_id(0), H, W, BLOCK_P)
    x_pix = n * x_sn + h * x_sh + w * x_sw
    label = tl.load(t_ptr + n * t_sn + h * t_sh + w * t_sw, mask=pmask, other=ignore_index)

    if ONE_CHUNK:
        c = tl.arange(0, BLOCK_C)
        v = tl.load(
            x_ptr + c.to(tl.int64)[:, None] * x_sc + x_pix[None, :],
            mask=(c < C)[:, None] & pmask[None, :],
            other=float("-inf"),
        ).to(ACC)
        m = tl.max(v, axis=0)
        # Lanes past the last pixel (and all--inf rows) have m = -inf; shift by 0 there instead of making NaN.
        s = tl.sum(tl.exp(v - tl.where(m == float("-inf"), 0.0, m)[None, :]), axis=0)
        xt = tl.sum(tl.where(c[:, None] == label[None, :], v, 0.0), axis=0)
    else:
        m = tl.full([BLOCK_P], float("-inf"), ACC)
        s = tl.zeros([BLOCK_P], ACC)
        xt = tl.zeros([BLOCK_P], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            v = tl.load(
                x_ptr + c.to(tl.int64)[:, None] * x_sc + x_pix[None, :],
                mask=cmask[:, None] & pmask[None, :],
                other=float("-inf"),
            ).to(ACC)
            m_new = tl.maximum(m, tl.max(v, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(v - shift[None, :]), axis=0)
            xt += tl.sum(tl.where(c[:, None] == label[None, :], v, 0.0), axis=0)
            m = m_new
    # Lanes past the last pixel are never stored; neutral statistics keep them free of log(0) and inf * 0.
    m = tl.where(pmask, m, 0.0)
    ls = tl.log(tl.where(pmask, s, 1.0))

    valid = label != ignore_index
    in_range = (label >= 0) & (label < C)
    wt = class_weight(w_ptr, label, pmask & valid & in_range, has_weight, ACC)
    loss = tl.where(valid, tl.where(in_range, wt * ((m - xt) + ls), float("nan")), 0.0)
    tl.store(loss_ptr + p, loss, mask=pmask)
    if WITH_GRAD:
        g = tl.where(valid, tl.where(in_range, wt, float("nan")), 0.0)
        gx_pix = n * gx_sn + h * gx_sh + w * gx_sw
        if ONE_CHUNK:  # the tile still in registers
            c = tl.arange(0, BLOCK_C)
            _store_class_grad(gx_ptr, gx_pix, gx_sc, v, c, (c < C)[:, None] & pmask[None, :], g, m, ls, label)
        else:
            _store_grad(x_ptr, x_pix, x_sc, gx_ptr, gx_pix, gx_sc, g, m, ls, label, pmask, C, ACC, BLOCK_C)
    else:
        tl.store(stats_ptr + p, m, mask=pmask)
        tl.store(stats_ptr + num_pixels + p, ls, mask=pmask)


@triton.jit
def _store_grad(x_ptr, x_pix, x_sc, gx_ptr, gx_pix, gx_sc, g, m, ls, label, pmask, C, ACC: tl.constexpr,
                BLOCK_C: tl.constexpr):  # fmt: skip
    """gx = g * (softmax(x) - onehot(label)) over all classes of a BLOCK_P-pixel tile, from the softmax statistics
    m (max) and ls (log sum exp(x - m)); g is the per-pixel upstream gradient times the label's class weight."""
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & pmask[None, :]
        v = tl.load(x_ptr + c.to(tl.int64)[:, None] * x_sc + x_pix[None, :], mask=mask, other=0.0).to(ACC)
        _store_class_grad(gx_ptr, gx_pix, gx_sc, v, c, mask, g, m, ls, label)


@triton.jit
def _store_class_grad(gx_ptr, gx_pix, gx_sc, v, c, mask, g, m, ls, label):
    """gx = g * (softmax - onehot(label)) for a classes x pixels tile of logits v (classes c), from the pixels'
    statistics m and ls: the one expression of every gradient these kernels write, so that the training forward's
    and a backward's that recomputes from saved statistics agree bit for bit."""
    prob = tl.exp((v - m[None, :]) - ls[None, :])
    grad = g[None, :] * tl.where(c[:, None] == label[None, :], prob - 1.0, prob)
    tl.store(gx_ptr + c.to(tl.int64)[:, None] * gx_sc + gx_pix[None, :], grad.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ce_bwd_kernel(
    g_ptr, x_ptr, t_ptr, w_ptr, stats_ptr, gx_ptr,
    num_pixels, C, H, W,
    g_sn, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    t_sn, t_sh, t_sw,
    gx_sn, gx_sc, gx_sh, gx_sw,
    ignore_index, has_weight,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    n, h, w, pmask, p = _row_pixels(tl.program_id(0), H, W, BLOCK_P)
    x_pix = n * x_sn + h * x_sh + w * x_sw
    gx_pix = n * gx_sn + h * gx_sh + w * gx_sw
    label = tl.load(t_ptr + n * t_sn + h * t_sh + w * t_sw, mask=pmask, other=ignore_index)
    m = tl.load(stats_ptr + p, mask=pmask, other=0.0)
    ls = tl.load(stats_ptr + num_pixels + p, mask=pmask, other=0.0)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < C)
    g = tl.load(g_ptr + n * g_sn + h * g_sh + w * g_sw, mask=pmask & valid, other=0.0).to(ACC)
    g = g * class_weight(w_ptr, label, pmask & valid & in_range, has_weight, ACC)
    g = tl.where(valid & ~in_range, float("nan"), g)
    _store_grad(x_ptr, x_pix, x_sc, gx_ptr, gx_pix, gx_sc, g, m, ls, label, pmask, C, ACC, BLOCK_C)


@triton.jit
def ce_scale_kernel(gx_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """gx *= scale[0] in place, over the numel elements of a dense gradient, leaving zeros (ignored pixels) exactly
    zero; nothing at all, not even a read of gx, when scale[0] == 1. The backward of a summed or averaged loss
    whose forward already wrote the gradient for an upstream gradient of 1: `loss.backward()` then costs no pass
    over the logits-sized gradient, and no host sync to find out."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        v = tl.load(gx_ptr + offs, mask=mask, other=0.0)
        scaled = tl.where(v != 0, v.to(scale.dtype) * scale, 0.0)
        tl.store(gx_ptr + offs, scaled.to(gx_ptr.dtype.element_ty), mask=mask)


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers in fcnkern.cross_entropy can produce: all
    logits dtypes, every class-chunk width (class weights or none is a run-time switch). Used to prove they
    compile for each GPU architecture (see fcnkern.kernels.compile_check)."""
    import triton.language as tl

    ints = "i32"
    for logits_ty, acc_ty, acc in (("fp32", "fp32", tl.float32), ("fp16", "fp32", tl.float32),
                                   ("bf16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)):  # fmt: skip
        scale_sig = {"gx_ptr": f"*{logits_ty}", "scale_ptr": f"*{acc_ty}", "numel": ints}
        yield f"ce_scale_{logits_ty}", ce_scale_kernel, scale_sig, {"BLOCK": CE_SCALE_BLOCK}, CE_NUM_WARPS
        fwd_sig = {
            "x_ptr": f"*{logits_ty}", "t_ptr": "*i64", "w_ptr": f"*{acc_ty}", "loss_ptr": f"*{acc_ty}",
            "stats_ptr": f"*{acc_ty}", "gx_ptr": f"*{logits_ty}", "num_pixels": ints, "C": ints, "H": ints,
            "W": ints, "x_sn": ints, "x_sc": ints, "x_sh": ints, "x_sw": ints,
            "t_sn": ints, "t_sh": ints, "t_sw": ints,
            "gx_sn": ints, "gx_sc": ints, "gx_sh": ints, "gx_sw": ints, "ignore_index": ints, "has_weight": "u1",
        }  # fmt: skip
        bwd_sig = {
            "g_ptr": f"*{acc_ty}", "x_ptr": f"*{logits_ty}", "t_ptr": "*i64", "w_ptr": f"*{acc_ty}",
            "stats_ptr": f"*{acc_ty}", "gx_ptr": f"*{logits_ty}",
            "num_pixels": ints, "C": ints, "H": ints, "W": ints,
            "g_sn": ints, "g_sh": ints, "g_sw": ints,
            "x_sn": ints, "x_sc": ints, "x_sh": ints, "x_sw": ints,
            "t_sn": ints, "t_sh": ints, "t_sw": ints,
            "gx_sn": ints, "gx_sc": ints, "gx_sh": ints, "gx_sw": ints, "ignore_index": ints, "has_weight": "u1",
        }  # fmt: skip
        for block_c in (1, 2, 4, 8, 16, 32):
            consts = {"ACC": acc, "BLOCK_P": CE_BLOCK_P, "BLOCK_C": block_c}
            tag = f"{logits_ty}_c{block_c}"
            # C <= 32 is one chunk; wider class counts take chunks of 32.
            for one_chunk in (True, False) if block_c == 32 else (True,):
                for with_grad in (False, True):
                    fwd_consts = {**consts, "WITH_GRAD": with_grad, "ONE_CHUNK": one_chunk}
                    name = f"ce_fwd_{tag}_g{int(with_grad)}_o{int(one_chunk)}"
                    yield name, ce_fwd_kernel, fwd_sig, fwd_consts, CE_NUM_WARPS
            yield f"ce_bwd_{tag}", ce_bwd_kernel, bwd_sig, consts, CE_NUM_WARPS
