"""Triton kernels of transposed-convolution upsampling with the crop folded in (gather formulation: every program
computes kept output pixels only, from the input taps that reach them; no atomics anywhere).

Learned path (``upsample_crop``), weight Cin x Cout_g x kh x kw, stride (sh, sw), kept window at (top, left):

- forward, by output cell: the kept outputs whose full-output coordinates (Y, X) share (Y // sh, X // sw) =
  (qy, qx) form a cell of sh x sw pixels, and all of them read the same th x tw input taps x[n, :, qy - t, qx - u]
  (t < TH = ceil(kh / sh), u < TW). So the forward is one dense GEMM per group: out[(co, py, px), (n, qy, qx)] =
  sum over k = (ci, t, u) of A[(co, py, px), k] x[n, ci, qy - t, qx - u], where A[(co, py, px), (ci, t, u)] =
  w[ci, co, py + t sh, px + u sw] (zero past the kernel) is the weight rearranged once per call by the launcher.
  Its epilogue writes each element to its kept pixel and drops the rest (the partial cells at the window's edges);
  neighbouring rows are neighbouring output columns, so the stores run along rows of the output;
- backward of the cell GEMM, its adjoint: with dyc[(n, qy, qx), (co, py, px)] the kept gradient arranged by cell
  (0 where cropped, gathered inside the kernels), dtaps = dyc @ A^T (upsample_dgrad_cells_kernel, its long
  reduction split over the rows into an fp32 workspace) and dx[n, ci, i, j] = sum over splits and (t, u) of
  dtaps[(n, i + t, j + u), (ci, t, u)] (upsample_dgrad_fold_kernel, no atomics); dA = taps^T @ dyc over the
  cells, split SPLIT ways into an fp32 workspace that the launcher sums and puts back in the weight's layout
  (upsample_wgrad_cells_kernel, deterministic);
- per-channel layers (fewer than 8 output channels per group) keep the direct gathers: dgrad dx[n, ci, i, j] = sum
  over (co, ky, kx) of dy[n, co, i sh + ky - top, j sw + kx - left] w[ci, co, ky, kx] (a strided convolution of
  the kept gradient), and wgrad dW[ci, (co, ky, kx)] = sum over input pixels of x[n, ci, i, j] dy[...], split
  SPLIT ways into an fp32 workspace.

The cell GEMMs multiply with ``tl.dot`` (tensor cores in fp16/bf16, TF32 only where ``DOT_PRECISION`` says so).
Per-channel layers (groups = channels) multiply-accumulate on CUDA cores (``USE_DOT=False``; a 16-wide
tensor-core tile would be almost all padding), and their forward (upsample_fwd_direct_kernel) has each pixel
gather its own taps and weights.

Fixed bilinear path (``bilinear_upsample_crop``, kernel 2f, stride f, each channel by itself): every output pixel has
2 x 2 taps (forward), and the backward is separable: a pass along the width then one along the height, each
output of a pass gathering its 2f taps, through an fp32 intermediate one f-th the size of the gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fcnkern.kernels.conv_relu import _dot

__all__ = [
    "bilinear_block",
    "bilinear_bwd_height_kernel",
    "bilinear_bwd_width_kernel",
    "bilinear_fwd_kernel",
    "bilinear_width_tile",
    "cell_blocks",
    "launch_configs",
    "learned_blocks",
    "upsample_dgrad_cells_kernel",
    "upsample_dgrad_fold_kernel",
    "upsample_dgrad_kernel",
    "upsample_fwd_cells_kernel",
    "upsample_fwd_direct_kernel",
    "upsample_wgrad_cells_kernel",
    "upsample_wgrad_kernel",
]

# Fewer output channels per group than this multiply on CUDA cores instead of tensor cores.
DOT_MIN_CHANNELS = 8


def learned_blocks(rows: int, cols: int, elem_bytes: int, use_dot: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of a learned-path GEMM whose output is rows x cols (pixels x output
    channels in the forward, pixels x input channels in dgrad, input channels x (co, ky, kx) in wgrad). Few shapes,
    so all compile-check.

    Tensor-core tiles are 64 x 32 or 64 x 64, 32 deep. The CUDA-core variant multiplies [M, K, N] broadcasts, so it
    keeps M * K * N at 4096 and gives a dimension of 1 (a per-channel layer's single channel) a block of 1 instead
    of padding it, spending the width on the reduction instead."""
    if use_dot:
        if elem_bytes >= 8:  # fp64, interpreter gradchecks only
            return 32, 32, 16, 4
        return 64, 32 if cols <= 32 else 64, 32, 4
    block_m = 1 if rows == 1 else 64
    block_n = 1 if cols == 1 else (8 if block_m == 64 else 64)
    block_k = 8 if (block_m, block_n) == (64, 8) else 64
    return block_m, block_n, block_k, 4


def all_learned_blocks(elem_bytes: int) -> list[tuple[tuple[int, int, int, int], bool]]:
    sizes = (1, 2, 64)
    return sorted({(learned_blocks(r, c, elem_bytes, dot), dot) for r in sizes for c in sizes for dot in (False, True)})


