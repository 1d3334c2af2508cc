"""Triton kernels of the fused Conv2d + ReLU: forward, input gradient (dgrad) and weight + bias gradient (wgrad),
all implicit GEMMs that gather their operands through the tensors' (n, c, h, w) strides. Any strides compute the
right result; the launcher makes the channel stride 1 (below), which is what makes them fast.

The launcher hands every kernel channels_last activations and a weight stored K x R x S x C (channel stride 1;
copies only where a tensor is not so already), so that a tile row of channels is one contiguous 16-byte-aligned
load: on sm_90 these compile to pipelined cp.async loads feeding wgmma. Pixel and offset arithmetic is 32-bit
(INDEX = int32) whenever every tensor's offsets fit, since a 64-bit division is a long subroutine on a GPU. In the
64-bit plan the flat indices are int64 but sizes and strides arrive as int32 scalars, whose products are int32: a
product of two sizes is taken in INDEX (``tl.cast(OW, INDEX) * OH``) and a channel index widened before it meets a
stride. ``m // (OW * OH)`` wrapped for a 46341 x 46341 output plane and the forward read out of bounds (H200, run
12). In the 32-bit plan the casts are no-ops: the same code as before, ptxas's choices included.

Forward, per group g: Y[m, k] = relu(sum_j X[m, j] W[j, k] + b[k]) with m = (n, oh, ow) output pixels, k the
group's output channels, and j = (c, r, s) the reduction. The reduction is one loop over (tap, BLOCK_K-channel
block), so each operand row is one contiguous load and the pipeliner sees every step. Layers with fewer than 16
channels per group (an RGB first layer) would waste most of every 16-deep ``tl.dot`` on padding; they flatten
j = (c, r, s) into one axis instead (FLAT_K) and decode (c, r, s) per element.

Backward: the ReLU mask is applied where the output gradient is loaded (``where(y <= 0, 0, dy)``, y being the saved
output), so the masked gradient is never written out. y must have dy's strides (the launcher makes both
channels_last), so one offset tile addresses both.

- dgrad, per group: dX[m', c] = sum over (k, r, s) of dY'[n, k, oh, ow] W[k, c, r, s] with m' = (n, ih, iw) input
  pixels and oh = (ih + pad - r * dil) / stride, only where that divides exactly and lands inside the output.
- wgrad, per group: dW[k, j] = sum over output pixels of dY'[m, k] X[m, j], with j = (r, s, c), each program's
  columns one tap's channel block (contiguous in channels_last x), or for fewer than 16 channels j = (c, r, s)
  flattened (FLAT_J, the weight's own layout) so that no channel padding is wasted. The pixel reduction is split
  SPLIT ways into an fp32 workspace that the launcher sums (deterministic, no atomics); programs owning the first
  j block also reduce dY' over their pixels for the bias gradient.

Accumulation is fp32 (fp64 for fp64 inputs, which exists for gradcheck). fp16/bf16 use tensor cores; fp32 uses TF32
only when the launcher passes ``DOT_PRECISION="tf32"`` (PyTorch's ``torch.backends.cudnn.allow_tf32``);
``"upcast"`` is the interpreter's way to multiply bf16 tiles (see ``_dot``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "conv_dgrad_kernel",
    "conv_fwd_kernel",
    "conv_wgrad_kernel",
    "fwd_block_k",
    "launch_configs",
    "pick_blocks",
    "wgrad_blocks",
]

# Below this many channels per group a BLOCK_K-deep channel chunk is mostly padding: flatten (c, r, s) instead.
FLAT_K_BELOW = 16

# The FLAT_K forward's reduction depth (small C * R * S, e.g. 27 for an RGB 3x3 layer).
FLAT_BLOCK_K = 32


def pick_blocks(n: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward and dgrad GEMMs, pixels x N channels.

    Few shapes on purpose, so that every one can be compile-checked: 64 x 128 tiles (64 deep in 16-bit types,
    32 in fp32) on wide layers, 32 or 64 wide on the narrow ones (21-class score layers). Masks cover the ragged
    edges. num_warps stays at 4: Inductor's conv template miscompiled non-1x1 kernels at num_warps >= 8 on some
    Triton versions. At 4 warps a 128 x 128 tile spilled 2.0-2.5 KB per thread to local memory on sm_90 (ptxas -v,
    triton 3.6, fp16 and TF32), 64 x 128 none, so 64 pixels it is.
    """
    if elem_bytes >= 8:  # fp64, for gradchecks in the interpreter only
        return 32, 32, 16, 4
    block_n = 32 if n <= 32 else 64 if n <= 64 else 128
    return 64, block_n, 64 if elem_bytes <= 2 else 32, 4


def fwd_block_k(flat: bool, block_k: int, elem_bytes: int) -> int:
    """The forward's reduction depth: pick_blocks' BLOCK_K, or FLAT_BLOCK_K for a flattened (c, r, s) reduction in
    16/32-bit types (fp64 keeps its 16, the depth of its fp64 dot)."""
    return FLAT_BLOCK_K if flat and elem_bytes < 8 else block_k


def all_blocks(elem_bytes: int) -> list[tuple[int, int, int, int]]:
    """Every result pick_blocks can give for this element size."""
    return sorted({pick_blocks(n, elem_bytes) for n in (1, 33, 65)})


def wgrad_blocks(elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M output channels, BLOCK_N of (c, r, s), BLOCK_K pixels, num_warps) of the weight-gradient GEMM."""
    if elem_bytes >= 8:
        return 32, 32, 16, 4
    return 64, 64, 64 if elem_bytes <= 2 else 32, 4


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    # "upcast" exists for the CPU interpreter only, whose tl.dot on bf16 operands is wrong (it has no bf16 math):
    # bf16 x bf16 products are exact in fp32, so an fp32 dot of the upcast tiles gives what tensor cores give.
    # out_dtype: triton 3.6 asserts that the accumulator has the dot's out_dtype, which defaults to fp32 even for
    # the fp64 (gradcheck) variants; 3.8 infers it.
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, C_G, H, W, K_G, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    w_sk, w_sc, w_sr, w_ss,
    y_sn, y_sc, y_sh, y_sw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R, S, relu,
    FLAT_K: tl.constexpr, ACC: tl.constexpr, INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(2)
    m = tl.program_id(0).to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    k_ok = kk < K_G
    ow = m % OW
    oh = (m // OW) % OH
    n = m // (tl.cast(OW, INDEX) * OH)  # tl.cast: OW may be a constexpr 1
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_base = x_ptr + n * x_sn + (group * C_G).to(INDEX) * x_sc
    w_base = w_ptr + (group * K_G + kk) * w_sk

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if FLAT_K:
        for j0 in range(0, C_G * R * S, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            j_ok = j < C_G * R * S
            c = j // (R * S)
            r = (j // S) % R
            s = j % S
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_ok = m_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_base[:, None] + c.to(INDEX)[None, :] * x_sc + ih * x_sh + iw * x_sw, mask=a_ok, other=0.0)
            b_off = (c * w_sc + r * w_sr + s * w_ss)[:, None]
            b = tl.load(w_base[None, :] + b_off, mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_PRECISION)
    else:
        # One loop over (tap, channel block), so that the software pipeliner overlaps loads across taps too (a
        # 3x3 layer of 256 channels is 36 steps, not 9 loops of 4).
        c_blocks = tl.cdiv(C_G, BLOCK_K)
        for t in range(R * S * c_blocks):
            rs = t // c_blocks
            r = rs // S
            s = rs - r * S
            c = (t - rs * c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            c_ok = c < C_G
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_row = x_base + ih * x_sh + iw * x_sw
            b_col = w_base + r * w_sr + s * w_ss
            a = tl.load(a_row[:, None] + c.to(INDEX)[None, :] * x_sc, mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_col[None, :] + (c * w_sc)[:, None], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, DOT_PRECISION)

    acc += tl.load(b_ptr + group * K_G + kk, mask=k_ok, other=0.0).to(ACC)[None, :]
    # not tl.maximum, which turns NaN into 0; torch.relu keeps NaN
    acc = tl.where((acc < 0.0) & relu, 0.0, acc)
    y_off = (n * y_sn + oh * y_sh + ow * y_sw)[:, None] + ((group * K_G + kk).to(INDEX) * y_sc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def _masked_grad(g_ptr, y_ptr, off, mask, relu):
    """The output gradient with the ReLU mask applied on load: 0 where the saved output is <= 0 (a NaN output
    passes its gradient, as PyTorch's threshold_backward does). g and y share one layout, so one offset tile.
    relu is a run-time bool (one compiled kernel for convs with and without the ReLU); without it the y load is
    masked off entirely, so no y is read."""
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    y = tl.load(y_ptr + off, mask=mask & relu, other=0.0)
    return tl.where((y <= 0) & relu, tl.zeros_like(g), g)


@triton.jit
def conv_dgrad_kernel(
    g_ptr, y_ptr, w_ptr, dx_ptr,
    M, C_G, H, W, K_G, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    w_sk, w_sc, w_sr, w_ss,
    dx_sn, dx_sc, dx_sh, dx_sw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R, S, relu, ACC: tl.constexpr, INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(2)
    m = tl.program_id(0).to(INDEX) * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels (n, ih, iw)
    cc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # the group's input channels
    m_ok = m < M
    c_ok = cc < C_G
    iw = m % W
    ih = (m // W) % H
    n = m // (tl.cast(W, INDEX) * H)
    w_base = w_ptr + group * K_G * w_sk + cc * w_sc

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    k_blocks = tl.cdiv(K_G, BLOCK_K)
    for t in range(R * S * k_blocks):  # (tap, output-channel block) flattened, as in the forward
        rs = t // k_blocks
        r = rs // S
        s = rs - r * S
        k = (t - rs * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < K_G
        oh_num = ih + pad_h - r * dil_h
        ow_num = iw + pad_w - s * dil_w
        # An input pixel gets this tap only where the output coordinate is a whole, in-range number.
        oh = tl.where(oh_num >= 0, oh_num, 0) // stride_h
        ow = tl.where(ow_num >= 0, ow_num, 0) // stride_w
        pix_ok = m_ok & (oh_num >= 0) & (ow_num >= 0) & (oh * stride_h == oh_num) & (ow * stride_w == ow_num)
        pix_ok = pix_ok & (oh < OH) & (ow < OW)
        g_row = n * g_sn + (group * K_G).to(INDEX) * g_sc + oh * g_sh + ow * g_sw
        b_col = w_base + r * w_sr + s * w_ss
        a_ok = pix_ok[:, None] & k_ok[None, :]
        a = _masked_grad(g_ptr, y_ptr, g_row[:, None] + (k.to(INDEX) * g_sc)[None, :], a_ok, relu)
        b = tl.load(b_col[None, :] + (k * w_sk)[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION)

    dx_off = (n * dx_sn + ih * dx_sh + iw * dx_sw)[:, None] + ((group * C_G + cc).to(INDEX) * dx_sc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def conv_wgrad_kernel(
    g_ptr, y_ptr, x_ptr, dw_ptr, db_ptr,
    M, C_G, H, W, K_G, OH, OW, G, PIX_PER_SPLIT,
    g_sn, g_sc, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R, S, relu, has_bias, ACC: tl.constexpr, INDEX: tl.constexpr,
    FLAT_J: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Grid (output-channel blocks, j blocks, SPLIT * G). Writes this split's partial sums to the ACC workspaces
    dw: SPLIT x G x K_G x J and db: SPLIT x G x K_G. With FLAT_J, j = (c, r, s) (the weight's own layout, no
    padding for few channels); otherwise j = (r, s, c) and each program's columns are one tap's block of
    channels (grid axis 1: R * S * channel blocks), contiguous in memory when x is channels_last."""
    pid_j = tl.program_id(1)
    group = tl.program_id(2) % G
    split = tl.program_id(2) // G
    k = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = k < K_G
    J = C_G * R * S
    if FLAT_J:
        j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = j < J
        c = j // (R * S)
        r = (j // S) % R
        s = j % S
    else:
        c_blocks = tl.cdiv(C_G, BLOCK_N)
        rs = pid_j // c_blocks
        c = (pid_j - rs * c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = c < C_G
        j = rs * C_G + c
        r = tl.zeros([BLOCK_N], tl.int32) + rs // S
        s = tl.zeros([BLOCK_N], tl.int32) + rs % S
    x_chan = (group * C_G + c).to(INDEX) * x_sc
    g_chan = (group * K_G + k).to(INDEX) * g_sc
    p_start = split.to(INDEX) * PIX_PER_SPLIT
    p_stop = tl.minimum(p_start + PIX_PER_SPLIT, M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # The bias gradient (row sums of the masked dy) is summed element-wise here and across pixels once after the
    # loop, by the programs of column block 0 only: a row sum per step put 20 warp shuffles, shared-memory stores
    # and a barrier in every iteration of every program (sm_90 PTX, triton 3.6), and the kernel was
    # shared-memory bound (Nsight Compute, H200: 979 us for conv3_2, 37 TFLOP/s).
    bias_acc = tl.zeros([BLOCK_M, BLOCK_K], ACC)
    # A run-time condition either way (only column block 0 sums the bias), so has_bias is a run-time bool too.
    with_bias = has_bias & (pid_j == 0)
    for p0 in range(p_start, p_stop, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_stop
        ow = p % OW
        oh = (p // OW) % OH
        n = p // (tl.cast(OW, INDEX) * OH)
        a_ok = k_ok[:, None] & p_ok[None, :]
        a = _masked_grad(g_ptr, y_ptr, g_chan[:, None] + (n * g_sn + oh * g_sh + ow * g_sw)[None, :], a_ok, relu)
        ih = (oh * stride_h - pad_h)[:, None] + (r * dil_h)[None, :]
        iw = (ow * stride_w - pad_w)[:, None] + (s * dil_w)[None, :]
        b_ok = p_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b_off = (n * x_sn)[:, None] + x_chan[None, :] + ih * x_sh + iw * x_sw
        b = tl.load(x_ptr + b_off, mask=b_ok, other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION)
        if with_bias:
            bias_acc += a.to(ACC)
    row = (split * G + group).to(tl.int64) * K_G + k
    tl.store(dw_ptr + row[:, None] * J + j[None, :], acc, mask=k_ok[:, None] & j_ok[None, :])
    if with_bias:
        tl.store(db_ptr + row, tl.sum(bias_acc, axis=1), mask=k_ok)


def _signature(pointers: dict[str, str], *stride_groups: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
    i = "i32"
    sig = dict(pointers)
    sig.update(dict.fromkeys(("M", "C_G", "H", "W", "K_G", "OH", "OW", *extra), i))
    for prefix in stride_groups:
        axes = ("k", "c", "r", "s") if prefix == "w" else ("n", "c", "h", "w")
        sig.update({f"{prefix}_s{a}": i for a in axes})
    sig.update(dict.fromkeys(("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "R", "S"), i))
    sig["relu"] = "u1"  # a bool argument: Triton neither specializes it nor compiles a kernel per value
    return sig


def launch_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers in fcnkern.conv_relu can produce on a GPU:
    fp32 (IEEE and TF32), fp16, bf16 and fp64 (the gradchecks'); every block shape of pick_blocks / wgrad_blocks;
    flat and per-tap forward and wgrad. Kernel sizes and the ReLU and bias switches are run-time arguments. Used to
    prove that they all compile for each architecture (fcnkern.kernels.compile_check)."""
    import triton.language as tl

    for ty, elem in (("fp32", 4), ("fp16", 2), ("bf16", 2), ("fp64", 8)):
        ptr = f"*{ty}"
        acc_ty, acc = ("*fp64", tl.float64) if ty == "fp64" else ("*fp32", tl.float32)
        fwd_sig = _signature({"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr}, "x", "w", "y")
        dgrad_sig = _signature({"g_ptr": ptr, "y_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr}, "g", "w", "dx")
        wgrad_sig = _signature(
            {"g_ptr": ptr, "y_ptr": ptr, "x_ptr": ptr, "dw_ptr": acc_ty, "db_ptr": acc_ty}, "g", "x",
            extra=("G", "PIX_PER_SPLIT"),
        )  # fmt: skip
        wgrad_sig["has_bias"] = "u1"
        for precision in ("ieee", "tf32") if ty == "fp32" else ("ieee",):
            base = {"ACC": acc, "DOT_PRECISION": precision}
            tag = f"{ty}_{precision}"
            # The 64-bit index plan (tensors past 2**31 elements) with the widest tiles only: the same code
            # with wider integers, checked where register pressure is highest.
            widest = max(all_blocks(elem))
            for bm, bn, bk, warps in all_blocks(elem):
                blocks = {"BLOCK_M": bm, "BLOCK_N": bn}
                for index in (tl.int32, tl.int64) if (bm, bn, bk, warps) == widest else (tl.int32,):
                    bits = 32 if index == tl.int32 else 64
                    for flat in (False, True):
                        depth = fwd_block_k(flat, bk, elem)
                        consts = {**base, **blocks, "FLAT_K": flat, "BLOCK_K": depth, "INDEX": index}
                        name = f"conv_fwd_{tag}_{bm}x{bn}x{depth}_flat{int(flat)}_i{bits}"
                        yield name, conv_fwd_kernel, fwd_sig, consts, warps
                    consts = {**base, **blocks, "BLOCK_K": bk, "INDEX": index}
                    yield f"conv_dgrad_{tag}_{bm}x{bn}x{bk}_i{bits}", conv_dgrad_kernel, dgrad_sig, consts, warps
            bm, bn, bk, warps = wgrad_blocks(elem)
            for flat in (False, True):
                for index in (tl.int32, tl.int64):
                    consts = {**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "FLAT_J": flat, "INDEX": index}
                    bits = 32 if index == tl.int32 else 64
                    name = f"conv_wgrad_{tag}_{bm}x{bn}x{bk}_flat{int(flat)}_i{bits}"
                    yield name, conv_wgrad_kernel, wgrad_sig, consts, warps