@triton.jit
def _mac(a, b, acc, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    if USE_DOT:
        return _dot(a, b, acc, DOT_PRECISION)
    return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)


# Elements of dx per program of upsample_dgrad_fold_kernel.
FOLD_BLOCK = 256


def cell_blocks(elem_bytes: int) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of each cell GEMM: "fwd" (rows (co, py, px) x cells, (ci, th, tw)
    deep), "dgrad" (cells x (ci, th, tw), rows deep) and "wgrad" ((ci, th, tw) x rows, cells deep).

    Chosen by bench/gpu_cells_sweep.py (run 10, H200, FCN-32s's final layer at batch 8, fp32 and bf16, kernel alone):
    the forward with 128 x 64 tiles on 8 warps took 0.44 / 0.38 ms against 0.51 / 0.41 for 64 x 64 on 4; the dgrad
    with all 84 taps of a cell in one 128-wide block, 0.22 / 0.21 ms against 0.31 / 0.30 (both split over rows);
    the wgrad with 32 x 128 tiles, 0.37 / 0.29 ms against 0.70 / 0.48."""
    if elem_bytes >= 8:  # fp64, interpreter gradchecks only
        return dict.fromkeys(("fwd", "dgrad", "wgrad"), (32, 32, 16, 4))
    return {"fwd": (128, 64, 32, 8), "dgrad": (64, 128, 32, 4), "wgrad": (32, 128, 32, 4)}


@triton.jit
def _cells(c, N, QH, QW, SH, SW, TOP, LEFT):
    """Image, full-output cell row and column (in strides) of cell indices c over N x QH x QW, and which exist. The
    size products in c's type (INDEX), as in the conv kernels (kernels/conv_relu.py)."""
    plane = tl.cast(QW, c.dtype) * QH
    return c // plane, TOP // SH + (c // QW) % QH, LEFT // SW + c % QW, c < tl.cast(N, c.dtype) * QH * QW


@triton.jit
def _kept_grad(g_ptr, n, cy, cx, c_ok, co, py, px, m_ok, g_sn, g_sc, g_sh, g_sw, SH, SW, TOP, LEFT, OH, OW):
    """[cells, rows] tile of the kept gradient arranged by cell: dy[n, co, cy sh + py - top, cx sw + px - left],
    0 where cropped; co is the channel index within the whole tensor."""
    oy0 = cy * SH - TOP
    ox0 = cx * SW - LEFT
    oy = oy0[:, None] + py[None, :]
    ox = ox0[:, None] + px[None, :]
    ok = c_ok[:, None] & m_ok[None, :] & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
    # The offset is a cell part plus a row part: one add per element of the tile, not two products and three adds
    # (run 9: the cell kernels were issue-bound on index arithmetic).
    cell_off = n * g_sn + oy0 * g_sh + ox0 * g_sw
    wide = cell_off.dtype  # INDEX: in the 64-bit plan the row part's products are 64-bit too
    row_off = co.to(wide) * g_sc + py.to(wide) * g_sh + px.to(wide) * g_sw
    return tl.load(g_ptr + cell_off[:, None] + row_off[None, :], mask=ok, other=0.0)


@triton.jit
def _cell_taps(x_ptr, n, cy, cx, c_ok, k, k_ok, group, CIN_G, TH, TW, H, W, x_sn, x_sc, x_sh, x_sw):
    """[depth, cells] tile of each cell's input taps, x[n, group CIN_G + ci, cy - t, cx - u] for k = (ci, t, u),
    0 outside the input."""
    tw = k % TW
    th = (k // TW) % TH
    ih = cy[None, :] - th[:, None]
    iw = cx[None, :] - tw[:, None]
    ok = k_ok[:, None] & c_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    cell_off = n * x_sn + cy * x_sh + cx * x_sw  # separable, as in _kept_grad
    wide = cell_off.dtype
    tap_off = (group * CIN_G + k // (TW * TH)).to(wide) * x_sc - th.to(wide) * x_sh - tw.to(wide) * x_sw
    return tl.load(x_ptr + tap_off[:, None] + cell_off[None, :], mask=ok, other=0.0)


@triton.jit
def upsample_fwd_cells_kernel(
    a_ptr, x_ptr, b_ptr, out_ptr,
    N, CIN_G, H, W, COUT_G, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    SH, SW, TOP, LEFT, TH, TW, QH, QW, has_bias,
    ACC: tl.constexpr, INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # The tensor-core forward as one dense GEMM per group over output cells (see the module docstring): A is the
    # rearranged weight, [COUT_G * SH * SW, CIN_G * TH * TW] row-major (a_ptr, one such matrix per group), B the
    # TH x TW input taps of each cell, gathered; each output element is scattered to its kept pixel or dropped.
    # Rows run (co, py, px) with px fastest, so neighbouring rows are neighbouring output columns.
    group = tl.program_id(2)
    rows = COUT_G * SH * SW
    depth = CIN_G * TH * TW
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < rows
    px = m % SW
    py = (m // SW) % SH
    co = m // (SW * SH)
    c = tl.program_id(0).to(INDEX) * BLOCK_N + tl.arange(0, BLOCK_N)  # axis 0: cells may pass 2**16 blocks
    n, cy, cx, c_ok = _cells(c, N, QH, QW, SH, SW, TOP, LEFT)
    a_rows = a_ptr + group.to(INDEX) * rows * depth + m.to(INDEX) * depth

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, depth, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < depth
        a = tl.load(a_rows[:, None] + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = _cell_taps(x_ptr, n, cy, cx, c_ok, k, k_ok, group, CIN_G, TH, TW, H, W, x_sn, x_sc, x_sh, x_sw)
        acc = _dot(a, b, acc, DOT_PRECISION)
    c_out = group * COUT_G + co
    acc += tl.load(b_ptr + c_out, mask=m_ok & has_bias, other=0.0).to(ACC)[:, None]  # run-time bool: one kernel
    oy0 = cy * SH - TOP
    ox0 = cx * SW - LEFT
    oy = py[:, None] + oy0[None, :]
    ox = px[:, None] + ox0[None, :]
    ok = m_ok[:, None] & c_ok[None, :] & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
    cell_off = n * o_sn + oy0 * o_sh + ox0 * o_sw  # separable, as in _kept_grad
    wide = cell_off.dtype
    row_off = c_out.to(wide) * o_sc + py.to(wide) * o_sh + px.to(wide) * o_sw
    tl.store(out_ptr + row_off[:, None] + cell_off[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def upsample_dgrad_cells_kernel(
    g_ptr, a_ptr, dt_ptr,
    N, CIN_G, COUT_G, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    SH, SW, TOP, LEFT, TH, TW, QH, QW, SPLITS, ROWS_PER_SPLIT,
    ACC: tl.constexpr, INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # The forward's adjoint towards dx: dtaps[cell, (ci, t, u)] = sum over rows (co, py, px) of the kept gradient
    # by cell times A, one slice of the rows per split, into an fp32 (fp64) workspace dt_ptr
    # [groups, SPLITS, N QH QW, CIN_G TH TW] that upsample_dgrad_fold_kernel sums into dx. Rows M = cells,
    # N = depth, the reduction over the forward's rows: few cells and a long reduction (FCN-32s: 74 programs of
    # 21504 rows each on 132 SMs in run 9), hence the split.
    group = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    rows = COUT_G * SH * SW
    depth = CIN_G * TH * TW
    c = tl.program_id(0).to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)
    n, cy, cx, c_ok = _cells(c, N, QH, QW, SH, SW, TOP, LEFT)
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < depth
    a_base = a_ptr + group.to(INDEX) * rows * depth

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, rows)
    for m0 in range(m_start, m_end, BLOCK_K):
        m = m0 + tl.arange(0, BLOCK_K)
        m_ok = m < m_end
        co = group * COUT_G + m // (SW * SH)
        dy = _kept_grad(g_ptr, n, cy, cx, c_ok, co, (m // SW) % SH, m % SW, m_ok, g_sn, g_sc, g_sh, g_sw,
                        SH, SW, TOP, LEFT, OH, OW)  # fmt: skip
        a = tl.load(a_base + m.to(INDEX)[:, None] * depth + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(dy, a, acc, DOT_PRECISION)
    row = (group * SPLITS + split).to(INDEX) * N * QH * QW + c
    tl.store(dt_ptr + row[:, None] * depth + k[None, :], acc, mask=c_ok[:, None] & k_ok[None, :])


@triton.jit
def upsample_dgrad_fold_kernel(
    dt_ptr, dx_ptr,
    N, CIN_G, H, W, GROUPS,
    dx_sn, dx_sc, dx_sh, dx_sw,
    TH, TW, QH, QW, QY0, QX0, SPLITS,
    ACC: tl.constexpr, INDEX: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # dx[n, c, i, j] = sum over splits and (t, u) of dtaps[split, (i + t, j + u), (ci, t, u)]: each input pixel
    # gathers its TH x TW cells (those the window touches) from every split, in a fixed order: no atomics, the same
    # sum run to run.
    e = tl.program_id(0).to(INDEX) * BLOCK + tl.arange(0, BLOCK)
    hw = tl.cast(W, INDEX) * H  # size products in INDEX, as in the conv kernels
    ok = e < tl.cast(N, INDEX) * CIN_G * GROUPS * H * W
    j = e % W
    i = (e // W) % H
    c = (e // hw) % (CIN_G * GROUPS)
    n = e // (hw * CIN_G * GROUPS)
    group = c // CIN_G
    depth = CIN_G * TH * TW
    acc = tl.zeros([BLOCK], ACC)
    for split in range(0, SPLITS):
        plane = ((group * SPLITS + split) * N + n) * QH * QW
        for t in range(0, TH):
            r = i + t - QY0
            for u in range(0, TW):
                q = j + u - QX0
                valid = ok & (r >= 0) & (r < QH) & (q >= 0) & (q < QW)
                tap = ((c % CIN_G) * TH + t) * TW + u
                acc += tl.load(dt_ptr + (plane + r * QW + q) * depth + tap, mask=valid, other=0.0)
    off = n * dx_sn + c * dx_sc + i * dx_sh + j * dx_sw
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def upsample_wgrad_cells_kernel(
    g_ptr, x_ptr, da_ptr,
    N, CIN_G, H, W, COUT_G, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    SH, SW, TOP, LEFT, TH, TW, QH, QW, SPLITS, CELLS_PER_SPLIT,
    ACC: tl.constexpr, INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # dA[(ci, t, u), (co, py, px)] = sum over cells of taps[cell, (ci, t, u)] * kept gradient by cell, one slice of
    # the cells per split, into an fp32 (fp64) workspace da_ptr [groups, SPLITS, CIN_G TH TW, COUT_G SH SW] that the
    # launcher sums and puts back in the kernel's layout.
    group = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    rows = COUT_G * SH * SW
    depth = CIN_G * TH * TW
    k = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = k < depth
    m = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < rows
    co = group * COUT_G + m // (SW * SH)
    py = (m // SW) % SH
    px = m % SW

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    c_start = split.to(INDEX) * CELLS_PER_SPLIT
    c_end = tl.minimum(c_start + CELLS_PER_SPLIT, tl.cast(N, INDEX) * QH * QW)
    for c0 in range(c_start, c_end, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        n, cy, cx, c_ok = _cells(c, N, QH, QW, SH, SW, TOP, LEFT)
        c_ok = c_ok & (c < c_end)
        taps = _cell_taps(x_ptr, n, cy, cx, c_ok, k, k_ok, group, CIN_G, TH, TW, H, W, x_sn, x_sc, x_sh, x_sw)
        dy = _kept_grad(g_ptr, n, cy, cx, c_ok, co, py, px, m_ok, g_sn, g_sc, g_sh, g_sw, SH, SW, TOP, LEFT, OH, OW)
        acc = _dot(taps, dy, acc, DOT_PRECISION)
    row = (group * SPLITS + split).to(INDEX) * depth + k
    tl.store(da_ptr + row[:, None] * rows + m[None, :], acc, mask=k_ok[:, None] & m_ok[None, :])


@triton.jit
def upsample_fwd_direct_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, CIN_G, H, W, COUT_G, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    w_si, w_so, w_sh, w_sw,
    o_sn, o_sc, o_sh, o_sw,
    SH, SW, TOP, LEFT, KH, KW, M_BLOCKS, has_bias,
    ACC: tl.constexpr, INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # The CUDA-core forward (few channels per group): each program takes any kept pixels, whatever their phase, and
    # gathers each one's own sub-kernel taps (ky = Y mod sh + th sh), so programs scale with pixels, not phases.
    pid = tl.program_id(0)
    m_block = pid % M_BLOCKS
    group = pid // M_BLOCKS
    m = m_block.to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < tl.cast(N, INDEX) * OH * OW  # size products and channel offsets in INDEX, as in the conv kernels
    ox = m % OW
    oy = (m // OW) % OH
    n = m // (tl.cast(OW, INDEX) * OH)
    py = (TOP + oy) % SH
    qy = (TOP + oy) // SH
    px = (LEFT + ox) % SW
    qx = (LEFT + ox) // SW
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT_G
    TH = (KH + SH - 1) // SH
    TW = (KW + SW - 1) // SW
    x_base = x_ptr + n * x_sn + (group * CIN_G).to(INDEX) * x_sc
    w_base = w_ptr + group * CIN_G * w_si

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, CIN_G * TH * TW, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < CIN_G * TH * TW
        ci = k // (TH * TW)
        th = (k // TW) % TH
        tw = k % TW
        ky = py[:, None] + (th * SH)[None, :]
        kx = px[:, None] + (tw * SW)[None, :]
        ih = qy[:, None] - th[None, :]
        iw = qx[:, None] - tw[None, :]
        ok = m_ok[:, None] & k_ok[None, :] & (ky < KH) & (kx < KW) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_base[:, None] + ci.to(INDEX)[None, :] * x_sc + ih * x_sh + iw * x_sw, mask=ok, other=0.0)
        w_off = ci[None, :] * w_si + ky * w_sh + kx * w_sw
        b = tl.load(w_base + w_off[:, :, None] + (co * w_so)[None, None, :], mask=ok[:, :, None] & co_ok[None, None, :],
                    other=0.0)  # fmt: skip
        acc += tl.sum(a.to(ACC)[:, :, None] * b.to(ACC), axis=1)
    c_out = group * COUT_G + co
    acc += tl.load(b_ptr + c_out, mask=co_ok & has_bias, other=0.0).to(ACC)[None, :]
    o_off = (n * o_sn + oy * o_sh + ox * o_sw)[:, None] + (c_out.to(INDEX) * o_sc)[None, :]
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


@triton.jit
def upsample_dgrad_kernel(
    g_ptr, w_ptr, dx_ptr,
    N, CIN_G, H, W, COUT_G, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    w_si, w_so, w_sh, w_sw,
    dx_sn, dx_sc, dx_sh, dx_sw,
    SH, SW, TOP, LEFT, KH, KW, M_BLOCKS,
    USE_DOT: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    m_block = pid % M_BLOCKS
    group = pid // M_BLOCKS
    m = m_block.to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < tl.cast(N, INDEX) * H * W  # size products and channel offsets in INDEX, as in the conv kernels
    j = m % W
    i = (m // W) % H
    n = m // (tl.cast(W, INDEX) * H)
    ci = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < CIN_G
    g_base = g_ptr + n * g_sn + (group * COUT_G).to(INDEX) * g_sc
    w_base = w_ptr + (group * CIN_G + ci) * w_si

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, COUT_G * KH * KW, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < COUT_G * KH * KW
        co = k // (KH * KW)
        ky = (k // KW) % KH
        kx = k % KW
        oy = (i * SH - TOP)[:, None] + ky[None, :]
        ox = (j * SW - LEFT)[:, None] + kx[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
        a = tl.load(g_base[:, None] + co.to(INDEX)[None, :] * g_sc + oy * g_sh + ox * g_sw, mask=a_ok, other=0.0)
        w_off = co * w_so + ky * w_sh + kx * w_sw
        b = tl.load(w_base[None, :] + w_off[:, None], mask=k_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = _mac(a, b, acc, USE_DOT, DOT_PRECISION)
    dx_off = (n * dx_sn + i * dx_sh + j * dx_sw)[:, None] + ((group * CIN_G + ci).to(INDEX) * dx_sc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.jit
def upsample_wgrad_kernel(
    g_ptr, x_ptr, dw_ptr,
    N, CIN_G, H, W, COUT_G, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    SH, SW, TOP, LEFT, KH, KW, M_BLOCKS, GROUPS, PIX_PER_SPLIT,
    USE_DOT: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # dw_ptr: SPLIT x Cin x (Cout_g kh kw) fp32 workspace, one slice per split of the pixel reduction.
    pid = tl.program_id(0)
    m_block = pid % M_BLOCKS
    group = (pid // M_BLOCKS) % GROUPS
    split = pid // (M_BLOCKS * GROUPS)
    J = COUT_G * KH * KW
    ci = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ci_ok = ci < CIN_G
    jj = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    jj_ok = jj < J
    co = jj // (KH * KW)
    ky = (jj // KW) % KH
    kx = jj % KW
    x_chan = (group * CIN_G + ci).to(INDEX) * x_sc  # size products and channel offsets in INDEX, as in the conv
    g_chan = (group * COUT_G + co).to(INDEX) * g_sc  # kernels

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    p_start = split.to(INDEX) * PIX_PER_SPLIT
    p_end = tl.minimum(p_start + PIX_PER_SPLIT, tl.cast(N, INDEX) * H * W)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_end
        j = p % W
        i = (p // W) % H
        n = p // (tl.cast(W, INDEX) * H)
        a_off = x_chan[:, None] + (n * x_sn + i * x_sh + j * x_sw)[None, :]
        a = tl.load(x_ptr + a_off, mask=ci_ok[:, None] & p_ok[None, :], other=0.0)
        oy = (i * SH - TOP)[:, None] + ky[None, :]
        ox = (j * SW - LEFT)[:, None] + kx[None, :]
        b_ok = p_ok[:, None] & jj_ok[None, :] & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
        b = tl.load(g_ptr + (n * g_sn)[:, None] + g_chan[None, :] + oy * g_sh + ox * g_sw, mask=b_ok, other=0.0)
        acc = _mac(a, b, acc, USE_DOT, DOT_PRECISION)
    row = (split * GROUPS + group).to(tl.int64) * CIN_G + ci
    tl.store(dw_ptr + row[:, None] * J + jj[None, :], acc, mask=ci_ok[:, None] & jj_ok[None, :])


@triton.jit
def _bilinear_tap(full, factor, ACC: tl.constexpr):
    """The two input indices reaching full-output coordinate `full` and their weights k(t) = 1 - |t - (f - 1/2)| / f
    (an index outside the input is the caller's to mask). Scalar or vector, int32."""
    i1 = full // factor
    i0 = i1 - 1
    center = factor - 0.5
    w1 = 1.0 - tl.abs((full - i1 * factor).to(ACC) - center) / factor
    w0 = 1.0 - tl.abs((full - i0 * factor).to(ACC) - center) / factor
    return i0, i1, w0, w1


@triton.jit
def _row_tile(D0, D1, D2, D3, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS consecutive rows (a0, a1, a2) of a D0 x D1 x D2 x D3 tensor walked row by row, and BLOCK of
    their columns a3: (a0, a1) as int64 row vectors, a2 an int32 row vector, a3 an int32 column vector, and the
    ROWS x BLOCK mask. A few divisions per row instead of four 64-bit divisions per element, and the column axis
    stays visibly contiguous (the CE kernels' lesson). Rows, and so D1 D2 and D0 D1 D2, are int32: the launcher
    refuses D0 D1 D2 >= 2**31 - 64."""
    blocks_per_row = tl.cdiv(D3, BLOCK)
    pid = tl.program_id(0)
    row = (pid // blocks_per_row) * ROWS + tl.arange(0, ROWS)
    a3 = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    a2 = row % D2
    a1 = (row // D2) % D1
    a0 = row // (D2 * D1)
    ok = (row < D0 * D1 * D2)[:, None] & (a3 < D3)[None, :]
    return a0.to(tl.int64), a1.to(tl.int64), a2, a3, ok


@triton.jit
def bilinear_fwd_kernel(
    x_ptr, out_ptr, N, C, H, W, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    FACTOR, TOP, LEFT,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # A program writes a ROWS x BLOCK tile of output rows (n, c, oy): the two input rows and their weights are per
    # row, the two input columns and theirs per column; each output costs four loads and six multiply-adds.
    n, c, oy, ox, ok = _row_tile(N, C, OH, OW, ROWS, BLOCK)
    r0, r1, wr0, wr1 = _bilinear_tap(TOP + oy, FACTOR, ACC)
    c0, c1, wc0, wc1 = _bilinear_tap(LEFT + ox, FACTOR, ACC)
    plane = n * x_sn + c * x_sc
    row0 = (plane + r0.to(tl.int64) * x_sh)[:, None]
    row1 = (plane + r1.to(tl.int64) * x_sh)[:, None]
    col0 = (c0.to(tl.int64) * x_sw)[None, :]
    col1 = (c1.to(tl.int64) * x_sw)[None, :]
    c0_ok = ok & (c0 >= 0)[None, :]
    c1_ok = ok & (c1 < W)[None, :]
    r0_ok = (r0 >= 0)[:, None]
    r1_ok = (r1 < H)[:, None]
    v00 = tl.load(x_ptr + row0 + col0, mask=c0_ok & r0_ok, other=0.0).to(ACC)
    v01 = tl.load(x_ptr + row0 + col1, mask=c1_ok & r0_ok, other=0.0).to(ACC)
    v10 = tl.load(x_ptr + row1 + col0, mask=c0_ok & r1_ok, other=0.0).to(ACC)
    v11 = tl.load(x_ptr + row1 + col1, mask=c1_ok & r1_ok, other=0.0).to(ACC)
    wc0 = wc0[None, :]
    wc1 = wc1[None, :]
    value = wr0[:, None] * (wc0 * v00 + wc1 * v01) + wr1[:, None] * (wc0 * v10 + wc1 * v11)
    o_row = (n * o_sn + c * o_sc + oy.to(tl.int64) * o_sh)[:, None]
    tl.store(out_ptr + o_row + (ox.to(tl.int64) * o_sw)[None, :], value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bilinear_bwd_width_kernel(
    src_ptr, dst_ptr, N, C, D2, D3,
    s_sn, s_sc, s_s2, s_s3,
    d_sn, d_sc, d_s2, d_s3,
    FACTOR, START, LENGTH,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, TAPS: tl.constexpr,
):  # fmt: skip
    # The width pass: dst[..., i] = sum over t < 2f of k(t) * src[..., i f + t - START], the kept window being columns
    # START .. START + LENGTH - 1; dst is N x C x D2 x D3, src the same with LENGTH columns. One output's taps are 2f
    # consecutive src columns, so the tile is ROWS x BLOCK outputs x TAPS taps with the taps innermost: each warp
    # load is a run of consecutive columns. (Taps as an outer loop made lanes f columns apart: 32 sectors per
    # load at f = 32, 1.72 ms for the FCN-32s final at N = 8 on an H200, 7x the CUDA kernel.)
    n, c, a2, a3, ok = _row_tile(N, C, D2, D3, ROWS, BLOCK)
    row = (n * s_sn + c * s_sc + a2.to(tl.int64) * s_s2)[:, None, None]
    center = FACTOR - 0.5
    acc = tl.zeros([ROWS, BLOCK], ACC)
    for t0 in range(0, 2 * FACTOR, TAPS):
        t = t0 + tl.arange(0, TAPS)
        weight = 1.0 - tl.abs(t.to(ACC) - center) / FACTOR
        pos = (a3 * FACTOR)[:, None] + t[None, :] - START
        inside = (t < 2 * FACTOR)[None, :] & (pos >= 0) & (pos < LENGTH)
        v = tl.load(src_ptr + row + (pos.to(tl.int64) * s_s3)[None, :, :], mask=ok[:, :, None] & inside[None, :, :],
                    other=0.0)  # fmt: skip
        acc += tl.sum(v.to(ACC) * weight[None, None, :], axis=2)
    d_row = (n * d_sn + c * d_sc + a2.to(tl.int64) * d_s2)[:, None]
    tl.store(dst_ptr + d_row + (a3.to(tl.int64) * d_s3)[None, :], acc.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bilinear_bwd_height_kernel(
    src_ptr, dst_ptr, N, C, D2, D3,
    s_sn, s_sc, s_s2, s_s3,
    d_sn, d_sc, d_s2, d_s3,
    FACTOR, START, LENGTH,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # The height pass: dst[..., i, :] = sum over t < 2f of k(t) * src[..., i f + t - START, :] (kept rows START ..
    # START + LENGTH - 1). A program writes a ROWS x BLOCK tile of dst rows (n, c, a2); each tap is a row offset, so
    # its loads are runs of a src row.
    n, c, a2, a3, ok = _row_tile(N, C, D2, D3, ROWS, BLOCK)
    plane = (n * s_sn + c * s_sc)[:, None]
    center = FACTOR - 0.5
    acc = tl.zeros([ROWS, BLOCK], ACC)
    for t in range(0, 2 * FACTOR):
        weight = 1.0 - tl.abs(tl.full([1, 1], t, tl.int32).to(ACC) - center) / FACTOR
        pos = a2 * FACTOR + t - START
        offset = plane + (pos.to(tl.int64) * s_s2)[:, None] + (a3.to(tl.int64) * s_s3)[None, :]
        v = tl.load(src_ptr + offset, mask=ok & ((pos >= 0) & (pos < LENGTH))[:, None], other=0.0)
        acc += weight * v.to(ACC)
    d_row = (n * d_sn + c * d_sc + a2.to(tl.int64) * d_s2)[:, None]
    tl.store(dst_ptr + d_row + (a3.to(tl.int64) * d_s3)[None, :], acc.to(dst_ptr.dtype.element_ty), mask=ok)


# Elements per program of the bilinear passes: 4 per thread at 4 warps. The width pass's tiles also span the taps.
BILINEAR_TILE = 512
BILINEAR_WIDTH_TILE = 2048


def bilinear_block(width: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of a bilinear pass whose rows are `width` long: BLOCK columns of ROWS rows, BLOCK the power of
    two in (16, 32, 64, 128, 256) nearest above the width (256 for wider rows), so that narrow rows do not leave
    most of a tile idle (17-32-wide rows used half of a 64-wide one) and a program holds BILINEAR_TILE elements."""
    block = next((b for b in (16, 32, 64, 128) if width <= b), 256)
    return BILINEAR_TILE // block, block


def bilinear_width_tile(width: int, factor: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, TAPS) of the backward's width pass into rows `width` long at `factor`: TAPS taps per step (the
    2f taps rounded up to 16, 32 or 64, looping past 64), BLOCK outputs per row (narrow rows rounded up to 2, 4, 8
    or 16, else as many as fit), ROWS rows, BILINEAR_WIDTH_TILE elements per program. Rounding to the nearest power
    of two keeps most of a tile busy: at 16 x 64 a 2-wide row at f = 16 used 1/16 of it (2550 programs for a
    2 x 150 x 17 x 2 pass, 160 now)."""
    taps = next((t for t in (16, 32) if 2 * factor <= t), 64)
    block = next((b for b in (2, 4, 8, 16) if width <= b), BILINEAR_WIDTH_TILE // taps)
    return max(1, BILINEAR_WIDTH_TILE // (block * taps)), block, taps


def _geometry_sig(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers in fcnkern.upsample can produce on a GPU:
    fp32 (IEEE and TF32), fp16 and bf16; tensor-core and CUDA-core variants of each learned GEMM with every block
    shape of learned_blocks (the forward's bias or none is a run-time switch); both bilinear passes. Used by
    fcnkern.kernels.compile_check to prove that they all compile for each architecture."""
    import triton.language as tl

    dims = ("N", "CIN_G", "H", "W", "COUT_G", "OH", "OW")
    geo = ("SH", "SW", "TOP", "LEFT", "KH", "KW", "M_BLOCKS")
    cells_geo = ("SH", "SW", "TOP", "LEFT", "TH", "TW", "QH", "QW")

    def strides(*prefixes: str) -> dict[str, str]:
        return {f"{p}_s{a}": "i32" for p in prefixes for a in ("n", "c", "h", "w")}

    def w_strides() -> dict[str, str]:
        return _geometry_sig("w_si", "w_so", "w_sh", "w_sw")

    # Every tile the bilinear passes can take, from the tile functions over the widths and factors (past 256 columns
    # and 2f > 64 taps nothing changes), rather than a hand-picked sample of widths that a new threshold could miss.
    bilinear_tiles = sorted({bilinear_block(width) for width in range(1, 258)})
    width_tiles = sorted({bilinear_width_tile(width, f) for width in range(1, 258) for f in range(1, 34)})
    for ty, elem in (("fp32", 4), ("fp16", 2), ("bf16", 2), ("fp64", 8)):  # fp64: the gradchecks'
        ptr = f"*{ty}"
        acc_ty, acc = ("*fp64", tl.float64) if ty == "fp64" else ("*fp32", tl.float32)
        fwd_sig = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr, **_geometry_sig(*dims),
                   **strides("x"), **w_strides(), **strides("o"), **_geometry_sig(*geo), "has_bias": "u1"}  # fmt: skip
        cells_sig = {"a_ptr": ptr, "x_ptr": ptr, "b_ptr": ptr, "out_ptr": ptr, **_geometry_sig(*dims),
                     **strides("x", "o"), **_geometry_sig(*cells_geo), "has_bias": "u1"}  # fmt: skip
        dgrad_cells_sig = {"g_ptr": ptr, "a_ptr": ptr, "dt_ptr": acc_ty, **_geometry_sig("N", "CIN_G", "COUT_G", "OH",
                           "OW"), **strides("g"), **_geometry_sig(*cells_geo, "SPLITS", "ROWS_PER_SPLIT")}  # fmt: skip
        wgrad_cells_sig = {"g_ptr": ptr, "x_ptr": ptr, "da_ptr": acc_ty, **_geometry_sig(*dims), **strides("g", "x"),
                           **_geometry_sig(*cells_geo, "SPLITS", "CELLS_PER_SPLIT")}  # fmt: skip
        fold_sig = {"dt_ptr": acc_ty, "dx_ptr": ptr, **_geometry_sig("N", "CIN_G", "H", "W", "GROUPS"),
                    **strides("dx"), **_geometry_sig("TH", "TW", "QH", "QW", "QY0", "QX0", "SPLITS")}  # fmt: skip
        dgrad_sig = {"g_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr, **_geometry_sig(*dims), **strides("g"),
                     **w_strides(), **strides("dx"), **_geometry_sig(*geo)}  # fmt: skip
        wgrad_sig = {"g_ptr": ptr, "x_ptr": ptr, "dw_ptr": acc_ty, **_geometry_sig(*dims), **strides("g", "x"),
                     **_geometry_sig(*geo, "GROUPS", "PIX_PER_SPLIT")}  # fmt: skip
        for precision in ("ieee", "tf32") if ty == "fp32" else ("ieee",):
            blocks = cell_blocks(elem)
            cell_kernels = (("fwd", upsample_fwd_cells_kernel, cells_sig),
                            ("dgrad", upsample_dgrad_cells_kernel, dgrad_cells_sig),
                            ("wgrad", upsample_wgrad_cells_kernel, wgrad_cells_sig))  # fmt: skip
            for index in (tl.int32, tl.int64):
                bits = 32 if index == tl.int32 else 64
                for kernel, fn, sig in cell_kernels:
                    bm, bn, bk, warps = blocks[kernel]
                    consts = {"ACC": acc, "INDEX": index, "DOT_PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn,
                              "BLOCK_K": bk}  # fmt: skip
                    name = f"upsample_{kernel}_cells_{ty}_{precision}_{bm}x{bn}x{bk}w{warps}_i{bits}"
                    yield name, fn, sig, consts, warps
                if precision == "ieee":  # the fold has no dot
                    fold = {"ACC": acc, "INDEX": index, "BLOCK": FOLD_BLOCK}
                    yield f"upsample_dgrad_fold_{ty}_i{bits}", upsample_dgrad_fold_kernel, fold_sig, fold, 4
            # The 64-bit index plan (tensors past 2**31 elements) with the first block shape of each variant.
            learned = all_learned_blocks(elem)
            wide = [next(b for b in learned if b[1] == dot) for dot in (False, True)]
            learned = [(b, tl.int32) for b in learned] + [(b, tl.int64) for b in wide]
            for ((bm, bn, bk, warps), use_dot), index in learned:
                if not use_dot and precision == "tf32":
                    continue  # CUDA-core variants ignore DOT_PRECISION
                consts = {"USE_DOT": use_dot, "ACC": acc, "INDEX": index, "DOT_PRECISION": precision,
                          "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}  # fmt: skip
                bits = 32 if index == tl.int32 else 64
                tag = f"{ty}_{precision}_{'dot' if use_dot else 'fma'}_{bm}x{bn}x{bk}_i{bits}"
                if not use_dot:  # the tensor-core forward is the cell GEMM above
                    fwd_consts = {k: v for k, v in consts.items() if k not in ("USE_DOT", "DOT_PRECISION")}
                    yield f"upsample_fwd_{tag}", upsample_fwd_direct_kernel, fwd_sig, fwd_consts, warps
                yield f"upsample_dgrad_{tag}", upsample_dgrad_kernel, dgrad_sig, consts, warps
                yield f"upsample_wgrad_{tag}", upsample_wgrad_kernel, wgrad_sig, consts, warps

        def pass_sig(src: str, dst: str) -> dict[str, str]:
            return {"src_ptr": src, "dst_ptr": dst, **_geometry_sig("N", "C", "D2", "D3"),
                    **{f"{p}_s{a}": "i32" for p in ("s", "d") for a in ("n", "c", "2", "3")},
                    **_geometry_sig("FACTOR", "START", "LENGTH")}  # fmt: skip

        bil_sig = {"x_ptr": ptr, "out_ptr": ptr, **_geometry_sig("N", "C", "H", "W", "OH", "OW"),
                   **strides("x", "o"), **_geometry_sig("FACTOR", "TOP", "LEFT")}  # fmt: skip
        for rows, block in bilinear_tiles:
            tile = {"ACC": acc, "ROWS": rows, "BLOCK": block}
            yield f"bilinear_fwd_{ty}_{rows}x{block}", bilinear_fwd_kernel, bil_sig, tile, 4
            # Height pass: the fp32 (fp64) intermediate into dx.
            yield f"bilinear_bwd_height_{ty}_{rows}x{block}", bilinear_bwd_height_kernel, pass_sig(acc_ty, ptr), tile, 4
        # Width pass: the gradient (ty) into the intermediate.
        for rows, block, taps in width_tiles:
            tile = {"ACC": acc, "ROWS": rows, "BLOCK": block, "TAPS": taps}
            yield (f"bilinear_bwd_width_{ty}_{rows}x{block}x{taps}", bilinear_bwd_width_kernel, pass_sig(ptr, acc_ty),
                   tile, 4)  # fmt: skip
